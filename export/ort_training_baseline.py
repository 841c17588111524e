"""The deprecated onnxruntime-training path, as a baseline and an independent gradient
reference: its training artifacts built from one of ours.

Runs only in a venv with onnxruntime-training 1.19.2 and onnx 1.16 (`make test` creates
.venv-ort-training); used by tests/scripts/ort_training_grads.py and the benchmarks' scripts.
"""
from __future__ import annotations

import json
from pathlib import Path

from actcomp_edge.core.manifest import Manifest


def build_artifacts(folder, workdir, inputs=None) -> list:
    """generate_artifacts (cross-entropy loss, SGD) from ``folder``'s evaluate.onnx with the
    trainable params turned into initializers; returns their names. ``inputs``: the tensors
    the model should start from (e.g. the frozen prefix's outputs), else the image."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    from onnx.utils import Extractor
    from onnxruntime.training import artifacts

    folder, workdir = Path(folder), Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.from_json(json.loads((folder / "manifest.json").read_text()))
    weights = np.load(folder / "weights.npz", allow_pickle=False)
    trainable = manifest.trainable_params
    model = onnx.load(str(folder / manifest.graphs.evaluate))
    if inputs is not None:
        model = Extractor(model).extract_model(sorted(inputs) + trainable, ["logits"])
    kept_inputs = [i for i in model.graph.input if i.name not in trainable]
    del model.graph.input[:]
    model.graph.input.extend(kept_inputs)
    model.graph.initializer.extend(numpy_helper.from_array(weights[n], n) for n in trainable)
    frozen = [i.name for i in model.graph.initializer if i.name not in trainable]
    artifacts.generate_artifacts(model, requires_grad=trainable, frozen_params=frozen,
                                 loss=artifacts.LossType.CrossEntropyLoss,
                                 optimizer=artifacts.OptimType.SGD,
                                 artifact_directory=str(workdir))
    return trainable
