"""Peak RSS of the deprecated onnxruntime-training path (run in its own venv, 1.19.2).

    python ort_training_peak.py build ART/ WORKDIR
    python ort_training_peak.py train WORKDIR DATA.npz --batch-size 32 --steps 10 [--threads 2]
        [--mean 0.5 0.5 0.5] [--std 0.5 0.5 0.5] [--no-torch]

build (its own process): takes the artifact's evaluate.onnx (image -> logits, trainable params
as graph inputs), turns the trainable params into initializers (weights.npz) and lets
onnxruntime.training.artifacts.generate_artifacts build the training graph for them
(cross-entropy loss, SGD: onnxruntime-training's SGD has no momentum), every other initializer
frozen, as tests/scripts/ort_training_grads.py does (here the whole model, from the image).

train (a fresh process, so the peak is this job's alone): loads the artifacts with
onnxruntime.training.api (Module, Optimizer, CheckpointState), the first `batch` images of
DATA (uint8 NHWC, already at the model's resolution; pixel/255 then (x - mean) / std),
measures the RSS before the first step (the baseline), resets VmHWM, runs `steps` x
(Module train step, Optimizer.step, lazy_reset_grad) and prints one JSON line: peak_rss_bytes,
baseline_rss_bytes, losses. The shipped Python package imports torch (onnxruntime's own
__init__ does); --no-torch blocks that import and drives the same C++ classes
(onnxruntime.capi._pybind_state.Module / Optimizer, what the api wrappers call) to show the
library's footprint without it.
"""
import argparse
import json
import sys
from pathlib import Path


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build(folder: str, workdir: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from export.ort_training_baseline import build_artifacts
    build_artifacts(folder, workdir)
    print(json.dumps({"workdir": str(workdir),
                      "files": sorted(p.name for p in Path(workdir).iterdir())}))


def train(args) -> None:
    if args.no_torch:
        sys.modules["torch"] = None  # onnxruntime then skips its torch-dependent parts
    import numpy as np
    import onnxruntime as ort

    workdir = Path(args.workdir)
    with np.load(args.data, allow_pickle=False) as d:
        images, labels = d["images"][:args.batch_size], d["labels"][:args.batch_size]
    mean = np.array(args.mean, np.float32).reshape(1, 3, 1, 1)
    std = np.array(args.std, np.float32).reshape(1, 3, 1, 1)
    x = np.ascontiguousarray(((images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0) - mean)
                             / std)
    y = labels.astype(np.int64)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    if args.no_torch:
        from onnxruntime.capi import _pybind_state as C
        state = C.load_checkpoint(str(workdir / "checkpoint"))
        device = C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0)
        module = C.Module(str(workdir / "training_model.onnx"), state,
                          str(workdir / "eval_model.onnx"), device, options)
        optimizer = C.Optimizer(str(workdir / "optimizer_model.onnx"), state, device, options)
        optimizer.set_learning_rate(0.001)

        def step():
            fetches = C.OrtValueVector()
            module.train_step([x, y], fetches)
            optimizer.optimizer_step()
            module.lazy_reset_grad()
            return float(fetches[0].numpy())
    else:
        from onnxruntime.training.api import CheckpointState, Module, Optimizer
        state = CheckpointState.load_checkpoint(str(workdir / "checkpoint"))
        module = Module(str(workdir / "training_model.onnx"), state,
                        str(workdir / "eval_model.onnx"), session_options=options)
        module.train()
        optimizer = Optimizer(str(workdir / "optimizer_model.onnx"), module)
        optimizer.set_learning_rate(0.001)

        def step():
            loss = module(x, y)
            optimizer.step()
            module.lazy_reset_grad()
            return float(loss)
    baseline = status("VmRSS")
    load_peak = status("VmHWM")
    reset_peak()
    losses = [step() for _ in range(args.steps)]
    print(json.dumps({"peak_rss_bytes": status("VmHWM"), "baseline_rss_bytes": baseline,
                      "load_peak_rss_bytes": load_peak, "losses": losses,
                      "torch_imported": "torch" in sys.modules and sys.modules["torch"] is not None,
                      "onnxruntime": ort.__version__}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("artifact")
    b.add_argument("workdir")
    t = sub.add_parser("train")
    t.add_argument("workdir")
    t.add_argument("data")
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--mean", type=float, nargs=3, default=[0.5, 0.5, 0.5])
    t.add_argument("--std", type=float, nargs=3, default=[0.5, 0.5, 0.5])
    t.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    if args.cmd == "build":
        build(args.artifact, args.workdir)
    else:
        train(args)


if __name__ == "__main__":
    main()
