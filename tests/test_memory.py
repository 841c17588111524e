"""Memory model: the paper's analytic columns, formulas, both accountings, the plan CLI."""
import json

import numpy as np
import pytest

from actcomp_edge.host import cli
from actcomp_edge.core.arch import load_spec
from actcomp_edge.core.program import network
from actcomp_edge.core.decomposition import hosvd
from actcomp_edge.core.memory import Plan, mib, plan
from actcomp_edge.core.methods import gf_floats, hosvd_floats, svd_floats, vanilla_floats
from helpers import actcomp, assert_one_line_error

# The paper's printed analytic columns: (vanilla N=2, N=4, GF-R2 N=2, N=4), MiB.
PAPER = {
    "mobilenet_v2": ("15.31", "28.71", "5.00", "9.38"),
    "resnet18": ("12.25", "30.63", "4.00", "7.00"),
    "resnet34": ("12.25", "24.50", "4.00", "8.00"),
    "mcunet-in1": ("13.78", "19.52", "4.50", "6.38"),
}


@pytest.mark.parametrize("model", sorted(PAPER))
def test_paper_table_to_the_printed_digit(model):
    net = network(load_spec(model), 224)
    ours = tuple(mib(plan(net, n, method, 64, 224).paper_bytes)
                 for method in ("vanilla", "gf-r2") for n in (2, 4))
    assert ours == PAPER[model]


def test_mib_rounds_half_up():
    assert mib(int(30.625 * 2 ** 20)) == "30.63"
    assert mib(int(6.375 * 2 ** 20)) == "6.38"


def test_formulas_hand_computed():
    shape = (64, 576, 7, 7)
    assert vanilla_floats(shape) == 64 * 576 * 49
    assert svd_floats(shape, (3,)) == 3 * (64 + 576 * 49)
    assert hosvd_floats(shape, (2, 3, 4, 5)) == 120 + 64 * 2 + 576 * 3 + 7 * 4 + 7 * 5
    assert gf_floats(shape, None, 1) == 64 * 576 * 4 * 4
    assert gf_floats((64, 256, 14, 14), None, 2) == 64 * 256 * 4 * 4


def test_last_n_layers_are_the_last_convs_in_definition_order():
    net = network(load_spec("resnet18"), 224)
    p = plan(net, 4, "vanilla", 64, 224)
    assert [layer.name for layer in p.layers] == [
        "layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv1", "layer4.1.conv2",
        "classifier"]
    assert p.layers[1].input_shape == (64, 256, 14, 14)


def test_full_accounting_masks_and_classifier():
    net = network(load_spec("mcunet-in1"), 224)
    p = plan(net, 2, "vanilla", 64, 224)
    dw, project, head = p.layers
    # dw is followed by ReLU6 -> one bit per output element, packed per sample
    # (576 * 7 * 7 = 28224 bits = 3528 bytes a sample); project is linear.
    assert dw.mask_bytes == 64 * 3528
    assert project.mask_bytes == 0
    assert head.full_bytes == 64 * 160 * 4 and head.paper_bytes == 0
    assert p.full_bytes == p.paper_bytes + 64 * 3528 + 64 * 160 * 4
    # ResNet: conv2 is followed by the post-add ReLU, conv1 by its ReLU
    r = plan(network(load_spec("resnet18"), 224), 2, "vanilla", 8, 224)
    assert r.layers[0].mask_bytes == r.layers[1].mask_bytes == 8 * 512 * 49 // 8


def test_resnet_stem_maxpool_indices_counted():
    net = network(load_spec("resnet18"), 224)
    p = plan(net, len(net.convs), "vanilla", 2, 224)
    stem = p.layers[0]
    assert stem.name == "conv1"
    assert stem.mask_bytes == 2 * 64 * 112 * 112 // 8 + 2 * 64 * 56 * 56 * 4  # int32 argmax


def test_hosvd_fixed_ranks_match_core_kept_floats():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((8, 96, 4, 4)).astype(np.float32)
    t = hosvd(a, ranks=(3, 7, 2, 2))
    net = network(load_spec("mcunet-in1"), 128)
    layer = plan(net, 3, "hosvd", 8, 128, ranks=(3, 7, 2, 2)).layers[0]
    assert layer.input_shape == (8, 96, 4, 4)
    assert layer.paper_bytes == 4 * t.kept_floats


def test_eps_plan_is_a_full_rank_bound_with_cap():
    net = network(load_spec("mcunet-in1"), 128)
    p = plan(net, 1, "hosvd", 32, 128, eps=0.8)
    assert p.rank_basis == "bound"
    assert p.layers[0].rank_per_mode == (32, 512, 4, 4)  # min(d, prod(others))
    capped = plan(net, 1, "hosvd", 32, 128, eps=0.8, rank_cap=8)
    assert capped.layers[0].rank_per_mode == (8, 8, 4, 4)
    assert plan(net, 1, "svd", 32, 128, eps=0.8).layers[0].rank_per_mode == (32,)


@pytest.mark.parametrize("method,kwargs", [("hosvd", dict(eps=0.8)), ("svd", dict(ranks=(3,))),
                                           ("vanilla", {})])
def test_a_plan_through_json_and_back_is_the_same_plan(method, kwargs):
    """What export's manifest records (to_json) is what its table prints (from_json)."""
    net = network(load_spec("mcunet-in1"), 128)
    p = plan(net, 3, method, 8, 128, **kwargs)
    back = Plan.from_json(json.loads(json.dumps(p.to_json())))
    assert back == p and back.to_json() == p.to_json()
    assert isinstance(back.layers[0].input_shape, tuple)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_layers=0, method="vanilla"), "between 1 and"),
    (dict(n_layers=43, method="vanilla"), "between 1 and 42"),
    (dict(n_layers=2, method="nope"), "unknown method"),
    (dict(n_layers=2, method="hosvd"), "needs --eps or --ranks"),
    (dict(n_layers=2, method="hosvd", eps=1.5), "eps"),
])
def test_plan_errors(kwargs, match):
    net = network(load_spec("mcunet-in1"), 128)
    with pytest.raises(ValueError, match=match):
        plan(net, batch_size=8, input_size=128, **kwargs)


def test_cli_plan_json(capsys):
    assert cli.main(["plan", "--model", "mobilenet_v2", "--layers", "4", "--method", "vanilla",
                     "--batch-size", "64", "--input-size", "224", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["paper_bytes"] == 30105600 and mib(out["paper_bytes"]) == "28.71"
    assert out["full_bytes"] > out["paper_bytes"]
    assert [layer["name"] for layer in out["layers"]][:4] == [
        "blocks.16.expand", "blocks.16.dw", "blocks.16.project", "feature_mix"]
    first = out["layers"][0]
    assert first["input_shape"] == [64, 160, 7, 7]
    assert set(first) >= {"name", "input_shape", "paper_bytes", "full_bytes"}


def test_cli_non_square_input(capsys):
    assert cli.main(["plan", "--model", "mcunet-in1", "--layers", "1", "--method", "gf-r2",
                     "--batch-size", "3", "--input-size", "160x96", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layers"][0]["input_shape"] == [3, 576, 5, 3]
    assert out["paper_bytes"] == 3 * 576 * 3 * 2 * 4


@pytest.mark.parametrize("argv,message", [
    (["plan", "--model", "nosuchnet", "--layers", "2", "--method", "vanilla"], "unknown model"),
    (["plan", "--model", "resnet18", "--layers", "21", "--method", "vanilla"], "between 1 and 20"),
    (["plan", "--model", "resnet18", "--layers", "2", "--method", "hosvd", "--eps", "0"], "eps"),
    (["plan", "--model", "resnet18", "--layers", "2", "--method", "hosvd", "--ranks", "1", "2"],
     "4 ranks"),
    (["plan", "--model", "resnet18", "--layers", "2", "--method", "vanilla", "--eps", "0.8"],
     "--eps applies to the methods with ranks (hosvd, asi, svd), not vanilla"),
    (["plan", "--model", "resnet18", "--layers", "2", "--method", "gf-r2", "--ranks", "2"],
     "--ranks applies to the methods with ranks"),
    (["plan", "--model", "resnet18", "--layers", "2", "--method", "vanilla", "--profile",
      "pi-zero-2w", "--rank-cap", "2"], "--rank-cap applies to the methods with ranks"),
    (["plan", "--model", "resnet18", "--layers", "2", "--method", "svd", "--ranks", "2",
      "--rank-cap", "1"], "give --ranks or --rank-cap, not both"),
])
def test_cli_errors_are_one_line(argv, message):
    assert_one_line_error(actcomp(*argv), message)


def test_cli_paper_table_matches():
    proc = actcomp("paper-table")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all figures match the paper" in proc.stdout
