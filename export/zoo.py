"""Torch models of the built-in architectures, and their weights.

A spec (``actcomp_edge.core.arch``) becomes its program (``actcomp_edge.core.program``, the one
description of the network), and ``ProgramNet`` runs that program in torch: the same ops,
with torch modules for the weights at the familiar state_dict names:

- inverted residual (MobileNetV2, MCUNet, ProxylessNAS and the ``../shared/weights``
  specs): the conv of layer ``X`` at ``X.conv``, its BatchNorm at ``X.bn``;
- resnet: torchvision's names (``conv1``, ``bn1``, ``layer1.0.conv1``,
  ``layer4.0.downsample.0``, ``fc``).

Either way the Conv2d modules, in ``named_modules()`` order, are exactly
``actcomp_edge.core.program.conv_layers(spec, size)``.

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

from actcomp_edge.core import arch
from actcomp_edge.core.program import RELU_HI, build_program

from .weight_files import WeightsError, mismatches, read_weight_file

IGNORED_SUFFIXES = (".w_scale", ".num_batches_tracked")


# ---------------------------------------------------------------- specs

def load_spec(model: str, num_classes: Optional[int] = None) -> dict:
    """A zoo name or an architecture spec .json (see ``actcomp_edge.core.arch.load_spec``)."""
    return arch.load_spec(model, num_classes)


# ---------------------------------------------------------------- the program in torch

class ProgramNet(nn.Module):
    """A program (``actcomp_edge.core.program``) run by torch: (B, 3, H, W) -> (B, num_classes).

    The network is the program's op list; this adds torch modules for its weights, placed
    where the familiar state_dicts have them: inverted-residual convs at ``<layer>.conv``
    (npz ``<layer>.weight``), ResNet convs at torchvision's names; BatchNorm2d at the prefix
    of its running statistics (``<layer>.bn``, ``bn1``, ``layer1.0.downsample.1``); the
    classifier at its own name, after a Dropout of the spec's p. Modules are made in op
    order, so the Conv2d of ``named_modules()`` are the program's convs in order."""

    def __init__(self, program, spec: dict):
        super().__init__()
        self.program = program
        self.paths = {}  # op output -> the path of the module that makes it
        # op index -> the tensors nothing reads after it: forward drops them there, as a
        # written-out torch model's locals go (holding every activation doubled the step)
        self.dead_after = {}
        last = {t: i for i, op in enumerate(program.ops) for t in op.inputs}
        for t, i in last.items():
            self.dead_after.setdefault(i, []).append(t)
        unit_convs = spec.get("family") == "inverted_residual"
        shapes = program.shapes
        for op in program.ops:
            a = op.attrs
            if op.kind == "conv":
                c, o = shapes[op.inputs[0]][0], shapes[op.output][0]
                module = nn.Conv2d(c, o, a["kernel"], a["stride"], a["padding"],
                                   dilation=a.get("dilation", 1), groups=a["groups"],
                                   bias=a.get("bias") is not None)
                path = a["weight"][:-len(".weight")] + (".conv" if unit_convs else "")
            elif op.kind == "affine":
                module = nn.BatchNorm2d(shapes[op.output][0], eps=a["eps"])
                path = a["scale"][:-len(".scale")]
            elif op.kind == "linear":
                self.dropout = nn.Dropout(float(spec["classifier"].get("dropout") or 0.0))
                c, o = shapes[op.inputs[0]][0], shapes[op.output][0]
                module = nn.Linear(c, o, bias=a.get("bias") is not None)
                path = a["weight"][:-len(".weight")]
            else:
                continue
            self._place(path, module)
            self.paths[op.output] = path

    def _place(self, path: str, module: nn.Module) -> None:
        parent = self
        *parents, leaf = path.split(".")
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, module)

    def forward(self, image):
        tensors = {"image": image}
        for i, op in enumerate(self.program.ops):
            x, a = tensors[op.inputs[0]], op.attrs
            if op.kind in ("conv", "affine"):
                y = self.get_submodule(self.paths[op.output])(x)
            elif op.kind == "clip":
                y = F.relu(x) if (a["lo"], a["hi"]) == (0.0, RELU_HI) else \
                    F.hardtanh(x, a["lo"], a["hi"])
            elif op.kind == "act":
                y = activation(x, a)
            elif op.kind == "add":
                y = x + tensors[op.inputs[1]]
            elif op.kind == "mul":
                y = x * tensors[op.inputs[1]]
            elif op.kind == "mean":
                y = x.mean((2, 3), keepdim=True)
            elif op.kind == "reshape":
                y = x.reshape(x.shape[0], *self.program.shapes[op.output])
            elif op.kind == "cat":
                y = torch.cat([tensors[t] for t in op.inputs], 1)
            elif op.kind == "slice":
                y = x[:, a["start"]:a["stop"]]
            elif op.kind == "shuffle":
                b, c, h, w = x.shape
                y = x.view(b, a["groups"], c // a["groups"], h, w).transpose(1, 2).reshape(
                    b, c, h, w)
            elif op.kind == "maxpool":
                y = F.max_pool2d(x, a["kernel"], a["stride"], a["padding"],
                                 ceil_mode=a.get("ceil_mode", False))
            elif op.kind == "avgpool":
                y = F.avg_pool2d(x, a["kernel"], a["stride"], a["padding"],
                                 count_include_pad=a["count_include_pad"])
            elif op.kind == "gap":
                y = x.mean((2, 3))
            elif op.kind == "linear":
                y = self.get_submodule(self.paths[op.output])(self.dropout(x))
            else:
                raise ValueError(f"no torch for op kind {op.kind!r}")
            tensors[op.output] = y
            for t in self.dead_after.get(i, ()):
                del tensors[t]
        return tensors["logits"]


def activation(x, attrs: dict):
    """torch's function of a program ``act`` op."""
    fn = attrs["fn"]
    if fn == "leaky_relu":
        return F.leaky_relu(x, attrs["slope"])
    return {"hardsigmoid": F.hardsigmoid, "hardswish": F.hardswish, "silu": F.silu,
            "sigmoid": torch.sigmoid}[fn](x)


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
    """The torch model of a spec's program, freshly initialised (call torch.manual_seed
    first). The spec is kept as ``model.spec``."""
    if spec.get("family") not in arch.FAMILIES:
        raise arch.SpecError(f"spec {spec.get('name')!r}: unsupported family "
                             f"{spec.get('family')!r}")
    size = int((spec.get("input") or {}).get("resolution", 224))
    model = ProgramNet(build_program(spec, None, size), spec)
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
