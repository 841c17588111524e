"""Where a fine-tuned depthwise conv's time goes on onnxruntime, per shape, against PyTorch's
kernels: the forward with its weight a constant (inference: onnxruntime's NCHWc kernels) and
a graph input (training: the weight changes every step), the input gradient and the weight
gradient as the exporter builds them (export/training_graph.py, actcomp_edge/core/methods.py):
portable, and on onnxruntime's NCHWc kernels (the artifact's *.nchwc.onnx variants, which
the runner takes where this onnxruntime has those kernels); and the per-tap alternative for
the weight gradient (a Slice, Mul and ReduceSum a kernel tap), tried and dropped.

    .venv/bin/python benchmarks/depthwise_ops.py [--batch 32] [--threads 2] [--reps 21]

Every depthwise conv of mcunet-in1 at 128 px (its 13 distinct shapes), one process, each op
one graph run on random data, median over --reps runs (after two warm-ups), checked against
torch.autograd (relative error < 1e-4). Writes depthwise_ops.{json,md} to
benchmarks/results.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from actcomp_edge.core import arch  # noqa: E402
from benchmarks import write_results  # noqa: E402
from actcomp_edge.core.methods import conv_weight_grad, nchwc_depthwise_conv  # noqa: E402
from actcomp_edge.core.program import build_program  # noqa: E402
from export.onnx_graph import Graph  # noqa: E402
from export.training_graph import conv_input_grad, conv_layer  # noqa: E402


def depthwise_layers(size: int) -> list:
    """The distinct depthwise ConvLayers of mcunet-in1 at size x size."""
    program = build_program(arch.load_spec("mcunet-in1", 2), None, (size, size))
    seen, out = set(), []
    for op in program.conv_ops():
        conv = conv_layer(program, op)
        key = (conv.in_ch, conv.input_hw, conv.kernel, conv.stride)
        if conv.groups == conv.in_ch > 1 and key not in seen:
            seen.add(key)
            out.append(conv)
    return out


def session(g: Graph, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(g.model().SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def graphs(conv, weight: np.ndarray) -> dict:
    """name -> (Graph, its input names): the ops of one depthwise conv."""
    c, (h, w), k, s, p = conv.in_ch, conv.input_hw, conv.kernel, conv.stride, conv.padding
    oh, ow = conv.output_hw
    attrs = dict(kernel_shape=[k, k], strides=[s, s], pads=[p] * 4, group=c)
    out = {}
    for name, constant in (("forward, weight constant", True), ("forward, weight input", False)):
        g = Graph(name)
        g.input("x", np.float32, ["batch", c, h, w])
        wt = g.const("w", weight) if constant else g.input("w", np.float32, list(weight.shape))
        g.output(g.op("Conv", ["x", wt], "conv", **attrs), np.float32, ["batch", c, oh, ow])
        out[name] = (g, ["x"] if constant else ["x", "w"])
    g = Graph("forward NCHWc", nchwc=True)
    g.input("x", np.float32, ["batch", c, h, w])
    g.input("w", np.float32, list(weight.shape))
    g.output(nchwc_depthwise_conv(g, "conv", "x", "w", c, k, kernel_shape=[k, k],
                                  strides=[s, s], pads=[p] * 4),
             np.float32, ["batch", c, oh, ow])
    out["forward, weight input, NCHWc"] = (g, ["x", "w"])
    for suffix, nchwc in (("", False), (", NCHWc", True)):
        g = Graph("dX", nchwc=nchwc)
        g.input("dy", np.float32, ["batch", c, oh, ow])
        g.input("w", np.float32, list(weight.shape))
        g.output(conv_input_grad(g, "l", "dy", "w", conv), np.float32, ["batch", c, h, w])
        out["input gradient" + suffix] = (g, ["dy", "w"])
        g = Graph("dW", nchwc=nchwc)
        g.input("x", np.float32, ["batch", c, h, w])
        g.input("dy", np.float32, ["batch", c, oh, ow])
        g.output(conv_weight_grad(g, "l", "x", "dy", conv), np.float32, list(weight.shape))
        out["weight gradient" + suffix] = (g, ["x", "dy"])
    g = Graph("dW per tap")
    g.input("x", np.float32, ["batch", c, h, w])
    g.input("dy", np.float32, ["batch", c, oh, ow])
    padded = g.op("Pad", ["x", g.ints([0, 0, p, p, 0, 0, p, p])], "pad") if p else "x"
    taps = []
    for i in range(k):
        for j in range(k):
            window = g.op("Slice", [padded, g.ints([i, j]), g.ints([i + s * (oh - 1) + 1,
                                                                     j + s * (ow - 1) + 1]),
                                    g.ints([2, 3]), g.ints([s, s])], f"tap{i}{j}")
            taps.append(g.op("ReduceSum", [g.op("Mul", [window, "dy"], f"prod{i}{j}"),
                                           g.ints([0, 2, 3])], f"sum{i}{j}", keepdims=0))
    per_tap = g.op("Reshape", [g.op("Concat", taps, "taps", axis=0), g.ints([k * k, c])], "kc")
    dw = g.op("Reshape", [g.op("Transpose", [per_tap], "ck", perm=[1, 0]),
                          g.ints([c, 1, k, k])], "dW")
    g.output(dw, np.float32, list(weight.shape))
    out["weight gradient per tap"] = (g, ["x", "dy"])
    return out


def median_ms(run, reps: int) -> float:
    run()
    run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def measure(conv, batch: int, threads: int, reps: int) -> dict:
    c, (h, w), k, s, p = conv.in_ch, conv.input_hw, conv.kernel, conv.stride, conv.padding
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, c, h, w), dtype=np.float32)
    weight = rng.standard_normal((c, 1, k, k), dtype=np.float32)
    dy = rng.standard_normal((batch, c) + tuple(conv.output_hw), dtype=np.float32)
    xt, wt, dyt = (torch.from_numpy(a) for a in (x, weight, dy))

    def torch_grads(mask):
        return torch.ops.aten.convolution_backward(dyt, xt, wt, None, [s, s], [p, p], [1, 1],
                                                   False, [0, 0], c, mask)
    with torch.no_grad():
        reference = {"forward": torch.nn.functional.conv2d(xt, wt, None, s, p, 1, c).numpy(),
                     "input gradient": torch_grads([True, False, False])[0].numpy(),
                     "weight gradient": torch_grads([False, True, False])[1].numpy()}
        row = {"shape": f"{c}x{h}x{w} k{k} s{s}",
               "torch": {"forward": median_ms(lambda: torch.nn.functional.conv2d(
                   xt, wt, None, s, p, 1, c), reps),
                   "input gradient": median_ms(lambda: torch_grads([True, False, False]), reps),
                   "weight gradient": median_ms(lambda: torch_grads([False, True, False]),
                                                reps)},
               "onnxruntime": {}}
    feeds = {"x": x, "w": weight, "dy": dy}
    for name, (g, inputs) in graphs(conv, weight).items():
        sess = session(g, threads)
        feed = {n: feeds[n] for n in inputs}
        got = sess.run(None, feed)[0]
        want = reference[name.split(",")[0].replace(" per tap", "")]
        assert ("NCHWc" in name) == g.uses_nchwc, name
        error = float(np.abs(got - want).max() / np.abs(want).max())
        if error > 1e-4:
            raise AssertionError(f"{row['shape']} {name}: relative error {error:.1e}")
        row["onnxruntime"][name] = median_ms(lambda: sess.run(None, feed), reps)
    return row


COLUMNS = [("forward, weight constant", "onnxruntime"), ("forward, weight input", "onnxruntime"),
           ("forward, weight input, NCHWc", "onnxruntime"), ("forward", "torch"),
           ("input gradient", "onnxruntime"), ("input gradient, NCHWc", "onnxruntime"),
           ("input gradient", "torch"), ("weight gradient", "onnxruntime"),
           ("weight gradient, NCHWc", "onnxruntime"), ("weight gradient per tap", "onnxruntime"),
           ("weight gradient", "torch")]


def markdown(meta: dict, rows: list) -> str:
    head = ["shape"] + [f"{op} ({who})" for op, who in COLUMNS]
    lines = [f"# Depthwise convs of mcunet-in1 ({meta['input_size']} px), ms a call", "",
             f"{meta['date']}, {meta['machine']}, onnxruntime {meta['onnxruntime']}, torch "
             f"{meta['torch']}; batch {meta['batch']}, {meta['threads']} threads, median of "
             f"{meta['reps']} runs.", "", f"Command: `{meta['command']}`", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    totals = {col: 0.0 for col in COLUMNS}
    for row in rows:
        cells = [row["shape"]]
        for op, who in COLUMNS:
            totals[op, who] += row[who][op]
            cells.append(f"{row[who][op]:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| **sum** | " + " | ".join(f"**{totals[col]:.1f}**" for col in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=21)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for conv in depthwise_layers(args.input_size):
        rows.append(measure(conv, args.batch, args.threads, args.reps))
        print(rows[-1]["shape"], json.dumps(rows[-1]["onnxruntime"]), flush=True)
    meta = {"date": str(date.today()), "machine": f"{platform.machine()}, "
            f"{__import__('os').cpu_count()} cores", "onnxruntime": ort.__version__,
            "torch": torch.__version__, "batch": args.batch, "input_size": args.input_size,
            "threads": args.threads, "reps": args.reps,
            "command": ".venv/bin/python benchmarks/depthwise_ops.py"}
    write_results("depthwise_ops", {"meta": meta, "rows": rows}, markdown(meta, rows))


if __name__ == "__main__":
    main()
