"""`make demo`: the main job end to end on a built-in default.

predict for a Raspberry Pi Zero 2 W profile -> export (mcunet-in1, last 4 convs, HOSVD
eps=0.8, batch 32, 128 px) -> `actcomp-device train` on the local runner, streaming profiles
over a pty pair (the serial cable) to `actcomp monitor` -> memory report -> `actcomp check`
-> `actcomp report` (plots + summary page); then all 42 convs fine-tuned, vanilla next to
HOSVD, with their working sets.  Uses the real
tiny-training weights and ants/bees images from ../shared when present, otherwise random
weights and generated images (said on screen).  Output goes to out/demo/.
"""
from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np

from . import cli
from ..core.manifest import Manifest
from ..core.memory import mib
from .nullmodem import NullModem

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
OUT = REPO / "out" / "demo"
BATCH, SIZE, LAYERS, EPS = 32, 128, 4, 0.8
DEEP_STEPS = 3
PROFILE = "pi-zero-2w"


def generated_data(path: Path) -> Path:
    """256 images of a learnable rule (bright vs dark blocks) as an .npz, for a fresh clone."""
    rng = np.random.default_rng(0)
    low = rng.integers(0, 256, (256, SIZE // 16, SIZE // 16, 3))
    labels = (low[..., 0].mean(axis=(1, 2)) > 127).astype(np.int64)
    pixels = np.kron(low, np.ones((1, 16, 16, 1))).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=pixels, labels=labels)
    return path


def main() -> int:
    print("== 1. The paper's analytic memory columns (computed, paper in parentheses)")
    if cli.main(["paper-table"]) != 0:
        return 1
    weights = SHARED / "weights" / "tt_mcunet-5fps_int8dq"
    model = ["--model", "mcunet-in1"]
    if weights.with_suffix(".json").exists():
        model = ["--model", str(weights.with_suffix(".json")), "--weights",
                 str(weights.with_suffix(".npz"))]
    art = OUT / "artifact"
    print(f"\n== 2. Predict for the board ({PROFILE}), then export: {' '.join(model)} -> {art}")
    cli.main(["plan", "--model", "mcunet-in1", "--method", "hosvd", "--eps", str(EPS),
              "--layers", str(LAYERS), "--batch-size", str(BATCH), "--input-size", str(SIZE),
              "--profile", PROFILE])
    status = cli.main(["export", "--force", *model, "--num-classes", "2", "--layers", str(LAYERS),
                       "--method", "hosvd", "--eps", str(EPS), "--batch-size", str(BATCH),
                       "--input-size", str(SIZE), "-o", str(art)])
    if status:
        return status

    import json

    data_path = SHARED / "data" / "hymenoptera_train.npz"
    if data_path.exists():
        what = f"real ants/bees images from {data_path}"
    else:
        data_path = generated_data(OUT / "generated.npz")
        what = f"generated images in {data_path} (../shared is absent)"
    print(f"\n== 3. Train on the local runner (actcomp-device train, one epoch at the default "
          f"recipe, {what}),"
          f" streaming memory profiles over a pseudo-terminal pair standing in for the serial "
          f"cable to `actcomp monitor`")
    summary_path = OUT / "summary.json"
    stream = OUT / "run.jsonl"
    stream.unlink(missing_ok=True)
    with NullModem() as (board_port, host_port):
        monitor = subprocess.Popen([sys.executable, "-m", "actcomp_edge.host.cli", "monitor", host_port,
                                    "--profile", PROFILE, "-o", str(stream), "--idle-timeout",
                                    "120"])
        # a process of its own, as on the board: numpy + onnxruntime, no torch
        status = subprocess.call([sys.executable, "-m", "device_runner.cli", "train", str(art),
                                  "--data", str(data_path), "--epochs", "1",
                                  "--batch-size", str(BATCH), "--out",
                                  str(OUT / "run"), "--summary", str(summary_path),
                                  "--report", board_port, "--report-timeout", "30"])
        monitor_status = monitor.wait(timeout=180)
    if status:
        return status
    print(f"monitor: {'no budget violation' if monitor_status == 0 else 'budget violated'}; "
          f"stream saved to {stream}")
    summary = json.loads(summary_path.read_text())
    manifest = Manifest.from_json(json.loads((art / "manifest.json").read_text()))

    print("\n== 4. Memory report")
    with np.load(data_path, allow_pickle=False) as images:  # the board's side is a process
        n_images = len(images["labels"])
    vanilla = sum(4 * BATCH * int(np.prod(layer.input_shape))
                  for layer in manifest.trainable_layers)
    kept = summary["kept_bytes_peak"]
    print(f"conv inputs kept for backward (paper accounting): vanilla {mib(vanilla)} MiB, "
          f"HOSVD eps={EPS} peak {mib(kept['paper'])} MiB "
          f"({vanilla / max(1, kept['paper']):.0f}x less; worst-case bound "
          f"{mib(manifest.predicted_memory.paper_bytes)} MiB)")
    print(f"everything the backward kept (full accounting): peak {mib(kept['full'])} MiB "
          f"(bound {mib(manifest.predicted_memory.full_bytes)} MiB)")
    print(f"process: peak RSS {mib(summary['peak_rss_bytes'])} MiB, of which "
          f"{mib(summary['baseline_rss_bytes'])} MiB interpreter, libraries and model before "
          f"the first step (the {n_images} images are read from disk per batch)")
    print(f"{summary['steps']} steps, median {summary['median_step_seconds'] * 1e3:.0f} ms/step, "
          f"final loss {summary['final_train_loss']:.4f}, "
          f"val accuracy {summary['final_val_accuracy']:.3f}")
    deep_finetune(model, data_path)
    print(f"\n== 6. Check the artifact against the board ({PROFILE}) and write the report")
    cli.main(["check", str(art), "--profile", PROFILE])
    report = OUT / "report"
    if cli.main(["report", str(stream), "-o", str(report), "--profile", PROFILE]) != 0:
        return 1
    print(f"\nartifact: {art}  (open overview.onnx in Netron to see the decomposition nodes)")
    print(f"report:   {report / 'index.html'}")
    return 0


def deep_finetune(model: list, data_path: Path) -> None:
    """Every conv fine-tuned, vanilla next to HOSVD: the working set of each, measured against
    its memory plan, each job a process of its own."""
    import json
    layers = 42
    print(f"\n== 5. Why compression matters: all {layers} convs fine-tuned, batch {BATCH}, "
          f"{SIZE} px, {DEEP_STEPS} steps each, vanilla next to HOSVD eps={EPS}")
    rows = []
    for method in ("vanilla", "hosvd"):
        art = OUT / f"deep-{method}"
        extra = ["--eps", str(EPS)] if method == "hosvd" else []
        with contextlib.redirect_stdout(io.StringIO()):  # its 42-row table: shown in step 2
            status = cli.main(["export",
                               "--force", *model, "--num-classes", "2", "--layers", str(layers),
                               "--method", method, *extra, "--batch-size", str(BATCH),
                               "--input-size", str(SIZE), "-o", str(art)])
        if status:
            return
        summary = OUT / f"deep-{method}.json"
        if subprocess.call([sys.executable, "-m", "device_runner.cli", "train", str(art),
                            "--data", str(data_path), "--max-steps", str(DEEP_STEPS),
                            "--out", str(OUT / f"deep-{method}-run"),
                            "--summary", str(summary)], stdout=subprocess.DEVNULL):
            return
        rows.append((method, json.loads(summary.read_text())))
    print(f"{'method':<8} {'working set MiB':>16} {'predicted MiB':>14} {'ms/step':>8}")
    for method, s in rows:
        print(f"{method:<8} {mib(s['working_set_bytes']):>16} "
              f"{mib(s['predicted_working_set_bytes'] or 0):>14} "
              f"{s['median_step_seconds'] * 1e3:>8.0f}")
    (_, v), (_, h) = rows
    print(f"HOSVD's working set is {h['working_set_bytes'] / v['working_set_bytes']:.2f}x "
          f"vanilla's (HOSVD's prediction uses the worst-case ranks)")


if __name__ == "__main__":
    sys.exit(main())
