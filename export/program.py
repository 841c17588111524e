"""A network as a flat list of ops over named tensors (numpy weights, no torch).

This is what the exporter turns into ONNX graphs. Ops, in execution order:

    conv    (x) -> y   attrs: layer, weight, bias|None, kernel, stride, padding, groups
    affine  (x) -> y   frozen BatchNorm as y = x * scale + shift (per channel)
    clip    (x) -> y   ReLU / ReLU6 / clamp: y = min(max(x, lo), hi); backward mask lo < x < hi
    add     (a, b) -> y   residual add
    maxpool (x) -> y   ResNet stem (frozen prefix only)
    gap     (x) -> y   global average pool + flatten: (B, C, H, W) -> (B, C)
    linear  (x) -> y   classifier: y = x W^T + b

Param names follow the ``.npz`` naming of ``export.zoo`` (``<layer>.weight``,
``<layer>.bn.running_mean``, torchvision names for ResNets).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from actcomp_edge import arch

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


class _Builder:
    def __init__(self, arrays: dict, bn_eps: float):
        self.ops, self.params, self.arrays, self.bn_eps = [], {}, arrays, bn_eps
        self.shapes = {}

    def param(self, name: str) -> str:
        if name not in self.arrays:
            raise KeyError(name)
        self.params[name] = np.ascontiguousarray(self.arrays[name], dtype=np.float32)
        return name

    def emit(self, kind, name, inputs, output, shape, **attrs) -> str:
        self.ops.append(Op(kind, name, tuple(inputs), output, attrs))
        self.shapes[output] = tuple(shape)
        return output

    def conv(self, layer: arch.ConvLayer, x: str, weight: str, bias: Optional[str]) -> str:
        return self.emit("conv", layer.name, [x], f"{layer.name}/conv",
                         (layer.out_ch,) + tuple(layer.output_hw), layer=layer.name,
                         weight=self.param(weight), bias=self.param(bias) if bias else None,
                         kernel=layer.kernel, stride=layer.stride, padding=layer.padding,
                         groups=layer.groups)

    def batchnorm(self, name: str, x: str, prefix: str) -> str:
        """Frozen BN from running stats -> per-channel affine."""
        gamma, beta = self.arrays[f"{prefix}.weight"], self.arrays[f"{prefix}.bias"]
        mean, var = self.arrays[f"{prefix}.running_mean"], self.arrays[f"{prefix}.running_var"]
        scale = (gamma / np.sqrt(var.astype(np.float64) + self.bn_eps)).astype(np.float32)
        shift = (beta - mean * scale).astype(np.float32)
        self.params[f"{prefix}.scale"], self.params[f"{prefix}.shift"] = scale, shift
        return self.emit("affine", name, [x], f"{name}/bn", self.shapes[x],
                         scale=f"{prefix}.scale", shift=f"{prefix}.shift")

    def act(self, name: str, x: str, act: Optional[dict]) -> str:
        if act is None:
            return x
        kind = act["type"]
        lo, hi = {"relu": (0.0, RELU_HI), "relu6": (0.0, 6.0)}.get(
            kind, (float(act.get("min", 0.0)), float(act.get("max", RELU_HI))))
        return self.emit("clip", name, [x], f"{name}/act", self.shapes[x], lo=lo, hi=hi)


def build_program(spec: dict, arrays: dict, input_size) -> Program:
    """spec + weights (npz naming) -> Program at a fixed input size (H, W)."""
    convs = {c.name: c for c in arch.conv_layers(spec, input_size)}
    bn_eps = float((spec.get("bn") or {}).get("eps", 1e-5))
    b = _Builder(arrays, bn_eps)
    hw = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    b.shapes["image"] = (3,) + hw
    try:
        if spec["family"] == "resnet":
            x = _resnet(b, spec, convs)
        else:
            x = _inverted_residual(b, spec, convs)
        head = spec["classifier"]
        x = b.emit("gap", "pool", [x], "features", (int(head["in_features"]),))
        bias = f"{head['name']}.bias" if head.get("bias", True) else None
        b.emit("linear", head["name"], [x], "logits", (int(head["out_features"]),),
               weight=b.param(f"{head['name']}.weight"), bias=b.param(bias) if bias else None)
    except KeyError as e:
        raise ValueError(f"weights have no array {e.args[0]!r} needed by {spec.get('name')}") from None
    return Program(spec.get("name", "model"), b.ops, b.params, b.shapes,
                   int(spec["classifier"]["out_features"]))


def _unit(b: _Builder, spec: dict, layer: dict, conv: arch.ConvLayer, x: str) -> str:
    name = layer["name"]
    bias = f"{name}.bias" if spec.get("conv_bias") else None
    x = b.conv(conv, x, f"{name}.weight", bias)
    if layer.get("bn") and not spec.get("bn_folded"):
        x = b.batchnorm(name, x, f"{name}.bn")
    return b.act(name, x, layer.get("act"))


def _inverted_residual(b: _Builder, spec: dict, convs: dict) -> str:
    x = _unit(b, spec, spec["stem"], convs["stem"], "image")
    for block in spec["blocks"]:
        block_in = x
        for layer in block["layers"]:
            x = _unit(b, spec, layer, convs[layer["name"]], x)
        if block.get("residual"):
            x = b.emit("add", block["name"], [block_in, x], f"{block['name']}/add", b.shapes[x])
            x = b.act(f"{block['name']}.out", x, block.get("residual_out_act"))
    if spec.get("feature_mix"):
        x = _unit(b, spec, spec["feature_mix"], convs[spec["feature_mix"]["name"]], x)
    return x


def _resnet(b: _Builder, spec: dict, convs: dict) -> str:
    relu = {"type": "relu"}
    x = b.conv(convs["conv1"], "image", "conv1.weight", None)
    x = b.act("relu", b.batchnorm("bn1", x, "bn1"), relu)
    stem = convs["conv1"]
    pool = stem.maxpool_after
    out_hw = tuple(arch.conv_out(s, pool["kernel"], pool["stride"], pool["padding"])
                   for s in stem.output_hw)
    x = b.emit("maxpool", "maxpool", [x], "maxpool", (stem.out_ch,) + out_hw, **pool)
    for stage, count in enumerate(spec["block_counts"]):
        for i in range(count):
            name = f"layer{stage + 1}.{i}"
            block_in = x
            y = b.conv(convs[f"{name}.conv1"], x, f"{name}.conv1.weight", None)
            y = b.act(f"{name}.relu1", b.batchnorm(f"{name}.bn1", y, f"{name}.bn1"), relu)
            y = b.conv(convs[f"{name}.conv2"], y, f"{name}.conv2.weight", None)
            y = b.batchnorm(f"{name}.bn2", y, f"{name}.bn2")
            shortcut = block_in
            if f"{name}.downsample.0" in convs:
                shortcut = b.conv(convs[f"{name}.downsample.0"], block_in,
                                  f"{name}.downsample.0.weight", None)
                shortcut = b.batchnorm(f"{name}.downsample", shortcut, f"{name}.downsample.1")
            x = b.emit("add", name, [shortcut, y], f"{name}/add", b.shapes[y])
            x = b.act(f"{name}.relu2", x, relu)
    return x


def network_of(program: Program) -> arch.Network:
    """The convs of a program as the memory model sees them (arch.Network). A clip belongs to
    the last conv before it: right after the conv (and its BN) it is the conv's act, after a
    residual add its post-add act; a max-pool right after is the conv's maxpool_after."""
    convs, current = [], None
    masking = {"type": "clamp"}  # every clip packs a backward mask
    for op in program.ops:
        if op.kind == "conv":
            (c, h, w), (o, oh, ow) = program.shapes[op.inputs[0]], program.shapes[op.output]
            a = op.attrs
            current = dict(name=op.name, in_ch=c, out_ch=o, kernel=a["kernel"], stride=a["stride"],
                           padding=a["padding"], groups=a["groups"], input_hw=(h, w),
                           output_hw=(oh, ow), act=None, post_add_act=None, maxpool_after=None,
                           tail=op.output, added=False)
            convs.append(current)
        elif current is None:
            continue
        elif op.kind == "affine" and op.inputs[0] == current["tail"]:
            current["tail"] = op.output
        elif op.kind == "add":
            current["added"] = True
        elif op.kind == "clip":
            current["post_add_act" if current["added"] else "act"] = masking
            current["tail"] = op.output
        elif op.kind == "maxpool" and op.inputs[0] == current["tail"]:
            current["maxpool_after"] = {k: op.attrs[k] for k in ("kernel", "stride", "padding")}
    layers = [arch.ConvLayer(**{k: v for k, v in c.items() if k not in ("tail", "added")})
              for c in convs]
    head = program.ops[-1]
    return arch.Network(program.name, tuple(layers), program.shapes[head.inputs[0]][0],
                        program.num_classes)
