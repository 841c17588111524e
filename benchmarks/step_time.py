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


def plain_torch(model, n_layers):
    """PyTorch eager with nn.Conv2d (no reference wrappers): the fair vanilla baseline."""
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
    ref.eval()  # frozen BN
    opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.001,
                          momentum=0.9)

    def step(images, labels):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ref(images), labels).backward()
        opt.step()
    return step


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
        timed = {k: [] for k in list(runners) + ["torch eager vanilla"]}
        splits = {k: [] for k in runners}
        ranks = {}
        eager = plain_torch(model, args.layers)
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
            t0 = time.perf_counter()
            eager(timg, tlab)
            if r >= 2:
                timed["torch eager vanilla"].append(time.perf_counter() - t0)
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
