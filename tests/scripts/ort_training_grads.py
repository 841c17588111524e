"""Gradients of the deprecated onnxruntime-training path (run in its own venv).

    python ort_training_grads.py ART/ inputs.npz out.npz WORKDIR

Takes the artifact's evaluate.onnx (trainable params as graph inputs), keeps only the part
after the frozen prefix (its inputs: the tensors named in inputs.npz, i.e. forward_0's
outputs computed by the caller, so both runtimes start from the same values), turns the
trainable params into initializers, lets onnxruntime.training.artifacts.generate_artifacts
build the training graph (cross-entropy loss, SGD), runs one forward/backward and writes the
loss and the gradient of every trainable param. inputs.npz also holds `labels`.
"""
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.utils import Extractor
from onnxruntime.training import artifacts
from onnxruntime.training.api import CheckpointState, Module


def main(folder, inputs_path, out_path, workdir):
    folder, workdir = Path(folder), Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((folder / "manifest.json").read_text())
    weights = np.load(folder / "weights.npz", allow_pickle=False)
    data = dict(np.load(inputs_path, allow_pickle=False))
    labels = data.pop("labels")
    model = onnx.load(str(folder / manifest["graphs"]["evaluate"]))
    trainable = manifest["trainable_params"]
    model = Extractor(model).extract_model(sorted(data) + trainable, ["logits"])
    kept_inputs = [i for i in model.graph.input if i.name not in trainable]
    del model.graph.input[:]
    model.graph.input.extend(kept_inputs)
    model.graph.initializer.extend(numpy_helper.from_array(weights[n], n) for n in trainable)
    frozen = [i.name for i in model.graph.initializer if i.name not in trainable]
    artifacts.generate_artifacts(model, requires_grad=trainable, frozen_params=frozen,
                                 loss=artifacts.LossType.CrossEntropyLoss,
                                 optimizer=artifacts.OptimType.SGD,
                                 artifact_directory=str(workdir))
    state = CheckpointState.load_checkpoint(str(workdir / "checkpoint"))
    module = Module(str(workdir / "training_model.onnx"), state)
    module.train()
    names = module.input_names()
    loss = module(*[data[n] for n in names[:-1]], labels)
    grads = {f"grad/{n}": np.array(state.parameters[n].grad) for n in trainable}
    np.savez(out_path, loss=np.array(loss), input_names=np.array(names), **grads)


if __name__ == "__main__":
    main(*sys.argv[1:])
