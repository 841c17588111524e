"""PyTorch reference of compressed-activation training (Nguyen et al., NeurIPS 2024).

One ``torch.autograd.Function`` per method.  Each forward is a plain conv2d;
what differs is what ``ctx.save_for_backward`` keeps of the input x (B, C, H, W):

=========  ==========================================  ===============================
method     kept for backward (besides the weight W)    weight gradient
=========  ==========================================  ===============================
vanilla    x                                            exact
hosvd      core S (K1..K4), U1 (B,K1) U2 (C,K2)         exact w.r.t. the Tucker tensor,
           U3 (H,K3) U4 (W,K4)                          computed without rebuilding x
svd        left (B,k), right (k, C*H*W)                 exact w.r.t. left @ right
gf-r2      x_sum (B, C, ceil(H/2s), ceil(W/2s))         gradient filter, r = 2
=========  ==========================================  ===============================

The input gradient dX = conv2d_input(x.shape, W, dY) needs only W and dY, so it is
exact for every method.  The bias gradient is sum(dY) over (B, H', W').

Decompositions call the numpy device core (``actcomp_edge.core.decomposition``), so the
reference picks exactly the ranks the device does.

``conv`` below is always the tuple (stride, padding, dilation, groups) with
stride/padding/dilation as (h, w) pairs, in the order F.conv2d takes them.
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input, conv2d_weight

from actcomp_edge.core.methods import GF_RADIUS, METHODS as TABLE
from actcomp_edge.core.decomposition import check_eps, hosvd, svd_compress


# ----------------------------------------------------------------- helpers

def _to_numpy(x: torch.Tensor) -> np.ndarray:
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    return x.detach().to("cpu", dtype).numpy()


def _to_torch(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(like.device, like.dtype)


def _input_grad(ctx, weight, grad_y):
    """dX (B, C, H, W) from W and dY only."""
    if not ctx.needs_input_grad[0]:
        return None
    return conv2d_input(ctx.x_shape, weight, grad_y, *ctx.conv)


def _bias_grad(ctx, grad_y):
    return grad_y.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None


# ------------------------------------------------- weight gradients (math)

def hosvd_weight_grad(core, factors, grad_y, weight_shape, stride, padding, dilation, groups):
    """dW (O, C/groups, kh, kw) of a conv whose input is x = S x1 U1 x2 U2 x3 U3 x4 U4.

    core S (K1, K2, K3, K4); factors U1 (B, K1), U2 (C, K2), U3 (H, K3), U4 (W, K4);
    grad_y dY (B, O, H', W').  x is never rebuilt:
      Z   = dY x_batch U1^T                    (K1, O, H', W')
      T   = S x3 U3p x4 U4p                    (K1, K2, H+2ph, W+2pw), U3p/U4p = zero-padded rows
      dW' = conv weight grad(T, Z), pad 0       (O, K2, kh, kw)   "a batch of K1 images of K2 channels"
      dW[o, c] = sum_k2 dW'[o, k2] U2[g(o) * C/groups + c, k2]    g(o) = group of output channel o
    Padded rows of T beyond the last stride step are simply unused by the conv.
    """
    u1, u2, u3, u4 = factors
    (ph, pw), (out_ch, cg, kh, kw) = padding, weight_shape
    z = torch.einsum("bk,bohw->kohw", u1, grad_y)
    u3p = F.pad(u3, (0, 0, ph, ph))                      # zero rows = the conv's zero padding
    u4p = F.pad(u4, (0, 0, pw, pw))
    t = torch.einsum("abcd,hc->abhd", core, u3p)
    t = torch.einsum("abhd,wd->abhw", t, u4p)
    dw_low = conv2d_weight(t, (out_ch, core.shape[1], kh, kw), z, stride, 0, dilation, 1)
    dw_low = dw_low.reshape(groups, out_ch // groups, -1, kh, kw)   # (G, O/G, K2, kh, kw)
    u2_per_group = u2.reshape(groups, cg, -1)                       # (G, C/G, K2)
    return torch.einsum("gokij,gck->gocij", dw_low, u2_per_group).reshape(weight_shape)


def svd_weight_grad(left, right, grad_y, x_shape, weight_shape, stride, padding, dilation, groups):
    """dW of a conv whose input is x = (left @ right).reshape(x_shape), x never rebuilt.

    left (B, k), right (k, C*H*W), grad_y (B, O, H', W'):
      Z  = left^T dY over the batch   (k, O, H', W')
      dW = conv weight grad(right as k images (k, C, H, W), Z)  with the layer's own
           stride/padding/dilation/groups.
    """
    z = torch.einsum("bk,bohw->kohw", left, grad_y)
    basis = right.reshape(-1, *x_shape[1:])
    return conv2d_weight(basis, weight_shape, z, stride, padding, dilation, groups)


def sum_pool(t, size):
    """Sum over non-overlapping size=(sh, sw) patches of t (B, C, H, W), zero-padded
    at the bottom/right to a multiple of size -> (B, C, ceil(H/sh), ceil(W/sw))."""
    (sh, sw), (b, c, h, w) = size, t.shape
    t = F.pad(t, (0, -w % sw, 0, -h % sh))
    return t.reshape(b, c, t.shape[2] // sh, sh, t.shape[3] // sw, sw).sum((3, 5))


def gf_weight_grad(x_sum, grad_y, weight_shape, groups, r=GF_RADIUS):
    """Gradient-filter dW (Yang et al., CVPR 2023) from x_sum (B, C, Ph, Pw) and dY (B, O, H', W').

    dY_avg = mean of dY over r x r patches (bottom/right padding not counted), grid
             (ceil(H'/r), ceil(W'/r)), then cropped / zero-padded to x_sum's grid (Ph, Pw);
    dW[o, c, i, j] = sum_{b, p} dY_avg[b, o, p] x_sum[b, g(o) * C/groups + c, p]  for every (i, j).
    """
    ph, pw = x_sum.shape[2:]
    counts = sum_pool(torch.ones_like(grad_y[:1, :1]), (r, r))
    dy_avg = sum_pool(grad_y, (r, r)) / counts
    dy_avg = dy_avg[:, :, :ph, :pw]
    dy_avg = F.pad(dy_avg, (0, pw - dy_avg.shape[3], 0, ph - dy_avg.shape[2]))
    out_ch, cg, kh, kw = weight_shape
    b = x_sum.shape[0]
    dw = torch.einsum("bgop,bgcp->goc", dy_avg.reshape(b, groups, out_ch // groups, -1),
                      x_sum.reshape(b, groups, cg, -1))
    return dw.reshape(out_ch, cg, 1, 1).expand(weight_shape).contiguous()


# ------------------------------------------------------ autograd Functions

class VanillaConv2d(torch.autograd.Function):
    """Keeps x (B, C, H, W) and W: the uncompressed baseline."""

    @staticmethod
    def forward(ctx, x, weight, bias, conv, stats):
        ctx.conv, ctx.x_shape = conv, x.shape
        ctx.save_for_backward(x, weight)
        stats.update(ranks=None, kept_floats=x.numel())
        return F.conv2d(x, weight, bias, *conv)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_w = conv2d_weight(x, weight.shape, grad_y, *ctx.conv) if ctx.needs_input_grad[1] else None
        return _input_grad(ctx, weight, grad_y), grad_w, _bias_grad(ctx, grad_y), None, None


class HosvdConv2d(torch.autograd.Function):
    """Keeps the truncated HOSVD of x: core (K1, K2, K3, K4) and factors U1..U4, plus W."""

    @staticmethod
    def forward(ctx, x, weight, bias, conv, stats, eps, ranks, rank_cap):
        tucker = hosvd(_to_numpy(x), eps=eps, ranks=ranks, rank_cap=rank_cap)
        core = _to_torch(tucker.core, x)
        factors = [_to_torch(u, x) for u in tucker.factors]
        ctx.conv, ctx.x_shape = conv, x.shape
        ctx.save_for_backward(core, *factors, weight)
        stats.update(ranks=tucker.rank_per_mode, kept_floats=tucker.kept_floats)
        return F.conv2d(x, weight, bias, *conv)

    @staticmethod
    def backward(ctx, grad_y):
        core, *factors, weight = ctx.saved_tensors
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = hosvd_weight_grad(core, factors, grad_y, weight.shape, *ctx.conv)
        return (_input_grad(ctx, weight, grad_y), grad_w, _bias_grad(ctx, grad_y),
                None, None, None, None, None)


class SvdConv2d(torch.autograd.Function):
    """Keeps the truncated SVD of the mode-1 unfolding x_(1) (B, C*H*W): left (B, k), right (k, CHW), plus W."""

    @staticmethod
    def forward(ctx, x, weight, bias, conv, stats, eps, rank, rank_cap):
        low = svd_compress(_to_numpy(x), eps=eps, rank=rank, rank_cap=rank_cap)
        left, right = _to_torch(low.left, x), _to_torch(low.right, x)
        ctx.conv, ctx.x_shape = conv, x.shape
        ctx.save_for_backward(left, right, weight)
        stats.update(ranks=(low.rank,), kept_floats=low.kept_floats)
        return F.conv2d(x, weight, bias, *conv)

    @staticmethod
    def backward(ctx, grad_y):
        left, right, weight = ctx.saved_tensors
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = svd_weight_grad(left, right, grad_y, ctx.x_shape, weight.shape, *ctx.conv)
        return (_input_grad(ctx, weight, grad_y), grad_w, _bias_grad(ctx, grad_y),
                None, None, None, None, None)


class GradientFilterR2Conv2d(torch.autograd.Function):
    """Gradient filter with r = 2 (Yang et al., "Efficient On-device Training via
    Gradient Filtering", CVPR 2023).

    Keeps x_sum (B, C, ceil(H/(r*sh)), ceil(W/(r*sw))): x summed over non-overlapping
    (r*sh) x (r*sw) patches, zero-padded at the bottom/right; plus W.
    Backward (see ``gf_weight_grad``): dY is averaged over r x r patches and every
    kernel tap (i, j) of dW gets the same value sum_{b,p} dY_avg * x_sum.

    Differences from the authors' code, on purpose:
    - padding is at the bottom/right only (theirs centres it with avg_pool2d padding);
    - dX is the exact conv2d_input(W, dY) (theirs approximates it from sum(W) and
      dY_avg).  Memory is the same as the original GF (x_sum + a weight-sized tensor);
      only the weight gradient is approximated here.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, conv, stats):
        (sh, sw) = conv[0]
        x_sum = sum_pool(x, (GF_RADIUS * sh, GF_RADIUS * sw))
        ctx.conv, ctx.x_shape = conv, x.shape
        ctx.save_for_backward(x_sum, weight)
        stats.update(ranks=None, kept_floats=x_sum.numel())
        return F.conv2d(x, weight, bias, *conv)

    @staticmethod
    def backward(ctx, grad_y):
        x_sum, weight = ctx.saved_tensors
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = gf_weight_grad(x_sum, grad_y, weight.shape, ctx.conv[3])
        return _input_grad(ctx, weight, grad_y), grad_w, _bias_grad(ctx, grad_y), None, None


# ------------------------------------------------------------------ modules

# the table's methods this torch reference implements, each by its own autograd Function (not
# asi: its subspaces carry over from step to step)
FUNCTIONS = {"vanilla": VanillaConv2d, "svd": SvdConv2d, "hosvd": HosvdConv2d,
             "gf-r2": GradientFilterR2Conv2d}
METHODS = tuple(name for name in TABLE if name in FUNCTIONS)


def _check_method_args(method, eps, ranks):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if eps is not None:
        check_eps(eps)
    if TABLE[method].ranks and (eps is None) == (ranks is None):
        raise ValueError(f"method {method!r} needs exactly one of eps or ranks")


class CompressedConv2d(nn.Conv2d):
    """nn.Conv2d whose backward keeps only a compressed form of its input.

    method: "vanilla" | "svd" | "hosvd" | "gf-r2".  For "hosvd": eps (paper rule) or
    ranks (one per mode B, C, H, W, or one int), rank_cap (int or per mode).  For "svd":
    eps or ranks (an int k), rank_cap (int).  vanilla and gf-r2 ignore them.
    After each training forward: last_ranks (HOSVD (K1..K4), SVD (k,), else None) and
    last_kept_floats (floats kept for the activation, weight excluded).
    Without grad (torch.no_grad, or nothing requires grad) it is a plain conv.
    """

    def __init__(self, *args, method="hosvd", eps=None, ranks=None, rank_cap=None, **kwargs):
        super().__init__(*args, **kwargs)
        _check_method_args(method, eps, ranks)
        if isinstance(self.padding, str) or self.padding_mode != "zeros":
            raise ValueError("CompressedConv2d needs numeric zero padding "
                             f"(got padding={self.padding!r}, padding_mode={self.padding_mode!r})")
        self.method, self.eps, self.ranks, self.rank_cap = method, eps, ranks, rank_cap
        self.last_ranks: Optional[tuple] = None
        self.last_kept_floats: Optional[int] = None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, method, eps=None, ranks=None, rank_cap=None):
        """A CompressedConv2d with conv's hyper-parameters and a copy of its weight/bias."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                  padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                  bias=conv.bias is not None, padding_mode=conv.padding_mode,
                  device=conv.weight.device, dtype=conv.weight.dtype,
                  method=method, eps=eps, ranks=ranks, rank_cap=rank_cap)
        with torch.no_grad():
            for name in ("weight", "bias"):
                old = getattr(conv, name)
                if old is not None:
                    getattr(new, name).copy_(old).requires_grad_(old.requires_grad)
        return new.train(conv.training)

    def forward(self, x):
        conv = (self.stride, self.padding, self.dilation, self.groups)
        needs_grad = any(t is not None and t.requires_grad for t in (x, self.weight, self.bias))
        if not (torch.is_grad_enabled() and needs_grad):
            return F.conv2d(x, self.weight, self.bias, *conv)
        stats = {}
        sizing = (self.eps, self.ranks, self.rank_cap) if TABLE[self.method].ranks else ()
        y = FUNCTIONS[self.method].apply(x, self.weight, self.bias, conv, stats, *sizing)
        self.last_ranks, self.last_kept_floats = stats["ranks"], stats["kept_floats"]
        return y

    def extra_repr(self):
        return (super().extra_repr() + f", method={self.method!r}, eps={self.eps}, "
                f"ranks={self.ranks}, rank_cap={self.rank_cap}")


# ------------------------------------------------------- model surgery

def _batchnorm_train(bn, mode=True):
    """Replaces bn.train: a frozen BatchNorm stays in eval mode whatever mode is asked."""
    return nn.Module.train(bn, False)


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Put every BatchNorm of model in eval mode for good.

    Each BatchNorm instance gets its own ``train`` (a picklable functools.partial) that
    always sets eval, so model.train() / model.eval() anywhere above it keep the
    running statistics fixed; its parameters are left as they are.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train = functools.partial(_batchnorm_train, module)
            module.train()
    return model


def compress_last_n(model: nn.Module, n: int, method: str, eps=None, ranks=None,
                    rank_cap=None) -> list:
    """Fine-tune the last n convs of model with compressed activations (the paper's setup).

    In place: the last n nn.Conv2d of model.named_modules() (definition order) become
    CompressedConv2d(method, eps | ranks, rank_cap); every parameter is frozen except
    those of the replaced convs and of every nn.Linear after the first replaced conv
    (the classifier); every BatchNorm stays in eval mode (``freeze_batchnorm``).
    Returns the names of the replaced convs.
    """
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(convs):
        raise ValueError(f"n must be an int in 1..{len(convs)} (the number of Conv2d in the model), got {n!r}")
    _check_method_args(method, eps, ranks)
    replaced = [name for name, _ in convs[-n:]]
    if "" in replaced:
        raise ValueError("cannot replace the model itself; wrap the Conv2d in a container")
    model.requires_grad_(False)
    for name, conv in convs[-n:]:
        parent_name, _, attr = name.rpartition(".")
        new = CompressedConv2d.from_conv(conv, method, eps=eps, ranks=ranks, rank_cap=rank_cap)
        setattr(model.get_submodule(parent_name), attr, new.requires_grad_(True))
    after_first = False
    for name, module in model.named_modules():
        after_first = after_first or name == replaced[0]
        if after_first and isinstance(module, nn.Linear):
            module.requires_grad_(True)
    freeze_batchnorm(model)
    return replaced
