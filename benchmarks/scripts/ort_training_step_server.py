"""A training-step server on the deprecated onnxruntime-training (run in its own venv).

    .venv-ort-training/bin/python ort_training_step_server.py ART/ batch.npz WORKDIR

Builds onnxruntime-training's artifacts (generate_artifacts: cross-entropy loss, SGD) from
ART/evaluate.onnx with the trainable params as initializers, then answers on stdin/stdout:
a line "step" runs one training step (forward, backward, optimizer step, grad reset) on the
batch and prints its wall time in seconds; "quit" ends. Lets benchmarks/step_time.py
interleave these steps with its in-process ones.
"""
import sys
import time
from pathlib import Path

import numpy as np
from onnxruntime import SessionOptions
from onnxruntime.training.api import CheckpointState, Module, Optimizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from export.ort_training_baseline import build_artifacts  # noqa: E402


def main(folder, batch_path, workdir):
    workdir = Path(workdir)
    build_artifacts(folder, workdir)
    state = CheckpointState.load_checkpoint(str(workdir / "checkpoint"))
    options = SessionOptions()  # as the runner: no thread spinning between steps, so the
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # others interleaved
    options.intra_op_num_threads = 2                                      # here get the cores
    module = Module(str(workdir / "training_model.onnx"), state, session_options=options)
    optimizer = Optimizer(str(workdir / "optimizer_model.onnx"), module)
    optimizer.set_learning_rate(0.001)
    module.train()
    data = np.load(batch_path, allow_pickle=False)
    images, labels = data["images"], data["labels"]
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        start = time.perf_counter()
        module(images, labels)
        optimizer.step()
        module.lazy_reset_grad()
        print(time.perf_counter() - start, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
