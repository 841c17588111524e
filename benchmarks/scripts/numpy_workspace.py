"""The numpy workspace the memory plan counts for a decomposition (the method's ``workspace``
row: hosvd_workspace, asi_workspace) against what numpy allocates, on the real inputs of
mcunet-in1's fine-tuned convs (pretrained weights from ../shared, ants/bees, eps 0.8):

    .venv/bin/python benchmarks/scripts/numpy_workspace.py [--method hosvd] [--layers 42]
        [--batch-size 32] [--input-size 128] [--steps 2]

Exports the artifact, runs --steps steps and, in the last, wraps each layer's compress in
tracemalloc: its peak (numpy's allocations; LAPACK's work arrays are not traced) beside
the formula plus the kept pieces. Prints one row per layer, "UNDER" where the formula is
below the traced peak.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from device_runner import data  # noqa: E402
from device_runner.runtime import Trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="hosvd", choices=["hosvd", "asi"])
    parser.add_argument("--layers", default="42")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    weights = SHARED / "weights" / "tt_mcunet-5fps_int8dq"
    art = Path(tempfile.mkdtemp()) / "art"
    subprocess.run([str(REPO / ".venv" / "bin" / "actcomp"), "export", "--model",
                    f"{weights}.json", "--weights", f"{weights}.npz", "--num-classes", "2",
                    "--layers", args.layers, "--method", args.method, "--eps", "0.8",
                    "--batch-size", str(args.batch_size), "--input-size", str(args.input_size),
                    "--force", "-o", str(art)], check=True, capture_output=True)
    trainer = Trainer(art, threads=2)
    images = data.load(SHARED / "data" / "hymenoptera_train.npz", (args.input_size,) * 2)
    own, rows = trainer.compress, []

    def traced(layer, x):
        tracemalloc.start()
        kept = own(layer, x)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rows.append((layer.name, x.shape, kept.rank_per_mode, peak, kept.nbytes,
                     trainer.row.workspace(x.shape, kept.rank_per_mode, layer.stride)))
        return kept
    trainer.compress = traced
    batch = args.batch_size
    for step in range(args.steps):
        rows.clear()
        x, y = images.batch(np.arange(step * batch, (step + 1) * batch) % len(images),
                            trainer.manifest.input.mean, trainer.manifest.input.std)
        trainer.step(x, y, 0.0)
    mib = 2 ** 20
    print(f"{args.method}, {args.layers} convs, batch {batch}, {args.input_size} px, step "
          f"{args.steps}: MiB")
    for name, shape, ranks, peak, kept, workspace in rows:
        print(f"{name:18} {str(shape):20} ranks {str(ranks):18} traced {peak / mib:7.2f} "
              f"formula + kept {(workspace + kept) / mib:7.2f}"
              + ("  UNDER" if workspace + kept < peak else ""))


if __name__ == "__main__":
    main()
