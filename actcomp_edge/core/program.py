"""A network as a flat list of ops over named tensors (numpy weights, no torch).

This is what the exporter turns into ONNX graphs. Ops, in execution order:

    conv    (x) -> y   attrs: layer, weight, bias|None, kernel, stride, padding, groups
                       [, dilation]; sizes an int (square) or (height, width)
    affine  (x) -> y   frozen BatchNorm as y = x * scale + shift (per channel); eps: its
                       BatchNorm's (for a torch model of the program)
    clip    (x) -> y   ReLU / ReLU6 / clamp: y = min(max(x, lo), hi); backward mask lo < x < hi
    act     (x) -> y   fn: hardsigmoid, leaky_relu (slope), hardswish, silu, sigmoid
                       (``arch.ACTIVATIONS``: what each one's backward keeps)
    add     (a, b) -> y   residual add
    mul     (a, b) -> y   y = a * b, one of them may be (C, 1, 1): a squeeze-excitation gate;
                       the backward keeps a factor when the other input needs a gradient
                       (unless a fine-tuned act's kept tensor gives it)
    mean    (x) -> y   global average pool keeping (C, 1, 1) (squeeze-excitation's squeeze)
    reshape (x) -> y   (C, 1, 1) <-> (C,): a squeeze-excitation's gate between Linears
    cat     (a, b, ...) -> y   concatenation on channels
    slice   (x) -> y   channels [start, stop) of x (a piece of a chunk / split)
    shuffle (x) -> y   channel shuffle of ``groups``: y[j g + i] = x[i C/g + j]
    maxpool (x) -> y   square window (ceil_mode when set); backward: dY to each window's argmax
    avgpool (x) -> y   a local square average pool (count_include_pad); backward: dY / count
                       spread over each window
    gap     (x) -> y   global average pool + flatten: (B, C, H, W) -> (B, C)
    linear  (x) -> y   y = x W^T + b on a vector: the classifier after the gap (several,
                       with clips and acts between them: a head; the last one's output is
                       ``logits``), or a squeeze-excitation's; the backward keeps x

Param names follow the ``.npz`` naming of ``export.zoo`` (``<layer>.weight``,
``<layer>.bn.running_mean``, torchvision names for ResNets).

The program is the one description of a network: the exporter's graphs, the memory plan of
an artifact and ``actcomp plan`` (``network``: the convs as the memory model sees them) all
derive from it. A built-in architecture's spec (``actcomp_edge.core.arch``) and a user's
``nn.Module`` (``export.torch_frontend``) are two ways in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Optional

import numpy as np

from actcomp_edge.core import arch

RELU_HI = float("inf")


@dataclass
class Op:
    kind: str
    name: str
    inputs: tuple
    output: str
    attrs: dict = field(default_factory=dict)


@dataclass
class Program:
    """ops in execution order; params: name -> float32 array; shapes: tensor -> per-sample shape."""

    name: str
    ops: list
    params: dict
    shapes: dict
    num_classes: int

    def conv_ops(self) -> list:
        return [op for op in self.ops if op.kind == "conv"]

    def consumers(self, tensor: str) -> list:
        return [op for op in self.ops if tensor in op.inputs]

    def head_start(self) -> int:
        """Index of the classifier's global pool (``gap``): the head is it and what follows."""
        return head_start(self.ops)


def head_start(ops: list) -> int:
    """Index of the ``gap`` op in ops (the classifier's global pool); ValueError without one."""
    kinds = [op.kind for op in ops]
    if "gap" not in kinds:
        raise ValueError("the network has no global pool before its classifier")
    return kinds.index("gap")


class _Builder:
    """Emits ops and computes every tensor's per-sample shape. ``arrays`` None: shapes only
    (each param a zero-stride view of its shape, for planning without weights)."""

    def __init__(self, arrays: Optional[dict], bn_eps: float):
        self.ops, self.params, self.arrays, self.bn_eps = [], {}, arrays, bn_eps
        self.shapes = {}

    def param(self, name: str, shape: tuple) -> str:
        if self.arrays is None:
            self.params[name] = np.broadcast_to(np.float32(0), shape)
            return name
        if name not in self.arrays:
            raise KeyError(name)
        array = np.ascontiguousarray(self.arrays[name], dtype=np.float32)
        if array.shape != tuple(shape):
            raise ValueError(f"weights array {name!r} has shape {array.shape}, the model needs "
                             f"{tuple(shape)}")
        self.params[name] = array
        return name

    def emit(self, kind, name, inputs, output, shape, **attrs) -> str:
        self.ops.append(Op(kind, name, tuple(inputs), output, attrs))
        self.shapes[output] = tuple(shape)
        return output

    def conv(self, name: str, x: str, out_ch: int, kernel: int, stride: int = 1,
             groups: int = 1, padding: Optional[int] = None, bias: bool = False) -> str:
        """Conv2d ``name`` (weight ``<name>.weight``, bias ``<name>.bias``); padding k // 2
        unless given."""
        c, h, w = self.shapes[x]
        p = kernel // 2 if padding is None else padding
        out_hw = (arch.conv_out(h, kernel, stride, p), arch.conv_out(w, kernel, stride, p))
        if min(out_hw) < 1:
            raise arch.SpecError(f"input too small: layer {name} would get an empty output")
        weight = self.param(f"{name}.weight", (out_ch, c // groups, kernel, kernel))
        return self.emit("conv", name, [x], f"{name}/conv", (out_ch,) + out_hw, layer=name,
                         weight=weight,
                         bias=self.param(f"{name}.bias", (out_ch,)) if bias else None,
                         kernel=kernel, stride=stride, padding=p, groups=groups)

    def batchnorm(self, name: str, x: str, prefix: str) -> str:
        """Frozen BN from running stats -> per-channel affine."""
        channels = (self.shapes[x][0],)
        gamma, beta, mean, var = (self.params.pop(self.param(f"{prefix}.{k}", channels))
                                  for k in ("weight", "bias", "running_mean", "running_var"))
        scale = (gamma / np.sqrt(var.astype(np.float64) + self.bn_eps)).astype(np.float32)
        shift = (beta - mean * scale).astype(np.float32)
        self.params[f"{prefix}.scale"], self.params[f"{prefix}.shift"] = scale, shift
        return self.emit("affine", name, [x], f"{name}/bn", self.shapes[x],
                         scale=f"{prefix}.scale", shift=f"{prefix}.shift", eps=self.bn_eps)

    def act(self, name: str, x: str, act: Optional[dict]) -> str:
        if act is None:
            return x
        kind = act["type"]
        lo, hi = {"relu": (0.0, RELU_HI), "relu6": (0.0, 6.0)}.get(
            kind, (float(act.get("min", 0.0)), float(act.get("max", RELU_HI))))
        return self.emit("clip", name, [x], f"{name}/act", self.shapes[x], lo=lo, hi=hi)

    def maxpool(self, name: str, x: str, kernel: int, stride: int, padding: int) -> str:
        c, h, w = self.shapes[x]
        out_hw = tuple(arch.conv_out(s, kernel, stride, padding) for s in (h, w))
        return self.emit("maxpool", name, [x], name, (c,) + out_hw, kernel=kernel,
                         stride=stride, padding=padding)


def build_program(spec: dict, arrays: Optional[dict], input_size) -> Program:
    """spec + weights (npz naming) -> Program at a fixed input size (H, W). arrays None: the
    ops and shapes alone (``network``)."""
    bn_eps = float((spec.get("bn") or {}).get("eps", 1e-5))
    b = _Builder(arrays, bn_eps)
    hw = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    b.shapes["image"] = (3,) + hw
    try:
        if spec["family"] == "resnet":
            x = _resnet(b, spec)
        else:
            x = _inverted_residual(b, spec)
        head = spec["classifier"]
        features, classes = b.shapes[x][0], int(head["out_features"])
        x = b.emit("gap", "pool", [x], "features", (features,))
        weight = b.param(f"{head['name']}.weight", (classes, features))
        bias = b.param(f"{head['name']}.bias", (classes,)) if head.get("bias", True) else None
        b.emit("linear", head["name"], [x], "logits", (classes,), weight=weight, bias=bias)
    except KeyError as e:
        raise ValueError(f"weights have no array {e.args[0]!r} needed by {spec.get('name')}") from None
    return Program(spec.get("name", "model"), b.ops, b.params, b.shapes,
                   int(spec["classifier"]["out_features"]))


def _unit(b: _Builder, spec: dict, layer: dict, x: str) -> str:
    name = layer["name"]
    x = b.conv(name, x, int(layer["out_ch"]), int(layer["kernel"]), int(layer["stride"]),
               int(layer.get("groups", 1)), bias=bool(spec.get("conv_bias")))
    if layer.get("bn") and not spec.get("bn_folded"):
        x = b.batchnorm(name, x, f"{name}.bn")
    return b.act(name, x, layer.get("act"))


def _inverted_residual(b: _Builder, spec: dict) -> str:
    x = _unit(b, spec, spec["stem"], "image")
    for block in spec["blocks"]:
        block_in = x
        for layer in block["layers"]:
            x = _unit(b, spec, layer, x)
        if block.get("residual"):
            x = b.emit("add", block["name"], [block_in, x], f"{block['name']}/add", b.shapes[x])
            x = b.act(f"{block['name']}.out", x, block.get("residual_out_act"))
    if spec.get("feature_mix"):
        x = _unit(b, spec, spec["feature_mix"], x)
    return x


def _resnet(b: _Builder, spec: dict) -> str:
    """torchvision's ResNet with BasicBlocks: conv1 7x7/2, max-pool 3x3/2, four stages."""
    relu = {"type": "relu"}
    x = b.conv("conv1", "image", 64, 7, 2)
    x = b.act("relu", b.batchnorm("bn1", x, "bn1"), relu)
    x = b.maxpool("maxpool", x, 3, 2, 1)
    cin = 64
    for stage, count in enumerate(spec["block_counts"]):
        cout = 64 * 2 ** stage
        for i in range(count):
            name, stride = f"layer{stage + 1}.{i}", 2 if (i == 0 and stage > 0) else 1
            block_in = x
            y = b.conv(f"{name}.conv1", x, cout, 3, stride)
            y = b.act(f"{name}.relu1", b.batchnorm(f"{name}.bn1", y, f"{name}.bn1"), relu)
            y = b.conv(f"{name}.conv2", y, cout, 3)
            y = b.batchnorm(f"{name}.bn2", y, f"{name}.bn2")
            shortcut = block_in
            if stride != 1 or cin != cout:
                shortcut = b.conv(f"{name}.downsample.0", block_in, cout, 1, stride)
                shortcut = b.batchnorm(f"{name}.downsample", shortcut, f"{name}.downsample.1")
            x = b.emit("add", name, [shortcut, y], f"{name}/add", b.shapes[y])
            x = b.act(f"{name}.relu2", x, relu)
            cin = cout
    return x


def network_of(program: Program) -> arch.Network:
    """The convs of a program as the memory model sees them (arch.Network). A clip or act
    belongs to the last conv before it: right after the conv (and its BN) it is the conv's act,
    after a residual add its post-add act; the first max-pool after it is its maxpool_after."""
    convs, current = [], None
    masking = {"type": "clamp"}  # every clip packs a backward mask
    gap = program.head_start()
    saving_act_owner = {}  # output of an act that keeps a float32 tensor -> its conv
    owner = {}             # tensor -> the last conv at or before the op that makes it
    for op in program.ops[:gap]:
        if op.kind == "conv":
            (c, h, w), (o, oh, ow) = program.shapes[op.inputs[0]], program.shapes[op.output]
            a = op.attrs
            current = dict(name=op.name, in_ch=c, out_ch=o, kernel=a["kernel"], stride=a["stride"],
                           padding=a["padding"], groups=a["groups"], input_hw=(h, w),
                           output_hw=(oh, ow), act=None, post_add_act=None, maxpool_after=None,
                           dilation=a.get("dilation", 1), tail=op.output, added=False,
                           more_acts=(), whole=())
            convs.append(current)
        elif current is None:
            continue
        elif op.kind == "affine" and op.inputs[0] == current["tail"]:
            current["tail"] = op.output
        elif op.kind == "add":
            current["added"] = True
        elif op.kind in ("clip", "act"):
            act = dict(masking if op.kind == "clip" else {"type": op.attrs["fn"]},
                       elements=prod(program.shapes[op.output]))
            slot = "post_add_act" if current["added"] else "act"
            if current[slot] is None:
                current[slot] = act
            else:
                current["more_acts"] += (act,)
            current["tail"] = op.output
            if op.kind == "act" and arch.ACTIVATIONS[op.attrs["fn"]] in ("input", "output"):
                saving_act_owner[op.output] = current["name"]
        elif op.kind == "mul":  # factor i: needed with the other input's conv fine-tuned
            current["whole"] += tuple((prod(program.shapes[t]), saving_act_owner.get(t),
                                       owner.get(op.inputs[1 - i]))
                                      for i, t in enumerate(op.inputs))
        elif op.kind == "linear":  # a squeeze-excitation's: its input, kept
            current["whole"] += ((prod(program.shapes[op.inputs[0]]), None, current["name"]),)
        elif op.kind == "maxpool" and current["maxpool_after"] is None:  # after an add too
            current["maxpool_after"] = {k: op.attrs[k] for k in ("kernel", "stride", "padding")}
            current["maxpool_after"]["output_hw"] = program.shapes[op.output][1:]
            current["tail"] = op.output
        owner[op.output] = current["name"]
    layers = [arch.ConvLayer(**{k: v for k, v in c.items() if k not in ("tail", "added")})
              for c in convs]
    floats, masks = head_kept(program, gap)
    return arch.Network(program.name, tuple(layers), program.shapes["features"][0],
                        program.num_classes, floats, masks)


def head_kept(program: Program, gap: int) -> tuple:
    """What a sample keeps for the backward of the head (the ops after the global pool):
    (float32 elements: every linear's input and what an act keeps whole, the element counts
    of the bit-packed masks of its clips and acts), as ``arch.ACTIVATIONS`` says."""
    floats, masks = 0, ()
    for op in program.ops[gap + 1:]:
        keeps = "mask" if op.kind == "clip" else arch.ACTIVATIONS.get(op.attrs.get("fn"))
        if op.kind == "linear":
            floats += prod(program.shapes[op.inputs[0]])
        elif keeps == "mask":
            masks += (prod(program.shapes[op.output]),)
        elif keeps in ("input", "output"):
            floats += prod(program.shapes[op.output])
    return floats, masks


def total_stride(spec: dict, reference: int = 1024) -> int:
    """Input pixels per pixel of the last feature map (32 for MobileNetV2, ResNet)."""
    last = network_of(build_program(spec, None, reference)).convs[-1]
    return reference // last.output_hw[0]


def check_input_size(spec: dict, input_size) -> tuple:
    """(H, W), or SpecError for an input smaller than the network's total stride (its last
    convs would see less than 1 px)."""
    hw = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    stride = total_stride(spec)
    if min(hw) < stride:
        raise arch.SpecError(f"input size {hw[0]}x{hw[1]} is smaller than the network's total "
                             f"stride {stride}: use an --input-size of at least {stride}")
    return hw


def network(spec: dict, input_size) -> arch.Network:
    """The convs of a built-in architecture at an input size, in definition order (torchvision's
    module order: "the last N convs" are ``network(...).convs[-N:]``), from its program."""
    return network_of(build_program(spec, None, check_input_size(spec, input_size)))


def conv_layers(spec: dict, input_size) -> list:
    """Every Conv2d of a built-in architecture in definition order (``network``)."""
    return list(network(spec, input_size).convs)
