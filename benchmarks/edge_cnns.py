"""Today's edge CNNs as a user brings them (tests/edge_models.py at width 1: MobileNetV3-Small,
EfficientNet-B0, RegNetY-200MF, ShuffleNetV2 1.0x), through the CLIs: `actcomp export
--model FILE.py:FUNCTION`, then `actcomp-device train`, each job a fresh process.

    .venv/bin/python benchmarks/edge_cnns.py [--layers 4,all] [--repeats 2] [--steps 10]

Random 10-class images (seeded; no ../shared needed), batch 16, 128 px, 2 threads, vanilla
and HOSVD eps 0.8; --layers all fine-tunes every conv. The jobs round-robin, --repeats
rounds; each figure the median over rounds (min-max). Writes edge_cnns.{json,md} to
benchmarks/results.
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
sys.path.insert(0, str(REPO))

from benchmarks import spread, write_results  # noqa: E402
from benchmarks.deep_finetune import BIN, call  # noqa: E402

MODELS = {"MobileNetV3-Small": "MobileNetV3Small", "EfficientNet-B0": "EfficientNetB0",
          "RegNetY-200MF": "RegNetY", "ShuffleNetV2 1.0x": "ShuffleNetV2"}
METHODS = {"vanilla": [], "hosvd": ["--eps", "0.8"]}
BATCH, SIZE, CLASSES, THREADS = 16, 128, 10, 2
MIB = 2 ** 20
MODEL_FILE = """import sys
sys.path.insert(0, {tests!r})
import edge_models
""" + "".join(f"\n\ndef {cls}():\n    return edge_models.{cls}(num_classes={CLASSES})\n"
              for cls in MODELS.values())


def n_convs(cls: str) -> int:
    sys.path.insert(0, str(REPO / "tests"))
    import torch
    import edge_models
    return sum(isinstance(m, torch.nn.Conv2d) for m in getattr(edge_models, cls)().modules())


def train_job(art: Path, run_dir: Path, data: Path, steps: int) -> dict:
    """One `actcomp-device train` process; its --summary."""
    summary = run_dir.with_suffix(".summary.json")
    call([str(BIN / "actcomp-device"), "train", str(art), "--data", str(data), "--val-data",
          str(data), "--max-steps", str(steps), "--no-augment", "--threads", str(THREADS),
          "--out", str(run_dir), "--summary", str(summary)])
    return json.loads(summary.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="4,all")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--work", default="out/edge_cnns")
    args = parser.parse_args()
    work = (REPO / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "edge.py").write_text(MODEL_FILE.format(tests=str(REPO / "tests")))
    rng = np.random.default_rng(0)
    data = work / "data.npz"
    np.savez(data, images=rng.integers(0, 256, (BATCH * args.steps, SIZE, SIZE, 3), np.uint8),
             labels=rng.integers(0, CLASSES, BATCH * args.steps))
    started, jobs = time.time(), []
    for name, cls in MODELS.items():
        for layers in args.layers.split(","):
            n = n_convs(cls) if layers == "all" else int(layers)
            for method, flags in METHODS.items():
                art = work / f"art-{cls}-{n}-{method}"
                call([str(BIN / "actcomp"), "export", "--force", "--model",
                      f"{work / 'edge.py'}:{cls}", "--layers", str(n), "--method", method,
                      *flags, "--batch-size", str(BATCH), "--input-size", str(SIZE), "-o",
                      str(art)])
                jobs.append((name, n, method, art))
    runs = {}
    for rep in range(args.repeats):
        for name, n, method, art in jobs[rep % len(jobs):] + jobs[:rep % len(jobs)]:
            s = train_job(art, work / f"run-{art.name}", data, args.steps)
            runs.setdefault((name, n, method), []).append({
                "step_ms": 1e3 * s["median_step_seconds"],
                "working_set_mib": s["working_set_bytes"] / MIB,
                "predicted_mib": s["predicted_working_set_bytes"] / MIB,
                "peak_rss_mib": s["peak_rss_bytes"] / MIB})
            print(f"[{time.time() - started:5.0f} s] {name} N={n} {method}: "
                  f"{json.dumps(runs[name, n, method][-1])}", flush=True)
    rows = [{"model": name, "layers": n, "method": method,
             **{k: spread([r[k] for r in rs]) for k in rs[0]}}
            for (name, n, method), rs in runs.items()]
    command = (f".venv/bin/python benchmarks/edge_cnns.py --layers {args.layers} --repeats "
               f"{args.repeats} --steps {args.steps}")
    meta = {"date": str(date.today()), "command": command,
            "runtime_seconds": time.time() - started}
    lines = ["# Edge CNNs through the CLIs (tests/edge_models.py, width 1)", "",
             f"{meta['date']}; random images, batch {BATCH}, {SIZE} px, {THREADS} threads, HOSVD "
             f"eps 0.8, {args.steps} steps a job, {args.repeats} rounds: median (min-max).", "",
             f"Command: `{command}`", "",
             "| model | N | method | step ms | steps' working set MiB | predicted MiB | "
             "peak RSS MiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[k]['median']:.1f} ({r[k]['min']:.1f}-{r[k]['max']:.1f})"
                 for k in ("step_ms", "working_set_mib", "predicted_mib", "peak_rss_mib")]
        lines.append(f"| {r['model']} | {r['layers']} | {r['method']} | " + " | ".join(cells)
                     + " |")
    write_results("edge_cnns", {"meta": meta, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
