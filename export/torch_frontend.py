"""A user's torch ``nn.Module`` -> the exporter's Program, traced with torch.fx.

| torch (module or function)                                        | program op |
|-------------------------------------------------------------------|------------|
| Conv2d: any kernel, stride, padding (ints, "valid", "same" with    | conv       |
|   odd (dilated) kernels), dilation and groups                      |            |
| BatchNorm2d (frozen: its running statistics)                      | affine     |
| ReLU, ReLU6, Hardtanh; F.relu, F.relu6, F.hardtanh, torch.relu     | clip       |
| Hardswish, Hardsigmoid, SiLU, Sigmoid, LeakyReLU; F.hardswish,     | act        |
|   F.hardsigmoid, F.silu, F.leaky_relu, torch.sigmoid, .sigmoid()   |            |
| ``a + b``, torch.add (two tensors)                                | add        |
| ``a * b``, torch.mul (two tensors; one may be (C, 1, 1): a gate)  | mul        |
| MaxPool2d: square, dilation 1, ceil_mode (its backward keeps the  | maxpool    |
|   argmax)                                                         |            |
| AvgPool2d, local: square, count_include_pad or not                | avgpool    |
| F.max_pool2d, F.avg_pool2d: as their modules                      |            |
| AdaptiveAvgPool2d(1), a global AvgPool2d, F.adaptive_avg_pool2d   | gap        |
| ``x.mean((2, 3))``, torch.mean over (2, 3) (keepdim or not)        | gap        |
|   (a global pool that a multiply follows, a squeeze-excitation's,  |  mean      |
|   is the program's ``mean``: its 1x1 convs or Linears, the gate)   |            |
| a view / flatten between (C,) and (C, 1, 1) (an SE of Linears)    | reshape    |
| torch.cat on channels                                             | cat        |
| chunk / split on channels (torch. or method), then its pieces     | slice      |
| a channel shuffle: view (g, C/g), transpose(1, 2), view back      | shuffle    |
| Flatten, torch.flatten, .flatten/.view/.reshape after the pool    | (none)     |
| Dropout (its p is recorded: the graphs leave it out)              | (none)     |
| Linear after the global pool; several, with activations and      | linear     |
|   dropout between them, are a head; the last gives the logits     |            |

In-place forms (``inplace=True``, ``F.relu_``, ``.sigmoid_()``, ...) are the same ops; one
whose input is read again after it is refused (torch would read the changed tensor).
Param names are the module's own state_dict names (``<module path>.weight``). Anything else
stops the export with one line naming every unsupported op at once, each with its module
path (a function by the module whose forward calls it: ``features.3 (forward): torch.erf``).
"""
from __future__ import annotations

import operator
from math import prod

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from actcomp_edge.core.arch import pair
from actcomp_edge.core.program import RELU_HI, Op, Program, head_start

RELUS = {F.relu: (0.0, RELU_HI), torch.relu: (0.0, RELU_HI), F.relu6: (0.0, 6.0),
         F.relu_: (0.0, RELU_HI), torch.relu_: (0.0, RELU_HI)}
HARDTANHS = (F.hardtanh, F.hardtanh_)
# torch -> the program's act fn (arch.ACTIVATIONS); a LeakyReLU's negative_slope is its slope
ACT_MODULES = {nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid", nn.SiLU: "silu",
               nn.Sigmoid: "sigmoid", nn.LeakyReLU: "leaky_relu"}
ACT_FUNCTIONS = {F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", F.silu: "silu",
                 torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.sigmoid_: "sigmoid",
                 F.leaky_relu: "leaky_relu", F.leaky_relu_: "leaky_relu"}
ACT_METHODS = {"sigmoid": "sigmoid", "sigmoid_": "sigmoid"}
IN_PLACE = (F.relu_, torch.relu_, F.hardtanh_, torch.sigmoid_, F.leaky_relu_, "relu_", "sigmoid_")
ADDS = (operator.add, torch.add)
MULS = (operator.mul, torch.mul)
CATS = (torch.cat, torch.concat)
SPLITS = (torch.chunk, torch.split, "chunk", "split")
TRANSPOSES = (torch.transpose, "transpose", "permute")
# python ints from x.size() / x.shape: only shapes for a view (a channel shuffle, a flatten)
SIZE_ARITHMETIC = (operator.getitem, operator.floordiv, operator.mul, operator.add,
                   operator.sub)
DROPOUTS = (nn.Dropout, nn.Dropout2d)
FLATTENS = ("flatten", "view", "reshape")
MODULES = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.MaxPool2d,
           nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Flatten, nn.Linear, nn.Identity, *DROPOUTS,
           *ACT_MODULES)


class FrontendError(ValueError):
    """A module the exporter cannot lower (one line: where and what)."""


def _size(value):
    """A size as the program holds it: an int when square, else (height, width)."""
    a, b = (value, value) if isinstance(value, int) else tuple(value)
    return int(a) if a == b else (int(a), int(b))


def _square(value, what: str, where: str) -> int:
    size = _size(value)
    if not isinstance(size, int):
        raise FrontendError(f"{where}: {what} {size} is not supported (square only)")
    return size


def _string_padding(conv: nn.Conv2d, where: str):
    """The zero padding of padding="valid" (0) or "same" (dilation (k - 1) / 2 on each side;
    torch allows "same" at stride 1 only). An even kernel's "same" pads one side more:
    refused."""
    if conv.padding == "valid":
        return 0
    pads = []
    for k, d in zip(pair(conv.kernel_size), pair(conv.dilation)):
        if d * (k - 1) % 2:
            raise FrontendError(f"{where}: padding='same' with kernel {conv.kernel_size} and "
                                f"dilation {conv.dilation} pads one side more: not supported "
                                f"(give ints)")
        pads.append(d * (k - 1) // 2)
    return _size(pads)


def _window(pool, where: str) -> dict:
    """A pool's square kernel, stride and padding (ints)."""
    return {"kernel": _square(pool.kernel_size, "kernel", where),
            "stride": _square(pool.stride, "stride", where),
            "padding": _square(pool.padding, "padding", where)}


class _Lowering:
    def __init__(self, module: nn.Module, name: str):
        self.modules = dict(module.named_modules())
        self.state = {k: v.detach().to(torch.float32).numpy()
                      for k, v in module.state_dict().items()}
        self.ops, self.params, self.shapes, self.tensor = [], {}, {}, {}
        self.pooled = set()  # fx nodes holding the (B, C) features: flatten/view are no-ops
        self.pieces = {}     # chunk / split node -> (tensor, channels of each piece)
        self.grouped = {}    # a shuffle's 5-D view -> (tensor, groups, transposed)
        self.dropout, self.name = 0.0, name

    def emit(self, kind, name, inputs, output, shape, **attrs) -> str:
        base, count = output, 1
        while output in self.shapes:  # a parameter-free module called twice (e.g. one ReLU)
            count += 1
            output = f"{base}#{count}"
        self.ops.append(Op(kind, name, tuple(inputs), output, attrs))
        self.shapes[output] = tuple(shape)
        return output

    def param(self, name: str) -> str:
        if name in self.params:
            raise FrontendError(f"{name.rpartition('.')[0]}: a module called twice (shared "
                                f"weights) is not supported")
        self.params[name] = np.ascontiguousarray(self.state[name], dtype=np.float32)
        return name

    def tensor_of(self, arg, where: str) -> str:
        if not isinstance(arg, fx.Node) or arg not in self.tensor:
            raise FrontendError(f"{where}: an input that is not a traced tensor is not supported")
        return self.tensor[arg]

    def lower(self, node: fx.Node) -> None:
        meta = node.meta.get("tensor_meta")
        shape = tuple(meta.shape)[1:] if hasattr(meta, "shape") else None  # not a tuple's
        if node.op == "placeholder":
            if self.tensor:
                raise FrontendError(f"{node.name}: a second input is not supported")
            self.tensor[node] = "image"
            self.shapes["image"] = shape
        elif node.op == "call_module":
            self.module(node, self.modules[node.target], node.target, shape)
        elif node.op in ("call_function", "call_method"):
            self.function(node, shape)
        elif node.op == "output":
            returned = self.tensor.get(node.args[0])
            if not self.ops or self.ops[-1].kind != "linear" or returned != self.ops[-1].output:
                raise FrontendError("forward must return the logits of a final nn.Linear")
        else:
            raise FrontendError(f"{node.name}: {node.op} {node.target} is not supported")

    def module(self, node, mod, where: str, shape) -> None:
        kind = type(mod).__name__
        x = self.tensor_of(node.args[0], where) if node.args else None
        if isinstance(mod, nn.Conv2d):
            if mod.padding_mode != "zeros":
                raise FrontendError(f"{where}: padding_mode={mod.padding_mode!r} is not "
                                    f"supported (zeros only)")
            padding = _string_padding(mod, where) if isinstance(mod.padding, str) else \
                _size(mod.padding)
            dilation = _size(mod.dilation)
            self.tensor[node] = self.emit(
                "conv", where, [x], f"{where}/conv", shape, layer=where,
                weight=self.param(f"{where}.weight"),
                bias=self.param(f"{where}.bias") if mod.bias is not None else None,
                kernel=_size(mod.kernel_size), stride=_size(mod.stride),
                padding=padding, groups=mod.groups,
                **({"dilation": dilation} if dilation != 1 else {}))
        elif isinstance(mod, nn.BatchNorm2d):
            if mod.running_mean is None:
                raise FrontendError(f"{where}: BatchNorm2d without running statistics is not "
                                    f"supported (it is frozen: track_running_stats=True)")
            gamma = self.state.get(f"{where}.weight", np.ones(mod.num_features, np.float32))
            beta = self.state.get(f"{where}.bias", np.zeros(mod.num_features, np.float32))
            mean, var = self.state[f"{where}.running_mean"], self.state[f"{where}.running_var"]
            scale = (gamma / np.sqrt(var.astype(np.float64) + mod.eps)).astype(np.float32)
            self.params[f"{where}.scale"] = scale
            self.params[f"{where}.shift"] = (beta - mean * scale).astype(np.float32)
            self.tensor[node] = self.emit("affine", where, [x], f"{where}/bn", shape,
                                          scale=f"{where}.scale", shift=f"{where}.shift",
                                          eps=float(mod.eps))
        elif isinstance(mod, (nn.ReLU, nn.ReLU6, nn.Hardtanh)):
            lo, hi = ((0.0, RELU_HI) if isinstance(mod, nn.ReLU) else
                      (float(mod.min_val), float(mod.max_val)))
            self.tensor[node] = self.emit("clip", where, [x], f"{where}/act", shape, lo=lo, hi=hi)
        elif type(mod) in ACT_MODULES:
            self.act(node, x, where, shape, ACT_MODULES[type(mod)],
                     getattr(mod, "negative_slope", None))
        elif isinstance(mod, nn.MaxPool2d):
            if _size(mod.dilation) != 1:
                raise FrontendError(f"{where}: MaxPool2d with dilation is not supported")
            if mod.ceil_mode and shape[1:] != ceil_pool_hw(mod, self.shapes[x][1:]):
                raise FrontendError(f"{where}: MaxPool2d with ceil_mode whose last window would "
                                    f"start in the padding (torch drops it, onnxruntime does "
                                    f"not) is not supported at this input size")
            self.tensor[node] = self.emit("maxpool", where, [x], f"{where}/pool", shape,
                                          **_window(mod, where),
                                          **({"ceil_mode": True} if mod.ceil_mode else {}))
        elif isinstance(mod, nn.AvgPool2d) and not self.is_global(mod, node):
            if mod.ceil_mode or mod.divisor_override:
                raise FrontendError(f"{where}: AvgPool2d with ceil_mode or divisor_override "
                                    f"is not supported")
            self.tensor[node] = self.emit("avgpool", where, [x], f"{where}/pool", shape,
                                          **_window(mod, where),
                                          count_include_pad=bool(mod.count_include_pad))
        elif isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
            if isinstance(mod, nn.AdaptiveAvgPool2d) and mod.output_size not in (1, (1, 1)):
                raise FrontendError(f"{where}: AdaptiveAvgPool2d({mod.output_size}) is not "
                                    f"supported (only 1: a global pool)")
            self.pool(node, x, where, shape)
        elif isinstance(mod, nn.Flatten):
            self.flatten(node, where)
        elif isinstance(mod, (nn.Identity, *DROPOUTS)):
            if isinstance(mod, DROPOUTS):
                self.dropout = max(self.dropout, float(mod.p))
            self.passthrough(node, where)
        elif isinstance(mod, nn.Linear):
            if len(self.shapes[x]) != 1:
                raise FrontendError(f"{where}: Linear is supported only in the classifier "
                                    f"head, after the global pool")
            self.tensor[node] = self.emit(
                "linear", where, [x], f"{where}/linear", shape,
                weight=self.param(f"{where}.weight"),
                bias=self.param(f"{where}.bias") if mod.bias is not None else None)
        else:
            raise FrontendError(f"{where}: {kind} is not supported")

    def act(self, node, x: str, where: str, shape, fn: str, slope=None) -> None:
        attrs = {"fn": fn, **({"slope": float(slope)} if fn == "leaky_relu" else {})}
        self.tensor[node] = self.emit("act", where, [x], f"{where}/act", shape, **attrs)

    def is_global(self, mod, node) -> bool:
        """An AvgPool2d whose one window is the whole map, unpadded."""
        h, w = self.shapes[self.tensor_of(node.args[0], node.name)][1:]
        return (h, w) == pair(mod.kernel_size) and mod.padding in (0, (0, 0))

    def pool(self, node, x: str, where: str, shape) -> None:
        if squeezes(node):  # (C, 1, 1), or as torch has it (C,)
            mean = self.emit("mean", where, [x], f"{where}/mean", (shape[0], 1, 1))
            self.tensor[node] = mean if len(shape) == 3 else \
                self.emit("reshape", where, [mean], f"{where}/vector", shape)
            return
        if "features" in self.shapes:
            raise FrontendError(f"{where}: a second global pool is not supported")
        self.tensor[node] = self.emit("gap", where, [x], "features", (shape[0],))
        self.pooled.add(node)

    def passthrough(self, node, where: str) -> None:
        """An op that is the identity here (dropout, Identity, flatten of the features)."""
        self.tensor[node] = self.tensor_of(node.args[0], where)
        if node.args[0] in self.pooled:
            self.pooled.add(node)

    def flatten(self, node, where: str) -> None:
        x = self.tensor.get(node.args[0])
        if node.args[0] not in self.pooled and x is not None and self.shapes[x][1:] == (1, 1):
            self.tensor[node] = self.emit("reshape", where, [x], f"{where}/vector",
                                          self.shapes[x][:1])
            return  # a squeeze-excitation's (C, 1, 1) to the vector its Linears take
        if node.args[0] not in self.pooled:
            raise FrontendError(f"{where_of(node, self.name)}: flattening a feature map is "
                                f"supported only after the global pool")
        self.passthrough(node, where)

    def view(self, node, where: str, shape) -> None:
        """A view / reshape: of the pooled features (a flatten), or one of a channel
        shuffle's two: (C, H, W) -> (g, C / g, H, W), and back after a transpose."""
        source = node.args[0]
        if source in self.pooled:
            return self.flatten(node, where)
        grouped = self.grouped.get(source)
        x = self.tensor.get(source)
        if x is not None and prod(self.shapes[x]) == prod(shape) and \
                {len(self.shapes[x]), len(shape)} == {1, 3} and \
                prod(self.shapes[x][1:]) == prod(shape[1:]) == 1:
            self.tensor[node] = self.emit("reshape", where, [x], f"{where}/reshape", shape)
            return  # a squeeze-excitation's vector (C,) and (C, 1, 1)
        if grouped is None and len(shape) == 4:
            x = self.tensor_of(source, where)
            if (shape[0] * shape[1], *shape[2:]) == self.shapes[x]:
                self.grouped[node] = (x, shape[0], False)
                return
        elif grouped and grouped[2] and shape == self.shapes[grouped[0]]:
            x, groups, _ = grouped
            self.tensor[node] = self.emit("shuffle", where, [x], f"{where}/shuffle", shape,
                                          groups=groups)
            return
        raise FrontendError(f"{where_of(node, self.name)}: a view of a feature map is "
                            f"supported only as a channel shuffle (view, transpose(1, 2), "
                            f"view) or a flatten after the global pool")

    def transpose(self, node, where: str) -> None:
        """The middle of a channel shuffle: swap the groups and the channels in a group."""
        dims = tuple(node.args[1:]) or tuple(node.kwargs.values())
        dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
        grouped = self.grouped.get(node.args[0])
        if grouped and not grouped[2] and dims in ((1, 2), (2, 1), (0, 2, 1, 3, 4)):
            self.grouped[node] = (grouped[0], grouped[1], True)
            return
        raise FrontendError(f"{where_of(node, self.name)}: a transpose is supported only in a "
                            f"channel shuffle (view, transpose(1, 2), view)")

    def split(self, node, where: str) -> None:
        """chunk / split on channels: its pieces are slices (see getitem)."""
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if dim not in (1, -3):
            raise FrontendError(f"{where_of(node, self.name)}: {op_label(node.target)} on dim "
                                f"{dim} is not supported (only on channels, dim 1)")
        sizes = [meta.shape[1] for meta in node.meta["tensor_meta"]]
        self.pieces[node] = (self.tensor_of(node.args[0], where), sizes)

    def cat(self, node, where: str, shape) -> None:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if dim not in (1, -3):
            raise FrontendError(f"{where_of(node, self.name)}: {op_label(node.target)} on dim "
                                f"{dim} is not supported (only on channels, dim 1)")
        inputs = [self.tensor_of(t, where) for t in tensors]
        self.tensor[node] = self.emit("cat", where, inputs, f"{where}/cat", shape)

    def piece(self, node, where: str, shape) -> None:
        """Piece i of a chunk / split: channels [start, stop) of its tensor."""
        if node.args[0] not in self.pieces:
            raise FrontendError(f"{where_of(node, self.name)}: indexing a tensor is not "
                                f"supported (only the pieces of chunk / split on channels)")
        x, sizes = self.pieces[node.args[0]]
        i = node.args[1] % len(sizes)
        start = sum(sizes[:i])
        self.tensor[node] = self.emit("slice", where, [x], f"{where}/slice", shape,
                                      start=start, stop=start + sizes[i])

    def function(self, node, shape) -> None:
        target, where = node.target, node.name
        label = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        if size_value(node):
            return  # python ints that only shape a view (checked there)
        x = node.args[0] if node.args else None
        method = node.op == "call_method"
        if target in RELUS or (node.op == "call_method" and target in ("relu", "relu_")):
            lo, hi = RELUS.get(target, (0.0, RELU_HI))
            self.tensor[node] = self.emit("clip", where, [self.tensor_of(x, where)],
                                          f"{where}/act", shape, lo=lo, hi=hi)
        elif target in ACT_FUNCTIONS or (node.op == "call_method" and target in ACT_METHODS):
            fn = ACT_FUNCTIONS.get(target) or ACT_METHODS[target]
            slope = (node.args[1] if len(node.args) > 1 else
                     node.kwargs.get("negative_slope", 0.01)) if fn == "leaky_relu" else None
            self.act(node, self.tensor_of(x, where), where, shape, fn, slope)
        elif target in HARDTANHS:
            lo = float(node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0))
            hi = float(node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0))
            self.tensor[node] = self.emit("clip", where, [self.tensor_of(x, where)],
                                          f"{where}/act", shape, lo=lo, hi=hi)
        elif target in ADDS and len(node.args) == 2 and not node.kwargs:
            a, b = (self.tensor_of(arg, where) for arg in node.args)
            self.tensor[node] = self.emit("add", where, [a, b], f"{where}/add", shape)
        elif target in MULS and len(node.args) == 2 and not node.kwargs:
            a, b = (self.tensor_of(arg, where) for arg in node.args)
            for t in (a, b):
                if self.shapes[t] not in (tuple(shape), (shape[0], 1, 1)):
                    raise FrontendError(f"{where_of(node, self.name)}: a multiply of "
                                        f"{self.shapes[t]} into "
                                        f"{tuple(shape)} is not supported (equal shapes, or "
                                        f"a (C, 1, 1) gate)")
            self.tensor[node] = self.emit("mul", where, [a, b], f"{where}/mul", shape)
        elif target is F.adaptive_avg_pool2d and node.args[1:] in ((1,), ((1, 1),)):
            self.pool(node, self.tensor_of(x, where), where, shape)
        elif target is torch.mean or (node.op == "call_method" and target == "mean"):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
            if sorted(d % 4 for d in dims) != [2, 3]:
                raise FrontendError(f"{where}: a mean over dims {dims} is supported only as "
                                    f"the global pool, over (2, 3)")
            self.pool(node, self.tensor_of(x, where), where, shape)
        elif target is torch.flatten or method and target == "flatten":
            self.flatten(node, where)
        elif target is torch.reshape or method and target in ("view", "reshape"):
            self.view(node, where, shape)
        elif target in TRANSPOSES:
            self.transpose(node, where)
        elif method and target == "contiguous":
            if x in self.grouped:
                self.grouped[node] = self.grouped[x]
            else:
                self.passthrough(node, where)
        elif target in CATS:
            self.cat(node, where, shape)
        elif target in SPLITS:
            self.split(node, where)
        elif target is operator.getitem:
            self.piece(node, where, shape)
        elif target in POOL_FUNCTIONS:  # as the module with the same arguments
            names, module = POOL_FUNCTIONS[target]
            arguments = dict(zip(names, node.args[1:]), **node.kwargs)
            arguments.pop("return_indices", None)  # True traces as F.max_pool2d_with_indices
            self.module(node, module(**arguments), where, shape)
        elif target is F.dropout:
            self.passthrough(node, where)
        else:
            raise FrontendError(f"{where}: {label} is not supported")


HEAD_OPS = ("linear", "clip", "act")  # after the global pool
# F.max_pool2d / F.avg_pool2d: their positional arguments after the input, and their module
POOL_FUNCTIONS = {
    F.max_pool2d: (("kernel_size", "stride", "padding", "dilation", "ceil_mode",
                    "return_indices"), nn.MaxPool2d),
    F.avg_pool2d: (("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                    "divisor_override"), nn.AvgPool2d)}
SUPPORTED_FUNCTIONS = (*RELUS, *HARDTANHS, *ACT_FUNCTIONS, *ADDS, *MULS, F.adaptive_avg_pool2d,
                       torch.mean, torch.flatten, torch.reshape, F.dropout, *CATS,
                       *POOL_FUNCTIONS, torch.chunk, torch.split, torch.transpose,
                       operator.getitem)
SUPPORTED_METHODS = (*FLATTENS, *ACT_METHODS, "relu", "relu_", "size", "mean", "chunk",
                     "split", "transpose", "permute", "contiguous")


def size_value(node: fx.Node) -> bool:
    """Whether node is a python int (or tuple of them) from x.size() / x.shape, or arithmetic
    on such ints: a shape for a view, not a tensor."""
    if node.op == "call_method" and node.target == "size" or \
            node.op == "call_function" and node.target is getattr and node.args[1] == "shape":
        return True
    sources = [a for a in node.args if isinstance(a, fx.Node)]
    return node.op == "call_function" and node.target in SIZE_ARITHMETIC and bool(sources) \
        and all(size_value(a) for a in sources)


def squeezes(pool: fx.Node) -> bool:
    """Whether a global pool is a squeeze-excitation's: something after it multiplies (its
    gate scales a map); the classifier's pool leads to the logits only."""
    seen, todo = set(), list(pool.users)
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        if node.op == "call_function" and node.target in MULS:
            return True
        seen.add(node)
        todo += node.users
    return False


def ceil_pool_hw(pool: nn.MaxPool2d, hw) -> tuple:
    """A ceil_mode pool's (OH, OW) as ONNX computes it: every window that starts inside the
    padded input (torch also drops one that starts in the right padding)."""
    k, s, p = (pair(v) for v in (pool.kernel_size, pool.stride, pool.padding))
    return tuple(-(-(n + 2 * pad - kk) // ss) + 1 for n, kk, ss, pad in zip(hw, k, s, p))


def in_place(node: fx.Node, modules: dict) -> bool:
    """An op that overwrites its input (F.relu_, .sigmoid_(), inplace=True)."""
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    return node.target in IN_PLACE or bool(node.kwargs.get("inplace"))


def read_after_overwrite(node: fx.Node, modules: dict, model: str) -> str | None:
    """'<where>: ... is read again' when an in-place op's input has a user after it: torch
    would read the overwritten tensor, the program the original one."""
    if node.op not in ("call_module", "call_function", "call_method") or not node.args or \
            not isinstance(node.args[0], fx.Node) or not in_place(node, modules):
        return None
    later = [user for user in node.args[0].users if user is not node and _after(user, node)]
    if not later:
        return None
    what = type(modules[node.target]).__name__ if node.op == "call_module" else \
        op_label(node.target)
    return (f"{where_of(node, model)}: the in-place {what} overwrites a tensor that "
            f"{later[0].name} reads after it: not supported (make it not in-place)")


def _after(a: fx.Node, b: fx.Node) -> bool:
    """Whether node a comes after node b in the graph."""
    node = b.next
    while node.op != "root":
        if node is a:
            return True
        node = node.next
    return False


def op_label(target) -> str:
    """How a user writes a traced function: torch.erf, F.silu, operator.mul, or .mean()."""
    if isinstance(target, str):
        return f".{target}()"
    name = getattr(target, "__name__", str(target))
    for prefix, home in (("torch.", torch), ("F.", F), ("operator.", operator)):
        if getattr(home, name, None) is target:
            return prefix + name
    return name


def unsupported(node: fx.Node, modules: dict, model: str) -> str | None:
    """'<module path>: <op> is not supported' when the frontend cannot lower node, else None.
    A function is named by the module whose forward calls it (``<path> (forward)``)."""
    if node.op == "call_module":
        mod = modules[node.target]
        return None if isinstance(mod, MODULES) else \
            f"{node.target}: {type(mod).__name__} is not supported"
    if size_value(node):
        return None
    if node.op == "call_function" and node.target in MULS and \
            not all(isinstance(arg, fx.Node) for arg in node.args):
        return f"{where_of(node, model)}: {op_label(node.target)} by a constant is not " \
               f"supported (only of two tensors, such as a gate)"
    if node.op == "call_function" and node.target in SUPPORTED_FUNCTIONS or \
            node.op == "call_method" and node.target in SUPPORTED_METHODS or \
            node.op not in ("call_function", "call_method"):
        return None
    return f"{where_of(node, model)}: {op_label(node.target)} is not supported"


def where_of(node: fx.Node, model: str) -> str:
    """A module's path, or for a function the module whose forward calls it."""
    if node.op == "call_module":
        return node.target
    stack = list((node.meta.get("nn_module_stack") or {}).keys())
    return f"{stack[-1]} (forward)" if stack else f"{model} (forward)"


def program_from_module(module: nn.Module, input_size, name: str | None = None) -> tuple:
    """(Program, dropout p) of an nn.Module at a fixed input size (H, W), in eval mode."""
    hw = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    name = name or type(module).__name__
    module = module.eval()
    try:
        traced = fx.symbolic_trace(module)
    except Exception as e:  # torch.fx raises many types (data-dependent control flow, ...)
        text = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise FrontendError(f"cannot trace {name} with torch.fx: {text}") from None
    lowering = _Lowering(module, name)
    # every unsupported op is named at once, before shapes are propagated through them
    found = [unsupported(node, lowering.modules, name) or
             read_after_overwrite(node, lowering.modules, name) for node in traced.graph.nodes]
    found = [text for text in found if text]
    if found:
        raise FrontendError(f"{len(found)} unsupported op{'s' if len(found) > 1 else ''}: "
                            + "; ".join(found))
    try:
        with torch.no_grad():
            ShapeProp(traced).propagate(torch.zeros(1, 3, *hw))
    except Exception as e:
        text = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise FrontendError(f"{name} does not run on a (1, 3, {hw[0]}, {hw[1]}) input: "
                            f"{text}") from None
    problems, failed = [], set()  # every op that fails, but not what only follows from one
    for node in traced.graph.nodes:
        if failed.intersection(node.all_input_nodes):
            failed.add(node)
            continue
        try:
            lowering.lower(node)
        except FrontendError as e:
            problems.append(str(e))
            failed.add(node)
    if problems:
        raise FrontendError(problems[0] if len(problems) == 1 else
                            f"{len(problems)} problems: " + "; ".join(problems))
    ops, shapes = lowering.ops, lowering.shapes
    if ops[-1].kind != "linear":
        raise FrontendError(f"{name}: the last op must be the classifier nn.Linear")
    head = [op for op in ops[head_start(ops) + 1:] if op.kind not in HEAD_OPS]
    if head:
        raise FrontendError(f"{head[0].name}: {head[0].kind} after the global pool is not "
                            f"supported (the head: Linear, activations, Dropout)")
    last = ops[-1]
    ops[-1] = Op(last.kind, last.name, last.inputs, "logits", last.attrs)
    shapes["logits"] = shapes.pop(last.output)
    return Program(name, ops, lowering.params, shapes, shapes["logits"][0]), lowering.dropout
