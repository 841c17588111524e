"""The low-rank weight gradient's forms (core/methods.hosvd_weight_grad) per fine-tuned conv:
mcunet-in1's pretrained weights from ../shared, ants/bees, batch 32, 128 px, HOSVD eps 0.8,
all 42 convs, 2 threads:

    .venv/bin/python benchmarks/scripts/backward_forms.py [--repeats 2] [--steps 3]

Exports the artifact three times, with the map-size thresholds as shipped, with both forms
off (ROWS_MAX_HW = KRON_MAX_HW = 0: the K2-channel form for grouped convs, U4 then U3 for
1x1 ones) and with both on everywhere; then, each in a fresh process, alternating, runs
--steps steps after a warm-up with onnxruntime's profiler and sums each layer's weight-gradient
kernel time (its backward nodes but dX and db). Prints ms a step per layer (median over
--repeats) and the totals; writes benchmarks/results/backward_forms.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
PYTHON = REPO / ".venv" / "bin" / "python"
VARIANTS = {"shipped": None, "neither (0, 0)": 0, "both everywhere": 10 ** 9}

EXPORT = r"""
import sys
from actcomp_edge.core import methods
if {limit!r} is not None:
    methods.ROWS_MAX_HW = methods.KRON_MAX_HW = {limit!r}
from actcomp_edge.host.cli import main
weights = {weights!r}
sys.exit(main(["export", "--model", weights + ".json", "--weights", weights + ".npz",
               "--num-classes", "2", "--layers", "42", "--method", "hosvd", "--eps", "0.8",
               "--batch-size", "32", "--input-size", "128", "--force", "-o", {out!r}]))
"""

PROFILE = r"""
import collections, json, tempfile
import numpy as np
from device_runner import data
from device_runner.runtime import Trainer
trainer = Trainer({art!r}, threads=2, profile_prefix=tempfile.mkdtemp() + "/")
images = data.load({train!r}, (128, 128))
for step in range({steps} + 1):
    x, y = images.batch(np.arange(step * 32, (step + 1) * 32) % len(images),
                        trainer.manifest.input.mean, trainer.manifest.input.std)
    trainer.step(x, y, 0.0)
per_layer = collections.Counter()
for path in trainer.end_profiling():
    for event in json.load(open(path)):
        name = event["name"]
        if event.get("cat") == "Node" and name.endswith("_kernel_time") and "/backward/" in name:
            layer, rest = name.split("/backward/", 1)
            if not rest.startswith(("dX", "db")):
                per_layer[layer] += event["dur"] / 1e3 / ({steps} + 1)
print(json.dumps(per_layer))
"""


def run(code: str, cwd: Path) -> str:
    return subprocess.run([str(PYTHON), "-c", code], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    weights = str(SHARED / "weights" / "tt_mcunet-5fps_int8dq")
    work = Path(tempfile.mkdtemp())
    for label, limit in VARIANTS.items():
        run(EXPORT.format(limit=limit, weights=weights, out=str(work / label)), REPO)
    runs = {label: [] for label in VARIANTS}
    for _ in range(args.repeats):
        for label in VARIANTS:
            runs[label].append(json.loads(run(PROFILE.format(
                art=str(work / label), steps=args.steps,
                train=str(SHARED / "data" / "hymenoptera_train.npz")), REPO).splitlines()[-1]))
    manifest = json.loads((work / "shipped" / "manifest.json").read_text())
    head = ["layer", "input (C, H, W)", "kind"] + [f"{label} ms" for label in VARIANTS]
    rows, totals = [], dict.fromkeys(VARIANTS, 0.0)
    for layer in manifest["trainable_layers"]:
        kind = ("1x1" if layer["kernel"] in (1, [1, 1]) else
                "grouped" if layer["groups"] > 1 else "dense")
        cells = []
        for label in VARIANTS:
            ms = statistics.median(r.get(layer["name"], 0.0) for r in runs[label])
            totals[label] += ms
            cells.append(f"{ms:.2f}")
        rows.append([layer["name"], str(tuple(layer["input_shape"])), kind] + cells)
    rows.append(["total", "", ""] + [f"{totals[label]:.1f}" for label in VARIANTS])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    text = "\n".join(
        [f"# Backward forms ({datetime.date.today()})", "",
         f"`.venv/bin/python benchmarks/scripts/backward_forms.py --repeats {args.repeats} "
         f"--steps {args.steps}`: weight-gradient kernel ms a step per fine-tuned conv "
         f"(onnxruntime's profiler, median of {args.repeats} fresh processes).", ""] + lines)
    print(text)
    (REPO / "benchmarks" / "results" / "backward_forms.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
