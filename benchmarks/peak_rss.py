"""Whole-process peak RSS of a fine-tuning job: the device runner vs PyTorch eager.

    .venv/bin/python benchmarks/peak_rss.py [--model mcunet-in1] [--layers 4] [--batch-size 32]
        [--input-size 128] [--eps 0.8] [--steps 10]

Each job runs in its own fresh process, one after the other, on the same images (ants/bees
from ../shared when present, else generated): the runner (`actcomp-device train`, artifacts
vanilla and HOSVD eps) and PyTorch eager (same layers fine-tuned, frozen BN, SGD momentum).
Reports peak RSS (VmHWM), the baseline before the first step (interpreter, libraries,
model) and their difference (the training working set). Writes benchmarks/results/peak_rss.*
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

TORCH_JOB = r"""
import json, sys, numpy as np, torch, torch.nn.functional as F
sys.path.insert(0, {repo!r})
from benchmarks.step_time import load_model, load_images, plain_torch
from device_runner import procmem
torch.set_num_threads(2)
model, _ = load_model({model!r})
images, labels, _ = load_images({batch}, {size}, model.spec)
step = plain_torch(model, {layers})
x, y = torch.from_numpy(images), torch.from_numpy(labels)
baseline = procmem.rss_bytes()
procmem.reset_peak()
for _ in range({steps}):
    step(x, y)
print(json.dumps({{"peak_rss_bytes": procmem.peak_rss_bytes(), "baseline_rss_bytes": baseline}}))
"""


def vmhwm_of(cmd) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mcunet-in1")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--eps", type=float, default=0.8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    real = SHARED / "weights" / "tt_mcunet-5fps_int8dq"
    model_args = (["--model", str(real.with_suffix(".json")), "--weights", str(real.with_suffix(".npz"))]
                  if args.model == "mcunet-in1" and real.with_suffix(".json").exists()
                  else ["--model", args.model])
    data = SHARED / "data" / "hymenoptera_train.npz"
    if not data.exists():
        import numpy as np
        rng = np.random.default_rng(0)
        data = tmp / "data.npz"
        np.savez(data, images=rng.integers(0, 255, (64, args.input_size, args.input_size, 3),
                                           dtype=np.uint8), labels=rng.integers(0, 2, 64))
    rows = {}
    for method in ("vanilla", "hosvd"):
        art = tmp / method
        vmhwm_of([sys.executable, "-m", "actcomp_edge.cli", "export", *model_args,
                  "--num-classes", "2", "--layers", str(args.layers), "--method", method,
                  *(["--eps", str(args.eps)] if method == "hosvd" else []),
                  "--batch-size", str(args.batch_size), "--input-size", str(args.input_size),
                  "-o", str(art)])
        summary = tmp / f"{method}.json"
        vmhwm_of([sys.executable, "-m", "device_runner.cli", "train", str(art), "--data", str(data),
                  "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
                  "--lr", "0.001", "--threads", "2", "--checkpoint-every", "1000",
                  "--out", str(tmp / f"run-{method}"), "--summary", str(summary)])
        s = json.loads(summary.read_text())
        rows[f"runner {method}"] = {"peak_rss_bytes": s["peak_rss_bytes"],
                                    "baseline_rss_bytes": s["baseline_rss_bytes"]}
    job = TORCH_JOB.format(repo=str(REPO), model=args.model, batch=args.batch_size,
                           size=args.input_size, layers=args.layers, steps=args.steps)
    out = vmhwm_of([sys.executable, "-c", job]).stdout.strip().splitlines()[-1]
    rows["torch eager vanilla"] = json.loads(out)
    mib = 2 ** 20
    lines = [f"Peak RSS, {args.model} last {args.layers} convs, batch {args.batch_size}, "
             f"{args.input_size} px, {args.steps} steps, each job a fresh process "
             f"({date.today().isoformat()})", "",
             "| job | peak RSS MiB | baseline MiB | working set MiB | peak / torch eager |",
             "|---|---|---|---|---|"]
    torch_peak = rows["torch eager vanilla"]["peak_rss_bytes"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['peak_rss_bytes'] / mib:.1f} | "
                     f"{r['baseline_rss_bytes'] / mib:.1f} | "
                     f"{(r['peak_rss_bytes'] - r['baseline_rss_bytes']) / mib:.1f} | "
                     f"{r['peak_rss_bytes'] / torch_peak:.2f} |")
    result = {"date": date.today().isoformat(), "args": vars(args), "rows": rows,
              "command": "benchmarks/peak_rss.py " + " ".join(sys.argv[1:])}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "peak_rss.json").write_text(json.dumps(result, indent=1) + "\n")
    (Path(args.out) / "peak_rss.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
