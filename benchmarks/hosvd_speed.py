"""HOSVD by mode-Gram eigendecomposition (ours) vs a full SVD per mode (the reference formulation).

    .venv/bin/python benchmarks/hosvd_speed.py [--shape 64 576 7 7] [--eps 0.8] [--repeats 7]

Both are run side by side in one process on the same activation (ReLU6 of a
Gaussian tensor with a decaying channel spectrum, so ranks are data-like, not
flat).  Prints medians with the spread (min-max) and writes JSON + Markdown to
benchmarks/results/.  Also times one vanilla conv step (forward + weight and
input gradient) of a 1x1 conv on the same tensor, for scale, when torch is there.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np

from actcomp_edge.core.decomposition import hosvd, project_core, rank_for_energy, unfold


def hosvd_full_svd(activation: np.ndarray, eps: float):
    """Reference formulation: a full (thin) SVD of every mode unfolding."""
    factors = []
    for mode in range(activation.ndim):
        u, s, _ = np.linalg.svd(unfold(activation, mode), full_matrices=False)
        k = rank_for_energy((s.astype(np.float64)) ** 2, eps)
        factors.append(u[:, :k])
    return project_core(activation, factors), factors


def hosvd_full_svd_torch(activation, eps: float):
    import torch
    a = torch.from_numpy(activation)
    factors = []
    for mode in range(a.ndim):
        m = a.movedim(mode, 0).reshape(a.shape[mode], -1)
        u, s, _ = torch.linalg.svd(m, full_matrices=False)
        k = rank_for_energy((s.double() ** 2).numpy(), eps)
        factors.append(u[:, :k].numpy())
    return project_core(activation, factors), factors


def timed(fn, repeats: int) -> dict:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_ms": 1e3 * float(np.median(times)), "min_ms": 1e3 * min(times),
            "max_ms": 1e3 * max(times), "repeats": repeats}


def synthetic_activation(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    b, c, h, w = shape
    mixing = rng.standard_normal((c, c)) * (0.85 ** np.arange(c))[None, :]
    x = np.einsum("bchw,dc->bdhw", rng.standard_normal(shape), mixing) + 0.5
    return np.clip(x, 0, 6).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[64, 576, 7, 7])
    parser.add_argument("--eps", type=float, default=0.8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    a = synthetic_activation(tuple(args.shape))
    ours = hosvd(a, eps=args.eps)
    ref_core, _ = hosvd_full_svd(a, args.eps)
    assert ours.rank_per_mode == ref_core.shape, (ours.rank_per_mode, ref_core.shape)
    rows = {"hosvd (Gram + eigh, ours)": timed(lambda: hosvd(a, eps=args.eps), args.repeats),
            "hosvd (full SVD per mode, numpy)": timed(lambda: hosvd_full_svd(a, args.eps),
                                                      args.repeats)}
    try:
        import torch
        torch.set_num_threads(max(1, torch.get_num_threads()))
        rows["hosvd (full SVD per mode, torch)"] = timed(
            lambda: hosvd_full_svd_torch(a, args.eps), args.repeats)
        x = torch.from_numpy(a)
        conv = torch.nn.Conv2d(args.shape[1], args.shape[1], 1)

        def vanilla_step():
            xi = x.clone().requires_grad_(True)
            conv(xi).square().mean().backward()
        rows["vanilla 1x1 conv step (torch, fwd+bwd)"] = timed(vanilla_step, args.repeats)
    except ImportError:
        pass
    base = rows["hosvd (Gram + eigh, ours)"]["median_ms"]
    result = {"date": date.today().isoformat(), "machine": platform.machine(),
              "numpy": np.__version__, "shape": args.shape, "eps": args.eps,
              "ranks": list(ours.rank_per_mode), "rows": rows,
              "command": "benchmarks/hosvd_speed.py " + " ".join(
                  ["--shape", *map(str, args.shape), "--eps", str(args.eps),
                   "--repeats", str(args.repeats)])}
    lines = [f"HOSVD of a {tuple(args.shape)} activation, eps={args.eps}, ranks "
             f"{ours.rank_per_mode} ({result['date']}, {result['machine']})", "",
             "| variant | median ms | min-max ms | x ours |", "|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['median_ms']:.1f} | {r['min_ms']:.1f}-{r['max_ms']:.1f} | "
                     f"{r['median_ms'] / base:.2f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hosvd_speed.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "hosvd_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
