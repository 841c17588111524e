"""`make demo`: the main job end to end on a built-in default.

export (mcunet-in1, last 4 convs, HOSVD eps=0.8, batch 32, 128 px) -> train a few steps
on the local runner -> memory report (predicted vs kept per layer).  Uses the real
tiny-training weights and ants/bees images from ../shared when present, otherwise random
weights and generated images (said on screen).  Output goes to out/demo/.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from . import cli
from .memory import mib

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
OUT = REPO / "out" / "demo"
STEPS, BATCH, SIZE, LAYERS, EPS = 8, 32, 128, 4, 0.8


def data(spec_mean, spec_std):
    """(images float32 NCHW normalised, labels, description)."""
    path = SHARED / "data" / "hymenoptera_train.npz"
    rng = np.random.default_rng(0)
    if path.exists():
        with np.load(path, allow_pickle=False) as d:
            pixels, labels = d["images"], d["labels"].astype(np.int64)
        what = f"{len(labels)} real ants/bees images from {path}"
    else:
        low = rng.integers(0, 256, (256, SIZE // 16, SIZE // 16, 3))
        labels = (low[..., 0].mean(axis=(1, 2)) > 127).astype(np.int64)  # a learnable rule
        pixels = np.kron(low, np.ones((1, 16, 16, 1))).astype(np.uint8)
        what = "256 generated images (../shared is absent)"
    x = (pixels.astype(np.float32) / 255 - np.array(spec_mean, np.float32)) / np.array(
        spec_std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), labels, what


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
    print(f"\n== 2. Export: {' '.join(model)} -> {art}")
    status = cli.main(["export", *model, "--num-classes", "2", "--layers", str(LAYERS),
                       "--method", "hosvd", "--eps", str(EPS), "--batch-size", str(BATCH),
                       "--input-size", str(SIZE), "--momentum", "0.9", "-o", str(art)])
    if status:
        return status

    from device_runner.runtime import Trainer
    trainer = Trainer(art)
    norm = trainer.manifest["input"]
    images, labels, what = data(norm["mean"], norm["std"])
    print(f"\n== 3. Train {STEPS} steps on the local runner ({what})")
    rng = np.random.default_rng(0)
    peak = {}
    for step in range(STEPS):
        idx = rng.choice(len(labels), BATCH, replace=False)
        result = trainer.step(images[idx], labels[idx], lr=0.005)
        for layer, nbytes in result.kept_bytes.items():
            peak[layer] = max(peak.get(layer, 0), nbytes)
        ranks = " ".join(f"{k.split('.')[-1]}{tuple(v)}" for k, v in result.ranks.items())
        print(f"step {step + 1}/{STEPS}  loss {result.loss:.4f}  ranks {ranks}")

    print("\n== 4. Memory kept for backward (conv inputs, paper accounting)")
    predicted = {layer["name"]: layer for layer in trainer.manifest["predicted_memory"]["layers"]}
    print(f"{'layer':<20} {'vanilla MiB':>12} {'bound MiB':>10} {'measured peak MiB':>18}")
    total_vanilla = total_peak = 0
    for layer in trainer.manifest["trainable_layers"]:
        vanilla = 4 * BATCH * int(np.prod(layer["input_shape"]))
        total_vanilla += vanilla
        total_peak += peak[layer["name"]]
        print(f"{layer['name']:<20} {mib(vanilla):>12} {mib(predicted[layer['name']]['paper_bytes']):>10}"
              f" {mib(peak[layer['name']]):>18}")
    print(f"{'total':<20} {mib(total_vanilla):>12} {'':>10} {mib(total_peak):>18}  "
          f"({total_vanilla / max(total_peak, 1):.0f}x less than vanilla)")
    print(f"\nartifact: {art}  (open overview.onnx in Netron to see the decomposition nodes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
