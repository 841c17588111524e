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

``conv_layers(spec, input_size)`` lists every Conv2d in definition order
(torchvision's module order), with its input and output sizes: "the last N
convs" of the paper are ``conv_layers(...)[-N:]``.  The torch modules in
``export.zoo`` are built from the same specs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

RELU6 = {"type": "relu6"}
RELU = {"type": "relu"}
MASKING_ACTS = ("relu", "relu6", "clamp")
IMAGENET_NORM = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
HALF_NORM = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


FAMILIES = ("inverted_residual", "resnet")


class SpecError(ValueError):
    """A model name or architecture spec that cannot be used."""


@dataclass(frozen=True)
class ConvLayer:
    """One Conv2d as the network runs it. Sizes in elements (per sample)."""

    name: str
    in_ch: int
    out_ch: int
    kernel: int
    stride: int
    padding: int
    groups: int
    input_hw: tuple
    output_hw: tuple
    act: Optional[dict] = None           # after (frozen) BN
    post_add_act: Optional[dict] = None  # after the residual add that ends this conv's block
    maxpool_after: Optional[dict] = None  # ResNet stem max-pool

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
    if path.suffix != ".json":
        raise SpecError(f"unknown model {model!r}: choose one of {', '.join(sorted(ZOO))} "
                        f"or give an architecture spec .json")
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


def _hw(input_size) -> tuple:
    if isinstance(input_size, int):
        return (input_size, input_size)
    h, w = input_size
    return (int(h), int(w))


def conv_layers(spec: dict, input_size) -> list:
    """Every Conv2d in definition order with its input/output spatial size. SpecError for an
    input smaller than the network's total stride (its last convs would see less than 1 px)."""
    hw = _hw(input_size)
    stride = total_stride(spec)
    if min(hw) < stride:
        raise SpecError(f"input size {hw[0]}x{hw[1]} is smaller than the network's total stride "
                        f"{stride}: use an --input-size of at least {stride}")
    return _convs(spec, hw)


def _convs(spec: dict, hw: tuple) -> list:
    return _resnet_convs(spec, hw) if spec["family"] == "resnet" else \
        _inverted_residual_convs(spec, hw)


def total_stride(spec: dict, reference: int = 1024) -> int:
    """Input pixels per pixel of the last feature map (32 for MobileNetV2, ResNet)."""
    last = _convs(spec, (reference, reference))[-1]
    return reference // last.output_hw[0]


def network(spec: dict, input_size) -> Network:
    convs = conv_layers(spec, input_size)
    head = spec["classifier"]
    return Network(spec.get("name", "?"), tuple(convs), int(head["in_features"]),
                   int(head["out_features"]))


def _layer(d: dict, hw: tuple, post_add_act=None) -> ConvLayer:
    k, s = int(d["kernel"]), int(d["stride"])
    p = k // 2
    out = (conv_out(hw[0], k, s, p), conv_out(hw[1], k, s, p))
    if min(out) < 1:
        raise SpecError(f"input too small: layer {d['name']} would get an empty output")
    return ConvLayer(d["name"], int(d["in_ch"]), int(d["out_ch"]), k, s, p, int(d.get("groups", 1)),
                     hw, out, d.get("act"), post_add_act)


def _inverted_residual_convs(spec: dict, hw: tuple) -> list:
    convs = [_layer(spec["stem"], hw)]
    hw = convs[-1].output_hw
    for block in spec["blocks"]:
        layers = block["layers"]
        for i, d in enumerate(layers):
            last = i == len(layers) - 1
            post = block.get("residual_out_act") if (last and block.get("residual")) else None
            convs.append(_layer(d, hw, post))
            hw = convs[-1].output_hw
    if spec.get("feature_mix"):
        convs.append(_layer(spec["feature_mix"], hw))
    return convs


def _resnet_convs(spec: dict, hw: tuple) -> list:
    stem = ConvLayer("conv1", 3, 64, 7, 2, 3, 1, hw,
                     (conv_out(hw[0], 7, 2, 3), conv_out(hw[1], 7, 2, 3)), RELU, None,
                     {"kernel": 3, "stride": 2, "padding": 1})
    convs = [stem]
    hw = (conv_out(stem.output_hw[0], 3, 2, 1), conv_out(stem.output_hw[1], 3, 2, 1))
    cin = 64
    for stage, count in enumerate(spec["block_counts"]):
        cout = 64 * 2 ** stage
        for b in range(count):
            stride = 2 if (b == 0 and stage > 0) else 1
            name = f"layer{stage + 1}.{b}"
            c1 = _layer(conv_spec(f"{name}.conv1", cin, cout, 3, stride, act=RELU), hw)
            c2 = _layer(conv_spec(f"{name}.conv2", cout, cout, 3, 1, act=None), c1.output_hw, RELU)
            convs += [c1, c2]
            if stride != 1 or cin != cout:
                ds = conv_spec(f"{name}.downsample.0", cin, cout, 1, stride, act=None)
                convs.append(ConvLayer(ds["name"], cin, cout, 1, stride, 0, 1, hw,
                                       c1.output_hw, None))
            hw, cin = c1.output_hw, cout
    return convs
