"""How close the compressed weight gradient is to the exact one, per dataset (issue 13's gap).

    .venv/bin/python benchmarks/gradient_fidelity.py            # ~10 s on 2 cores

The real tiny-training MCUNet-5fps (``../shared``), its last N convs fine-tuned as the
accuracy study does (a new classifier, seeded), on real batches of ants/bees and of the
CIFAR-10 subset (32 px -> 128 px), at the runner's normalisation and batch. For each batch
and fine-tuned conv: the PyTorch reference's weight gradient with the activation kept whole
(vanilla, exact) and with it compressed (HOSVD eps 0.8 / 0.9, SVD 0.8), then

    cosine   <g, g_exact> / (|g| |g_exact|)      the direction
    norm     |g| / |g_exact|                     the length (HOSVD projects: <= 1 in expectation)

as medians over batches, with the min-max. Writes ``benchmarks/results/gradient_fidelity.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

MODEL = "tt_mcunet-5fps_int8dq"
DATASETS = {"ants/bees": ("hymenoptera_train.npz", 2, 16),
            "CIFAR-10 subset": ("cifar10_subset_train.npz", 10, 32)}
METHODS = {"hosvd-0.8": ("hosvd", 0.8), "hosvd-0.9": ("hosvd", 0.9), "svd-0.8": ("svd", 0.8)}


def reference_model(spec_path: Path, weights: Path, classes: int, n: int, method: str, eps,
                    seed: int) -> tuple:
    """(model, names of its fine-tuned convs): the PyTorch reference, the classifier new
    (seeded: every method's starts the same)."""
    import torch
    from export import zoo
    from export.reference import compress_last_n
    torch.manual_seed(seed)
    model = zoo.build_from_name(str(spec_path), classes, weights)
    names = compress_last_n(model, n, method, eps=eps)
    return model.eval(), names


def conv_grads(model, names: list, x: np.ndarray, y: np.ndarray) -> dict:
    """{conv name: weight gradient} of one batch."""
    import torch
    import torch.nn.functional as F
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    return {name: model.get_submodule(name).weight.grad.detach().numpy().astype(np.float64)
            for name in names}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" /
                   "gradient_fidelity")
    args = p.parse_args(argv)
    spec, weights = SHARED / "weights" / f"{MODEL}.json", SHARED / "weights" / f"{MODEL}.npz"
    if not spec.exists():
        print(f"gradient_fidelity: needs the real weights in {SHARED / 'weights'}",
              file=sys.stderr)
        return 2
    import torch
    torch.set_num_threads(2)
    from actcomp_edge.core.arch import HALF_NORM
    from device_runner.data import load
    started, rows = time.perf_counter(), []
    for title, (file, classes, batch) in DATASETS.items():
        data = load(SHARED / "data" / file, (128, 128))
        order = np.random.default_rng(args.seed).permutation(len(data))
        models = {label: reference_model(spec, weights, classes, args.layers, method, eps,
                                         args.seed)
                  for label, (method, eps) in {"vanilla": ("vanilla", None), **METHODS}.items()}
        for b in range(args.batches):
            idx = order[b * batch:(b + 1) * batch]
            if len(idx) < batch:
                break
            x, y = data.batch(idx, HALF_NORM["mean"], HALF_NORM["std"])
            exact = conv_grads(*models["vanilla"], x, y)
            for label in METHODS:
                for name, g in conv_grads(*models[label], x, y).items():
                    e = exact[name]
                    rows.append({"dataset": title, "method": label, "layer": name, "batch": b,
                                 "cosine": float((g * e).sum() / np.linalg.norm(g)
                                                 / np.linalg.norm(e)),
                                 "norm": float(np.linalg.norm(g) / np.linalg.norm(e))})
    summary = []
    for title in DATASETS:
        for label in METHODS:
            for name in dict.fromkeys(r["layer"] for r in rows):
                sel = [r for r in rows if (r["dataset"], r["method"], r["layer"]) ==
                       (title, label, name)]
                if sel:
                    summary.append({"dataset": title, "method": label, "layer": name,
                                    **{k: [float(np.median([r[k] for r in sel])),
                                           min(r[k] for r in sel), max(r[k] for r in sel)]
                                       for k in ("cosine", "norm")}})
    command = ".venv/bin/python benchmarks/gradient_fidelity.py" + (
        " " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    result = {"date": date.today().isoformat(), "command": command.strip(),
              "seconds": time.perf_counter() - started, "model": MODEL,
              "layers": args.layers, "batches": args.batches, "summary": summary, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Compressed against exact weight gradients ({result['date']})", "",
             f"`{result['command']}` ({result['seconds']:.0f} s). {MODEL}, last "
             f"{args.layers} convs and a new classifier (seed {args.seed}), 128 px, "
             f"{args.batches} real batches per dataset (ants/bees 16, CIFAR-10 32 images), "
             f"the PyTorch reference. Median (min-max) over the batches.", "",
             "| dataset | method | layer | cosine | norm ratio |", "|---|---|---|---|---|"]
    for s in summary:
        c, n = s["cosine"], s["norm"]
        lines.append(f"| {s['dataset']} | {s['method']} | {s['layer']} | {c[0]:.3f} "
                     f"({c[1]:.3f}-{c[2]:.3f}) | {n[0]:.3f} ({n[1]:.3f}-{n[2]:.3f}) |")
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
