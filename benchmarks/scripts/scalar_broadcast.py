"""An elementwise op between a tensor and a float32 scalar constant on onnxruntime: the
scalar of rank 0 against the scalar with the tensor's rank (all dims 1), per shape, on the
shapes mcunet's update and masks see (a 1x1 conv weight ends in two dims of 1):

    .venv/bin/python benchmarks/scripts/scalar_broadcast.py [--repeats 30] [--threads 2]

Prints the median microseconds of one run of a one-node graph (Mul, Greater) for each.
Measured 2026-12-08 (onnxruntime 1.32.0, 2 threads): Mul on (576, 96, 1, 1) 931 us against
14; on activations (32, C, H, W) within the noise either way.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SHAPES = ([576, 96, 1, 1], [160, 576, 1, 1], [96], [32, 576, 4, 4], [32, 16, 64, 64])


def one_run_us(op: str, shape: list, scalar_rank: int, repeats: int, threads: int) -> float:
    """Median us of one run of y = op(x, c), x of ``shape``, c = 0.5 of ``scalar_rank``."""
    const = numpy_helper.from_array(np.full([1] * scalar_rank, 0.5, np.float32), "c")
    out_type = TensorProto.BOOL if op == "Greater" else TensorProto.FLOAT
    graph = helper.make_graph([helper.make_node(op, ["x", "c"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", out_type, None)], [const])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    for _ in range(5):
        session.run(None, {"x": x})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, median of {args.repeats}")
    for shape in SHAPES:
        for op in ("Mul", "Greater"):
            rank0 = one_run_us(op, shape, 0, args.repeats, args.threads)
            ranked = one_run_us(op, shape, len(shape), args.repeats, args.threads)
            print(f"{op:8} {str(shape):18} scalar of rank 0 {rank0:8.1f} us, of rank "
                  f"{len(shape)} {ranked:8.1f} us")


if __name__ == "__main__":
    main()
