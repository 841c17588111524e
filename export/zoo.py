"""Torch models built from the plain specs of ``actcomp_edge.arch``, and their weights.

One builder per family:

- inverted residual (MobileNetV2, MCUNet, ProxylessNAS and the ``../shared/weights``
  specs): every spec conv layer ``X`` becomes a ``ConvUnit`` at module path ``X``
  with children ``conv`` (nn.Conv2d), ``bn`` (when the layer has BN and the spec is
  not BN-folded) and ``act``; so Conv2d module names are ``<layer name>.conv``.
- resnet: torchvision's BasicBlock layout and module names (``conv1``, ``bn1``,
  ``layer1.0.conv1``, ``layer4.0.downsample.0``, ``fc``).

Either way the Conv2d modules, in ``named_modules()`` order, are exactly
``actcomp_edge.program.conv_layers(spec, size)``.

Weights are ``.npz``, ``.pth``/``.pt`` (tensors only) or ``.safetensors`` files
(``export.weight_files``), never untrusted pickles.  Inverted-residual
naming follows ``../shared/weights``: ``<layer>.weight``, ``<layer>.bias``,
``<layer>.bn.{weight,bias,running_mean,running_var}``, ``classifier.{weight,bias}``;
``*.w_scale`` arrays (quantisation metadata) are ignored.  ResNet arrays are named
as the state_dict (torchvision's); a torchvision MobileNetV2 state_dict is renamed to the
built-in's (``torchvision_mobilenet_v2_name``).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from actcomp_edge import arch

from .weight_files import WeightsError, mismatches, read_weight_file

IGNORED_SUFFIXES = (".w_scale", ".num_batches_tracked")


# ---------------------------------------------------------------- specs

def load_spec(model: str, num_classes: Optional[int] = None) -> dict:
    """A zoo name or an architecture spec .json (see ``actcomp_edge.arch.load_spec``)."""
    return arch.load_spec(model, num_classes)


# ---------------------------------------------------------------- inverted residual

def activation(act: Optional[dict]) -> nn.Module:
    """Module for a spec activation: None (linear), relu, relu6 or clamp(min, max)."""
    if act is None:
        return nn.Identity()
    kind = act["type"]
    if kind == "relu":
        return nn.ReLU()
    if kind == "relu6":
        return nn.ReLU6()
    if kind == "clamp":
        return nn.Hardtanh(float(act["min"]), float(act["max"]))
    raise arch.SpecError(f"unsupported activation {kind!r}")


class ConvUnit(nn.Module):
    """conv -> bn? -> act: (B, in_ch, H, W) -> (B, out_ch, H', W')."""

    def __init__(self, layer: dict, conv_bias: bool, with_bn: bool, bn_eps: float):
        super().__init__()
        k = int(layer["kernel"])
        self.conv = nn.Conv2d(int(layer["in_ch"]), int(layer["out_ch"]), k, int(layer["stride"]),
                              k // 2, groups=int(layer.get("groups", 1)), bias=conv_bias)
        self.bn = nn.BatchNorm2d(int(layer["out_ch"]), eps=bn_eps) if with_bn else None
        self.act = activation(layer.get("act"))

    def forward(self, x):
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.act(x)


class InvertedResidual(nn.Module):
    """expand? -> dw -> project, then ``out_act(y + x)`` when the block is residual."""

    def __init__(self, block: dict, make_unit):
        super().__init__()
        prefix = block["name"] + "."
        self.layer_names = []
        for layer in block["layers"]:
            if not layer["name"].startswith(prefix):
                raise arch.SpecError(f"layer {layer['name']!r} is not named {prefix}<part>")
            child = layer["name"][len(prefix):]
            self.add_module(child, make_unit(layer))
            self.layer_names.append(child)
        self.residual = bool(block.get("residual"))
        self.out_act = activation(block.get("residual_out_act")) if self.residual else nn.Identity()

    def forward(self, x):
        y = x
        for name in self.layer_names:
            y = getattr(self, name)(y)
        return self.out_act(y + x) if self.residual else y


class InvertedResidualNet(nn.Module):
    """stem -> blocks -> feature_mix? -> global avg pool -> dropout -> classifier.
    (B, 3, H, W) -> (B, num_classes)."""

    def __init__(self, spec: dict):
        super().__init__()
        folded = bool(spec.get("bn_folded", False))
        conv_bias = bool(spec.get("conv_bias", False))
        bn_eps = float((spec.get("bn") or {}).get("eps", 1e-5))

        def make_unit(layer):
            return ConvUnit(layer, conv_bias, bool(layer.get("bn")) and not folded, bn_eps)

        self.stem = make_unit(spec["stem"])
        self.blocks = nn.Sequential(*[InvertedResidual(b, make_unit) for b in spec["blocks"]])
        self.feature_mix = make_unit(spec["feature_mix"]) if spec.get("feature_mix") else None
        head = spec["classifier"]
        self.dropout = nn.Dropout(float(head.get("dropout") or 0.0))
        self.classifier = nn.Linear(int(head["in_features"]), int(head["out_features"]),
                                    bias=bool(head.get("bias", True)))

    def features(self, x):
        """(B, 3, H, W) -> pooled features (B, classifier.in_features)."""
        x = self.blocks(self.stem(x))
        if self.feature_mix is not None:
            x = self.feature_mix(x)
        return x.mean((2, 3))

    def forward(self, x):
        return self.classifier(self.dropout(self.features(x)))


# ---------------------------------------------------------------- resnet (torchvision layout)

class BasicBlock(nn.Module):
    """torchvision's BasicBlock: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False),
                                            nn.BatchNorm2d(out_ch))

    def forward(self, x):
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """torchvision ResNet with BasicBlocks: (B, 3, H, W) -> (B, num_classes)."""

    def __init__(self, spec: dict):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = 64
        for stage, count in enumerate(spec["block_counts"]):
            out_ch = 64 * 2 ** stage
            blocks = []
            for b in range(count):
                blocks.append(BasicBlock(in_ch, out_ch, 2 if (b == 0 and stage > 0) else 1))
                in_ch = out_ch
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.num_stages = len(spec["block_counts"])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        head = spec["classifier"]
        self.fc = nn.Linear(in_ch, int(head["out_features"]), bias=bool(head.get("bias", True)))

    def features(self, x):
        """(B, 3, H, W) -> pooled features (B, 512)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in range(self.num_stages):
            x = getattr(self, f"layer{stage + 1}")(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x):
        return self.fc(self.features(x))


# ---------------------------------------------------------------- building

def init_weights(model: nn.Module) -> None:
    """torchvision's init (kaiming fan_out convs, unit BN, small linear); seed via torch."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def build_model(spec: dict) -> nn.Module:
    """The torch model of a spec, freshly initialised (call torch.manual_seed first).
    The spec is kept as ``model.spec``."""
    family = spec.get("family")
    if family == "resnet":
        model = ResNet(spec)
    elif family == "inverted_residual":
        model = InvertedResidualNet(spec)
    else:
        raise arch.SpecError(f"spec {spec.get('name')!r}: unsupported family {family!r}")
    init_weights(model)
    model.spec = spec
    return model


def build_from_name(model: str, num_classes: Optional[int] = None,
                    weights: Union[str, Path, Mapping, None] = None) -> nn.Module:
    """Zoo name or spec .json -> model, with weights loaded when given.  When
    ``num_classes`` differs from the weights' classifier, the classifier keeps its
    fresh init; ``model.weights_note`` then says so (else it is None)."""
    spec = load_spec(str(model), num_classes)
    net = build_model(spec)
    net.weights_note = None
    if weights is not None:
        net.weights_note = load_weights(net, spec, weights, replace_classifier=num_classes is not None)
    return net


# ---------------------------------------------------------------- weights

def array_names(model: nn.Module, spec: dict) -> dict:
    """{npz array name: state_dict key} for every parameter and BN running stat."""
    names = {}
    for key in model.state_dict():
        if key.endswith("num_batches_tracked"):
            continue
        name = key
        if spec["family"] == "inverted_residual":
            name = re.sub(r"\.conv\.(weight|bias)$", r".\1", key)
        names[name] = key
    return names


def read_arrays(path_or_dict: Union[str, Path, Mapping]) -> dict:
    """{name: float32 array} from a weights file (weight_files.FORMATS) or a mapping."""
    items = (dict(path_or_dict) if isinstance(path_or_dict, Mapping)
             else read_weight_file(path_or_dict))
    arrays = {}
    for name, value in items.items():
        if name.endswith(IGNORED_SUFFIXES):
            continue
        try:
            arrays[name] = np.asarray(value.detach().cpu() if torch.is_tensor(value) else value,
                                      np.float32)
        except (TypeError, ValueError) as e:
            raise WeightsError(f"weights array {name} is not numeric: {e}") from None
    return arrays


def torchvision_mobilenet_v2_name(name: str) -> str:
    """torchvision's MobileNetV2 name -> the built-in's: features.0 = stem, features.N =
    blocks.N-1 (its ConvBNReLUs conv.i.0 / conv.i.1, then the project conv and its BN),
    features.18 = feature_mix, classifier.1 = classifier."""
    if name.startswith("classifier.1."):
        return "classifier." + name[len("classifier.1."):]
    m = re.fullmatch(r"features\.(\d+)\.(.+)", name)
    if m is None:
        return name
    n, rest = int(m[1]), m[2]
    if n in (0, 18):
        unit, tail = rest.split(".", 1)
        return ("stem" if n == 0 else "feature_mix") + (".bn." if unit == "1" else ".") + tail
    units = ("dw", "project") if n == 1 else ("expand", "dw", "project")
    parts = rest.split(".")  # conv, i, [j,] param
    i = int(parts[1])
    if i < len(units) - 1:  # a ConvBNReLU: conv.i.0 (conv) / conv.i.1 (bn)
        unit, bn, tail = units[i], parts[2] == "1", ".".join(parts[3:])
    else:                   # the project conv (conv.i) and its BN (conv.i+1)
        unit, bn, tail = units[-1], i == len(units), ".".join(parts[2:])
    return f"blocks.{n - 1}.{unit}." + ("bn." if bn else "") + tail


def known_layout(arrays: dict, spec: dict) -> tuple:
    """(arrays, note): a torchvision MobileNetV2 state_dict renamed to the built-in names."""
    if spec.get("name") == "mobilenet_v2" and "features.0.0.weight" in arrays:
        return ({torchvision_mobilenet_v2_name(n): a for n, a in arrays.items()},
                "torchvision MobileNetV2 names mapped to the built-in's")
    return arrays, None


def load_weights(model: nn.Module, spec: dict, path_or_dict, strict: bool = True,
                 replace_classifier: bool = False) -> Optional[str]:
    """Copy arrays into the model.  Shape mismatches always raise WeightsError; with
    ``strict`` so do missing and unexpected arrays.  With ``replace_classifier`` a
    classifier whose out_features differ from the model's is skipped (the model's
    classifier keeps its init) and a note saying so is returned; otherwise None."""
    arrays, layout_note = known_layout(read_arrays(path_or_dict), spec)
    names = array_names(model, spec)
    by_key = {key: n for n, key in names.items()}  # the torch model's own state_dict names too
    arrays = {by_key.get(n, n): a for n, a in arrays.items()}
    state = model.state_dict()
    note = None
    head = spec["classifier"]["name"]
    w_key = f"{head}.weight"
    if replace_classifier and w_key in arrays and w_key in names:
        got, want = arrays[w_key].shape, tuple(state[names[w_key]].shape)
        if len(got) == 2 and got[1] == want[1] and got[0] != want[0]:
            for k in (w_key, f"{head}.bias"):
                arrays.pop(k, None)
                names.pop(k, None)
            note = (f"classifier re-initialised: weights have {got[0]} classes, "
                    f"model has {want[0]}")
    problems = mismatches({n: tuple(state[key].shape) for n, key in names.items()}, arrays,
                          strict)
    if problems:
        source = "" if isinstance(path_or_dict, Mapping) else f" {path_or_dict}"
        raise WeightsError(f"weights{source} do not fit {spec.get('name', '?')}: "
                           + "; ".join(problems) + " (the README's 'Weights' lists the names)")
    with torch.no_grad():
        for n, key in names.items():
            if n in arrays:
                state[key].copy_(torch.from_numpy(arrays[n]))
    return "; ".join(n for n in (layout_note, note) if n) or None


def model_arrays(model: nn.Module, spec: dict) -> dict:
    """The model's arrays as float32 numpy, in ``load_weights`` naming."""
    state = model.state_dict()
    return {n: state[k].detach().cpu().numpy().astype(np.float32)
            for n, k in array_names(model, spec).items()}


def save_weights(model: nn.Module, spec: dict, path: Union[str, Path]) -> None:
    """Write the model's arrays as float32 .npz in ``load_weights`` naming."""
    np.savez(path, **model_arrays(model, spec))


# ---------------------------------------------------------------- input

def preprocess(images: np.ndarray, spec: dict, size=None) -> torch.Tensor:
    """uint8 (N, H, W, 3) RGB -> normalised float (N, 3, S, S); bilinear resize to
    ``size`` (default: the spec's input resolution) when it differs."""
    norm = spec["input"]["normalize"]
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(norm["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(norm["std"], dtype=torch.float32).view(1, 3, 1, 1)
    x = (x - mean) / std
    size = size or spec["input"]["resolution"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x
