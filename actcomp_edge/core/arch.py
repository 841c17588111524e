"""Architectures as plain data, and the conv layers they contain (no torch).

A *spec* is a JSON-serialisable dict.  Two families:

- ``inverted_residual`` (MobileNetV2, MCUNet, ProxylessNAS): the format of
  ``../shared/weights/*.json``: ``stem`` (a conv layer), ``blocks`` (each with
  ``layers``: expand? -> dw -> project, and ``residual``), optional
  ``feature_mix`` conv, global average pool, ``classifier`` (linear).
  A conv layer is ``{"name", "type": "conv", "in_ch", "out_ch", "kernel",
  "stride", "groups", "bn": bool, "act": None | {"type": "relu"|"relu6"} |
  {"type": "clamp", "min", "max"}}``; padding is kernel // 2.
- ``resnet`` (torchvision's BasicBlock layout): ``{"family": "resnet",
  "block_counts": [2, 2, 2, 2], ...}``.

A spec is an input to ``actcomp_edge.core.program``: its program is the network (ops, shapes),
and ``program.network(spec, input_size)`` lists every Conv2d in definition order
(torchvision's module order) as the memory model sees it (``ConvLayer``): "the last N
convs" of the paper are ``network(...).convs[-N:]``.  The torch models in ``export.zoo``
run the same programs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

RELU6 = {"type": "relu6"}
RELU = {"type": "relu"}
MASKING_ACTS = ("relu", "relu6", "clamp")
# The smooth and gated activations (program op ``act``), one row each: what the backward of
# y = f(x) keeps between forward and backward, and the exact rule it applies (torch's):
#   "mask"   1 bit an element (bit-packed), the region where f' is not 0 (or not slope)
#   "input"  x itself, float32: f' depends on x, and y does not determine x
#   "output" y itself, float32: f' is a function of y
ACTIVATIONS = {
    "hardsigmoid": "mask",    # relu6(x + 3) / 6;    dX = dY / 6 where -3 < x < 3, else 0
    "leaky_relu": "mask",     # x > 0 ? x : slope x; dX = dY where x > 0, else slope dY
    "hardswish": "input",     # x relu6(x + 3) / 6;  dX = dY (0 | x / 3 + 1/2 | 1) for x
                              #                      < -3 | <= 3 | > 3
    "silu": "input",          # x s, s = sigmoid(x); dX = dY s (1 + x (1 - s))
    "sigmoid": "output",      # 1 / (1 + e^-x);      dX = dY y (1 - y)
}
IMAGENET_NORM = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
HALF_NORM = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


FAMILIES = ("inverted_residual", "resnet")


class SpecError(ValueError):
    """A model name or architecture spec that cannot be used."""


def pair(value) -> tuple:
    """A conv size as (height, width): an int is square."""
    return (value, value) if isinstance(value, int) else tuple(value)


@dataclass(frozen=True)
class ConvLayer:
    """One Conv2d as the network runs it. Sizes in elements (per sample); kernel, stride,
    padding and dilation an int (square) or (height, width)."""

    name: str
    in_ch: int
    out_ch: int
    kernel: object
    stride: object
    padding: object
    groups: int
    input_hw: tuple
    output_hw: tuple
    act: Optional[dict] = None           # after (frozen) BN
    post_add_act: Optional[dict] = None  # after the residual add that ends this conv's block
    maxpool_after: Optional[dict] = None  # a max-pool after it, before the next conv
    dilation: object = 1
    more_acts: tuple = ()                # further activations before the next conv (silu then
                                         # hardswish, ...), each a dict like act; an act's
                                         # "elements": per sample, when not the output's
    whole: tuple = ()                    # float32 tensors after it that the backward may take
                                         # whole: a multiply's factors (a gate, the map it
                                         # scales), a squeeze-excitation Linear's input, each
                                         # (elements per sample, the conv of the act whose
                                         # saved tensor gives it or None, the conv that must
                                         # be fine-tuned for it to be needed or None)

    @property
    def acts(self) -> tuple:
        """Every activation after this conv before the next one."""
        return tuple(a for a in (self.act, self.post_add_act, *self.more_acts) if a is not None)

    @property
    def square(self) -> bool:
        """Square kernel and stride, one padding, dilation 1 (what Gradient Filter needs)."""
        return all(isinstance(v, int) for v in (self.kernel, self.stride, self.padding)) \
            and self.dilation == 1

    def input_shape(self, batch: int) -> tuple:
        return (batch, self.in_ch) + tuple(self.input_hw)

    def output_shape(self, batch: int) -> tuple:
        return (batch, self.out_ch) + tuple(self.output_hw)


@dataclass(frozen=True)
class Network:
    name: str
    convs: tuple
    classifier_in: int
    num_classes: int
    head_floats: int                 # per sample: float32 elements the head's backward keeps
                                     # (each linear's input, hardswish/silu inputs, ...)
    head_masks: tuple = ()           # per sample: elements of each bit-packed head mask


# ---------------------------------------------------------------- zoo specs

def conv_spec(name, in_ch, out_ch, kernel, stride=1, groups=1, act=RELU6, bn=True) -> dict:
    return {"name": name, "type": "conv", "in_ch": in_ch, "out_ch": out_ch, "kernel": kernel,
            "stride": stride, "groups": groups, "bn": bn, "act": act}


def inverted_residual_block(name, kernel, stride, expand, in_ch, out_ch, act=RELU6) -> dict:
    """expand 1x1 (skipped when expand == 1) -> depthwise kxk stride s -> project 1x1 (linear)."""
    mid = int(round(in_ch * expand))
    layers = []
    if expand != 1:
        layers.append(conv_spec(f"{name}.expand", in_ch, mid, 1, act=act))
    layers.append(conv_spec(f"{name}.dw", mid, mid, kernel, stride, groups=mid, act=act))
    layers.append(conv_spec(f"{name}.project", mid, out_ch, 1, act=None))
    return {"name": name, "in_ch": in_ch, "out_ch": out_ch, "kernel": kernel, "stride": stride,
            "expand_ratio": expand, "mid_ch": mid, "residual": stride == 1 and in_ch == out_ch,
            "residual_out_act": None, "layers": layers}


def inverted_residual_spec(name, stem_ch, table, num_classes, resolution, norm,
                           feature_mix_ch=None, dropout=0.0) -> dict:
    """table: rows (kernel, stride, expand, in_ch, out_ch), one per block."""
    blocks = [inverted_residual_block(f"blocks.{i}", *row) for i, row in enumerate(table)]
    last = table[-1][4]
    feature_mix = None
    if feature_mix_ch:
        feature_mix = conv_spec("feature_mix", last, feature_mix_ch, 1)
        last = feature_mix_ch
    return {"family": "inverted_residual", "name": name, "bn_folded": False, "conv_bias": False,
            "input": {"resolution": resolution, "normalize": norm},
            "stem": conv_spec("stem", 3, stem_ch, 3, 2), "blocks": blocks,
            "feature_mix": feature_mix, "pool": "avg",
            "classifier": {"name": "classifier", "type": "linear", "in_features": last,
                           "out_features": num_classes, "bias": True, "dropout": dropout}}


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's channel rounding for width multipliers."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


MOBILENET_V2_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                         (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]  # t, c, n, s


def mobilenet_v2(num_classes=1000, width=1.0, resolution=224) -> dict:
    stem = make_divisible(32 * width)
    table, cin = [], stem
    for t, c, n, s in MOBILENET_V2_SETTINGS:
        cout = make_divisible(c * width)
        for i in range(n):
            table.append((3, s if i == 0 else 1, t, cin, cout))
            cin = cout
    last = make_divisible(1280 * max(1.0, width))
    return inverted_residual_spec("mobilenet_v2" if width == 1.0 else f"mobilenet_v2-w{width}",
                                  stem, table, num_classes, resolution, IMAGENET_NORM,
                                  feature_mix_ch=last, dropout=0.2)


# (kernel, stride, expand, in, out): the tiny-training backbones (no feature-mix conv)
MCUNET_IN1 = [(3, 1, 1, 16, 8), (3, 2, 4, 8, 16), (3, 1, 3, 16, 16), (7, 2, 3, 16, 24),
              (3, 1, 5, 24, 24), (3, 2, 5, 24, 40), (7, 1, 4, 40, 40), (5, 1, 4, 40, 48),
              (3, 1, 3, 48, 48), (3, 1, 4, 48, 48), (7, 2, 5, 48, 96), (5, 1, 4, 96, 96),
              (5, 1, 4, 96, 96), (3, 1, 6, 96, 160)]
MBV2_W035 = [(3, 1, 1, 16, 8), (3, 2, 6, 8, 8), (3, 1, 6, 8, 8), (3, 2, 6, 8, 16),
             (3, 1, 6, 16, 16), (3, 1, 6, 16, 16), (3, 2, 6, 16, 24), (3, 1, 6, 24, 24),
             (3, 1, 6, 24, 24), (3, 1, 6, 24, 24), (3, 1, 6, 24, 32), (3, 1, 6, 32, 32),
             (3, 1, 6, 32, 32), (3, 2, 6, 32, 56), (3, 1, 6, 56, 56), (3, 1, 6, 56, 56),
             (3, 1, 6, 56, 112)]
PROXYLESS_W03 = [(3, 1, 1, 16, 8), (5, 2, 3, 8, 16), (3, 1, 3, 16, 16), (7, 2, 3, 16, 16),
                 (3, 1, 3, 16, 16), (5, 1, 3, 16, 16), (5, 1, 3, 16, 16), (7, 2, 6, 16, 24),
                 (5, 1, 3, 24, 24), (5, 1, 3, 24, 24), (5, 1, 3, 24, 24), (5, 1, 6, 24, 32),
                 (5, 1, 3, 32, 32), (5, 1, 3, 32, 32), (5, 1, 3, 32, 32), (7, 2, 6, 32, 64),
                 (7, 1, 6, 64, 64), (7, 1, 3, 64, 64), (7, 1, 3, 64, 64), (7, 1, 6, 64, 96)]


def resnet(depth: int, num_classes=1000, resolution=224) -> dict:
    counts = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}[depth]
    return {"family": "resnet", "name": f"resnet{depth}", "block_counts": counts,
            "input": {"resolution": resolution, "normalize": IMAGENET_NORM},
            "classifier": {"name": "fc", "type": "linear", "in_features": 512,
                           "out_features": num_classes, "bias": True, "dropout": 0.0}}


ZOO = {
    "mobilenet_v2": lambda nc: mobilenet_v2(nc),
    "mcunet-in1": lambda nc: inverted_residual_spec("mcunet-in1", 16, MCUNET_IN1, nc, 128, HALF_NORM),
    "mbv2-w0.35": lambda nc: inverted_residual_spec("mbv2-w0.35", 16, MBV2_W035, nc, 128, HALF_NORM),
    "proxyless-w0.3": lambda nc: inverted_residual_spec("proxyless-w0.3", 16, PROXYLESS_W03, nc, 128,
                                                        HALF_NORM),
    "resnet18": lambda nc: resnet(18, nc),
    "resnet34": lambda nc: resnet(34, nc),
}
ALIASES = {"mobilenetv2": "mobilenet_v2", "mbv2": "mobilenet_v2", "mcunet-5fps": "mcunet-in1",
           "mcunet": "mcunet-in1"}


def load_spec(model: str, num_classes: Optional[int] = None) -> dict:
    """A zoo name (see ZOO) or the path of a spec .json (the format of ../shared/weights)."""
    name = ALIASES.get(model, model)
    if name in ZOO:
        return ZOO[name](1000 if num_classes is None else num_classes)
    path = Path(model)
    if path.suffix == ".py" or ".py:" in model:
        raise SpecError(f"--model {model}: a model file is FILE.py:FUNCTION, where FUNCTION() "
                        f"returns your torch.nn.Module, and `actcomp export` takes it (this "
                        f"command takes a zoo name or a spec .json)")
    if path.suffix != ".json":
        raise SpecError(f"unknown model {model!r}: choose one of {', '.join(sorted(ZOO))}, "
                        f"give an architecture spec .json, or (actcomp export) FILE.py:FUNCTION")
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SpecError(f"cannot read architecture spec {path}: {e}") from None
    if not isinstance(spec, dict):
        raise SpecError(f"architecture spec {path} is not a JSON object")
    if spec.get("family") not in FAMILIES and "blocks" in spec:
        # ../shared/weights/*.json use "family" for a description ("MCUNet-5fps (TinyNAS), ...")
        spec["family_description"], spec["family"] = spec.get("family"), "inverted_residual"
    spec.setdefault("name", path.stem)
    if num_classes is not None and spec.get("classifier"):
        spec["classifier"] = dict(spec["classifier"], out_features=num_classes)
    validate(spec)
    return spec


def validate(spec: dict) -> None:
    family = spec.get("family")
    if family == "resnet":
        return
    if family != "inverted_residual":
        raise SpecError(f"spec {spec.get('name')!r}: unsupported family {family!r}")
    for key in ("stem", "blocks", "classifier"):
        if not spec.get(key):
            raise SpecError(f"spec {spec.get('name')!r}: missing {key!r}")
    for layer in iter_layer_specs(spec):
        if layer.get("type") != "conv":
            raise SpecError(f"spec {spec.get('name')!r}: layer {layer.get('name')!r} has "
                            f"unsupported type {layer.get('type')!r}")
        act = layer.get("act")
        if act is not None and act.get("type") not in MASKING_ACTS:
            raise SpecError(f"layer {layer['name']!r}: unsupported activation {act.get('type')!r}")


def iter_layer_specs(spec: dict):
    yield spec["stem"]
    for block in spec["blocks"]:
        yield from block["layers"]
    if spec.get("feature_mix"):
        yield spec["feature_mix"]


# ---------------------------------------------------------------- shapes

def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1
