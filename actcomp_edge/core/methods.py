"""The methods: what the backward keeps of a fine-tuned conv's input, one row each.

For a fine-tuned conv with input x (B, C, H, W) a method (a row of ``METHODS``) says

    pieces       what it keeps, named, with their dims (a rank is a symbol: k, k1..k4)
    kept_floats  how many floats that is (the paper's formulas)
    workspace    the bytes numpy needs for a while to make them, beyond x and the pieces
    compress     how the board makes them (numpy: this module runs on the device)
    weight_grad  how the backward graph turns them and dY into dW (ONNX nodes on ``g``,
                 the exporter's ``export.onnx_graph.Graph``: ``g.op``, ``g.ints``)

Adding a method is adding its functions and one row here. No torch, no onnx import.

    vanilla:       input (B, C, H, W)
    hosvd:         core (K1, K2, K3, K4), u_batch (B, K1), u_channel (C, K2), u_height (H, K3),
                   u_width (W, K4); eps ranks recomputed every step (the paper)
    asi:           the hosvd pieces from ``Asi``: ranks fixed at the first step, then one
                   warm-started subspace iteration a step (Nguyen et al., ICML 2025)
    svd:           left = U_k diag(s_k) (B, k), right = V_k^T reshaped (k, C, H, W)
    gf-r2:         x_sum (B, C, ceil(H / (r s)), ceil(W / (r s))): sums over (r s) x (r s)
                   patches, zero-padded bottom/right (Gradient Filter, r = 2, Yang et al. 2023)
"""
from __future__ import annotations

from dataclasses import dataclass
from math import ceil, prod
from typing import Callable, Optional, Sequence

import numpy as np

from .arch import ConvLayer, pair
from .decomposition import (GRAM_BLOCK_BYTES, Tucker, full_rank_bound, grow_samples, hosvd,
                            in_place, small_map, subspace_step, svd_compress)

GF_RADIUS = 2
# onnxruntime's blocked-layout CPU kernels: contrib ops of every stock build, fast where MLAS
# has NCHWc kernels (x86-64). A graph built with them is a variant the runner probes first.
NCHWC_DOMAIN = "com.microsoft.nchwc"
NCHWC_CHANNELS = 16  # their channel block is 8 (AVX2) or 16 (AVX-512): graphs pad to both
BATCH = "batch"   # the symbolic batch dim of the graphs


@dataclass
class Kept:
    pieces: dict                      # piece name -> array (float32)
    rank_per_mode: Optional[tuple]    # hosvd (K1..K4), svd (k,), else None

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.pieces.values()))


# ---------------------------------------------------------------- vanilla: x itself

def vanilla_floats(shape: Sequence[int], ranks=None, stride: int = 1) -> int:
    """B*C*H*W."""
    return prod(shape)


def vanilla_compress(x, eps=None, ranks=None, rank_cap=None, stride=1) -> Kept:
    return Kept({"input": x}, None)


def vanilla_weight_grad(g, name: str, kept: dict, dy: str, conv: ConvLayer) -> str:
    return conv_weight_grad(g, name, kept["input"], dy, conv)


# ---------------------------------------------------------------- svd: mode-1 truncated SVD

def svd_floats(shape: Sequence[int], ranks: Sequence[int], stride: int = 1) -> int:
    """k (B + C*H*W)."""
    return ranks[0] * (shape[0] + prod(shape[1:]))


def svd_rank(shape: tuple, ranks, rank_cap) -> tuple:
    """(k,) for sizing: the fixed rank, else the bound min(B, C*H*W); capped."""
    bound = min(shape[0], prod(shape[1:]))
    k = int(ranks[0]) if ranks is not None else bound
    cap = rank_cap if isinstance(rank_cap, int) else (rank_cap[0] if rank_cap else None)
    return (max(1, min(k, bound, cap if cap else bound)),)


def svd_workspace(shape: tuple, ranks, stride: int) -> int:
    """The (B, B) Gram in float64 with eigh's copy and vectors, and two (k, C*H*W) passes."""
    b = shape[0]
    return 3 * 8 * b * b + 2 * 4 * ranks[0] * (prod(shape) // b)


def svd_kept(x, eps=None, ranks=None, rank_cap=None, stride=1) -> Kept:
    rank = None if eps is not None else (ranks[0] if ranks is not None else None)
    s = svd_compress(x, eps=eps, rank=rank, rank_cap=rank_cap)
    return Kept({"left": s.left, "right": s.right.reshape((s.rank,) + x.shape[1:])}, (s.rank,))


def svd_weight_grad(g, name: str, kept: dict, dy: str, conv: ConvLayer) -> str:
    """dW = sum_b left[b, k] (right_k * dY_b): dY contracted with left over the batch, then
    the conv's weight gradient of the k rows of right."""
    z = batch_contract(g, name + "/dY_x_left", kept["left"], dy,
                       (conv.out_ch,) + tuple(conv.output_hw))
    return conv_weight_grad(g, name, kept["right"], z, conv)


# ---------------------------------------------------------------- hosvd: truncated Tucker

def hosvd_floats(shape: Sequence[int], ranks: Sequence[int], stride: int = 1) -> int:
    """prod(K_n) + sum(d_n K_n)."""
    return prod(ranks) + sum(d * k for d, k in zip(shape, ranks))


def tucker_ranks(shape: tuple, ranks, rank_cap) -> tuple:
    """(K1..K4) for sizing: fixed ones if given, else the full multilinear rank; capped."""
    bound = full_rank_bound(shape)
    chosen = tuple(ranks) if ranks is not None else bound
    if len(chosen) != 4:
        raise ValueError(f"hosvd needs 4 ranks (B, C, H, W), got {len(chosen)}")
    caps = rank_cap if rank_cap is not None else (None,) * 4
    if isinstance(caps, int):
        caps = (caps,) * 4
    return tuple(max(1, min(k, b, c if c else b)) for k, b, c in zip(chosen, bound, caps))


def hosvd_workspace(shape: tuple, ranks, stride: int) -> int:
    """What decomposition.hosvd allocates beyond x and the kept pieces (x is read in place):
    - the Grams: the largest mode's (g x g float64 and numpy's eigh beside it, which took
      4.8 g^2 doubles more of RSS for g = 512 here: its copy, vectors and LAPACK's work
      arrays, which tracemalloc does not see; from a float32 unfold copy where d_n exceeds
      the rest), beside two blocks of mode_gram's unfold copies (one sample or
      GRAM_BLOCK_BYTES: the last and the next);
    - the core: the mode products' outputs, the largest pair of successive ones.
    At least tracemalloc's peak on each of mcunet's 42 conv inputs (batch 32, 128 px and batch
    64, 224 px: benchmarks/scripts/numpy_workspace.py)."""
    size = prod(shape)
    sample = 4 * (size // shape[0])
    block = min(4 * size, max(sample, GRAM_BLOCK_BYTES // sample * sample))
    grams = max(6 * 8 * min(d, size // d) ** 2 + (4 * size if d > size // d else 0)
                for d in shape) + 2 * block
    return max(grams, product_chain_bytes(shape, ranks, sorted(range(4), key=lambda n:
                                                                 ranks[n] / shape[n])))


def product_chain_bytes(shape: tuple, ranks, modes) -> int:
    """The largest pair of successive outputs (float32 bytes) of mode products applied to
    a tensor of ``shape`` in the order ``modes``, each taking its mode to its rank."""
    sizes, current = [], list(shape)
    for mode in modes:
        current[mode] = ranks[mode]
        sizes.append(prod(current))
    return max([4 * sizes[0]] + [4 * (a + b) for a, b in zip(sizes[:-1], sizes[1:])])


def asi_workspace(shape: tuple, ranks, stride: int) -> int:
    """The first step's exact HOSVD (hosvd_workspace), or a subspace step's: per mode, on a
    block of samples (decomposition.grow_samples), the product with U_n (size K_n / d_n; with
    its strided copy and the next product's output: three of them), beside the block's
    unfold copy where that mode is not multiplied in place (decomposition.in_place); then
    the partial core's products (decomposition.partial_core: the batch mode left whole; on a
    small map the spatial modes, then the channels); then P (B, K2, K3, K4) beside its
    float64 copy, for the batch mode's B x B Gram."""
    block = prod(shape[1:]) * min(shape[0], grow_samples(shape))
    grow = max(4 * 3 * block * k // d + (0 if in_place(shape, n) else 4 * block)
               for n, (d, k) in enumerate(zip(shape, ranks)) if n)
    order = ((2, 3, 1) if small_map(shape) else
             sorted((1, 2, 3), key=lambda n: ranks[n] / shape[n]))
    partial = shape[0] * prod(ranks[1:])
    return max(hosvd_workspace(shape, ranks, stride), grow,
               product_chain_bytes(shape, ranks, order), (4 + 8) * partial)


TUCKER_PIECES = ("core", "u_batch", "u_channel", "u_height", "u_width")


def tucker_kept(t: Tucker) -> Kept:
    return Kept(dict(zip(TUCKER_PIECES, (t.core,) + tuple(t.factors))), t.rank_per_mode)


def hosvd_kept(x, eps=None, ranks=None, rank_cap=None, stride=1) -> Kept:
    return tucker_kept(hosvd(x, eps=eps, ranks=ranks if eps is None else None, rank_cap=rank_cap))


def asi_kept(x, eps=None, ranks=None, rank_cap=None, stride=1) -> Kept:
    raise ValueError("asi keeps its factors across steps: use Asi")


class Asi:
    """ASI's compression of one layer's input (Nguyen et al., ICML 2025): the first step is
    the exact HOSVD (eps rule or fixed ranks, capped), which fixes the ranks for the rest of
    training; every later step is one ``subspace_step`` warm-started from the last factors.
    (The shapes are static from then on; the memory plan still takes eps ranks at their
    bound, as it does for hosvd.)"""

    def __init__(self, eps=None, ranks=None, rank_cap=None):
        self.eps, self.ranks, self.rank_cap = eps, ranks, rank_cap
        self.k1 = None        # the batch rank, fixed at the first step
        self.factors = None   # U_2, U_3, U_4, followed from step to step

    def state(self) -> dict:
        """Arrays to checkpoint: K1 and the factors, once the first step fixed them."""
        if self.factors is None:
            return {}
        return {"k1": np.array(self.k1), **{f"u{n}": u for n, u in enumerate(self.factors, 2)}}

    def restore(self, state: dict) -> None:
        """The state of ``state()``; {} is the state before the first step."""
        self.k1, self.factors = ((int(state["k1"]), [state[f"u{n}"] for n in (2, 3, 4)])
                                 if "k1" in state else (None, None))

    def __call__(self, x: np.ndarray) -> Kept:
        if self.factors is None:
            t = hosvd(x, eps=self.eps, ranks=None if self.eps is not None else self.ranks,
                      rank_cap=self.rank_cap)
            self.k1 = t.factors[0].shape[1]
        else:
            t = subspace_step(x, self.factors, self.k1)
        self.factors = list(t.factors[1:])
        return tucker_kept(t)


# Map sizes (H * W of the input) up to which a backward form pays: weight-gradient kernel ms
# a step summed over mcunet's 42 convs at batch 32, 128 px, eps 0.8 (NCHWc kernels; the
# forms forced everywhere and nowhere: benchmarks/scripts/backward_forms.py, 2026-12-08)
ROWS_MAX_HW = 64     # grouped, x's K1 rows rebuilt: the eight on 8x8 and 4x4 maps 36.5 ->
#                      8.3 ms; on 16x16 to 64x64 maps the K2 form (22.5 ms) beat it (28.6)
KRON_MAX_HW = 256    # 1x1, U3 (x) U4 in one MatMul: the 21 on 16x16 maps and smaller 39.2
#                      -> 13.2 ms; on larger maps U4 then U3 (22.4 ms) beat it (325)


def hosvd_weight_grad(g, name: str, kept: dict, dy: str, conv: ConvLayer) -> str:
    """dW in the low-rank space: dY contracted with U1 over the batch (z, (K1, O, H', W')),
    then per kind of conv:
    - 1x1: ``hosvd_pointwise_weight_grad``;
    - grouped (depthwise) on a small map (H W <= ROWS_MAX_HW): the core's K1 rows rebuilt
      along C, H, W (``tucker_rows``), then the conv's own weight gradient with K1 for the
      batch: K1 / B of vanilla's flops, where the K2 form below is a dense (O, K2) one;
    - else: the core expanded along H and W with the zero-padded U3, U4, the weight
      gradient of a dense conv of its K2 channels, then a projection with U2 (per group)."""
    c, (h, w), out_ch = conv.in_ch, conv.input_hw, conv.out_ch
    (oh, ow), (kh, kw), (ph, pw) = conv.output_hw, pair(conv.kernel), pair(conv.padding)
    if (kh, kw, *pair(conv.stride), ph, pw, *pair(conv.dilation), conv.groups) == \
            (1, 1, 1, 1, 0, 0, 1, 1, 1):
        return hosvd_pointwise_weight_grad(g, name, kept, dy, conv)
    z = batch_contract(g, name + "/dY_x_U1", kept["u_batch"], dy, (out_ch, oh, ow))
    if conv.groups > 1 and h * w <= ROWS_MAX_HW:
        return conv_weight_grad(g, name, tucker_rows(g, name, kept, conv), z, conv)
    u3, u4 = kept["u_height"], kept["u_width"]
    if ph:
        u3 = g.op("Pad", [u3, g.ints([ph, 0, ph, 0])], name + "/U3_padded")
    if pw:
        u4 = g.op("Pad", [u4, g.ints([pw, 0, pw, 0])], name + "/U4_padded")
    core_hw = g.op("Einsum", [kept["core"], u3, u4], name + "/core_x_U3p_x_U4p",
                   equation="abcd,hc,wd->abhw")                           # (K1, K2, Hp, Wp)
    low_conv = ConvLayer(name, "k2", out_ch, conv.kernel, conv.stride, 0, 1,
                         (h + 2 * ph, w + 2 * pw), (oh, ow), dilation=conv.dilation)
    dw_low = conv_weight_grad(g, name + "/lowrank", core_hw, z, low_conv)  # (O, K2, kh, kw)
    groups = conv.groups
    if groups == 1:
        return g.op("Einsum", [dw_low, kept["u_channel"]], name + "/project_U2",
                    equation="okij,ck->ocij")
    low = g.op("Reshape", [dw_low, g.ints([groups, out_ch // groups, -1, kh, kw])],
               name + "/dW_low_groups")
    u2 = g.op("Reshape", [kept["u_channel"], g.ints([groups, c // groups, -1])],
              name + "/U2_groups")
    dw = g.op("Einsum", [low, u2], name + "/project_U2", equation="gokij,gck->gocij")
    return g.op("Reshape", [dw, g.ints([out_ch, c // groups, kh, kw])], name + "/dW")


def tucker_rows(g, name: str, kept: dict, conv: ConvLayer) -> str:
    """core x_2 U2 x_3 U3 x_4 U4 (K1, C, H, W): x's Tucker form with its batch mode left
    out, as three MatMuls (the width, then the height, then the channels: the widest last)."""
    c, (h, w) = conv.in_ch, conv.input_hw
    t = g.op("MatMul", [kept["core"], g.op("Transpose", [kept["u_width"]], name + "/U4_T",
                                          perm=[1, 0])], name + "/core_x_U4")  # (K1,K2,K3,W)
    t = g.op("MatMul", [kept["u_height"], t], name + "/core_x_U4_x_U3")       # (K1,K2,H,W)
    t = g.op("Reshape", [t, g.ints([0, 0, h * w])], name + "/core_hw_flat")    # (K1,K2,HW)
    t = g.op("MatMul", [kept["u_channel"], t], name + "/core_x_U432")         # (K1,C,HW)
    return g.op("Reshape", [t, g.ints([0, c, h, w])], name + "/x_rows")


def hosvd_pointwise_weight_grad(g, name: str, kept: dict, dy: str, conv: ConvLayer) -> str:
    """1x1: dW_low[o, k2] = sum dY[b,o,h,w] U1[b,k1] core[k1,k2,c,d] U3[h,c] U4[w,d], dY
    projected on the spatial factors first (it shrinks), never expanding the core; then
    dW = dW_low U2^T. Small maps (H W <= KRON_MAX_HW) take both spatial factors in one
    MatMul with U3 (x) U4 (H W, K3 K4); larger ones U4 then U3 (fewer flops)."""
    c, out_ch, (h, w) = conv.in_ch, conv.out_ch, conv.input_hw
    if h * w <= KRON_MAX_HW:
        u3 = g.op("Unsqueeze", [kept["u_height"], g.ints([1, 3])], name + "/U3_4d")  # (H,1,K3,1)
        u4 = g.op("Unsqueeze", [kept["u_width"], g.ints([0, 2])], name + "/U4_4d")   # (1,W,1,K4)
        u34 = g.op("Reshape", [g.op("Mul", [u3, u4], name + "/U3_kron_U4"),
                               g.ints([h * w, -1])], name + "/U34")             # (HW, K3K4)
        t = g.op("MatMul", [g.op("Reshape", [dy, g.ints([0, out_ch, h * w])],
                                 name + "/dY_flat"), u34], name + "/dY_x_U34")   # (B,O,K3K4)
        core = g.op("Reshape", [kept["core"], g.ints([0, 0, -1])], name + "/core_flat")
    else:
        t = g.op("MatMul", [dy, kept["u_width"]], name + "/dY_x_U4")             # (B,O,H,K4)
        t = g.op("Transpose", [t], name + "/dY_x_U4_T", perm=[0, 1, 3, 2])      # (B,O,K4,H)
        t = g.op("MatMul", [t, kept["u_height"]], name + "/dY_x_U4_x_U3")      # (B,O,K4,K3)
        core = g.op("Transpose", [kept["core"]], name + "/core_T", perm=[0, 1, 3, 2])
        core = g.op("Reshape", [core, g.ints([0, 0, -1])], name + "/core_flat")  # (K1,K2,K4K3)
    u1_t = g.op("Transpose", [kept["u_batch"]], name + "/U1_T", perm=[1, 0])
    z = g.op("MatMul", [u1_t, g.op("Reshape", [t, g.ints([0, -1])], name + "/t_flat")],
             name + "/x_U1")                                                    # (K1, O*K3K4)
    z = g.op("Reshape", [z, g.ints([0, out_ch, -1])], name + "/z")             # (K1,O,K3K4)
    per_k1 = g.op("MatMul", [z, g.op("Transpose", [core], name + "/core_flat_T",
                                     perm=[0, 2, 1])], name + "/dW_low_per_k1")  # (K1,O,K2)
    low = g.op("ReduceSum", [per_k1, g.ints([0])], name + "/dW_low", keepdims=0)  # (O, K2)
    dw = g.op("MatMul", [low, g.op("Transpose", [kept["u_channel"]], name + "/U2_T",
                                   perm=[1, 0])], name + "/project_U2")          # (O, C)
    return g.op("Reshape", [dw, g.ints([out_ch, c, 1, 1])], name + "/dW")


# ---------------------------------------------------------------- gf-r2: Gradient Filter

def gf_patches(h: int, w: int, stride: int) -> tuple:
    """Patch rows and columns of a Gradient Filter input: ceil(H / (r s)), ceil(W / (r s))."""
    return ceil(h / (GF_RADIUS * stride)), ceil(w / (GF_RADIUS * stride))


def gf_floats(shape: Sequence[int], ranks=None, stride: int = 1) -> int:
    """B*C*ceil(H/(r*s))*ceil(W/(r*s))."""
    b, c, h, w = shape
    return b * c * prod(gf_patches(h, w, stride))


def gf_workspace(shape: tuple, ranks, stride: int) -> int:
    """The zero-padded copy of x."""
    b, c, h, w = shape
    window = GF_RADIUS * stride
    return 4 * b * c * ceil(h / window) * ceil(w / window) * window * window


def sum_pool(x: np.ndarray, window: int) -> np.ndarray:
    """(B, C, H, W) -> (B, C, ceil(H/window), ceil(W/window)), zero-padded bottom/right.

    Sum of window**2 strided views (a 6-D reshape + sum is ~10x slower in numpy)."""
    b, c, h, w = x.shape
    ph, pw = ceil(h / window), ceil(w / window)
    if (ph * window, pw * window) != (h, w):
        padded = np.zeros((b, c, ph * window, pw * window), dtype=x.dtype)
        padded[:, :, :h, :w] = x
        x = padded
    total = x[:, :, 0::window, 0::window].copy()
    for i in range(window):
        for j in range(window):
            if i or j:
                total += x[:, :, i::window, j::window]
    return total


def gf_kept(x, eps=None, ranks=None, rank_cap=None, stride=1) -> Kept:
    return Kept({"x_sum": sum_pool(x, GF_RADIUS * stride)}, None)


def gf_weight_grad(g, name: str, kept: dict, dy: str, conv: ConvLayer) -> str:
    """Every tap of the kernel gets the same gradient: the patch sums of x against the patch
    means of dY (r x r patches of the output), as a 1x1 conv's weight gradient."""
    r, s, k = GF_RADIUS, conv.stride, conv.kernel
    (h, w), (oh, ow) = conv.input_hw, conv.output_hw
    ph, pw = gf_patches(h, w, s)
    gh, gw = ceil(oh / r), ceil(ow / r)
    avg = g.op("AveragePool", [dy], name + "/dY_patch_mean", kernel_shape=[r, r],
               strides=[r, r], pads=[0, 0, gh * r - oh, gw * r - ow], count_include_pad=0)
    if (gh, gw) != (ph, pw):
        avg = g.op("Slice", [avg, g.ints([0, 0]), g.ints([min(gh, ph), min(gw, pw)]),
                             g.ints([2, 3])], name + "/dY_patch_crop")
        if gh < ph or gw < pw:
            avg = g.op("Pad", [avg, g.ints([0, 0, 0, 0, 0, 0, max(0, ph - gh),
                                            max(0, pw - gw)])], name + "/dY_patch_pad")
    patches = ConvLayer(name, conv.in_ch, conv.out_ch, 1, 1, 0, conv.groups, (ph, pw), (ph, pw))
    dw1 = conv_weight_grad(g, name, kept["x_sum"], avg, patches)           # (O, Cg, 1, 1)
    return g.op("Expand", [dw1, g.ints([1, 1, k, k])], name + "/dW_every_tap")


# ---------------------------------------------------------------- weight gradients as ONNX

def conv_weight_grad(g, name: str, x: str, dy: str, conv: ConvLayer) -> str:
    """dW (O, C/groups, kh, kw) of ``conv`` from its input x (N, C, H, W) and dY (N, O, H', W'),
    N any "batch" (images, or the K1 rows of a Tucker core), as a single Conv:
    every channel c of x becomes an image, dY^T becomes the kernel (dilation = the conv's
    stride; stride = its dilation: dW[i] = sum_u x[i d + u s - p] dY[u]).
    conv.in_ch may be symbolic (a Tucker rank) when groups == 1."""
    c, (h, w), out_ch = conv.in_ch, conv.input_hw, conv.out_ch
    (kh, kw), (sh, sw), (ph, pw) = pair(conv.kernel), pair(conv.stride), pair(conv.padding)
    dilation, groups = pair(conv.dilation), conv.groups
    if getattr(g, "nchwc", False) and nchwc_depthwise(conv):
        return depthwise_weight_grad_nchwc(g, name, x, dy, conv)
    if (kh, kw, sh, sw, ph, pw, *dilation, groups) == (1, 1, 1, 1, 0, 0, 1, 1, 1):
        dw = pointwise_weight_grad(g, name, x, dy, c, out_ch, conv.output_hw)
        return g.op("Reshape", [dw, g.ints([out_ch, -1, 1, 1])], name + "/dW")
    if groups == 1 and isinstance(c, int) and c < kh * kw:
        return tap_weight_grad(g, name, x, dy, conv)
    if groups == 1:
        xr = g.op("Transpose", [x], name + "/x_T", perm=[1, 0, 2, 3])           # (C, N, H, W)
    else:
        cg = c // groups
        xg = g.op("Reshape", [x, g.ints([0, groups, cg, h, w])], name + "/x_groups")
        xg = g.op("Transpose", [xg], name + "/x_groups_T", perm=[2, 1, 0, 3, 4])
        xr = g.op("Reshape", [xg, g.ints([cg, -1, h, w])], name + "/x_T")     # (Cg, groups*N, H, W)
    kernel_from_dy = g.op("Transpose", [dy], name + "/dy_T", perm=[1, 0, 2, 3])  # (O, N, H', W')
    full = g.op("Conv", [xr, kernel_from_dy], name + "/grad_conv", dilations=[sh, sw],
                pads=[ph, pw, ph, pw], strides=list(dilation), group=groups)  # (Cg, O, kh', kw')
    reach_h = (h + 2 * ph - (conv.output_hw[0] - 1) * sh - 1) // dilation[0] + 1
    reach_w = (w + 2 * pw - (conv.output_hw[1] - 1) * sw - 1) // dilation[1] + 1
    if (reach_h, reach_w) != (kh, kw):  # rows past the last stride step are unused
        full = g.op("Slice", [full, g.ints([0, 0]), g.ints([kh, kw]), g.ints([2, 3])],
                    name + "/crop")
    return g.op("Transpose", [full], name + "/dW", perm=[1, 0, 2, 3])


def tap_weight_grad(g, name: str, x: str, dy: str, conv: ConvLayer) -> str:
    """dW (O, C, kh, kw) of a dense conv with fewer input channels than taps (an RGB stem)
    from x's columns: a Conv with one-hot kernels (group C) gives tap t of channel c as
    output channel c kh kw + t (N, C kh kw, H', W'); then dY_n (O, H' W') times the
    columns' transpose, summed over n. (The single-Conv form takes dY as a kernel of
    H' x W' taps: slow on a large map.)"""
    c, out_ch, (oh, ow) = conv.in_ch, conv.out_ch, conv.output_hw
    (kh, kw), (ph, pw) = pair(conv.kernel), pair(conv.padding)
    one_hot = np.tile(np.eye(kh * kw, dtype=np.float32).reshape(kh * kw, 1, kh, kw), (c, 1, 1, 1))
    columns = g.op("Conv", [x, g.const(name + "/one_hot_taps", one_hot)], name + "/columns",
                   strides=list(pair(conv.stride)), pads=[ph, pw, ph, pw],
                   dilations=list(pair(conv.dilation)), group=c)       # (N, C kk, H', W')
    columns = g.op("Reshape", [columns, g.ints([0, c * kh * kw, oh * ow])], name + "/columns_flat")
    per_sample = g.op("MatMul", [g.op("Reshape", [dy, g.ints([0, out_ch, oh * ow])],
                                      name + "/dY_flat"),
                                 g.op("Transpose", [columns], name + "/columns_T",
                                      perm=[0, 2, 1])], name + "/per_sample")  # (N, O, C kk)
    dw_flat = g.op("ReduceSum", [per_sample, g.ints([0])], name + "/dW_flat", keepdims=0)
    return g.op("Reshape", [dw_flat, g.ints([out_ch, c, kh, kw])], name + "/dW")


def nchwc_depthwise(conv: ConvLayer) -> bool:
    """Whether a conv runs on nchwc_depthwise_conv: depthwise, no dilation, the kernel at
    least the stride."""
    (kh, kw), (sh, sw) = pair(conv.kernel), pair(conv.stride)
    return (conv.groups == conv.in_ch == conv.out_ch and isinstance(conv.in_ch, int)
            and pair(conv.dilation) == (1, 1) and kh >= sh and kw >= sw)


def pad_channels(g, name: str, t: str, c: int, axis: int, rank: int) -> str:
    """t with zeros after its c channels (on axis) up to a multiple of NCHWC_CHANNELS."""
    extra = -c % NCHWC_CHANNELS
    if not extra:
        return t
    pads = [0] * (2 * rank)
    pads[rank + axis] = extra
    return g.op("Pad", [t, g.ints(pads)], name)


def nchwc_depthwise_conv(g, name: str, x: str, kernel: str, c: int, kernel_width: int,
                         bias: str | None = None, **attrs) -> str:
    """y = the depthwise conv of x (N, C, H, W) by kernel (C, 1 or N', kh, kernel_width: the
    rows of every slice along axis 1 stacked), both graph tensors (a weight that is an
    input, a gradient), on onnxruntime's NCHWc kernels: the channels padded with zeros to
    whole blocks, each reordered to the blocked layout, the blocked Conv (attrs: its pads,
    strides, dilations), y back to NCHW, cut to its C channels (onnxruntime's ReorderOutput
    drops fewer than one block of 8 or 16 only)."""
    blocks = c + -c % NCHWC_CHANNELS
    x = pad_channels(g, name + "/x_padded", x, c, axis=1, rank=4)
    x = g.op("ReorderInput", [x], name + "/x_blocked", domain=NCHWC_DOMAIN)
    kernel = pad_channels(g, name + "/k_padded", kernel, c, axis=0, rank=4)
    kernel = g.op("Reshape", [kernel, g.ints([1, blocks, -1, kernel_width])], name + "/k_image")
    kernel = g.op("ReorderInput", [kernel], name + "/k_blocked", domain=NCHWC_DOMAIN)
    kernel = g.op("Reshape", [kernel, g.ints([blocks, 1, -1, kernel_width])], name + "/k_filter")
    if bias:
        bias = pad_channels(g, name + "/b_padded", bias, c, axis=0, rank=1)
    y = g.op("Conv", [x, kernel] + ([bias] if bias else []), name + "/conv",
             domain=NCHWC_DOMAIN, group=blocks, **attrs)
    y = g.op("ReorderOutput", [y], name + "/unblocked", domain=NCHWC_DOMAIN, channels=blocks)
    if blocks == c:
        return y
    return g.op("Slice", [y, g.ints([0]), g.ints([c]), g.ints([1])], name + "/channels")


def depthwise_weight_grad_nchwc(g, name: str, x: str, dy: str, conv: ConvLayer) -> str:
    """dW (C, 1, kh, kw) of a depthwise conv as one depthwise correlation on onnxruntime's
    NCHWc kernels, whatever the batch N: the images of x (N, C, H, W), each zero-padded to
    Hp = s*m rows, are stacked along the height into one (1, C, N*Hp, W) image, and dY
    (N, C, H', W'), each image zero-padded to m rows, into a (C, 1, N*m, W') kernel. With
    dilation s, output row i < kh is sum_n,u,v x[n, c, i + s u - p, j + s v - p] dY[n, c, u, v]
    = dW[c, 0, i, j]: a kernel row u < H' of image n reads x rows n Hp + i + s u, inside
    image n; the rows u >= H' are zero."""
    c, (h, w), (oh, ow) = conv.in_ch, conv.input_hw, conv.output_hw
    (kh, kw), (sh, sw), (ph, pw) = pair(conv.kernel), pair(conv.stride), pair(conv.padding)
    m = -(-(h + 2 * ph) // sh)  # kernel rows a dY image takes: Hp = s m >= H + 2p
    x = g.op("Pad", [x, g.ints([0, 0, ph, 0, 0, 0, sh * m - h - ph, 0])], name + "/x_rows")
    x = g.op("Transpose", [x], name + "/x_T", perm=[1, 0, 2, 3])            # (C, N, Hp, W)
    x = g.op("Reshape", [x, g.ints([1, c, -1, w])], name + "/x_stacked")     # (1, C, N Hp, W)
    if m > oh:
        dy = g.op("Pad", [dy, g.ints([0, 0, 0, 0, 0, 0, m - oh, 0])], name + "/dy_rows")
    dy = g.op("Transpose", [dy], name + "/dy_T", perm=[1, 0, 2, 3])          # (C, N, m, W')
    rows = max(kh - sh, 0)  # below the last image: output rows s .. kh - 1 need zeros
    full = nchwc_depthwise_conv(g, name + "/grad", x, dy, c, ow, dilations=[sh, sw],
                                pads=[0, pw, rows, pw], strides=[1, 1])
    # (1, C, s + rows, W + 2 pw - s W' + s): rows and columns past the kernel are unused
    full = g.op("Slice", [full, g.ints([0, 0]), g.ints([kh, kw]), g.ints([2, 3])], name + "/crop")
    return g.op("Reshape", [full, g.ints([c, 1, kh, kw])], name + "/dW")


def pointwise_weight_grad(g, name: str, x: str, dy: str, c, out_ch: int, hw) -> str:
    """dW (O, C) = sum_n dY_n (O, HW) X_n^T (HW, C) of a 1x1 conv. Large maps (O*C below
    (O + C)*HW): one MatMul per sample, summed; small maps: one Gemm over the whole batch
    of the transposed copies (O, N*HW) (C, N*HW)^T. onnxruntime decides
    (benchmarks/backward_ops.py: each is 1.4-5x the other's speed on its side; the Einsum
    they replace was slower than both). c may be symbolic (a Tucker rank): then the Gemm."""
    n_hw = hw[0] * hw[1]
    if isinstance(c, int) and out_ch * c <= (out_ch + c) * n_hw:
        x_t = g.op("Transpose", [g.op("Reshape", [x, g.ints([0, c, -1])], name + "/x_flat")],
                   name + "/x_T", perm=[0, 2, 1])                                   # (N, HW, C)
        per_sample = g.op("MatMul", [g.op("Reshape", [dy, g.ints([0, out_ch, -1])],
                                          name + "/dY_flat"), x_t], name + "/per_sample")
        return g.op("ReduceSum", [per_sample, g.ints([0])], name + "/pointwise", keepdims=0)
    dy_t = g.op("Reshape", [g.op("Transpose", [dy], name + "/dY_T", perm=[1, 0, 2, 3]),
                            g.ints([out_ch, -1])], name + "/dY_rows")              # (O, N*HW)
    x_rows = g.op("Reshape", [g.op("Transpose", [x], name + "/x_T", perm=[1, 0, 2, 3]),
                              g.ints([0, -1])], name + "/x_rows")                   # (C, N*HW)
    return g.op("Gemm", [dy_t, x_rows], name + "/pointwise", transB=1)


def batch_contract(g, name: str, u: str, dy: str, ohw) -> str:
    """sum_b u[b, k] dY[b, o, h, w] -> (K, O, H', W') as one MatMul u^T (K, B) @ dY (B, O*H'*W')
    (an Einsum here transposes dY into a full-size copy first)."""
    u_t = g.op("Transpose", [u], name + "/u_T", perm=[1, 0])
    flat = g.op("Reshape", [dy, g.ints([0, -1])], name + "/dY_flat")
    z = g.op("MatMul", [u_t, flat], name)
    return g.op("Reshape", [z, g.ints([-1, *ohw])], name + "/shape")


# ---------------------------------------------------------------- the table

@dataclass(frozen=True)
class Method:
    name: str
    pieces: tuple            # what it keeps, in the backward graph's order
    piece_dims: Callable     # ConvLayer -> dims of each piece (BATCH and rank symbols as str)
    rank_symbols: tuple      # the pieces' symbolic ranks (k1..k4; k); () for none
    ranks: Optional[Callable]  # (shape, ranks, rank_cap) -> sizing ranks; None: no eps or ranks
    kept_floats: Callable    # (shape, ranks, stride) -> floats kept
    workspace: Callable      # (shape, ranks, stride) -> transient numpy bytes of compress
    compress: Callable       # (x, eps, ranks, rank_cap, stride) -> Kept
    weight_grad: Callable    # (g, name, kept {piece: tensor}, dY, ConvLayer) -> dW tensor
    overview_op: str         # the ai.actcomp node that stands for compress in overview.onnx
    keeps_input: bool = False  # the kept piece is x itself (held in the runner's pool)
    tracker: Optional[type] = None  # stateful compress: one per layer (Asi)
    square_only: bool = False  # square kernels, strides and paddings, dilation 1 only
    #                            (ConvLayer.square)


def vanilla_dims(conv: ConvLayer) -> tuple:
    return ((BATCH, conv.in_ch) + tuple(conv.input_hw),)


def tucker_dims(conv: ConvLayer) -> tuple:
    c, (h, w) = conv.in_ch, conv.input_hw
    return ("k1", "k2", "k3", "k4"), (BATCH, "k1"), (c, "k2"), (h, "k3"), (w, "k4")


def svd_dims(conv: ConvLayer) -> tuple:
    return (BATCH, "k"), ("k", conv.in_ch) + tuple(conv.input_hw)


def gf_dims(conv: ConvLayer) -> tuple:
    return ((BATCH, conv.in_ch) + gf_patches(*conv.input_hw, conv.stride),)


def no_workspace(shape: tuple, ranks, stride: int) -> int:
    return 0


TUCKER_RANKS = ("k1", "k2", "k3", "k4")

METHODS = {m.name: m for m in (
    Method("vanilla", ("input",), vanilla_dims, (), None,
           vanilla_floats, no_workspace, vanilla_compress, vanilla_weight_grad, "KeepInput",
           keeps_input=True),
    Method("hosvd", TUCKER_PIECES, tucker_dims, TUCKER_RANKS, tucker_ranks, hosvd_floats,
           hosvd_workspace, hosvd_kept, hosvd_weight_grad, "HOSVD"),
    Method("asi", TUCKER_PIECES, tucker_dims, TUCKER_RANKS, tucker_ranks, hosvd_floats,
           asi_workspace, asi_kept, hosvd_weight_grad, "SubspaceIteration", tracker=Asi),
    Method("svd", ("left", "right"), svd_dims, ("k",), svd_rank, svd_floats, svd_workspace,
           svd_kept, svd_weight_grad, "SVD"),
    Method("gf-r2", ("x_sum",), gf_dims, (), None, gf_floats, gf_workspace, gf_kept,
           gf_weight_grad, "GradientFilterSumPool", square_only=True),
)}
RANKED = tuple(name for name, m in METHODS.items() if m.ranks)  # --eps / --ranks apply to these


# methods that were replaced: name -> its successor (an artifact naming one is re-exported)
RETIRED = {"hosvd-tracked": "asi"}


def method(name: str) -> Method:
    """The row of a method name; ValueError naming the choices."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]


def compress(name: str, x: np.ndarray, eps: Optional[float] = None, ranks=None,
             rank_cap=None, stride: int = 1) -> Kept:
    """What method ``name`` keeps of x (B, C, H, W)."""
    return method(name).compress(x, eps, ranks, rank_cap, stride)
