"""export.zoo: torch models match the program's convs, weights round-trip, real weights work."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from actcomp_edge.core import arch, program
from export import zoo
from helpers import SHARED, assert_one_line

WEIGHTS = SHARED / "weights"
KNOWN_SHARED = ["mcunet-320kb-1mb_fp32", "tt_mbv2-w0.35_int8dq", "tt_mcunet-5fps_int8dq",
                "tt_proxyless-w0.3_int8dq"]
SHARED_NAMES = sorted({p.stem for p in WEIGHTS.glob("*.json") if p.with_suffix(".npz").exists()}
                      | set(KNOWN_SHARED))
ANT, BEE = 310, 309  # ImageNet-1k indices (checked against imagenet_classes.json below)
SIZES = [224, 128, 96, (160, 128)]


def shared_param(name):
    missing = not (WEIGHTS / f"{name}.json").exists()
    return pytest.param(name, id=name, marks=pytest.mark.skipif(
        missing, reason=f"{WEIGHTS / name}.json absent (../shared is not part of a clone)"))


SHARED_PARAMS = [shared_param(n) for n in SHARED_NAMES]


def shared_spec(name, num_classes=None):
    return zoo.load_spec(str(WEIGHTS / f"{name}.json"), num_classes)


def all_specs():
    specs = [pytest.param(lambda n=n: arch.load_spec(n), id=n) for n in arch.ZOO]
    for p in SHARED_PARAMS:
        name = p.values[0]
        specs.append(pytest.param(lambda n=name: shared_spec(n), id=name, marks=p.marks))
    return specs


def conv_modules(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def module_name(spec, layer):
    return layer.name + ".conv" if spec["family"] == "inverted_residual" else layer.name


@pytest.mark.parametrize("make_spec", all_specs())
def test_convs_match_the_program(make_spec):
    spec = make_spec()
    model = zoo.build_model(spec).eval()
    convs = conv_modules(model)
    for size in SIZES:
        layers = program.conv_layers(spec, size)
        assert [n for n, _ in convs] == [module_name(spec, c) for c in layers]
        for (name, m), c in zip(convs, layers):
            assert (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.groups) == \
                   (c.in_ch, c.out_ch, (c.kernel,) * 2, (c.stride,) * 2, (c.padding,) * 2,
                    c.groups), name
        seen = {}
        hooks = [m.register_forward_hook(
            lambda mod, inp, out, n=n: seen.__setitem__(n, (tuple(inp[0].shape[-2:]),
                                                            tuple(out.shape[-2:]))))
            for n, m in convs]
        hw = (size, size) if isinstance(size, int) else size
        with torch.no_grad():
            logits = model(torch.zeros(1, 3, *hw))
        for h in hooks:
            h.remove()
        assert logits.shape == (1, spec["classifier"]["out_features"])
        for c in layers:
            assert seen[module_name(spec, c)] == (tuple(c.input_hw), tuple(c.output_hw)), \
                (c.name, size)


def test_resnet_state_dict_is_torchvisions():
    """The names and shapes of torchvision's resnet18().state_dict(), written out here."""
    want = [("conv1.weight", (64, 3, 7, 7))] + bn("bn1", 64)
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            p = f"layer{stage}.{block}"
            stride_in = cin if block == 0 else cout
            want += [(f"{p}.conv1.weight", (cout, stride_in, 3, 3))] + bn(f"{p}.bn1", cout)
            want += [(f"{p}.conv2.weight", (cout, cout, 3, 3))] + bn(f"{p}.bn2", cout)
            if block == 0 and stage > 1:
                want += [(f"{p}.downsample.0.weight", (cout, cin, 1, 1))]
                want += bn(f"{p}.downsample.1", cout)
        cin = cout
    want += [("fc.weight", (1000, 512)), ("fc.bias", (1000,))]
    model = zoo.build_model(arch.load_spec("resnet18"))
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert sorted(got) == sorted(want)


def bn(prefix, c):
    return [(f"{prefix}.{k}", (c,)) for k in ("weight", "bias", "running_mean", "running_var")] \
        + [(f"{prefix}.num_batches_tracked", ())]


def test_activations_from_spec():
    """A spec's clamps act where it puts them: after a layer's conv (and BN), and after a
    residual add."""
    spec = arch.load_spec("mcunet-in1")
    spec["blocks"][2]["residual_out_act"] = {"type": "clamp", "min": -1.5, "max": 2.0}
    spec["blocks"][2]["layers"][0]["act"] = {"type": "clamp", "min": 0.0, "max": 3.0}
    torch.manual_seed(0)
    model = zoo.build_model(spec).eval()
    randomise(model)
    with torch.no_grad():  # wide ranges before the clamps: both bounds are reached
        for name in ("blocks.2.expand.bn", "blocks.2.project.bn"):
            model.get_submodule(name).weight.mul_(100)
    seen = {}
    for name in ("blocks.2.dw.conv", "blocks.3.expand.conv"):
        model.get_submodule(name).register_forward_hook(
            lambda mod, inp, out, n=name: seen.__setitem__(n, inp[0]))
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64) * 10)
    dw_in, next_in = seen["blocks.2.dw.conv"], seen["blocks.3.expand.conv"]
    assert dw_in.min() >= 0.0 and dw_in.max() <= 3.0
    assert (dw_in == 0.0).any() and (dw_in == 3.0).any()
    assert next_in.min() >= -1.5 and next_in.max() <= 2.0
    assert (next_in == -1.5).any() and (next_in == 2.0).any()


def randomise(model, seed=1):
    """Non-trivial values for every parameter and BN running stat."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=gen) * 0.5 + (0.5 if "running_var" in key else -0.25))


@pytest.mark.parametrize("name", ["mcunet-in1", "resnet18"])
def test_save_load_round_trip(tmp_path, name):
    spec = arch.load_spec(name, num_classes=7)
    torch.manual_seed(0)
    model = zoo.build_model(spec)
    randomise(model)
    zoo.save_weights(model, spec, tmp_path / "w.npz")
    torch.manual_seed(1)
    copy = zoo.build_model(spec)
    assert zoo.load_weights(copy, spec, tmp_path / "w.npz") is None
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), copy.eval()(x))


@pytest.fixture
def small():
    spec = arch.load_spec("mcunet-in1", num_classes=5)
    model = zoo.build_model(spec)
    state = model.state_dict()
    arrays = {n: state[k].numpy().copy() for n, k in zoo.array_names(model, spec).items()}
    return spec, model, arrays


def test_inverted_residual_naming(small):
    spec, model, arrays = small
    assert "blocks.3.dw.weight" in arrays and "blocks.3.dw.bn.running_var" in arrays
    assert "stem.bias" not in arrays and "classifier.weight" in arrays
    assert arrays["classifier.weight"].shape == (5, 160)


@pytest.mark.parametrize("edit, name, words", [
    (lambda a: a.update({"blocks.3.dw.weight": np.zeros((48, 1, 5, 5), np.float32)}),
     "blocks.3.dw.weight", ["shape", "(48, 1, 7, 7)", "(48, 1, 5, 5)"]),
    (lambda a: a.pop("blocks.3.dw.bn.running_var"), "blocks.3.dw.bn.running_var", ["missing"]),
    (lambda a: a.update({"blocks.99.dw.weight": np.zeros(3, np.float32)}), "blocks.99.dw.weight",
     ["unexpected"]),
])
def test_mismatched_weights_raise(small, tmp_path, edit, name, words):
    spec, model, arrays = small
    edit(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    for source in (arrays, tmp_path / "bad.npz"):
        with pytest.raises(zoo.WeightsError) as err:
            zoo.load_weights(model, spec, source)
        message = str(err.value)
        assert_one_line(message)
        assert name in message and all(w in message for w in words)


def test_non_strict_and_ignored_arrays(small, tmp_path):
    spec, model, arrays = small
    arrays["stem.w_scale"] = np.ones(16, np.float32)  # quantisation metadata: ignored
    assert zoo.load_weights(model, spec, arrays) is None
    arrays.pop("blocks.3.dw.weight")
    arrays["extra"] = np.zeros(1, np.float32)
    zoo.load_weights(model, spec, arrays, strict=False)
    arrays["stem.weight"] = np.zeros((1, 2, 3, 3), np.float32)
    with pytest.raises(zoo.WeightsError, match="stem.weight"):
        zoo.load_weights(model, spec, arrays, strict=False)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(zoo.WeightsError, match="junk.npz"):
        zoo.load_weights(model, spec, tmp_path / "junk.npz")


def test_replace_classifier(small):
    spec, model, arrays = small
    arrays["classifier.weight"] = np.zeros((1000, 160), np.float32)
    arrays["classifier.bias"] = np.zeros(1000, np.float32)
    arrays["stem.weight"] = np.full_like(arrays["stem.weight"], 0.5)
    with pytest.raises(zoo.WeightsError, match="classifier.weight"):
        zoo.load_weights(model, spec, arrays)
    before = model.classifier.weight.detach().clone()
    note = zoo.load_weights(model, spec, arrays, replace_classifier=True)
    assert "re-initialised" in note and "1000" in note
    assert torch.equal(model.classifier.weight, before)
    assert torch.all(model.stem.conv.weight == 0.5)
    arrays["classifier.weight"] = np.zeros((1000, 159), np.float32)  # in_features wrong: error
    with pytest.raises(zoo.WeightsError, match="classifier.weight"):
        zoo.load_weights(model, spec, arrays, replace_classifier=True)


def test_seeded_init_and_eval_determinism():
    spec = arch.load_spec("mbv2-w0.35", num_classes=3)
    torch.manual_seed(0)
    a = zoo.build_model(spec)
    torch.manual_seed(0)
    b = zoo.build_model(spec)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    randomise(a)
    a.eval()
    for p in a.parameters():
        p.requires_grad_(False)
    stats = {k: v.clone() for k, v in a.state_dict().items() if "running" in k}
    x = torch.randn(4, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(a(x), a(x))
    assert all(torch.equal(a.state_dict()[k], v) for k, v in stats.items())


def test_unknown_model_and_family():
    with pytest.raises(arch.SpecError):
        zoo.build_from_name("nope")
    with pytest.raises(arch.SpecError):
        zoo.build_model({"family": "vit"})


# ---------------------------------------------------------------- real weights (../shared)

@pytest.fixture(scope="module")
def hymenoptera():
    path = SHARED / "data" / "hymenoptera_val.npz"
    if not path.exists():
        pytest.skip(f"{path} absent (../shared is not part of a clone)")
    with np.load(path, allow_pickle=False) as data:
        assert list(data["classes"]) == ["ants", "bees"]
        return data["images"], data["labels"]


def test_imagenet_ant_bee_indices():
    path = WEIGHTS / "imagenet_classes.json"
    if not path.exists():
        pytest.skip(f"{path} absent (../shared is not part of a clone)")
    classes = json.loads(path.read_text())["classes"]
    assert (classes[ANT], classes[BEE]) == ("ant", "bee")


@pytest.mark.parametrize("name", SHARED_PARAMS)
def test_shared_weights_ant_vs_bee(name, hymenoptera):
    images, labels = hymenoptera
    model = zoo.build_from_name(str(WEIGHTS / f"{name}.json"), weights=WEIGHTS / f"{name}.npz")
    assert model.weights_note is None
    model.eval()
    x = zoo.preprocess(images, model.spec)
    assert x.shape[-1] == model.spec["input"]["resolution"]
    with torch.no_grad():
        logits = model(x)
    accuracy = float(((logits[:, BEE] > logits[:, ANT]).long().numpy() == labels).mean())
    print(f"{name}: ants/bees accuracy {accuracy:.4f} at {x.shape[-1]}px")
    assert accuracy >= 0.88
    record = json.loads((WEIGHTS / "verification_results.json").read_text()).get(name, {})
    recorded = record.get("hymenoptera_val_zero_shot", {}).get("ant_vs_bee_logit_acc")
    if recorded is not None:
        assert abs(accuracy - recorded) < 0.015  # same conversion, same preprocessing


@pytest.mark.parametrize("name", SHARED_PARAMS[:1])
def test_shared_weights_new_classifier(name):
    model = zoo.build_from_name(str(WEIGHTS / f"{name}.json"), num_classes=2,
                                weights=WEIGHTS / f"{name}.npz")
    assert model.classifier.out_features == 2 and "re-initialised" in model.weights_note
    with np.load(WEIGHTS / f"{name}.npz", allow_pickle=False) as npz:
        assert np.array_equal(model.stem.conv.weight.detach().numpy(), npz["stem.weight"])
