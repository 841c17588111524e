"""actcomp_edge.core.names: every tensor-name convention against its spelled-out string."""
from actcomp_edge.core import names


def test_graph_tensor_names():
    assert names.d("blocks.13.dw") == "d/blocks.13.dw"
    assert names.d("logits") == "dlogits"
    assert names.grad("classifier.weight") == "grad/classifier.weight"
    assert names.new("classifier.weight") == "new/classifier.weight"
    assert names.state("exp_avg", "conv.weight") == "state/exp_avg/conv.weight"
    assert names.new(names.state("momentum", "w")) == "new/state/momentum/w"
    assert names.kept("blocks.13.dw", "core") == "blocks.13.dw/kept/core"
    assert names.mask_bits("relu_3") == "relu_3/mask_bits"
    assert names.act_saved("hswish_2") == "hswish_2/act_saved"
    assert names.argmax("pool_1") == "pool_1/argmax"
    assert names.factor("mul_4", 1) == "mul_4/factor_1"


def test_graph_tensor_parsers():
    assert names.is_grad("grad/w") and not names.is_grad("d/w")
    assert names.param_of("grad/blocks.1.conv.weight") == "blocks.1.conv.weight"
    assert names.is_new("new/state/exp_avg/w") and not names.is_new("w")
    assert names.updated_of("new/state/exp_avg/w") == "state/exp_avg/w"
    assert names.is_state("state/momentum/w") and not names.is_state("w")
    assert names.is_d("d/x") and not names.is_d("dlogits")
    for saved in ("t/mask_bits", "t/act_saved", "t/argmax", "t/factor_0"):
        assert names.is_saved(saved) and names.source_of(saved) == "t"
    assert not names.is_saved("t/kept/core") and not names.is_saved("t")
    assert names.is_mask_bits("a/b/mask_bits") and names.source_of("a/b/mask_bits") == "a/b"
    assert names.is_argmax("p/argmax") and not names.is_argmax("p/act_saved")
    assert names.is_act_saved("p/act_saved") and names.is_factor("m/factor_1")


def test_checkpoint_names():
    assert names.param("w") == "param/w"
    assert names.opt("state/exp_avg/w") == "opt/state/exp_avg/w"
    assert names.tracker("blocks.13.dw", "U0") == "tracker/blocks.13.dw/U0"
    arrays = names.checkpoint_arrays({"w": 1}, {"state/momentum/w": 2})
    assert arrays == {"param/w": 1, "opt/state/momentum/w": 2}
    arrays["tracker/l/U0"] = 3
    assert names.under(arrays, names.PARAM) == {"w": 1}
    assert names.under(arrays, names.OPT) == {"state/momentum/w": 2}
    assert names.under(arrays, names.tracker("l", "")) == {"U0": 3}
