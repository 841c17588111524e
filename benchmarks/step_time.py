"""Training-step time: the device runner (artifact on onnxruntime + numpy) vs PyTorch eager.

    .venv/bin/python benchmarks/step_time.py [--models mcunet-in1 mobilenet_v2] [--layers 4]
        [--batch-size 32] [--input-size 128] [--eps 0.8] [--repeats 15] [--threads 2]

For each model: export artifacts (vanilla, hosvd eps, hosvd-tracked, gf-r2), then time
the runner's step and a PyTorch eager step of the same fine-tuning (last N convs + classifier,
SGD momentum, frozen BN), interleaved round-robin in one process so machine noise hits all
alike. mcunet-in1 uses the real tiny-training weights and ants/bees images from ../shared
when present (real activations -> real ranks); otherwise random weights and smooth random
images (said in the output). Reports medians, min-max, ratios and the runner's time split.
Writes benchmarks/results/step_time.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import onnxruntime
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from device_runner.runtime import Trainer  # noqa: E402
from export import zoo  # noqa: E402
from export.artifact import export_artifact  # noqa: E402
from export.training_graph import TrainConfig  # noqa: E402

REAL = {"mcunet-in1": "tt_mcunet-5fps_int8dq", "mbv2-w0.35": "tt_mbv2-w0.35_int8dq",
        "proxyless-w0.3": "tt_proxyless-w0.3_int8dq"}


def load_model(name: str):
    real = REAL.get(name)
    if real and (SHARED / "weights" / f"{real}.json").exists():
        spec_path = SHARED / "weights" / f"{real}.json"
        model = zoo.build_from_name(str(spec_path), 2, SHARED / "weights" / f"{real}.npz")
        return model, f"{real} (pretrained, ../shared)"
    torch.manual_seed(0)
    return zoo.build_model(zoo.load_spec(name, 2)), "random init"


def load_images(batch: int, size: int, spec: dict):
    path = SHARED / "data" / "hymenoptera_train.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as d:
            images, labels = d["images"][:batch], d["labels"][:batch]
        return zoo.preprocess(images, spec, size).numpy(), labels.astype(np.int64), "ants/bees"
    rng = np.random.default_rng(0)
    low = rng.standard_normal((batch, 3, size // 16 + 1, size // 16 + 1))
    x = np.kron(low, np.ones((1, 1, 16, 16)))[:, :, :size, :size].astype(np.float32)
    return x, rng.integers(0, 2, batch).astype(np.int64), "synthetic"


class FullSvdHosvdConv2d(torch.autograd.Function):
    """The paper's formulation in PyTorch eager: a full SVD of every mode unfolding
    (torch.linalg.svd), eps ranks, core by mode products; the weight gradient in the
    low-rank space (export.reference.hosvd_weight_grad); dX from W and dY."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, groups, eps):
        factors = []
        with torch.no_grad():
            for mode in range(4):
                unfolded = x.movedim(mode, 0).reshape(x.shape[mode], -1)
                u, s, _ = torch.linalg.svd(unfolded, full_matrices=False)
                energy = torch.cumsum(s.double() ** 2, 0)
                k = int(torch.searchsorted(energy, eps * energy[-1] * (1 - 1e-9))) + 1
                factors.append(u[:, :k].contiguous())
            core = x
            for mode, u in enumerate(factors):
                core = torch.movedim(torch.movedim(core, mode, -1) @ u, -1, mode)
        ctx.save_for_backward(core, *factors, weight)
        ctx.conf = (x.shape, stride, padding, groups)
        return F.conv2d(x, weight, bias, stride, padding, 1, groups)

    @staticmethod
    def backward(ctx, grad_y):
        from export.reference import hosvd_weight_grad
        core, *factors, weight = ctx.saved_tensors
        shape, stride, padding, groups = ctx.conf
        grad_w = hosvd_weight_grad(core, factors, grad_y, weight.shape, stride, padding, (1, 1),
                                   groups)
        grad_x = (torch.nn.grad.conv2d_input(shape, weight, grad_y, stride, padding, 1, groups)
                  if ctx.needs_input_grad[0] else None)
        grad_b = grad_y.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None


class FullSvdHosvdConv(torch.nn.Module):
    def __init__(self, conv: torch.nn.Conv2d, eps: float):
        super().__init__()
        self.conv, self.eps = conv, eps

    def forward(self, x):
        c = self.conv
        return FullSvdHosvdConv2d.apply(x, c.weight, c.bias, c.stride, c.padding, c.groups,
                                        self.eps)


def plain_torch(model, n_layers, full_svd_eps=None):
    """PyTorch eager with nn.Conv2d (no reference wrappers): the fair vanilla baseline;
    with full_svd_eps, the fine-tuned convs use the full-SVD-per-mode HOSVD instead."""
    ref = copy.deepcopy(model)
    convs = [m for m in ref.modules() if isinstance(m, torch.nn.Conv2d)]
    for p in ref.parameters():
        p.requires_grad_(False)
    first = convs[-n_layers]
    trainable = convs[-n_layers:]
    seen = False
    for m in ref.modules():
        seen = seen or m is first
        if (m in trainable) or (seen and isinstance(m, torch.nn.Linear)):
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)
    for m in ref.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    if full_svd_eps is not None:  # the reference formulation of HOSVD, eager
        parents = dict(ref.named_modules())
        for name, m in list(ref.named_modules()):
            if any(m is c for c in trainable):
                parent_name, _, attr = name.rpartition(".")
                setattr(parents[parent_name] if parent_name else ref, attr,
                        FullSvdHosvdConv(m, full_svd_eps))
    ref.eval()  # frozen BN
    opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.001,
                          momentum=0.9)

    def step(images, labels):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ref(images), labels).backward()
        opt.step()
    return step


def start_ort_training(artifact, images, labels, tmp):
    """The onnxruntime-training step server in its own venv, or None (said) if absent."""
    import subprocess
    python = REPO / ".venv-ort-training" / "bin" / "python"
    if not python.exists():
        print(f"note: {python} is absent (`make test` creates it): no onnxruntime-training row")
        return None
    batch = tmp / "ort_training_batch.npz"
    np.savez(batch, images=images, labels=labels)
    server = subprocess.Popen([str(python), str(REPO / "benchmarks" / "scripts" /
                                                "ort_training_step_server.py"),
                               str(artifact), str(batch), str(tmp / "ort_training")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              stderr=subprocess.DEVNULL)
    if server.stdout.readline().strip() != "ready":
        print("note: onnxruntime-training could not build its artifacts: no row")
        return None
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mcunet-in1", "mobilenet_v2"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--eps", type=float, default=0.8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = {"date": date.today().isoformat(), "machine": platform.machine(),
               "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
               "command": "benchmarks/step_time.py " + " ".join(sys.argv[1:]), "models": {}}
    lines = [f"Training-step time, last {args.layers} convs + classifier, batch "
             f"{args.batch_size}, {args.input_size} px, SGD momentum, {args.threads} threads "
             f"({results['date']}, {results['machine']}, onnxruntime {onnxruntime.__version__},"
             f" torch {torch.__version__}); median of {args.repeats} interleaved rounds", ""]
    for name in args.models:
        model, weights = load_model(name)
        spec = model.spec
        images, labels, data = load_images(args.batch_size, args.input_size, spec)
        arrays = zoo.model_arrays(model, spec)
        runners = {}
        tmp = Path(tempfile.mkdtemp())
        for method, eps in (("vanilla", None), ("hosvd", args.eps), ("hosvd-tracked", args.eps),
                            ("gf-r2", None)):
            config = TrainConfig(n_layers=args.layers, method=method, eps=eps)
            export_artifact(spec, arrays, tmp / method, config, args.batch_size,
                            args.input_size)
            runners[f"runner {method}"] = Trainer(tmp / method, threads=args.threads)
        eager_variants = {"torch eager vanilla": plain_torch(model, args.layers),
                          f"torch eager HOSVD full SVD per mode (eps {args.eps})":
                              plain_torch(model, args.layers, full_svd_eps=args.eps)}
        server = start_ort_training(tmp / "vanilla", images, labels, tmp)
        timed = {k: [] for k in list(runners) + list(eager_variants)
                 + (["onnxruntime-training 1.19.2 vanilla (SGD)"] if server else [])}
        splits = {k: [] for k in runners}
        ranks = {}
        timg, tlab = torch.from_numpy(images), torch.from_numpy(labels)
        for r in range(args.repeats + 2):  # 2 warm-up rounds
            for key, runner in runners.items():
                t0 = time.perf_counter()
                result = runner.step(images, labels, lr=0.001)
                elapsed = time.perf_counter() - t0
                if r >= 2:
                    timed[key].append(elapsed)
                    splits[key].append(result.seconds)
                    ranks[key] = {k: list(v) if v else None for k, v in result.ranks.items()}
            for key, eager in eager_variants.items():
                t0 = time.perf_counter()
                eager(timg, tlab)
                if r >= 2:
                    timed[key].append(time.perf_counter() - t0)
            if server:
                server.stdin.write("step\n")
                server.stdin.flush()
                elapsed = float(server.stdout.readline())
                if r >= 2:
                    timed["onnxruntime-training 1.19.2 vanilla (SGD)"].append(elapsed)
        if server:
            server.stdin.write("quit\n")
            server.stdin.flush()
            server.wait(30)
        base = float(np.median(timed["runner vanilla"]))
        eager_median = float(np.median(timed["torch eager vanilla"]))
        rows = {}
        for key, ts in timed.items():
            rows[key] = {"median_ms": 1e3 * float(np.median(ts)), "min_ms": 1e3 * min(ts),
                         "max_ms": 1e3 * max(ts)}
            if key in splits:
                rows[key]["split_ms"] = {part: 1e3 * float(np.median([s[part] for s in splits[key]]))
                                         for part in splits[key][0]}
        results["models"][name] = {"weights": weights, "data": data, "rows": rows,
                                   "ranks": ranks}
        lines += [f"**{name}** ({weights}, {data} images)", "",
                  "| variant | median ms | min-max ms | / runner vanilla | / torch eager | "
                  "prefix / fwd / decomp / bwd ms |", "|---|---|---|---|---|---|"]
        for key, row in rows.items():
            split = row.get("split_ms")
            split_text = (" / ".join(f"{split[p]:.1f}" for p in ("prefix", "forward", "compress",
                                                                 "backward")) if split else "-")
            lines.append(f"| {key} | {row['median_ms']:.1f} | {row['min_ms']:.1f}-"
                         f"{row['max_ms']:.1f} | {row['median_ms'] / 1e3 / base:.2f} | "
                         f"{row['median_ms'] / 1e3 / eager_median:.2f} | {split_text} |")
        med = {k: r["median_ms"] for k, r in rows.items()}
        ortt = med.get("onnxruntime-training 1.19.2 vanilla (SGD)")
        targets = [
            ("runner HOSVD-eps / runner vanilla <= 1.25", med["runner hosvd"] / med["runner vanilla"],
             1.25),
            ("runner tracked HOSVD / runner vanilla <= 1.0",
             med["runner hosvd-tracked"] / med["runner vanilla"], 1.0),
            ("runner vanilla / torch eager vanilla <= 1.0",
             med["runner vanilla"] / med["torch eager vanilla"], 1.0)]
        if ortt:
            targets.append(("runner vanilla / onnxruntime-training vanilla <= 0.8",
                            med["runner vanilla"] / ortt, 0.8))
        results["models"][name]["targets"] = {t: {"ratio": v, "limit": lim, "met": v <= lim}
                                              for t, v, lim in targets}
        lines.append("")
        lines += [f"- {t}: {v:.2f} — {'met' if v <= lim else 'missed'}" for t, v, lim in targets]
        lines.append("")
        lines.append("HOSVD ranks (last step): " + json.dumps(ranks.get("runner hosvd")))
        lines.append("")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_time.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "step_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
