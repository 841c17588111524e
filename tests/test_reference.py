"""Tests of export/reference.py: compressed-activation conv layers and model surgery."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from actcomp_edge.core.decomposition import full_rank_bound, hosvd, svd_compress
from export.reference import (CompressedConv2d, GradientFilterR2Conv2d, HosvdConv2d,
                              compress_last_n, freeze_batchnorm)
from helpers import SHARED, rel_l2_error

ORACLE = SHARED / "vectors"

# (B, C, O, H, W, kernel, stride, padding, groups, dilation, bias)
SHAPES = {
    "3x3-pad1": (3, 4, 6, 8, 8, 3, 1, 1, 1, 1, True),
    "3x3-pad1-nobias-b1": (1, 4, 6, 8, 8, 3, 1, 1, 1, 1, False),
    "stride2-7x7": (3, 4, 6, 7, 7, 3, 2, 1, 1, 1, True),
    "stride2-8x8-last-row-unused": (3, 4, 6, 8, 8, 3, 2, 1, 1, 1, False),
    "stride2-15x15-k2-last-row-unused": (3, 4, 5, 15, 15, 2, 2, 0, 1, 1, True),
    "stride3-15x15-two-rows-unused": (1, 4, 5, 15, 15, 3, 3, 1, 1, 1, True),
    "stride(2,1)": (3, 4, 6, 9, 8, 3, (2, 1), 1, 1, 1, True),
    "depthwise-3x3": (3, 8, 8, 8, 8, 3, 1, 1, 8, 1, False),
    "depthwise-7x7-b1": (1, 8, 8, 9, 9, 7, 1, 3, 8, 1, True),
    "depthwise-3x3-stride2": (3, 8, 8, 9, 9, 3, 2, 1, 8, 1, False),
    "depthwise-multiplier2": (3, 4, 8, 8, 8, 3, 1, 1, 4, 1, True),
    "1x1": (3, 8, 5, 6, 6, 1, 1, 0, 1, 1, True),
    "grouped-4": (3, 8, 12, 8, 8, 3, 1, 1, 4, 1, True),
    "asym-pad(1,0)-6x9": (3, 4, 6, 6, 9, 3, 1, (1, 0), 1, 1, True),
    "asym-pad(0,2)-7x5": (3, 4, 6, 7, 5, 3, 1, (0, 2), 1, 1, False),
    "dilation2": (3, 4, 6, 9, 9, 3, 1, 2, 1, 2, True),
}


def make_case(shape, seed=0):
    """x (B,C,H,W), a conv with that layout, and a dY for its output."""
    b, c, o, h, w, k, stride, padding, groups, dilation, bias = shape
    g = torch.Generator().manual_seed(seed)
    # a dominant low-rank part + noise: truncation at eps < 1 actually drops something
    x = torch.randn(b, c, h, w, generator=g) + 2 * torch.rand(b, c, 1, 1, generator=g) * torch.rand(1, 1, h, w, generator=g)
    conv = nn.Conv2d(c, o, k, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        if bias:
            conv.bias.copy_(torch.randn(o, generator=g))
    dy = torch.randn(conv(x).shape, generator=g)
    return x, conv, dy


def grads(module, x, dy):
    """(dX, dW, db) of module at x for output gradient dy."""
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad()
    module(x).backward(dy)
    return x.grad, module.weight.grad, None if module.bias is None else module.bias.grad


def plain_grads(conv, x, dy):
    return grads(copy.deepcopy(conv), x, dy)


def assert_grads_close(got, want, tol=1e-4):
    for name, a, b in zip(("dX", "dW", "db"), got, want):
        if b is None:
            assert a is None
        else:
            assert a.shape == b.shape, name
            assert rel_l2_error(a, b) < tol, f"{name}: rel {rel_l2_error(a, b):.2e}"


# ---------------------------------------------------------------- exactness

@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("method", ["hosvd", "svd"])
def test_full_rank_matches_autograd(shape, method):
    x, conv, dy = make_case(shape)
    layer = CompressedConv2d.from_conv(conv, method, eps=1.0)
    assert_grads_close(grads(layer, x, dy), plain_grads(conv, x, dy))
    if method == "hosvd":
        assert layer.last_ranks == full_rank_bound(x.shape)
    else:
        assert layer.last_ranks == (x.shape[0],)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_vanilla_matches_autograd(shape):
    x, conv, dy = make_case(shape)
    layer = CompressedConv2d.from_conv(conv, "vanilla")
    assert_grads_close(grads(layer, x, dy), plain_grads(conv, x, dy), tol=1e-6)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_hosvd_truncated_matches_reconstruction(shape):
    x, conv, dy = make_case(shape)
    eps = 0.6
    tucker = hosvd(x.numpy(), eps=eps)
    assert tucker.rank_per_mode != full_rank_bound(x.shape), "case must actually truncate"
    x_rec = torch.from_numpy(tucker.reconstruct())
    layer = CompressedConv2d.from_conv(conv, "hosvd", eps=eps)
    got = grads(layer, x, dy)
    assert layer.last_ranks == tucker.rank_per_mode
    assert layer.last_kept_floats == tucker.kept_floats
    _, dw_rec, db = plain_grads(conv, x_rec, dy)
    dx_exact = plain_grads(conv, x, dy)[0]          # dX needs only W and dY
    assert_grads_close(got, (dx_exact, dw_rec, db))
    assert rel_l2_error(got[1], plain_grads(conv, x, dy)[1]) > 1e-3   # truncation changed dW


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_svd_truncated_matches_reconstruction(shape):
    x, conv, dy = make_case(shape)
    eps = 0.6
    low = svd_compress(x.numpy(), eps=eps)
    x_rec = torch.from_numpy(low.reconstruct())
    layer = CompressedConv2d.from_conv(conv, "svd", eps=eps)
    got = grads(layer, x, dy)
    assert layer.last_ranks == (low.rank,)
    _, dw_rec, db = plain_grads(conv, x_rec, dy)
    assert_grads_close(got, (plain_grads(conv, x, dy)[0], dw_rec, db))
    if x.shape[0] > 1:
        assert low.rank < x.shape[0], "case must actually truncate"


def test_fixed_ranks_and_cap():
    x, conv, dy = make_case(SHAPES["3x3-pad1"])
    layer = CompressedConv2d.from_conv(conv, "hosvd", ranks=(2, 3, 4, 5))
    got = grads(layer, x, dy)
    assert layer.last_ranks == (2, 3, 4, 5)
    x_rec = torch.from_numpy(hosvd(x.numpy(), ranks=(2, 3, 4, 5)).reconstruct())
    assert rel_l2_error(got[1], plain_grads(conv, x_rec, dy)[1]) < 1e-4
    capped = CompressedConv2d.from_conv(conv, "hosvd", eps=1.0, rank_cap=2)
    grads(capped, x, dy)
    assert capped.last_ranks == (2, 2, 2, 2)
    svd = CompressedConv2d.from_conv(conv, "svd", ranks=1)
    grads(svd, x, dy)
    assert svd.last_ranks == (1,)


@pytest.mark.parametrize("kwargs", [dict(eps=0.0), dict(eps=1.5), dict(eps=-0.2), dict(),
                                    dict(eps=0.5, ranks=(1, 1, 1, 1))])
def test_bad_arguments(kwargs):
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError):
        CompressedConv2d.from_conv(conv, "hosvd", **kwargs)


def test_bad_method_and_padding():
    with pytest.raises(ValueError):
        CompressedConv2d.from_conv(nn.Conv2d(3, 4, 3), "tucker", eps=0.5)
    with pytest.raises(ValueError):
        CompressedConv2d.from_conv(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), "hosvd", eps=0.5)


def test_no_grad_is_plain_conv():
    x, conv, _ = make_case(SHAPES["3x3-pad1"])
    layer = CompressedConv2d.from_conv(conv, "hosvd", eps=0.5)
    with torch.no_grad():
        assert torch.equal(layer(x), conv(x))
    assert layer.last_ranks is None
    assert torch.allclose(layer(x), conv(x), atol=1e-5)
    assert layer.last_ranks is not None


# ---------------------------------------------------------- gradient filter

def gf_loops(x, dy, weight_shape, stride, groups, r=2):
    """Straightforward GF-R2 weight gradient, one element at a time (numpy)."""
    x, dy = x.double().numpy(), dy.double().numpy()
    bsz, c_in, h, w = x.shape
    o_ch, hy, wy = dy.shape[1:]
    sh, sw = stride
    ph, pw = math.ceil(h / (r * sh)), math.ceil(w / (r * sw))
    x_sum = np.zeros((bsz, c_in, ph, pw))
    for i in range(h):
        for j in range(w):
            x_sum[:, :, i // (r * sh), j // (r * sw)] += x[:, :, i, j]
    dy_sum, count = np.zeros((bsz, o_ch, ph, pw)), np.zeros((ph, pw))
    for i in range(hy):
        for j in range(wy):
            if i // r < ph and j // r < pw:
                dy_sum[:, :, i // r, j // r] += dy[:, :, i, j]
                count[i // r, j // r] += 1
    dy_avg = dy_sum / np.maximum(count, 1)
    cg, og = c_in // groups, o_ch // groups
    dw = np.zeros(weight_shape)
    for o in range(o_ch):
        for c in range(cg):
            dw[o, c] = np.sum(dy_avg[:, o] * x_sum[:, (o // og) * cg + c])
    return torch.from_numpy(dw), x_sum


GF_SHAPES = {
    "3x3-pad1": SHAPES["3x3-pad1"],
    "stride2-odd": (2, 4, 6, 9, 11, 3, 2, 1, 2, 1, True),
    "depthwise": SHAPES["depthwise-3x3"],
    "dy-grid-larger(crop)": (2, 4, 4, 4, 4, 1, 1, 2, 1, 1, True),     # H'=8 -> 4 patches, x_sum 2
    "dy-grid-smaller(pad)": (2, 4, 4, 5, 5, 3, 1, 0, 1, 1, False),    # H'=3 -> 2 patches, x_sum 3
    "stride(2,1)": SHAPES["stride(2,1)"],
}


@pytest.mark.parametrize("shape", GF_SHAPES.values(), ids=GF_SHAPES.keys())
def test_gradient_filter_against_loops(shape):
    x, conv, dy = make_case(shape)
    layer = CompressedConv2d.from_conv(conv, "gf-r2")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x.clone().requires_grad_(True))
    y.backward(dy)
    dw_loops, x_sum = gf_loops(x, dy, conv.weight.shape, conv.stride, conv.groups)
    b, c, h, w = x.shape
    sh, sw = conv.stride
    assert x_sum.shape == (b, c, math.ceil(h / (2 * sh)), math.ceil(w / (2 * sw)))
    assert [tuple(t.shape) for t in saved] == [x_sum.shape, tuple(conv.weight.shape)]
    assert np.allclose(saved[0].double().numpy(), x_sum, atol=1e-5)
    assert rel_l2_error(layer.weight.grad.double(), dw_loops) < 1e-5
    if conv.bias is not None:
        assert rel_l2_error(layer.bias.grad, plain_grads(conv, x, dy)[2]) < 1e-6


def test_gradient_filter_input_grad_is_exact():
    x, conv, dy = make_case(SHAPES["grouped-4"])
    x1 = x.clone().requires_grad_(True)
    GradientFilterR2Conv2d.apply(x1, conv.weight, conv.bias, (conv.stride, conv.padding, conv.dilation, conv.groups), {}).backward(dy)
    assert rel_l2_error(x1.grad, plain_grads(conv, x, dy)[0]) < 1e-6


# ------------------------------------------------------------------ oracle

def oracle_cases():
    if not (ORACLE / "hosvd_oracle.json").is_file():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"oracle vectors absent: {ORACLE}"))]
    cases = json.loads((ORACLE / "hosvd_oracle.json").read_text())
    return [pytest.param(c, id=f"{c['model']}/{c['layer']}/eps{c['eps']}") for c in cases]


@pytest.fixture(scope="module")
def oracle_npz():
    return np.load(ORACLE / "hosvd_oracle.npz")


@pytest.mark.parametrize("case", oracle_cases())
def test_oracle_ranks_and_weight_grad(case, oracle_npz):
    key, eps = f"{case['model']}/{case['layer']}", case["eps"]
    x = torch.from_numpy(oracle_npz[f"{key}/activation"])
    weight = torch.from_numpy(oracle_npz[f"{key}/weight"]).clone().requires_grad_(True)
    dy = torch.from_numpy(oracle_npz[f"{key}/grad_output"])
    assert list(weight.shape) == case["kernel"] and list(x.shape) == case["shape"]
    conv = (tuple(case["stride"]), tuple(case["padding"]), (1, 1), case["groups"])
    stats = {}
    HosvdConv2d.apply(x, weight, None, conv, stats, eps, None, None).backward(dy)
    assert stats["ranks"] == tuple(int(k) for k in oracle_npz[f"{key}/eps{eps}/hosvd_ranks"])
    assert stats["kept_floats"] == case["hosvd_kept_floats"]
    official = torch.from_numpy(oracle_npz[f"{key}/eps{eps}/hosvd_grad_weight"])
    assert rel_l2_error(weight.grad, official) < 1e-5


# ------------------------------------------------------------------ memory

def saved_for_backward(layer, x):
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        layer(x.clone().requires_grad_(True))
    return shapes


@pytest.mark.parametrize("name", ["3x3-pad1", "depthwise-3x3", "stride2-15x15-k2-last-row-unused"])
def test_only_compressed_form_is_saved(name):
    x, conv, _ = make_case(SHAPES[name])
    w_numel = conv.weight.numel()

    hosvd_layer = CompressedConv2d.from_conv(conv, "hosvd", eps=0.6)
    shapes = saved_for_backward(hosvd_layer, x)
    tucker = hosvd(x.numpy(), eps=0.6)
    assert shapes == [tucker.core.shape, *(u.shape for u in tucker.factors), tuple(conv.weight.shape)]
    assert sum(math.prod(s) for s in shapes) == tucker.kept_floats + w_numel
    assert tuple(x.shape) not in shapes and tucker.kept_floats < x.numel()

    svd_layer = CompressedConv2d.from_conv(conv, "svd", eps=0.6)
    shapes = saved_for_backward(svd_layer, x)
    (k,), (b, c, h, w) = svd_layer.last_ranks, x.shape
    assert sum(math.prod(s) for s in shapes) == k * (b + c * h * w) + w_numel
    assert tuple(x.shape) not in shapes

    gf_layer = CompressedConv2d.from_conv(conv, "gf-r2")
    assert tuple(x.shape) not in saved_for_backward(gf_layer, x)

    vanilla = CompressedConv2d.from_conv(conv, "vanilla")
    assert saved_for_backward(vanilla, x) == [tuple(x.shape), tuple(conv.weight.shape)]


# --------------------------------------------------------- compress_last_n

def toy_model():
    torch.manual_seed(0)
    chans, layers = [3, 8, 8, 16, 16], []
    for i in range(4):
        bn = nn.BatchNorm2d(chans[i + 1])
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
        layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 + i % 2, padding=1, bias=False),
                   bn, nn.ReLU6()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


@pytest.mark.parametrize("n", [0, 5, -1, 2.0])
def test_compress_last_n_rejects_bad_n(n):
    with pytest.raises(ValueError, match="n must be"):
        compress_last_n(toy_model(), n, "hosvd", eps=0.8)


@pytest.mark.parametrize("eps", [0.0, 1.01])
def test_compress_last_n_rejects_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        compress_last_n(toy_model(), 2, "hosvd", eps=eps)


def test_compress_last_n_freezes_and_replaces():
    model = toy_model()
    names = compress_last_n(model, 2, "hosvd", eps=0.8)
    assert names == ["6", "9"]
    assert isinstance(model[6], CompressedConv2d) and isinstance(model[9], CompressedConv2d)
    assert type(model[0]) is nn.Conv2d and type(model[3]) is nn.Conv2d
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"6.weight", "9.weight", "14.weight", "14.bias"}
    model.train()
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model[2].training and model.training
    before = model[1].running_mean.clone()
    model(torch.randn(2, 3, 12, 12)).sum().backward()
    assert torch.equal(model[1].running_mean, before)
    assert model[6].last_ranks is not None
    clone = copy.deepcopy(model).train()
    assert not clone[1].training and clone[2].training


def test_one_sgd_step_full_rank_hosvd_equals_uncompressed():
    reference = toy_model()
    model = copy.deepcopy(reference)
    compress_last_n(model, 2, "hosvd", eps=1.0)
    reference.requires_grad_(False)
    for i in (6, 9, 14):
        reference[i].requires_grad_(True)
    reference.train()
    freeze_batchnorm(reference)

    x, target = torch.randn(4, 3, 12, 12), torch.tensor([0, 1, 2, 3])
    start = {k: v.clone() for k, v in reference.state_dict().items()}
    for net in (reference, model):
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
        F.cross_entropy(net(x), target).backward()
        opt.step()
    for (name, p_ref), p in zip(reference.named_parameters(), model.parameters()):
        assert rel_l2_error(p, p_ref) < 1e-4, name
    assert rel_l2_error(model[6].weight, start["6.weight"]) > 1e-3       # the step did something
    assert torch.equal(model[0].weight, start["0.weight"])      # frozen stays put


def test_only_linears_after_the_first_replaced_conv_train():
    model = nn.ModuleDict({"early_fc": nn.Linear(4, 4), "net": toy_model()})
    assert compress_last_n(model, 1, "svd", eps=0.9) == ["net.9"]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"net.9.weight", "net.14.weight", "net.14.bias"}
