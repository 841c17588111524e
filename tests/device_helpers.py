"""Shared by the device-runner tests: a small HOSVD artifact, generated images, and the
runner as a subprocess."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from export.training_graph import TrainConfig
from export_helpers import export, random_model
from helpers import ENV

SIZE = (64, 64)
DEVICE = [sys.executable, "-m", "device_runner.cli"]


def hosvd_artifact(folder: Path) -> Path:
    """mcunet-in1 (random weights, calibrated BN), 3 classes, last 4 convs, HOSVD eps 0.9,
    batch 8, 64 x 64."""
    spec, model = random_model("mcunet-in1", 3, calibration_hw=SIZE)
    return export(model, spec, folder, TrainConfig(n_layers=4, method="hosvd", eps=0.9),
                  8, SIZE).folder


def colour_images(root: Path) -> Path:
    """3 classes of 12 generated PNG/JPEG images each (a learnable colour rule), plus a
    broken JPEG and a text file."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for label, name in enumerate(["red", "green", "blue"]):
        (root / name).mkdir()
        for i in range(12):
            pixels = rng.integers(0, 80, (40, 48, 3)).astype(np.uint8)
            pixels[..., label] += 150
            Image.fromarray(pixels).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "green" / "notes.txt").write_text("not an image")
    return root


def device(*argv, timeout=600, env=None):
    """`actcomp-device ARGV` in a subprocess (CompletedProcess, text)."""
    return subprocess.run([*DEVICE, *map(str, argv)],
                          capture_output=True, text=True, env=env or ENV, timeout=timeout)


def train_args(artifact, data, out, *extra):
    """2 epochs of batch 8 (32 of the 36 images: 4 steps an epoch), a checkpoint every 2."""
    return ["train", artifact, "--data", data, "--epochs", "2", "--batch-size", "8", "--lr",
            "0.002", "--threads", "1", "--checkpoint-every", "2", "--out", out, *extra]


def wait_for_checkpoint(folder, min_step, proc, timeout=300):
    """The step of the newest checkpoint once it is >= min_step (proc: the runner)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            entries = json.loads((folder / "checkpoints.json").read_text())
            if entries and entries[-1]["step"] >= min_step:
                return entries[-1]["step"]
        except (OSError, ValueError):
            pass
        if proc.poll() is not None:
            raise AssertionError(f"runner ended early: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")
