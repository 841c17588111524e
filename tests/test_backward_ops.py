"""The backward's conv formulations, one graph each, against torch.autograd."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.onnx_graph import Graph
from actcomp_edge.core.arch import ConvLayer, pair
from actcomp_edge.core.methods import conv_weight_grad
from export.training_graph import conv_input_grad

CASES = [  # (C, O, groups, kernel, stride, padding, H, W[, dilation]); a size int or (h, w)
    (8, 16, 1, 1, 1, 0, 5, 7),      # pointwise
    (8, 6, 1, 1, 2, 0, 7, 6),       # pointwise stride 2, odd height
    (64, 96, 1, 1, 1, 0, 2, 3),     # pointwise on a small map (dW as one Gemm)
    (6, 6, 6, 3, 1, 1, 9, 8),       # depthwise
    (6, 6, 6, 3, 2, 1, 9, 8),       # depthwise stride 2, odd height
    (4, 4, 4, 5, 2, 2, 11, 12),     # depthwise 5x5 stride 2
    (4, 4, 4, 7, 1, 3, 8, 8),       # depthwise 7x7
    (3, 5, 1, 3, 2, 1, 10, 9),      # full 3x3 stride 2
    (6, 4, 2, 3, 1, 0, 7, 7),       # grouped, no padding
    (4, 8, 4, 3, 1, 3, 6, 6),       # depthwise multiplier 2, padding beyond k - 1 (dY cropped)
    (3, 5, 1, (1, 3), 1, (0, 1), 7, 8),          # rectangular kernel
    (4, 6, 2, (3, 1), (2, 1), (1, 0), 9, 7),     # rectangular kernel and stride, grouped
    (5, 4, 1, (1, 7), (1, 2), (0, 3), 6, 15),    # 1x7, stride (1, 2)
    (4, 4, 4, 3, 1, 2, 9, 9, 2),                 # depthwise dilated 2
    (3, 5, 1, 3, 2, 2, 11, 10, 2),               # dilated 2, stride 2
    (3, 4, 1, (3, 5), 1, (1, 4), 8, 12, (1, 2)),  # rectangular, dilation (1, 2)
    (4, 4, 1, 3, 1, 0, 9, 9, 3),                 # dilated 3, no padding
]


def run(g: Graph, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(g.model().SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def case_tensors(c, o, groups, k, s, p, h, w, d=1):
    torch.manual_seed(0)
    x = torch.randn(2, c, h, w, requires_grad=True)
    weight = torch.randn(o, c // groups, *pair(k), requires_grad=True)
    y = torch.nn.functional.conv2d(x, weight, stride=s, padding=p, dilation=d, groups=groups)
    dy = torch.randn_like(y)
    y.backward(dy)
    return x, weight, dy


def layer(case) -> ConvLayer:
    c, o, groups, k, s, p, h, w, *d = case
    d = d[0] if d else 1
    out = tuple((size + 2 * pp - dd * (kk - 1) - 1) // ss + 1 for size, kk, ss, pp, dd
                in zip((h, w), pair(k), pair(s), pair(p), pair(d)))
    return ConvLayer("conv", c, o, k, s, p, groups, (h, w), out, dilation=d)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_input_gradient_as_a_conv_equals_autograd(case):
    c, o, groups, k, s, p, h, w, *_ = case
    x, weight, dy = case_tensors(*case)
    g = Graph("dx")
    g.input("dy", np.float32, list(dy.shape))
    g.input("w", np.float32, list(weight.shape))
    dx = conv_input_grad(g, "conv", "dy", "w", layer(case))
    g.output(dx, np.float32, [2, c, h, w])
    got = run(g, {"dy": dy.numpy(), "w": weight.detach().numpy()})
    np.testing.assert_allclose(got, x.grad.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_weight_gradient_equals_autograd(case):
    c, o, groups, k, s, p, h, w, *_ = case
    x, weight, dy = case_tensors(*case)
    g = Graph("dw")
    g.input("x", np.float32, list(x.shape))
    g.input("dy", np.float32, list(dy.shape))
    dw = conv_weight_grad(g, "conv", "x", "dy", layer(case))
    g.output(dw, np.float32, list(weight.shape))
    got = run(g, {"x": x.detach().numpy(), "dy": dy.numpy()})
    np.testing.assert_allclose(got, weight.grad.numpy(), rtol=1e-5, atol=1e-5)


NCHWC_CASES = [  # depthwise: (C, kernel, stride, padding, H, W)
    (16, 3, 1, 1, 9, 8),
    (6, 3, 1, 1, 9, 8),       # channels padded to a whole block
    (120, 3, 2, 1, 8, 8),     # mcunet's, not a multiple of 16
    (16, 3, 2, 1, 9, 8),      # stride 2, odd height: the stacked images' rows round up
    (32, 5, 2, 2, 11, 12),
    (16, 7, 1, 3, 8, 8),
    (16, 7, 2, 3, 8, 8),
    (48, 3, 1, 0, 6, 7),      # no padding
    (16, (3, 5), (2, 1), (1, 2), 10, 9),  # rectangular
    (16, 2, 2, 0, 8, 8),      # kernel = stride
]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("case", NCHWC_CASES, ids=str)
def test_depthwise_weight_gradient_on_nchwc_kernels_equals_autograd(case, batch):
    """One graph for any batch: the batch is a symbolic dim."""
    c, k, s, p, h, w = case
    conv = layer((c, c, c, k, s, p, h, w))
    g = Graph("dw", nchwc=True)
    g.input("x", np.float32, ["batch", c, h, w])
    g.input("dy", np.float32, ["batch", c, *conv.output_hw])
    g.output(conv_weight_grad(g, "conv", "x", "dy", conv), np.float32, [c, 1, *pair(k)])
    assert g.uses_nchwc
    torch.manual_seed(batch)
    x = torch.randn(batch, c, h, w)
    weight = torch.randn(c, 1, *pair(k), requires_grad=True)
    y = torch.nn.functional.conv2d(x, weight, stride=s, padding=p, groups=c)
    dy = torch.randn_like(y)
    y.backward(dy)
    got = run(g, {"x": x.numpy(), "dy": dy.numpy()})
    np.testing.assert_allclose(got, weight.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_nchwc_weight_gradient_is_used_only_where_it_applies():
    for case in [(16, 32, 16, 3, 1, 1, 9, 8),     # a channel multiplier of 2
                 (16, 16, 16, 3, 1, 2, 9, 9, 2),  # dilated
                 (16, 16, 16, 1, 2, 0, 9, 9)]:    # kernel below the stride
        g = Graph("dw", nchwc=True)
        conv_weight_grad(g, "conv", "x", "dy", layer(case))
        assert not g.uses_nchwc, case


@pytest.mark.parametrize("case", NCHWC_CASES + [(16, 3, 2, 0, 9, 9), (16, 3, 2, 1, 10, 9)],
                         ids=str)
def test_depthwise_input_gradient_on_nchwc_kernels_equals_autograd(case):
    c, k, s, p, h, w = case
    conv = layer((c, c, c, k, s, p, h, w))
    x, weight, dy = case_tensors(c, c, c, k, s, p, h, w)
    g = Graph("dx", nchwc=True)
    g.input("dy", np.float32, ["batch", c, *conv.output_hw])
    g.input("w", np.float32, list(weight.shape))
    g.output(conv_input_grad(g, "conv", "dy", "w", conv), np.float32, ["batch", c, h, w])
    assert g.uses_nchwc
    got = run(g, {"dy": dy.numpy(), "w": weight.detach().numpy()})
    np.testing.assert_allclose(got, x.grad.numpy(), rtol=1e-5, atol=1e-5)
