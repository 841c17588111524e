"""The runner's numpy parts that issues 26-28 moved out of the graphs or onto views, timed
in-process on the real inputs of mcunet-in1's 42 fine-tuned convs (batch 32, 128 px,
ants/bees, its pretrained weights from ../shared):

    .venv/bin/python benchmarks/scripts/numpy_parts.py [--repeats 5] [--before TREE]

- crop: one batch of 32 augmentation crops, data.bilinear_box against Pillow's BILINEAR
  resize of the same boxes;
- masks: runtime.pack_mask of every conv input (above 0, below 6: the ReLU6 of the region);
- asi: decomposition.subspace_step of every conv input at ranks (12, 18, 4, 4), warm-started
  from random orthonormal factors; with --before TREE also TREE's subspace_step (a checkout,
  e.g. `git worktree add --detach /tmp/before eed872d`) on the same inputs, the two
  alternating (one BLAS thread, after a warm-up of each); then this tree's on one BLAS thread
  and on two.
Prints the median over --repeats of each sum, in ms.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from actcomp_edge.core import decomposition  # noqa: E402
from device_runner import data  # noqa: E402
from device_runner.runtime import Trainer, pack_mask  # noqa: E402

RANKS = (12, 18, 4, 4)


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def conv_inputs(work: Path) -> tuple:
    """(images uint8 (32, 128, 128, 3), {layer: its input (32, C, H, W)}) of an artifact of
    every conv, exported by the CLI."""
    weights = SHARED / "weights" / "tt_mcunet-5fps_int8dq"
    subprocess.run([str(REPO / ".venv" / "bin" / "actcomp"), "export", "--model",
                    f"{weights}.json", "--weights", f"{weights}.npz", "--num-classes", "2",
                    "--layers", "42", "--method", "asi", "--eps", "0.8", "--batch-size", "32",
                    "--input-size", "128", "--force", "-o", str(work / "art")],
                   check=True, capture_output=True)
    trainer = Trainer(work / "art", threads=2)
    dataset = data.load(SHARED / "data" / "hymenoptera_train.npz", (128, 128))
    x, y = dataset.batch(np.arange(32), trainer.manifest.input.mean, trainer.manifest.input.std)
    inputs = {}
    trainer.forward(x, y, decompose=False,
                    inspect=lambda layer, a: inputs.__setitem__(layer.name, a.copy()))
    return np.stack([dataset.images[i] for i in range(32)]), inputs


def subspace_total(step, inputs: dict, factors: dict) -> None:
    for name, a in inputs.items():
        step(a, factors[name], min(RANKS[0], a.shape[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before", type=Path, help="a checkout to time its subspace_step")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        images, inputs = conv_inputs(Path(work))
    rng = np.random.default_rng(0)
    boxes = [(int(rng.integers(0, 40)), int(rng.integers(0, 40)), 88, 80) for _ in images]
    from PIL import Image

    def ours():
        return [data.bilinear_box(image, *box) for image, box in zip(images, boxes)]

    def pillow():
        return [np.asarray(Image.fromarray(image).resize(
            (128, 128), Image.BILINEAR, box=(left, top, left + w, top + h)))
            for image, (left, top, w, h) in zip(images, boxes)]
    print(f"crop, a batch of 32: bilinear_box {median_ms(ours, args.repeats):.1f} ms, "
          f"Pillow {median_ms(pillow, args.repeats):.1f} ms")
    bits = {n: np.empty((32, -(-a[0].size // 8)), np.uint8) for n, a in inputs.items()}

    def pack():
        for name, a in inputs.items():
            pack_mask(a, 0.0, 6.0, bits[name])
    elements = sum(a.size for a in inputs.values()) / 1e6
    print(f"masks, {len(inputs)} inputs, {elements:.1f} M elements: pack_mask "
          f"{median_ms(pack, args.repeats):.1f} ms")
    factors = {name: [np.linalg.qr(rng.standard_normal((d, min(k, d))))[0].astype(np.float32)
                      for d, k in zip(a.shape[1:], RANKS[1:])] for name, a in inputs.items()}
    steps = {"this tree": decomposition.subspace_step}
    if args.before:
        spec = importlib.util.spec_from_file_location(
            "before_decomposition", args.before / "actcomp_edge" / "core" / "decomposition.py")
        before = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = before  # its dataclasses look their module up
        spec.loader.exec_module(before)
        steps[str(args.before)] = before.subspace_step
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1, user_api="blas"):  # the runner's (runtime.Trainer.compress)
        for step in steps.values():               # a warm-up each
            subspace_total(step, inputs, factors)
        times = {name: [] for name in steps}
        for _ in range(args.repeats):             # the trees alternate, repeat by repeat
            for name, step in steps.items():
                times[name].append(median_ms(lambda: subspace_total(step, inputs, factors), 1))
    timed = ", ".join(f"{name} {statistics.median(ms):.1f} ms (spread {min(ms):.1f}-"
                      f"{max(ms):.1f})" for name, ms in times.items())
    print(f"asi subspace step, {len(inputs)} inputs, ranks {RANKS}, 1 BLAS thread, the trees "
          f"alternating: {timed}")
    by_threads = []
    for threads in (1, 2):  # the runner runs it on one (runtime.Trainer.compress)
        with threadpool_limits(threads, user_api="blas"):
            ms = median_ms(lambda: subspace_total(decomposition.subspace_step, inputs, factors),
                           args.repeats)
        by_threads.append(f"{threads} BLAS thread{'s' if threads > 1 else ''} {ms:.1f} ms")
    print(f"asi subspace step, this tree: {', '.join(by_threads)}")

if __name__ == "__main__":
    main()
