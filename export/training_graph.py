"""ONNX graphs of one training step, split where the device decomposes activations.

ONNX has no SVD/eigen operator, and the eps rule needs the exact spectrum every
step. So the step is cut at the input of every fine-tuned conv:

    forward_0 (frozen prefix, BN folded)   image -> x_1 (+ skip tensors)
    [device: compress x_1 with numpy]      x_1 -> kept pieces of layer 1, x_1 freed
    forward_1                              x_1 -> x_2, bit-packed masks ...
    ...
    forward_N (last convs, head, loss)     x_N, labels -> loss, logits, dlogits, features, masks
    backward_N .. backward_1               the reverse of each forward_p: d/<t> of what it
                                           handed on, its conv's kept pieces, its masks and
                                           params -> d/<t> of its inputs, grad/<param>
    update                                 grad/<param>, params, optimizer state, lr (, step)
                                           -> new/<param>, new/state/...

Between forward and backward the device holds only the kept pieces (core +
factors for HOSVD), the masks at 1 bit an element (the graphs make and read them as bool,
``<t>/mask_bool``; the runner packs them in between), the float32 input of each hardswish and
silu and output of each sigmoid (``arch.ACTIVATIONS``), each factor of a multiply that no
such act gives (``factor_sources``), the argmax of each max-pool in the fine-tuned part
(int32) and the input of each linear (the classifier head's, a squeeze-excitation's).
Every graph uses standard ONNX ops only (opset ``OPSET``), so the stock
onnxruntime wheel runs it. Tensor names say what they hold (``actcomp_edge.core.names``):
``<layer>/kept/<piece>``, ``<t>/mask_bool``, ``<t>/act_saved``, ``<t>/factor_<i>``,
``<t>/argmax``, ``d/<t>``, ``grad/<param>``, ``new/<param>``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import numpy as np

from actcomp_edge.core import names
from actcomp_edge.core.arch import ACTIVATIONS, ConvLayer, pair
from actcomp_edge.core.methods import (BATCH, METHODS, RANKED, nchwc_depthwise,
                                        nchwc_depthwise_conv)

import onnx
from onnx import TensorProto

from .onnx_graph import ACTCOMP_DOMAIN, Graph
from actcomp_edge.core.program import RELU_HI, Op, Program

OPTIMIZERS = ("sgd", "adamw")


@dataclass
class TrainConfig:
    n_layers: int
    method: str = "hosvd"
    eps: float | None = 0.8
    ranks: tuple | None = None
    rank_cap: object = None
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    label_smoothing: float = 0.0
    micro_batch: int | None = None   # samples a backward-partition run (None: the plan chooses,
                                     # forward partitions included)
    activation_budget: int | None = None  # bytes of kept activations, all layers (asi: the
                                          # board chooses the ranks on its first batch)

    def check(self) -> None:
        """ValueError, one line naming the flag, for a recipe that would train wrongly or fail
        after files are written: momentum outside [0, 1) (the runner's default lr is
        0.05 (1 - momentum)), ranks or rank caps of the wrong count for the method."""
        row = METHODS[self.method]
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"--momentum must be in [0, 1), got {self.momentum} (SGD's step "
                             f"grows as lr / (1 - momentum))")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.activation_budget is not None:
            if not row.tracker:
                raise ValueError(f"--activation-budget chooses the fixed ranks of --method asi, "
                                 f"not {self.method}")
            if self.ranks is not None or self.eps is not None:
                raise ValueError("give --activation-budget or --ranks / --eps, not both: the "
                                 "budget chooses the ranks")
        symbols = ", ".join(row.rank_symbols)
        for flag, given, counts in (("--ranks", self.ranks, (len(row.rank_symbols),)),
                                    ("--rank-cap", self.rank_cap, (1, len(row.rank_symbols)))):
            if given is None:
                continue
            if not row.rank_symbols:
                raise ValueError(f"{flag} applies to the methods with ranks "
                                 f"({', '.join(RANKED)}), "
                                 f"not {self.method}")
            n = 1 if isinstance(given, int) else len(given)
            if n not in counts:
                raise ValueError(f"{self.method} takes {' or '.join(map(str, counts))} "
                                 f"{flag} value(s) ({symbols}), got {n}")


@dataclass
class Split:
    """Where the program is cut. partitions[p] = op indices of forward_p."""

    program: Program
    trainable_convs: list            # conv Ops, in order
    trainable_params: list           # param names (weights, biases, classifier)
    partitions: list = field(default_factory=list)

    @property
    def region_start(self) -> int:
        return self.program.ops.index(self.trainable_convs[0])


def split_program(program: Program, n_layers: int) -> Split:
    convs = program.conv_ops()
    if not 1 <= n_layers <= len(convs):
        raise ValueError(f"--layers must be between 1 and {len(convs)} ({program.name} has "
                         f"{len(convs)} convs), got {n_layers}")
    trainable = convs[-n_layers:]
    starts = [program.ops.index(c) for c in trainable]
    params = []
    for op in program.ops[starts[0]:]:
        if op.kind in ("conv", "linear"):
            params += [op.attrs["weight"]] + ([op.attrs["bias"]] if op.attrs.get("bias") else [])
    bounds = [0] + starts + [len(program.ops)]
    parts = [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]
    return Split(program, trainable, params, parts)


# ------------------------------------------------------------------ forward ops

def param_ref(g: Graph, program: Program, name: str, trainable: set) -> str:
    """Trainable params are graph inputs (fed each step); frozen ones initializers."""
    if name in trainable:
        if not any(i.name == name for i in g.inputs):
            g.input(name, np.float32, list(program.params[name].shape))
        return name
    return g.const(name, program.params[name])


def channel_const(g: Graph, program: Program, name: str) -> str:
    """A per-channel param (C,) as an initializer shaped (1, C, 1, 1)."""
    return g.const(name + "/nchw", program.params[name].reshape(1, -1, 1, 1))


def emit_conv_forward(g: Graph, program: Program, op: Op, trainable: set,
                      fold_bn: Op | None) -> None:
    """A conv of the forward pass: folded with the frozen affine after it (fold_bn), on the
    NCHWc kernels when g may use them and its weight is trainable (a graph input), else a
    Conv."""
    a = op.attrs
    w, b = a["weight"], a.get("bias")
    out = op.output
    if fold_bn is not None:  # frozen prefix: W' = W * scale, b' = b * scale + shift
        scale = program.params[fold_bn.attrs["scale"]]
        shift = program.params[fold_bn.attrs["shift"]]
        bias = program.params[b] if b else np.zeros_like(scale)
        w = g.const(w + "/folded", program.params[w] * scale[:, None, None, None])
        b = g.const(f"{op.name}.bias/folded", bias * scale + shift)
        out = fold_bn.output
    else:
        w = param_ref(g, program, w, trainable)
        b = param_ref(g, program, b, trainable) if b else None
    conv = conv_layer(program, op)
    if g.nchwc and w in trainable and nchwc_depthwise(conv):  # a weight input: unpacked
        attrs = {k: v for k, v in conv_attrs(conv).items() if k != "group"}  # its own group
        y = nchwc_depthwise_conv(g, op.name, op.inputs[0], w, conv.in_ch, pair(conv.kernel)[1],
                                 b, **attrs)
        g.op("Identity", [y], op.name + "/out", outputs=[out])
        return
    g.op("Conv", [op.inputs[0], w] + ([b] if b else []), op.name, outputs=[out],
         **conv_attrs(conv))


def emit_forward(g: Graph, program: Program, op: Op, trainable: set, with_mask: bool,
                 fold_bn: Op | None = None) -> None:
    """One op of the forward pass. fold_bn: the frozen affine that follows a frozen conv."""
    a = op.attrs
    if op.kind == "conv":
        emit_conv_forward(g, program, op, trainable, fold_bn)
    elif op.kind == "affine":
        y = g.op("Mul", [op.inputs[0], channel_const(g, program, a["scale"])], op.name + "/bn_scale")
        g.op("Add", [y, channel_const(g, program, a["shift"])], op.name + "/bn_shift",
             outputs=[op.output])
    elif op.kind == "clip":
        x = op.inputs[0]
        if a["hi"] == RELU_HI and a["lo"] == 0.0:
            g.op("Relu", [x], op.name, outputs=[op.output])
        else:
            g.op("Clip", [x, g.scalar(a["lo"]), g.scalar(a["hi"])], op.name, outputs=[op.output])
        if with_mask:  # the backward of min(max(x, lo), hi): pass where lo < x < hi (as torch)
            mask = g.op("Greater", [x, g.scalar(a["lo"])], op.name + "/above_lo")
            if a["hi"] != RELU_HI:
                below = g.op("Less", [x, g.scalar(a["hi"])], op.name + "/below_hi")
                mask = g.op("And", [mask, below], op.name + "/mask")
            g.op("Identity", [mask], op.name + "/keep_mask", outputs=[names.mask_bool(op.output)])
    elif op.kind == "act":
        emit_activation(g, program, op, keep=with_mask)
    elif op.kind == "add":
        g.op("Add", list(op.inputs), op.name, outputs=[op.output])
    elif op.kind == "mul":
        g.op("Mul", list(op.inputs), op.name, outputs=[op.output])
    elif op.kind == "mean":
        g.op("GlobalAveragePool", [op.inputs[0]], op.name, outputs=[op.output])
    elif op.kind == "reshape":
        g.op("Reshape", [op.inputs[0], g.ints([0, *program.shapes[op.output]])], op.name,
             outputs=[op.output])
    elif op.kind == "cat":
        g.op("Concat", list(op.inputs), op.name, outputs=[op.output], axis=1)
    elif op.kind == "slice":
        g.op("Slice", [op.inputs[0], g.ints([a["start"]]), g.ints([a["stop"]]), g.ints([1])],
             op.name, outputs=[op.output])
    elif op.kind == "shuffle":
        emit_shuffle(g, op.inputs[0], program.shapes[op.output], a["groups"], op.name,
                     op.output)
    elif op.kind == "maxpool":
        k, s, p = a["kernel"], a["stride"], a["padding"]
        outputs = [op.output] + ([op.output + "/argmax_flat"] if with_mask else [])
        g.op("MaxPool", [op.inputs[0]], op.name, outputs=outputs, kernel_shape=[k, k],
             strides=[s, s], pads=[p] * 4, ceil_mode=int(a.get("ceil_mode", False)))
        if with_mask:  # the backward's: where in its sample (C*H*W) each output's max is
            c, h, w = program.shapes[op.inputs[0]]
            within = g.op("Mod", [outputs[1], g.const(f"const/i64/{c * h * w}",
                                                      np.array(c * h * w))], op.name + "/within")
            g.op("Cast", [within], op.name + "/argmax", to=TensorProto.INT32,
                 outputs=[names.argmax(op.output)])
    elif op.kind == "avgpool":
        k, s, p = a["kernel"], a["stride"], a["padding"]
        g.op("AveragePool", [op.inputs[0]], op.name, outputs=[op.output], kernel_shape=[k, k],
             strides=[s, s], pads=[p] * 4, count_include_pad=int(a["count_include_pad"]))
    elif op.kind == "gap":
        pooled = g.op("GlobalAveragePool", [op.inputs[0]], op.name)
        g.op("Flatten", [pooled], op.name + "/flatten", outputs=[op.output], axis=1)
    elif op.kind == "linear":
        w = param_ref(g, program, a["weight"], trainable)
        b = param_ref(g, program, a["bias"], trainable) if a.get("bias") else None
        g.op("Gemm", [op.inputs[0], w] + ([b] if b else []), op.name, outputs=[op.output],
             transB=1)
    else:
        raise ValueError(f"unknown op kind {op.kind!r}")


def emit_shuffle(g: Graph, x: str, chw, groups: int, name: str,
                 output: str | None = None) -> str:
    """Channel shuffle of x (B, C, H, W): view (B, g, C/g, H, W), swap g and C/g, view back."""
    c, h, w = chw
    grouped = g.op("Reshape", [x, g.ints([0, groups, c // groups, h, w])], name + "/grouped")
    swapped = g.op("Transpose", [grouped], name + "/swapped", perm=[0, 2, 1, 3, 4])
    return g.op("Reshape", [swapped, g.ints([0, c, h, w])], name + "/shuffled",
                **({"outputs": [output]} if output else {}))


def pool_counts(hw, kernel: int, stride: int, padding: int, include_pad: bool) -> np.ndarray:
    """(OH, OW): the elements each window of an average pool divides by."""
    counts = []
    for size in hw:
        starts = np.arange((size + 2 * padding - kernel) // stride + 1) * stride - padding
        ends = starts + kernel
        counts.append(ends - starts if include_pad else
                      np.minimum(ends, size) - np.maximum(starts, 0))
    return np.outer(*counts).astype(np.float32)


def emit_avgpool_backward(g: Graph, program: Program, op: Op, dy: str) -> str:
    """dX of an average pool: dY / count spread over each window, a depthwise ConvTranspose
    with a kernel of ones (output_padding: the rows and columns no window reached)."""
    (c, h, w), (_, oh, ow) = program.shapes[op.inputs[0]], program.shapes[op.output]
    k, s, p = op.attrs["kernel"], op.attrs["stride"], op.attrs["padding"]
    counts = pool_counts((h, w), k, s, p, op.attrs["count_include_pad"])
    scaled = g.op("Mul", [dy, g.const(f"{op.name}/inverse_counts", 1.0 / counts)],
                  op.name + "/dY_per_element")
    ones = g.const(f"const/f32/ones_{c}x1x{k}x{k}", np.ones((c, 1, k, k), np.float32))
    extra = [size + 2 * p - k - (out - 1) * s for size, out in ((h, oh), (w, ow))]
    return g.op("ConvTranspose", [scaled, ones], op.name + "/dX", group=c, strides=[s, s],
                pads=[p] * 4, kernel_shape=[k, k], output_padding=extra)


def emit_ops(g: Graph, program: Program, indices, trainable: set, masked=frozenset()) -> None:
    """Forward ops at these indices; frozen conv+affine pairs are folded into one Conv;
    the clips, acts and max-pools whose outputs are in ``masked`` also output what their
    backward keeps (mask bits, the saved input or output, the argmax)."""
    ops = program.ops
    skip = set()
    for i in indices:
        if i in skip:
            continue
        op = ops[i]
        fold = None
        if (op.kind == "conv" and op.attrs["weight"] not in trainable and i + 1 in indices
                and ops[i + 1].kind == "affine"
                and ops[i + 1].inputs == (op.output,) and len(program.consumers(op.output)) == 1):
            fold = ops[i + 1]
            skip.add(i + 1)
        emit_forward(g, program, op, trainable, with_mask=op.output in masked, fold_bn=fold)


# ------------------------------------------------------------------ activations

def apply_activation(g: Graph, attrs: dict, x: str, name: str, y: str | None = None) -> str:
    """y = f(x) of an ``act`` op's attrs (fn, slope); returns y."""
    fn, out = attrs["fn"], {"outputs": [y]} if y else {}
    if fn == "hardsigmoid":  # ONNX's max(0, min(1, alpha x + beta)) is relu6(x + 3) / 6
        return g.op("HardSigmoid", [x], name, alpha=1.0 / 6.0, beta=0.5, **out)
    if fn == "leaky_relu":
        return g.op("LeakyRelu", [x], name, alpha=float(attrs["slope"]), **out)
    if fn == "hardswish":
        return g.op("HardSwish", [x], name, **out)
    if fn == "silu":
        return g.op("Mul", [x, g.op("Sigmoid", [x], name + "/sigmoid")], name, **out)
    if fn == "sigmoid":
        return g.op("Sigmoid", [x], name, **out)
    raise ValueError(f"unknown activation {fn!r}")


def emit_activation(g: Graph, program: Program, op: Op, keep: bool) -> None:
    """y = f(x) of an ``act`` op (arch.ACTIVATIONS); keep: also output what its backward
    keeps, <y>/mask_bool (the region where f' is not 0 or slope) or <y>/act_saved."""
    fn, x, y, name = op.attrs["fn"], op.inputs[0], op.output, op.name
    apply_activation(g, op.attrs, x, name, y)
    if not keep:
        return
    keeps = ACTIVATIONS[fn]
    if keeps == "mask":
        if fn == "hardsigmoid":
            mask = g.op("And", [g.op("Greater", [x, g.scalar(-3.0)], name + "/above_lo"),
                                g.op("Less", [x, g.scalar(3.0)], name + "/below_hi")],
                        name + "/mask")
        else:
            mask = g.op("Greater", [x, g.scalar(0.0)], name + "/positive")
        g.op("Identity", [mask], name + "/keep_mask", outputs=[names.mask_bool(y)])
    else:
        g.op("Identity", [x if keeps == "input" else y], name + "/saved",
             outputs=[names.act_saved(y)])


def activation_source(op: Op, derived: dict) -> str:
    """What the backward of a clip or act reads: "kept" (its output is the kept input of the
    next conv, vanilla: exact for a clip, a leaky ReLU of slope >= 0 (y > 0 is x > 0) and a
    sigmoid (f' = y (1 - y))), "bits" (its packed mask) or "saved" (its float32 input or
    output)."""
    if op.kind == "clip":
        return "kept" if op.output in derived else "bits"
    keeps = ACTIVATIONS[op.attrs["fn"]]
    if op.output in derived and (keeps == "output" or mask_bounds(op) is not None):
        return "kept"
    return "bits" if keeps == "mask" else "saved"


def mask_bounds(op: Op) -> tuple | None:
    """(lo, hi): op's backward mask is exactly lo < y < hi of its output y (hi None: no upper
    bound): a clip's (y = min(max(x, lo), hi)) and a leaky ReLU's of slope >= 0 (y > 0 is
    x > 0); None for every other op."""
    if op.kind == "clip":
        return op.attrs["lo"], None if op.attrs["hi"] == RELU_HI else op.attrs["hi"]
    if op.kind == "act" and op.attrs["fn"] == "leaky_relu" and op.attrs["slope"] >= 0:
        return 0.0, None
    return None


def activation_derivative(g: Graph, program: Program, op: Op, source: str, kept: str) -> str:
    """f'(x) as a float32 tensor of y's shape (dX = dY f'), exactly as torch's backward of
    each activation computes it, from what the backward reads (``activation_source``; kept:
    the tensor the source names)."""
    fn, name = op.attrs["fn"], op.name
    one = g.scalar(1.0)
    if ACTIVATIONS[fn] == "mask":
        if source == "bits":
            mask = mask_float(g, name, kept)
        else:  # leaky ReLU from the kept y: y > 0 is x > 0
            mask = g.op("Cast", [g.op("Greater", [kept, g.scalar(0.0)], name + "/positive")],
                        name + "/mask_f", to=TensorProto.FLOAT)
        if fn == "hardsigmoid":
            return g.op("Mul", [mask, g.scalar(1.0 / 6.0)], name + "/slope")
        slope = float(op.attrs["slope"])
        return g.op("Add", [g.op("Mul", [mask, g.scalar(1.0 - slope)], name + "/mask_x_1_minus_a"),
                            g.scalar(slope)], name + "/slope")
    if fn == "hardswish":  # 0 for x < -3, x / 3 + 1/2 for -3 <= x <= 3, 1 above
        x = kept
        middle = g.op("And", [g.op("Not", [g.op("Less", [x, g.scalar(-3.0)], name + "/below")],
                                   name + "/from_lo"),
                              g.op("LessOrEqual", [x, g.scalar(3.0)], name + "/to_hi")],
                      name + "/middle")
        ramp = g.op("Add", [g.op("Div", [x, g.scalar(3.0)], name + "/x_3"), g.scalar(0.5)],
                    name + "/ramp")
        above = g.op("Cast", [g.op("Greater", [x, g.scalar(3.0)], name + "/above")],
                     name + "/above_f", to=TensorProto.FLOAT)
        middle = g.op("Cast", [middle], name + "/middle_f", to=TensorProto.FLOAT)
        return g.op("Add", [g.op("Mul", [middle, ramp], name + "/middle_ramp"), above],
                    name + "/slope")
    if fn == "silu":  # s (1 + x (1 - s))
        x = kept
        s = g.op("Sigmoid", [x], name + "/sigmoid")
        t = g.op("Mul", [x, g.op("Sub", [one, s], name + "/1_minus_s")], name + "/x_1_minus_s")
        return g.op("Mul", [s, g.op("Add", [one, t], name + "/1_plus")], name + "/slope")
    # sigmoid: y (1 - y)
    return g.op("Mul", [kept, g.op("Sub", [one, kept], name + "/1_minus_y")], name + "/slope")


def tensor_shape(program: Program, name: str) -> list:
    return [BATCH] + list(program.shapes[name])


def emit_loss(g: Graph, num_classes: int, label_smoothing: float) -> None:
    """Softmax cross-entropy (mean over the batch, optional label smoothing) and dL/dlogits."""
    g.input("labels", np.int64, [BATCH])
    onehot = g.op("OneHot", ["labels", g.ints([num_classes]),
                             g.const("const/onehot_values", np.array([0.0, 1.0], np.float32))],
                  "loss/onehot", axis=-1)
    target = onehot
    if label_smoothing:
        scaled = g.op("Mul", [onehot, g.scalar(1.0 - label_smoothing)], "loss/smooth_scale")
        target = g.op("Add", [scaled, g.scalar(label_smoothing / num_classes)], "loss/smooth")
    logp = g.op("LogSoftmax", ["logits"], "loss/log_softmax", axis=1)
    picked = g.op("ReduceSum", [g.op("Mul", [target, logp], "loss/target_logp"), g.ints([1])],
                  "loss/sum_classes", keepdims=0)
    g.op("Neg", [g.op("ReduceMean", [picked], "loss/mean", keepdims=0)], "loss", outputs=["loss"])
    batch = g.op("Cast", [g.op("Gather", [g.op("Shape", ["logits"], "loss/shape"), g.ints([0])],
                               "loss/batch")], "loss/batch_f", to=1)
    diff = g.op("Sub", [g.op("Exp", [logp], "loss/softmax"), target], "loss/softmax_minus_target")
    g.op("Div", [diff, batch], "dlogits", outputs=["dlogits"])


def masks_from_kept(split: Split, method: str) -> dict:
    """clip output y -> the kept tensor its backward mask is read from. Vanilla keeps every
    fine-tuned conv's whole input, and where that input is y = min(max(x, lo), hi), the mask
    lo < x < hi is exactly lo < y < hi: no mask is packed for it."""
    if not METHODS[method].keeps_input:
        return {}
    return {conv.inputs[0]: names.kept(conv.name, "input") for conv in split.trainable_convs}


def region_sources(split: Split, method: str) -> dict:
    """Output of each clip and act of the fine-tuned region -> what its backward reads
    (``activation_source``)."""
    derived = masks_from_kept(split, method)
    return {op.output: activation_source(op, derived) for i, op in enumerate(split.program.ops)
            if op.kind in ("clip", "act") and i >= split.region_start}


def packed_masks(split: Split, method: str) -> set:
    """Outputs of the fine-tuned region's clips and acts whose backward mask is bit-packed."""
    return {t for t, source in region_sources(split, method).items() if source == "bits"}


def input_masks(split: Split, method: str) -> dict:
    """conv name -> (y, lo, hi) for each fine-tuned conv whose input y is the output of an
    op of the fine-tuned region whose mask y gives (``mask_bounds``), when the method does
    not keep y: the runner packs y's backward mask lo < y < hi from y at the decomposition,
    so the forward makes none. A y that several fine-tuned convs read (a shortcut conv's) is
    packed at the first."""
    if METHODS[method].keeps_input:
        return {}
    program = split.program
    producer = {op.output: (i, op) for i, op in enumerate(program.ops)}
    out = {}
    for conv in split.trainable_convs:
        y = conv.inputs[0]
        i, op = producer.get(y, (-1, None))
        if i < split.region_start or any(y == seen for seen, _, _ in out.values()):
            continue
        bounds = mask_bounds(op)
        if bounds is not None:
            out[conv.name] = (y, *bounds)
    return out


def forward_masks(split: Split, method: str) -> set:
    """The packed masks a forward graph makes (as bool): all but the runner's input_masks."""
    return packed_masks(split, method) - {y for y, _, _ in input_masks(split, method).values()}


def saved_activations(split: Split, method: str) -> set:
    """Outputs of the fine-tuned region's acts that keep a float32 tensor (<t>/act_saved)."""
    return {t for t, source in region_sources(split, method).items() if source == "saved"}


def head_tensors(program: Program) -> set:
    """The outputs of the global pool and of every op after it (the classifier head)."""
    return {op.output for op in program.ops[program.head_start():]}


def region_multiplies(split: Split) -> set:
    """Outputs of the fine-tuned region's multiplies: their backward needs both factors."""
    return {op.output for i, op in enumerate(split.program.ops) if op.kind == "mul"
            and i >= split.region_start}


def factor_sources(split: Split, method: str) -> dict:
    """<y>/factor_<i> of each fine-tuned multiply whose other input needs a gradient (made in
    the region) -> the act of the region whose kept float32 tensor gives it (a hardswish's
    or silu's input: recomputed; a sigmoid's output: read), or None: the forward keeps the
    factor itself."""
    program, sources = split.program, region_sources(split, method)
    producer = {op.output: op for op in program.ops}
    made_at = {op.output: i for i, op in enumerate(program.ops)}
    result = {}
    for y in region_multiplies(split):
        for i, t in enumerate(producer[y].inputs):
            if made_at.get(producer[y].inputs[1 - i], -1) < split.region_start:
                continue  # the other input is the frozen prefix's: no gradient, no factor
            act = producer.get(t)
            derivable = act is not None and act.kind == "act" and t in sources and \
                ACTIVATIONS[act.attrs["fn"]] in ("input", "output")
            result[names.factor(y, i)] = act if derivable else None
    return result


def kept_factors(split: Split, method: str) -> set:
    """The multiply factors the forward hands the backward as they are (``factor_sources``)."""
    return {name for name, act in factor_sources(split, method).items() if act is None}


def argmax_pools(split: Split) -> set:
    """Outputs of the fine-tuned region's max-pools: each hands its argmax to the backward."""
    return {op.output for i, op in enumerate(split.program.ops) if op.kind == "maxpool"
            and i >= split.region_start}


def forward_partitions(split: Split, config: TrainConfig, nchwc: bool = False) -> list:
    """forward_0 .. forward_N as (Graph, inputs, outputs); liveness decides what crosses."""
    program = split.program
    trainable = set(split.trainable_params)
    masked = forward_masks(split, config.method)
    saved = saved_activations(split, config.method)
    factors = kept_factors(split, config.method)
    pools = argmax_pools(split)
    produced_in, used_in = crossings(split)
    result = []
    for p, part in enumerate(split.partitions):
        g = Graph(f"forward_{p}", nchwc=nchwc)
        inputs = []
        for i in part:
            for t in program.ops[i].inputs:
                if produced_in.get(t, -1) != p and t not in inputs:
                    inputs.append(t)
        for t in inputs:
            g.input(t, np.float32, tensor_shape(program, t))
        emit_ops(g, program, part, trainable, masked | saved | pools)
        outputs, shapes = [], {}  # shapes: of the kept factors
        for i in part:
            op = program.ops[i]
            if any(q > p for q in used_in.get(op.output, ())):
                outputs.append(op.output)
            if op.output in masked:
                outputs.append(names.mask_bool(op.output))
            if op.output in saved:
                outputs.append(names.act_saved(op.output))
            for j, t in enumerate(op.inputs if op.kind == "mul" else ()):
                factor = names.factor(op.output, j)
                if factor in factors:  # t under the name the backward reads
                    outputs.append(g.op("Identity", [t], f"{op.name}/keep_{j}",
                                        outputs=[factor]))
                    shapes[factor] = tensor_shape(program, t)
            if op.output in pools:
                outputs.append(names.argmax(op.output))
            if op.kind == "linear" and p >= 1:  # its backward takes its input
                outputs.append(op.inputs[0])
        last = p == len(split.partitions) - 1
        if last:
            emit_loss(g, program.num_classes, config.label_smoothing)
            outputs += ["logits", "loss", "dlogits"]
        outputs = list(dict.fromkeys(outputs))
        for t in outputs:
            if t == "loss":
                g.output(t, np.float32, [])
            elif names.is_mask_bool(t):
                g.output(t, np.bool_, tensor_shape(program, names.source_of(t)))
            elif names.is_argmax(t):
                g.output(t, np.int32, tensor_shape(program, names.source_of(t)))
            elif names.is_act_saved(t):
                g.output(t, np.float32, tensor_shape(program, names.source_of(t)))
            elif t in shapes:
                g.output(t, np.float32, shapes[t])
            elif t == "dlogits":
                g.output(t, np.float32, tensor_shape(program, "logits"))
            else:
                g.output(t, np.float32, tensor_shape(program, t))
        result.append((g, inputs + (["labels"] if last else []), outputs))
    return result


def eval_graph(program: Program, trainable_params, frozen_all: bool = False) -> Graph:
    """image -> logits. Trainable params are inputs, unless frozen_all (the inference export,
    every weight an initializer)."""
    g = Graph("inference" if frozen_all else "evaluate")
    g.input("image", np.float32, tensor_shape(program, "image"))
    trainable = set() if frozen_all else set(trainable_params)
    emit_ops(g, program, range(len(program.ops)), trainable)
    g.output("logits", np.float32, tensor_shape(program, "logits"))
    return g


# ------------------------------------------------------------------ backward

def kept_inputs(split: Split, method: str) -> list:
    """(name, dims) of every kept piece the backward takes, per trainable conv; a rank dim is
    named <layer>/<symbol>."""
    row, out = METHODS[method], []
    for op in split.trainable_convs:
        dims = row.piece_dims(conv_layer(split.program, op))
        for piece, shape in zip(row.pieces, dims):
            out.append((names.kept(op.name, piece), [f"{op.name}/{d}" if isinstance(d, str)
                                                   and d != BATCH else d for d in shape]))
    return out


def conv_layer(program: Program, op: Op) -> ConvLayer:
    """A conv op as its backward sees it: channels and per-sample sizes."""
    a = op.attrs
    c, h, w = program.shapes[op.inputs[0]]
    out_ch, oh, ow = program.shapes[op.output]
    return ConvLayer(op.name, c, out_ch, a["kernel"], a["stride"], a["padding"], a["groups"],
                     (h, w), (oh, ow), dilation=a.get("dilation", 1))


def conv_attrs(conv: ConvLayer) -> dict:
    """The ONNX Conv attributes of a conv (dilations only where not 1)."""
    attrs = dict(kernel_shape=list(pair(conv.kernel)), strides=list(pair(conv.stride)),
                 pads=list(pair(conv.padding)) * 2, group=conv.groups)
    if conv.dilation != 1:
        attrs["dilations"] = list(pair(conv.dilation))
    return attrs


def emit_conv_backward(g: Graph, program: Program, op: Op, dy: str, method: str,
                       needs_dx: bool) -> tuple:
    """(dW, db | None, dx | None) of a fine-tuned conv from what was kept."""
    conv, name, row = conv_layer(program, op), op.name + "/backward", METHODS[method]
    dw = row.weight_grad(g, name, {piece: names.kept(op.name, piece) for piece in row.pieces},
                         dy, conv)
    db = None
    if op.attrs.get("bias"):
        db = g.op("ReduceSum", [dy, g.ints([0, 2, 3])], name + "/db", keepdims=0)
    dx = conv_input_grad(g, name, dy, op.attrs["weight"], conv) if needs_dx else None
    return dw, db, dx


def conv_input_grad(g: Graph, name: str, dy: str, weight: str, conv: ConvLayer) -> str:
    """dX (N, C, H, W) of a conv from dY (N, O, H', W') and W (O, C/groups, kh, kw).

    Stride 1: a Conv of dY padded by (k - 1) d - p with the kernel flipped in space and
    transposed within each group, W'[g*C/g + c, o, i, j] = W[g*O/g + o, c, k-1-i, k-1-j]:
    dX[i] = sum_t dY[i + p - t d] W[t] = sum_u dY[i - ((k - 1) d - p) + u d] W[k - 1 - u]
    (per dim; d the dilation). Stride > 1: ConvTranspose (as a Conv, dY would need stride - 1
    zeros after every element). onnxruntime's CPU kernels decide (benchmarks/backward_ops.py:
    the Conv is 1.2-5.9x faster at stride 1, 2-3x slower at stride 2 with the zeros)."""
    c, (h, w), out_ch, (oh, ow) = conv.in_ch, conv.input_hw, conv.out_ch, conv.output_hw
    (kh, kw), (sh, sw), (ph, pw) = pair(conv.kernel), pair(conv.stride), pair(conv.padding)
    (dh, dw), groups = pair(conv.dilation), conv.groups
    dilated = {"dilations": [dh, dw]} if (dh, dw) != (1, 1) else {}
    if (sh, sw) != (1, 1) and g.nchwc and nchwc_depthwise(conv) and ph < kh and pw < kw:
        return strided_depthwise_input_grad_nchwc(g, name, dy, weight, conv)
    if (sh, sw) != (1, 1):
        return g.op("ConvTranspose", [dy, weight], name + "/dX", kernel_shape=[kh, kw],
                    strides=[sh, sw], pads=[ph, pw, ph, pw], group=groups,
                    output_padding=[h - ((oh - 1) * sh - 2 * ph + (kh - 1) * dh + 1),
                                    w - ((ow - 1) * sw - 2 * pw + (kw - 1) * dw + 1)],
                    **dilated)
    before = [(kh - 1) * dh - ph, (kw - 1) * dw - pw]
    if min(before) < 0:  # padding past the kernel's reach: a negative pad is a crop of dY
        crop = [max(0, -b) for b in before]
        dy = g.op("Slice", [dy, g.ints(crop), g.ints([oh - crop[0], ow - crop[1]]),
                            g.ints([2, 3])], name + "/dY_cropped")
        before = [max(0, b) for b in before]
    og, cg = out_ch // groups, c // groups
    kernel_t = weight
    if groups == 1:
        kernel_t = g.op("Transpose", [weight], name + "/W_T", perm=[1, 0, 2, 3])  # (C, O, k, k)
    elif og > 1 or cg > 1:  # (g, O/g, C/g, k, k) -> (g, C/g, O/g, k, k) -> (C, O/g, k, k)
        grouped = g.op("Reshape", [weight, g.ints([groups, og, cg, kh, kw])], name + "/W_groups")
        grouped = g.op("Transpose", [grouped], name + "/W_groups_T", perm=[0, 2, 1, 3, 4])
        kernel_t = g.op("Reshape", [grouped, g.ints([c, og, kh, kw])], name + "/W_T")
    if kh > 1 or kw > 1:
        kernel_t = g.op("Slice", [kernel_t, g.ints([-1, -1]), g.ints([-kh - 1, -kw - 1]),
                                  g.ints([2, 3]), g.ints([-1, -1])], name + "/W_flipped")
    if g.nchwc and nchwc_depthwise(conv):
        return nchwc_depthwise_conv(g, name + "/dX", dy, kernel_t, c, kw, pads=before * 2,
                                    **dilated)
    return g.op("Conv", [dy, kernel_t], name + "/dX", pads=before * 2, group=groups, **dilated)


def spread_matrix(n: int, s: int) -> np.ndarray:
    """(n, n s) float32: row i one at column i s, so that x @ it puts s - 1 zeros after each
    element of x's last axis."""
    m = np.zeros((n, n * s), np.float32)
    m[np.arange(n), np.arange(n) * s] = 1
    return m


def strided_depthwise_input_grad_nchwc(g: Graph, name: str, dy: str, weight: str,
                                      conv: ConvLayer) -> str:
    """dX (N, C, H, W) of a strided depthwise conv on onnxruntime's NCHWc kernels: dY with
    s - 1 zeros after each element, (N, C, H' s, W' s), then conv_input_grad's stride-1 form,
    the flipped kernel padded k - 1 - p before and up to H after (s^2 the multiplies of
    ConvTranspose, on the fast kernel)."""
    c, (h, w), (oh, ow) = conv.in_ch, conv.input_hw, conv.output_hw
    (kh, kw), (sh, sw), (ph, pw) = pair(conv.kernel), pair(conv.stride), pair(conv.padding)
    # the zeros by two MatMuls with one-hot spreading matrices: onnxruntime pads or
    # transposes a trailing axis element by element (3-5x slower, measured)
    up = g.op("MatMul", [dy, g.const(f"const/spread_columns/{ow}x{sw}", spread_matrix(ow, sw))],
              name + "/dY_columns")                                              # (N, C, H', W' s)
    up = g.op("MatMul", [g.const(f"const/spread_rows/{oh}x{sh}", spread_matrix(oh, sh).T), up],
              name + "/dY_spread")                                               # (N, C, H' s, W' s)
    before = [kh - 1 - ph, kw - 1 - pw]
    after = [h - oh * sh - before[0] + kh - 1, w - ow * sw - before[1] + kw - 1]
    if min(after) < 0:  # trailing zeros past the last row or column dX needs
        up = g.op("Slice", [up, g.ints([0, 0]), g.ints([oh * sh + min(after[0], 0),
                                                         ow * sw + min(after[1], 0)]),
                            g.ints([2, 3])], name + "/dY_cut")
        after = [max(a, 0) for a in after]
    flipped = g.op("Slice", [weight, g.ints([-1, -1]), g.ints([-kh - 1, -kw - 1]),
                             g.ints([2, 3]), g.ints([-1, -1])], name + "/W_flipped")
    return nchwc_depthwise_conv(g, name + "/dX", up, flipped, c, kw, pads=before + after)


def lr_of_rank(rank: int) -> str:
    """The update graph's lr, reshaped to ``rank`` dims of 1."""
    return f"lr/rank{rank}"


def emit_update(g: Graph, config: TrainConfig, param: str, grad: str, shape) -> list:
    """Optimizer step in torch's semantics; returns the state tensor names it reads. Its
    scalars (lr and the constants) have the param's rank, all dims 1: onnxruntime 1.32
    multiplied a (576, 96, 1, 1) tensor by a rank-0 scalar in 931 us, by a (1, 1, 1, 1)
    one in 14 (an elementwise op whose shape ends in 1s, against a scalar of another rank;
    activations showed no such gap: benchmarks/scripts/scalar_broadcast.py)."""
    rank = len(shape)
    lr = lr_of_rank(rank)  # update_graph makes it
    scalar = partial(g.scalar, rank=rank)
    if config.optimizer == "sgd":
        if config.weight_decay:
            grad = g.op("Add", [grad, g.op("Mul", [param, scalar(config.weight_decay)],
                                           param + "/decay")], param + "/grad_decayed")
        step_dir, state = grad, []
        if config.momentum:
            buf = g.input(names.state("momentum", param), np.float32, shape)
            step_dir = g.op("Add", [g.op("Mul", [buf, scalar(config.momentum)], param + "/mom"),
                                    grad], param + "/momentum",
                            outputs=[names.new(names.state("momentum", param))])
            g.output(step_dir, np.float32, shape)
            state = [buf]
        g.op("Sub", [param, g.op("Mul", [step_dir, lr], param + "/lr_x_dir")], param + "/update",
             outputs=[names.new(param)])
        g.output(names.new(param), np.float32, shape)
        return state
    # AdamW: decoupled weight decay, bias-corrected moments; "step" counts from 1
    b1, b2 = config.betas
    m = g.input(names.state("exp_avg", param), np.float32, shape)
    v = g.input(names.state("exp_avg_sq", param), np.float32, shape)
    m_new = g.op("Add", [g.op("Mul", [m, scalar(b1)], param + "/m_b1"),
                         g.op("Mul", [grad, scalar(1 - b1)], param + "/g_1mb1")],
                 param + "/exp_avg", outputs=[names.new(names.state("exp_avg", param))])
    g_sq = g.op("Mul", [grad, grad], param + "/g_sq")
    v_new = g.op("Add", [g.op("Mul", [v, scalar(b2)], param + "/v_b2"),
                         g.op("Mul", [g_sq, scalar(1 - b2)], param + "/gsq_1mb2")],
                 param + "/exp_avg_sq", outputs=[names.new(names.state("exp_avg_sq", param))])
    bc1 = g.op("Sub", [scalar(1.0), g.op("Pow", [scalar(b1), "step"], param + "/b1_t")],
               param + "/bias_correction1")
    bc2 = g.op("Sub", [scalar(1.0), g.op("Pow", [scalar(b2), "step"], param + "/b2_t")],
               param + "/bias_correction2")
    denom = g.op("Add", [g.op("Div", [g.op("Sqrt", [v_new], param + "/sqrt_v"),
                                      g.op("Sqrt", [bc2], param + "/sqrt_bc2")], param + "/v_hat"),
                         scalar(config.adam_eps)], param + "/denom")
    step_size = g.op("Div", [lr, bc1], param + "/step_size")
    decayed = g.op("Mul", [param, g.op("Sub", [scalar(1.0), g.op(
        "Mul", [lr, scalar(config.weight_decay)], param + "/lr_wd")], param + "/1m_lr_wd")],
        param + "/decayed")
    g.op("Sub", [decayed, g.op("Mul", [step_size, g.op("Div", [m_new, denom], param + "/m_over_d")],
                               param + "/delta")], param + "/update", outputs=[names.new(param)])
    for t in (names.new(param), m_new, v_new):
        g.output(t, np.float32, shape)
    return [m, v]


def crossings(split: Split) -> tuple:
    """(produced_in, used_in): tensor -> the partition that makes it / the partitions that read it."""
    program = split.program
    produced_in, used_in = {}, {}
    for p, part in enumerate(split.partitions):
        for i in part:
            produced_in[program.ops[i].output] = p
            for t in program.ops[i].inputs:
                used_in.setdefault(t, set()).add(p)
    return produced_in, used_in


def backward_partitions(split: Split, config: TrainConfig, nchwc: bool = False) -> list:
    """backward_p for p = N .. 1: the reverse of forward_p (fine-tuned conv p-1 and what
    follows it up to the next fine-tuned conv).

    backward_p takes d/<t> of the tensors forward_p hands to later partitions (summed over
    their consumers by the device), the kept pieces of its conv, its masks and its params;
    it returns d/<t> of forward_p's inputs and grad/<param>. Every term is a sum over the
    samples, so the device may run it on slices of the batch and sum the grad/<param>.
    nchwc: the graphs may use onnxruntime's NCHWc kernels (``Graph.nchwc``).
    Returns [(p, Graph)] in execution order (p = N first)."""
    program = split.program
    produced_in, used_in = crossings(split)
    trainable = set(split.trainable_params)
    kept = dict(kept_inputs(split, config.method))
    derived = masks_from_kept(split, config.method)
    factor_acts = factor_sources(split, config.method)

    def needs_grad(t: str) -> bool:  # made in the fine-tuned region (the prefix is partition 0)
        return produced_in.get(t, 0) >= 1

    result = []
    for p in range(len(split.partitions) - 1, 0, -1):
        ops = [program.ops[i] for i in split.partitions[p]]
        g = Graph(f"backward_{p}", nchwc=nchwc)
        grads, factors = {}, {}  # factors: <y>/factor_<i> -> its tensor in g
        later = [op.output for op in ops
                 if any(q > p for q in used_in.get(op.output, ())) or op.output == "logits"]
        for t in later:
            grads[t] = g.input(names.d(t), np.float32, tensor_shape(program, t))
        conv = ops[0]
        for piece in METHODS[config.method].pieces:
            name = names.kept(conv.name, piece)
            g.input(name, np.float32, kept[name])
        for op in ops:
            source = activation_source(op, derived) if op.kind in ("clip", "act") else None
            if source == "kept":
                g.input(derived[op.output], np.float32, kept[derived[op.output]])
            elif source == "bits":
                g.input(names.mask_bool(op.output), np.bool_, tensor_shape(program, op.output))
            elif source == "saved":
                g.input(names.act_saved(op.output), np.float32, tensor_shape(program, op.output))
            elif op.kind == "mul":
                for i, t in enumerate(op.inputs):
                    name = names.factor(op.output, i)
                    if name not in factor_acts:
                        continue
                    factors[name] = (g.input(name, np.float32, tensor_shape(program, t))
                                     if factor_acts[name] is None else
                                     factor_from_act(g, program, factor_acts[name], derived,
                                                     kept, f"{op.name}/factor_{i}"))
            elif op.kind == "maxpool":
                g.input(names.argmax(op.output), np.int32, tensor_shape(program, op.output))
            if op.kind == "linear":
                g.input(op.inputs[0], np.float32, tensor_shape(program, op.inputs[0]))
        params = [n for op in ops if op.kind in ("conv", "linear")
                  for n in (op.attrs["weight"], op.attrs.get("bias")) if n in trainable]
        for name in params:
            g.input(name, np.float32, list(program.params[name].shape))
        param_grads = emit_partition_backward(g, program, ops, grads, needs_grad, config.method,
                                              derived, factors)
        inputs = []
        for op in ops:
            for t in op.inputs:
                if produced_in.get(t, -1) != p and t not in inputs and needs_grad(t):
                    inputs.append(t)
        for t in inputs:
            g.output(g.op("Identity", [grads.pop(t)], t + "/grad_out", outputs=[names.d(t)]),
                     np.float32, tensor_shape(program, t))
        for name in params:
            shape = list(program.params[name].shape)
            grad = g.op("Identity", [param_grads[name]], name + "/grad", outputs=[names.grad(name)])
            g.output(grad, np.float32, shape)
        result.append((p, g))
    return result


def update_graph(split: Split, config: TrainConfig) -> Graph:
    """grad/<param>, params, optimizer state, lr (, step) -> new/<param>, new/state/...:
    the optimizer step of every trainable param, once the whole batch's gradients are in."""
    g = Graph("update")
    g.input("lr", np.float32, [])
    if config.optimizer == "adamw":
        g.input("step", np.float32, [])
    for rank in sorted({len(split.program.params[name].shape)
                        for name in split.trainable_params}):
        g.op("Reshape", ["lr", g.ints([1] * rank)], "lr_reshaped", outputs=[lr_of_rank(rank)])
    for name in split.trainable_params:
        shape = list(split.program.params[name].shape)
        g.input(name, np.float32, shape)
        emit_update(g, config, name, g.input(names.grad(name), np.float32, shape), shape)
    return g


def mask_float(g: Graph, name: str, mask: str) -> str:
    """bool (B, *shape) -> float32 0/1 of the same shape, to multiply dY by (Cast + Mul:
    measured 5x faster than a Where(mask, dY, 0) here, ORT 1.32, 2 threads)."""
    return g.op("Cast", [mask], name + "/mask_f", to=TensorProto.FLOAT)


def factor_from_act(g: Graph, program: Program, act: Op, derived: dict, kept: dict,
                    name: str) -> str:
    """A multiply's factor y = f(x) from what the backward of act f keeps (declared here as
    an input unless g has it): f(x) of the saved input (hardswish, silu), or y itself (a
    sigmoid's saved output; vanilla: the next conv's kept input)."""
    y = act.output
    held, shape = ((derived[y], kept[derived[y]]) if y in derived and
                   activation_source(act, derived) == "kept" else
                   (names.act_saved(y), tensor_shape(program, y)))
    if held not in {value.name for value in g.inputs}:
        g.input(held, np.float32, shape)
    if ACTIVATIONS[act.attrs["fn"]] == "output":
        return held
    return apply_activation(g, act.attrs, held, name + "/recomputed")


def emit_partition_backward(g: Graph, program: Program, ops: list, grads: dict, needs_grad,
                            method: str, derived: dict, factors: dict) -> dict:
    """Backward of ops (one partition, reversed); grads: tensor -> gradient so far (updated,
    ends with the gradients of the partition's inputs); derived: masks_from_kept; factors: each
    multiply factor's tensor in g. Returns param -> gradient."""
    param_grads = {}

    def accumulate(t: str, grad: str) -> None:
        if not needs_grad(t):
            return
        grads[t] = g.op("Add", [grads[t], grad], t + "/grad_sum") if t in grads else grad

    for op in reversed(ops):
        dy = grads.pop(op.output, None)
        if dy is None:
            continue
        if op.kind in ("linear", "conv"):
            param_grads.update(emit_layer_backward(g, program, op, dy, method, needs_grad,
                                                   accumulate))
        elif op.kind in ("add", "mul", "cat"):
            emit_join_backward(g, program, op, dy, needs_grad, factors, accumulate)
        elif op.kind in ("clip", "act", "affine"):
            accumulate(op.inputs[0], g.op("Mul", [dy, local_slope(g, program, op, derived)],
                                          op.name + "/dX"))
        elif op.kind in ("gap", "mean", "avgpool", "maxpool"):
            accumulate(op.inputs[0], pool_input_grad(g, program, op, dy))
        elif op.kind in ("reshape", "slice", "shuffle"):
            accumulate(op.inputs[0], moved_input_grad(g, program, op, dy))
        else:
            raise ValueError(f"no backward for {op.kind!r}")
    return param_grads


def emit_layer_backward(g: Graph, program: Program, op: Op, dy: str, method: str, needs_grad,
                        accumulate) -> dict:
    """A linear's or conv's param -> gradient; its input's gradient goes to accumulate, made
    only when needs_grad(input)."""
    x = op.inputs[0]
    param_grads = {}
    if op.kind == "linear":
        param_grads[op.attrs["weight"]] = g.op("Gemm", [dy, x], op.name + "/dW", transA=1)
        if op.attrs.get("bias"):
            param_grads[op.attrs["bias"]] = g.op("ReduceSum", [dy, g.ints([0])], op.name + "/db",
                                                 keepdims=0)
        if needs_grad(x):
            accumulate(x, g.op("MatMul", [dy, op.attrs["weight"]], op.name + "/dX"))
        return param_grads
    dw, db, dx = emit_conv_backward(g, program, op, dy, method, needs_grad(x))
    param_grads[op.attrs["weight"]] = dw
    if db:
        param_grads[op.attrs["bias"]] = db
    if dx:
        accumulate(x, dx)
    return param_grads


def emit_join_backward(g: Graph, program: Program, op: Op, dy: str, needs_grad, factors: dict,
                       accumulate) -> None:
    """The gradient of each input of an add, a mul (factors: each multiply factor's tensor in
    g) or a cat, to accumulate."""
    if op.kind == "add":
        for t in op.inputs:
            accumulate(t, dy)
    elif op.kind == "mul":  # d/a = dY b, summed over the axes a was broadcast along
        for i, t in enumerate(op.inputs):
            if not needs_grad(t):
                continue
            other = factors[names.factor(op.output, 1 - i)]
            grad = g.op("Mul", [dy, other], f"{op.name}/dY_x_factor_{1 - i}")
            if program.shapes[t] != program.shapes[op.output]:  # a (C, 1, 1) gate
                grad = g.op("ReduceSum", [grad, g.ints([2, 3])], f"{op.name}/d_gate_{i}",
                            keepdims=1)
            accumulate(t, grad)
    else:  # cat: each input's channels of dY
        start = 0
        for i, t in enumerate(op.inputs):
            stop = start + program.shapes[t][0]
            if needs_grad(t):
                accumulate(t, g.op("Slice", [dy, g.ints([start]), g.ints([stop]), g.ints([1])],
                                   f"{op.name}/dX_{i}"))
            start = stop


def local_slope(g: Graph, program: Program, op: Op, derived: dict) -> str:
    """d output / d input of an elementwise op (clip, act, affine), to multiply dY by: the
    clip's 0/1 mask (from the kept y in derived, else its mask bits), the activation's
    derivative, the affine's scale."""
    if op.kind == "clip" and op.output in derived:  # lo < y < hi of the kept y
        y, lo, hi = derived[op.output], op.attrs["lo"], op.attrs["hi"]
        mask = g.op("Greater", [y, g.scalar(lo)], op.name + "/above_lo")
        if hi != RELU_HI:
            below = g.op("Less", [y, g.scalar(hi)], op.name + "/below_hi")
            mask = g.op("And", [mask, below], op.name + "/mask")
        # Cast + Mul: measured 5x faster than a Where(mask, dY, 0) here (ORT 1.32, 2 threads)
        return g.op("Cast", [mask], op.name + "/mask_f", to=TensorProto.FLOAT)
    if op.kind == "clip":
        return mask_float(g, op.name, names.mask_bool(op.output))
    if op.kind == "act":
        source = activation_source(op, derived)
        kept_tensor = {"kept": derived.get(op.output), "bits": names.mask_bool(op.output),
                       "saved": names.act_saved(op.output)}[source]
        return activation_derivative(g, program, op, source, kept_tensor)
    return channel_const(g, program, op.attrs["scale"])  # affine


def pool_input_grad(g: Graph, program: Program, op: Op, dy: str) -> str:
    """dX (B, C, H, W) of a pool: gap and mean spread dY evenly, avgpool over its windows,
    maxpool to each window's max (summed where windows share it)."""
    c, h, w = program.shapes[op.inputs[0]]
    if op.kind == "gap":
        mean = g.op("Mul", [dy, g.scalar(1.0 / (h * w))], op.name + "/dX_mean")
        spread = g.op("Unsqueeze", [mean, g.ints([2, 3])], op.name + "/dX_unsqueeze")
        return g.op("Expand", [spread, g.ints([1, 1, h, w])], op.name + "/dX")
    if op.kind == "mean":
        spread = g.op("Mul", [dy, g.scalar(1.0 / (h * w))], op.name + "/dX_mean")
        return g.op("Expand", [spread, g.ints([1, 1, h, w])], op.name + "/dX")
    if op.kind == "avgpool":
        return emit_avgpool_backward(g, program, op, dy)
    flat = g.ints([0, -1])  # maxpool
    batch = g.op("Slice", [g.op("Shape", [dy], op.name + "/dY_shape"), g.ints([0]), g.ints([1])],
                 op.name + "/batch")
    rows = g.op("Concat", [batch, g.ints([c * h * w])], op.name + "/dX_flat_shape",
                axis=0)                                                           # (B, C*H*W)
    zeros = g.op("ConstantOfShape", [rows], op.name + "/zeros",
                 value=onnx.helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    index = g.op("Reshape", [names.argmax(op.output), flat], op.name + "/argmax_rows")
    updates = g.op("Reshape", [dy, flat], op.name + "/dY_rows")
    dx = g.op("ScatterElements", [zeros, index, updates], op.name + "/dX_flat", axis=1,
              reduction="add")
    return g.op("Reshape", [dx, g.ints([-1, c, h, w])], op.name + "/dX")


def moved_input_grad(g: Graph, program: Program, op: Op, dy: str) -> str:
    """dX of an op that only moves values (reshape, slice, shuffle): dY moved back."""
    x = op.inputs[0]
    if op.kind == "reshape":
        return g.op("Reshape", [dy, g.ints([0, *program.shapes[x]])], op.name + "/dX")
    if op.kind == "slice":  # dY in its channels, zeros elsewhere
        c = program.shapes[x][0]
        pads = [0, op.attrs["start"], 0, 0, 0, c - op.attrs["stop"], 0, 0]
        return g.op("Pad", [dy, g.ints(pads)], op.name + "/dX")
    groups = program.shapes[x][0] // op.attrs["groups"]  # shuffle: the inverse, C / g groups
    return emit_shuffle(g, dy, program.shapes[x], groups, op.name + "/dX")


def optimizer_state(split: Split, config: TrainConfig) -> dict:
    """Initial optimizer state (zeros), named as the backward graph's state inputs."""
    kinds = {"sgd": ["momentum"] if config.momentum else [], "adamw": ["exp_avg", "exp_avg_sq"]}
    return {names.state(kind, p): np.zeros_like(split.program.params[p])
            for p in split.trainable_params for kind in kinds[config.optimizer]}


def overview_graph(forward_graphs: list, split: Split, backward: list,
                   config: TrainConfig) -> Graph:
    """One graph of the whole step for people (Netron), not for execution: the forward
    partitions, an ``ai.actcomp`` node where the device decomposes each fine-tuned conv's
    input (its outputs are exactly what the backward keeps), then the backward partitions
    (``backward``: their Graphs in execution order). Of the initializers only the constants
    (shapes, axes) come along; the weights and the other unproduced tensors are inputs, each
    with its type and shape, and every edge gets a shape (value_info)."""
    g = Graph("training_step_overview")
    append_forward(g, forward_graphs, split, config)
    append_backward(g, backward)
    declare_interface(g, forward_graphs, backward)
    return g


def copy_nodes(graph: Graph, renamed: dict) -> list:
    """graph's nodes, named <graph>/<node>; a tensor inside the graph (not one it takes or
    hands on) becomes <graph>/<tensor>, as two graphs may use the same inner name; an input
    in renamed reads its new name."""
    interface = {v.name for v in graph.inputs + graph.outputs}
    inner = {o: f"{graph.name}/{o}" for n in graph.nodes for o in n.output if o not in interface}
    copies = []
    for node in graph.nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{graph.name}/{node.name}"
        copy.input[:] = [inner.get(i, renamed.get(i, i)) for i in copy.input]
        copy.output[:] = [inner.get(o, o) for o in copy.output]
        copies.append(copy)
    return copies


def append_forward(g: Graph, forward_graphs: list, split: Split, config: TrainConfig) -> None:
    """The forward partitions' nodes into g, each fine-tuned conv's input decomposed (an
    ``ai.actcomp`` node giving its kept pieces, and its mask where the runner makes it:
    ``input_masks``) before the partition that starts with it."""
    op_type = METHODS[config.method].overview_op
    attrs = {}
    if config.eps is not None:
        attrs["eps"] = float(config.eps)
    if config.ranks:
        attrs["ranks"] = [int(r) for r in config.ranks]
    masks = input_masks(split, config.method)
    for p, graph in enumerate(forward_graphs):
        if p >= 1:
            conv = split.trainable_convs[p - 1]
            kept = [names.kept(conv.name, piece) for piece in METHODS[config.method].pieces]
            if conv.name in masks:  # the runner packs the input's mask there too
                kept.append(names.mask_bool(conv.inputs[0]))
            g.op(op_type, [conv.inputs[0]], f"{conv.name}/decompose", outputs=kept,
                 domain=ACTCOMP_DOMAIN, **attrs)
        g.nodes.extend(copy_nodes(graph, {}))


def append_backward(g: Graph, backward: list) -> None:
    """The backward partitions' nodes into g. A d/<t> that two of them make (t has consumers
    in both) is summed by the device; here the second is renamed <d/t>@<graph> and an Add
    makes what later reads d/t."""
    renamed, made = {}, {o for n in g.nodes for o in n.output}
    for graph in backward:
        sums = []
        for copy in copy_nodes(graph, renamed):
            for k, out in enumerate(copy.output):
                if out in made:
                    copy.output[k] = f"{out}@{graph.name}"
                    sums.append(out)
                made.add(copy.output[k])
            g.nodes.append(copy)
        for out in sums:
            renamed[out] = g.op("Add", [renamed.get(out, out), f"{out}@{graph.name}"],
                                f"{graph.name}/{out}/sum", outputs=[f"{out}/sum@{graph.name}"])
            made.add(renamed[out])


def declare_interface(g: Graph, forward_graphs: list, backward: list) -> None:
    """g's inputs, constants, outputs and value_info, every tensor typed and shaped as the
    executable graphs (forward then backward) declare it: the tensors g reads but no node
    makes are inputs, except the constants (shapes, axes: small), which come along so that
    shape inference can use their values; the outputs are the backward's (no d/<t>), the loss
    and the logits."""
    graphs = list(forward_graphs) + list(backward)
    known = {}
    for graph in graphs:
        for info in graph.inputs + graph.outputs:
            known.setdefault(info.name, info)
        for init in graph.initializers:
            known.setdefault(init.name, onnx.helper.make_tensor_value_info(
                init.name, init.data_type, list(init.dims)))
    produced = {o for n in g.nodes for o in n.output}
    consumed = []
    for n in g.nodes:
        for i in n.input:
            if i and i not in produced and i not in consumed:
                consumed.append(i)
    constants = {init.name: init for graph in graphs for init in graph.initializers
                 if init.name.startswith("const/")}
    g.initializers.extend(constants[name] for name in consumed if name in constants)
    g.inputs.extend(known[name] for name in consumed if name not in constants)
    for graph in backward:
        g.outputs.extend(o for o in graph.outputs if not names.is_d(o.name))
    g.outputs.extend(o for o in forward_graphs[-1].outputs if o.name in ("loss", "logits"))
    outputs = {o.name for o in g.outputs}
    g.value_info.extend(info for name, info in known.items()
                        if name in produced and name not in outputs)
