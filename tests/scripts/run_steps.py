"""Run training steps of an artifact with whatever onnxruntime this interpreter has.

    python run_steps.py ART/ batch.npz out.npz STEPS [KERNELS]

batch.npz holds `images` (S, B, 3, H, W) float32 and `labels` (S, B) int64; out.npz gets
`loss` (S,), every trained param after the last step, the kernels that ran (KERNELS: the
runner's --kernels, default auto) and `ort_version`. Used by the tests to
compare onnxruntime versions (it imports only numpy, onnxruntime and actcomp-edge).
"""
import sys

import numpy as np
import onnxruntime

from device_runner.runtime import Trainer


def main(folder, batch_path, out_path, steps, kernels="auto"):
    data = np.load(batch_path, allow_pickle=False)
    trainer = Trainer(folder, kernels=kernels)
    losses = [trainer.step(data["images"][s], data["labels"][s], lr=0.0002).loss
              for s in range(int(steps))]
    np.savez(out_path, loss=np.array(losses), ort_version=np.array(onnxruntime.__version__),
             numpy_version=np.array(np.__version__), kernels=np.array(trainer.kernels),
             **{f"param/{k}": v for k, v in trainer.params.items()})


if __name__ == "__main__":
    main(*sys.argv[1:])
