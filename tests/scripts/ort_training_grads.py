"""Gradients of the deprecated onnxruntime-training path (run in its own venv).

    python ort_training_grads.py ART/ inputs.npz out.npz WORKDIR

Takes the artifact's evaluate.onnx (trainable params as graph inputs), keeps only the part
after the frozen prefix (its inputs: the tensors named in inputs.npz, i.e. forward_0's
outputs computed by the caller, so both runtimes start from the same values), turns the
trainable params into initializers, lets onnxruntime.training.artifacts.generate_artifacts
build the training graph (cross-entropy loss, SGD), runs one forward/backward and writes the
loss and the gradient of every trainable param. inputs.npz also holds `labels`.
"""
import sys
from pathlib import Path

import numpy as np
from onnxruntime.training.api import CheckpointState, Module

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from export.ort_training_baseline import build_artifacts  # noqa: E402


def main(folder, inputs_path, out_path, workdir):
    workdir = Path(workdir)
    data = dict(np.load(inputs_path, allow_pickle=False))
    labels = data.pop("labels")
    trainable = build_artifacts(folder, workdir, inputs=data)
    state = CheckpointState.load_checkpoint(str(workdir / "checkpoint"))
    module = Module(str(workdir / "training_model.onnx"), state)
    module.train()
    names = module.input_names()
    loss = module(*[data[n] for n in names[:-1]], labels)
    grads = {f"grad/{n}": np.array(state.parameters[n].grad) for n in trainable}
    np.savez(out_path, loss=np.array(loss), input_names=np.array(names), **grads)


if __name__ == "__main__":
    main(*sys.argv[1:])
