"""The torch frontend: a user's nn.Module traced with torch.fx trains on the runner with
torch.autograd's gradients and torch.optim's step; unsupported ops are one line."""
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from device_runner.runtime import Trainer
from export.module_export import ModuleOptions, export_module
from export.torch_frontend import FrontendError, program_from_module
from edge_models import Activations
from export_helpers import (TOL, assert_step_is_autograds, assert_update_is_sgds,
                            torch_sgd_step)
from helpers import actcomp, assert_one_line_error, rel_max_error
from export.training_graph import TrainConfig

USER_MODEL = '''
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Depthwise 3x3 + pointwise 1x1, residual, Hardtanh after the add."""

    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.dw_bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU6()
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(c)
        self.out = nn.Hardtanh(-1.0, 3.0)

    def forward(self, x):
        return self.out(x + self.pw_bn(self.pw(self.act(self.dw_bn(self.dw(x))))))


class UserNet(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.block = Block(8)
        self.widen = nn.Conv2d(8, 16, 3, stride=2, padding=1)   # with a bias, no BN
        self.head = nn.Conv2d(16, 16, 5, padding=2, groups=4, bias=False)
        self.head_bn = nn.BatchNorm2d(16)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.block(self.pool(self.stem(x)))
        x = F.relu(self.widen(x))
        x = torch.relu(self.head_bn(self.head(x)))
        return self.fc(self.drop(torch.flatten(self.gap(x), 1)))


def build():
    torch.manual_seed(3)
    net = UserNet()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net
'''


@pytest.fixture(scope="module")
def user_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "user_model.py"
    path.write_text(USER_MODEL)
    return path


def user_net(user_file):
    namespace = {}
    exec(compile(user_file.read_text(), str(user_file), "exec"), namespace)
    return namespace["build"]()


@pytest.mark.parametrize("method,eps", [("vanilla", None), ("hosvd", 1.0), ("svd", 1.0)])
# 4: through the residual block; 5: every conv, through the max-pool (3x3/2: windows overlap)
@pytest.mark.parametrize("n_convs", [2, 4, 5])
def test_a_user_cnn_trains_with_autograds_gradients_and_sgds_step(user_file, tmp_path, method,
                                                                   eps, n_convs):
    net = user_net(user_file)
    manifest = export_module(net, tmp_path / "art",
                             TrainConfig(n_layers=n_convs, method=method, eps=eps, momentum=0.0),
                             ModuleOptions(input_size=(40, 48), batch_size=3))
    assert manifest.dropout_not_applied == 0.3
    trainer = Trainer(tmp_path / "art")
    rng = np.random.default_rng(0)
    images = rng.standard_normal((3, 3, 40, 48)).astype(np.float32)
    labels = rng.integers(0, 5, 3).astype(np.int64)
    assert_update_is_sgds(trainer, net, n_convs, images, labels)


def test_file_py_function_with_pth_weights_gives_the_modules_logits(user_file, tmp_path):
    net = user_net(user_file)
    with torch.no_grad():  # weights unlike build()'s: they must come from the file
        for p in net.parameters():
            p.mul_(1.5)
    torch.save(net.state_dict(), tmp_path / "w.pth")
    proc = actcomp("export", "--model", f"{user_file}:build", "--weights", tmp_path / "w.pth",
                   "--layers", "3", "--method", "hosvd", "--eps", "0.9", "--batch-size", "2",
                   "--input-size", "64", "-o", tmp_path / "art")
    assert proc.returncode == 0, proc.stderr
    x = torch.randn(4, 3, 64, 64)
    net.eval()
    with torch.no_grad():
        want = net(x).numpy()
    trainer = Trainer(tmp_path / "art")
    assert rel_max_error(trainer.evaluate(x.numpy()), want) < TOL
    assert trainer.manifest.model == Path(user_file).stem  # FILE.py:build -> FILE's stem


class WithMish(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.Conv2d(4, 4, 1),
                                                                       nn.Mish()))
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(x), 1), 1))


class Reflect(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv(x), 1), 1))


class OneConv(nn.Module):
    """A 3 -> 4 3x3 conv and a 4 -> 2 classifier: each subclass's forward tries one op."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)


class Gelu(OneConv):
    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.gelu(self.conv(x)), 1), 1))


class Block(nn.Module):
    """A MobileNetV3-like block: Hardswish, and a squeeze-excitation gate in its forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.Hardswish()
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        y = self.act(self.conv(x))
        return y * self.gate(F.adaptive_avg_pool2d(y, 1))


class Scaled(OneConv):
    def forward(self, x):
        y = self.conv(x)
        return self.fc((y * 0.5).mean((2, 3)))


class EdgeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.features = nn.Sequential(Block())
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.erf(self.features(self.stem(x))).mean((2, 3)))


@pytest.mark.parametrize("module,message", [
    (WithMish(), "1 unsupported op: blocks.1.1: Mish is not supported"),
    (Reflect(), "conv: padding_mode='reflect' is not supported (zeros only)"),
    (Gelu(), "1 unsupported op: Gelu (forward): F.gelu is not supported"),
    (Scaled(), "1 unsupported op: Scaled (forward): operator.mul by a constant is not "
               "supported (only of two tensors, such as a gate)"),
    (EdgeNet(), "1 unsupported op: EdgeNet (forward): torch.erf is not supported"),
])
def test_unsupported_ops_are_one_line_naming_each_module_path(module, message):
    """Every unsupported op at once, in execution order, a function by the module whose
    forward calls it (a user learnt them one export at a time)."""
    with pytest.raises(FrontendError) as e:
        program_from_module(module, 32)
    assert str(e.value) == message


class Rectangular(nn.Module):
    """Rectangular kernels, strides and paddings and dilated convs, all fine-tuned."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.row = nn.Conv2d(8, 8, (1, 3), padding=(0, 1), bias=False)
        self.col = nn.Conv2d(8, 12, (3, 1), stride=(2, 1), padding=(1, 0), groups=4)
        self.dilated = nn.Conv2d(12, 12, 3, padding=2, dilation=2, groups=12, bias=False)
        self.wide = nn.Conv2d(12, 16, (3, 5), padding=(1, 4), dilation=(1, 2), bias=False)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu6(self.row(x))
        x = F.relu(self.col(x))
        x = F.relu(self.dilated(x))
        x = F.relu(self.wide(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("method,eps", [("vanilla", None), ("hosvd", 1.0), ("svd", 1.0)])
def test_rectangular_and_dilated_convs_train_with_autograds_gradients(tmp_path, method, eps):
    torch.manual_seed(5)
    net = Rectangular()
    export_module(net, tmp_path / "art",
                  TrainConfig(n_layers=4, method=method, eps=eps, momentum=0.0),
                  ModuleOptions(input_size=(24, 30), batch_size=3))
    layers = json.loads((tmp_path / "art" / "manifest.json").read_text())["trainable_layers"]
    assert [(layer["kernel"], layer["stride"], layer.get("dilation", 1)) for layer in layers] == \
           [([1, 3], 1, 1), ([3, 1], [2, 1], 1), (3, 1, 2), ([3, 5], 1, [1, 2])]
    trainer = Trainer(tmp_path / "art")
    rng = np.random.default_rng(2)
    images = rng.standard_normal((3, 3, 24, 30)).astype(np.float32)
    labels = rng.integers(0, 5, 3).astype(np.int64)
    assert_update_is_sgds(trainer, net, 4, images, labels)
    x = rng.standard_normal((2, 3, 24, 30)).astype(np.float32)
    net.eval()
    with torch.no_grad():
        assert rel_max_error(trainer.evaluate(x), net(torch.from_numpy(x)).numpy()) < TOL


def test_gradient_filter_refuses_a_rectangular_conv_in_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"^gf-r2 needs square kernels, strides and paddings "
                                         r"and dilation 1: col has kernel \(3, 1\)"):
        export_module(Rectangular(), tmp_path / "art",
                      TrainConfig(n_layers=3, method="gf-r2", eps=None, momentum=0.0),
                      ModuleOptions(input_size=24, batch_size=2))
    assert not (tmp_path / "art").exists()


def test_a_max_pool_in_the_fine_tuned_part_keeps_its_argmax_and_counts_it(user_file, tmp_path):
    """The forward hands each max's place to the backward: int32, one per pooled element,
    in the full accounting of the conv before it (the stem's)."""
    manifest = export_module(user_net(user_file), tmp_path / "art",
                             TrainConfig(n_layers=5, method="vanilla", eps=None, momentum=0.0),
                             ModuleOptions(input_size=32, batch_size=2))
    stem = manifest.trainable_layers[0]
    assert "pool/pool/argmax" in stem.masks
    trainer = Trainer(tmp_path / "art")
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    fwd = trainer.forward(x, np.zeros(2, np.int64))
    argmax = fwd.tensors["pool/pool/argmax"]
    assert argmax.dtype == np.int32 and argmax.shape == (2, 8, 8, 8)
    assert 0 <= argmax.min() and argmax.max() < 8 * 16 * 16  # within its sample
    assert fwd.kept_full_per_layer[stem.name] >= argmax.nbytes


def test_the_cli_says_what_is_wrong_with_a_model_file_in_one_line(tmp_path):
    (tmp_path / "m.py").write_text(textwrap.dedent('''
        import torch
        def build():
            return 3
        def broken():
            raise RuntimeError("no GPU here")
        def needs(width):
            return torch.nn.Conv2d(3, width, 3)
    '''))
    for ref, message in [(f"{tmp_path}/m.py:build", "returned a int, not a torch.nn.Module"),
                         (f"{tmp_path}/m.py:nope", "has no function 'nope'"),
                         (f"{tmp_path}/m.py:broken", "broken() failed: RuntimeError: no GPU here"),
                         (f"{tmp_path}/m.py:needs", "needs() must build the model with no "
                                                    "arguments"),
                         (f"{tmp_path}/m.py", "a model file is FILE.py:FUNCTION"),
                         (f"{tmp_path}/absent.py:build", "no such file")]:
        proc = actcomp("export", "--model", ref, "--layers", "1", "--method", "vanilla", "-o",
                       tmp_path / "o")
        assert_one_line_error(proc, message)


@pytest.mark.parametrize("name", ["mcunet-in1", "mobilenet_v2", "resnet18"])
def test_actcomp_plan_sizes_the_program_the_artifact_is_built_from(name):
    """`actcomp plan` has no weights: program.network builds the program without them. Its
    ops, shapes and plan equal those of the program built with weights (the artifact's)."""
    from actcomp_edge.core import program
    from actcomp_edge.core.memory import plan
    from export import zoo
    spec = zoo.load_spec(name, 10)
    arrays = zoo.model_arrays(zoo.build_model(spec), spec)
    hw = (96, 128)
    weighted, bare = program.build_program(spec, arrays, hw), program.build_program(spec, None, hw)
    assert [(op.kind, op.name, op.inputs, op.output) for op in weighted.ops] == \
           [(op.kind, op.name, op.inputs, op.output) for op in bare.ops]
    assert weighted.shapes == bare.shapes
    assert {k: v.shape for k, v in weighted.params.items()} == \
           {k: v.shape for k, v in bare.params.items()}
    ours, theirs = program.network_of(weighted), program.network(spec, hw)
    assert ours == theirs
    assert plan(ours, len(ours.convs), "vanilla", 4, hw).to_json() == \
           plan(theirs, len(theirs.convs), "vanilla", 4, hw).to_json()


def test_weights_of_the_wrong_shape_are_named():
    from actcomp_edge.core import program
    from export import zoo
    spec = zoo.load_spec("mcunet-in1", 10)
    arrays = zoo.model_arrays(zoo.build_model(spec), spec)
    arrays["blocks.3.dw.weight"] = arrays["blocks.3.dw.weight"][:, :, :3, :3]
    with pytest.raises(ValueError, match=r"weights array 'blocks.3.dw.weight' has shape "
                                         r"\(48, 1, 3, 3\), the model needs \(48, 1, 7, 7\)"):
        program.build_program(spec, arrays, 128)


class SharedRelu(nn.Module):
    """One ReLU module called after two convs; a conv that a second call would share."""

    def __init__(self, share_conv=False):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.share_conv = share_conv
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.relu(self.b(self.relu(self.a(x))))
        if self.share_conv:
            x = self.b(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_a_module_called_twice_is_two_ops_or_refused_when_it_holds_weights(tmp_path):
    torch.manual_seed(0)
    net = SharedRelu()
    export_module(net, tmp_path / "art",
                  TrainConfig(n_layers=2, method="vanilla", eps=None, momentum=0.0),
                  ModuleOptions(input_size=16, batch_size=2))
    rng = np.random.default_rng(1)
    images = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    labels = np.array([0, 2])
    assert_step_is_autograds(Trainer(tmp_path / "art"), net, 2, images, labels)
    with pytest.raises(FrontendError, match="^b: a module called twice"):
        program_from_module(SharedRelu(share_conv=True), 16)


def test_actcomp_plan_takes_a_model_file_and_sizes_what_its_export_keeps(user_file, tmp_path):
    """`actcomp plan --model FILE.py:FUNCTION` traces the module as the export does: its
    table's totals are those the artifact's manifest predicts; --profile counts its
    trainable parameters."""
    argv = ["--model", f"{user_file}:build", "--layers", "3", "--method", "hosvd", "--eps",
            "0.9", "--batch-size", "2", "--input-size", "64"]
    proc = actcomp("plan", *argv, "--json")
    assert proc.returncode == 0, proc.stderr
    planned = json.loads(proc.stdout)
    export = actcomp("export", *argv, "-o", tmp_path / "art")
    assert export.returncode == 0, export.stderr
    predicted = json.loads((tmp_path / "art" / "manifest.json").read_text())["predicted_memory"]
    assert (planned["paper_bytes"], planned["full_bytes"]) == (predicted["paper_bytes"],
                                                               predicted["full_bytes"])
    fits = actcomp("plan", *argv, "--profile", "pi-zero-2w")
    assert fits.returncode == 0 and "fits" in fits.stdout, fits.stderr
    from actcomp_edge.core.profiles import program_param_count
    from export.torch_frontend import program_from_module
    net = user_net(user_file)
    program, _ = program_from_module(net, (64, 64))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    first = [m for m in net.modules()].index(convs[-3])
    trainable = sum(p.numel() for m in list(net.modules())[first:]
                    if isinstance(m, (nn.Conv2d, nn.Linear)) for p in m.parameters())
    assert program_param_count(program, 3) == trainable


class MeanPool(nn.Module):
    """The global pool as people write it: x.mean((2, 3)), or torch.mean(keepdim) + flatten."""

    def __init__(self, keepdim: bool):
        super().__init__()
        self.keepdim = keepdim
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv = nn.Conv2d(8, 12, 3, padding=1)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        x = F.relu(self.conv(F.relu(self.stem(x))))
        if self.keepdim:
            return self.fc(torch.mean(x, dim=(-2, -1), keepdim=True).flatten(1))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("keepdim", [False, True])
def test_a_mean_over_height_and_width_is_the_global_pool(tmp_path, keepdim):
    torch.manual_seed(3)
    net = MeanPool(keepdim)
    program, _ = program_from_module(net, 16)
    assert [op.kind for op in program.ops][-2:] == ["gap", "linear"]
    assert_trains_like_autograd(net, tmp_path / "art", 16, 2, classes=4, seed=4)


def assert_trains_like_autograd(net, folder, size: int, n_convs: int, method="vanilla",
                                eps=None, batch=3, classes=3, seed=0):
    """Export net's last n_convs; the runner's logits are the module's, and one step's loss
    and gradients are torch.autograd's (random images, size x size)."""
    export_module(net, folder,
                  TrainConfig(n_layers=n_convs, method=method, eps=eps, momentum=0.0),
                  ModuleOptions(input_size=size, batch_size=batch))
    trainer = Trainer(folder)
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    labels = rng.integers(0, classes, batch).astype(np.int64)
    net.eval()
    with torch.no_grad():
        assert rel_max_error(trainer.evaluate(images), net(torch.from_numpy(images)).numpy()) < TOL
    assert_step_is_autograds(trainer, net, n_convs, images, labels)


def test_a_mean_over_other_dims_is_refused_in_one_line():
    class ChannelMean(MeanPool):
        def forward(self, x):
            y = F.relu(self.conv(F.relu(self.stem(x))))
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(y + y.mean(1, keepdim=True), 1),
                                         1))

    with pytest.raises(FrontendError, match=r"a mean over dims \(1,\) is supported only as the "
                                            r"global pool"):
        program_from_module(ChannelMean(False), 16)


class SamePadding(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding="same")
        self.wide = nn.Conv2d(8, 8, (3, 5), padding="same", dilation=(1, 2), groups=8)
        self.valid = nn.Conv2d(8, 6, 3, padding="valid")
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.valid(F.relu(self.wide(F.relu(self.stem(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_string_paddings_train_with_autograds_gradients(tmp_path):
    torch.manual_seed(6)
    net = SamePadding()
    program, _ = program_from_module(net, 12)
    assert [op.attrs["padding"] for op in program.ops if op.kind == "conv"] == [1, (1, 4), 0]
    assert_trains_like_autograd(net, tmp_path / "art", 12, 3, "hosvd", 1.0, batch=2, seed=7)


def test_same_padding_of_an_even_kernel_is_refused_in_one_line():
    class Even(SamePadding):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 2, padding="same")

    with pytest.raises(FrontendError, match=r"stem: padding='same' with kernel \(2, 2\) and "
                                            r"dilation \(1, 1\) pads one side more"):
        program_from_module(Even(), 12)


@pytest.mark.parametrize("method,eps", [("vanilla", None), ("hosvd", 1.0), ("asi", 1.0),
                                        ("svd", 1.0)])
@pytest.mark.parametrize("n_convs", [2, 5])
def test_smooth_and_gated_activations_train_with_autograds_gradients(tmp_path, method, eps,
                                                                     n_convs):
    torch.manual_seed(8)
    net = Activations()
    with torch.no_grad():  # wide pre-activations: every region of every activation is hit
        for conv in (net.stem, net.dw, net.pw, net.mix, net.last):
            conv.weight.mul_(4.0)
    program, _ = program_from_module(net, 12)
    assert [(op.attrs["fn"], op.attrs.get("slope")) for op in program.ops if op.kind == "act"] \
        == [("hardswish", None), ("leaky_relu", 0.1), ("silu", None), ("hardswish", None),
            ("hardsigmoid", None), ("leaky_relu", 0.2), ("sigmoid", None), ("silu", None)]
    assert_trains_like_autograd(net, tmp_path / "art", 12, n_convs, method, eps, seed=9)


@pytest.mark.parametrize("method,eps", [("hosvd", 1.0), ("vanilla", None)])
def test_what_each_activation_keeps_is_held_and_planned(tmp_path, method, eps):
    """hardsigmoid and leaky ReLU keep 1 bit an element, hardswish and silu their float32
    input, sigmoid its output; vanilla reads a leaky ReLU's and a sigmoid's from the next
    conv's kept input. The plan's full bytes of every layer are what the runner holds."""
    from actcomp_edge.core.memory import plan, plan_table
    from actcomp_edge.core.program import network_of
    torch.manual_seed(8)
    net = Activations()
    manifest = export_module(net, tmp_path / "art",
                             TrainConfig(n_layers=5, method=method, eps=eps, momentum=0.0),
                             ModuleOptions(input_size=12, batch_size=3))
    masks = {layer.name: layer.masks for layer in manifest.trainable_layers}
    saved = {"hosvd": {"stem": ["hswish/act/act_saved"], "dw": ["leaky/act/mask_bits"],
                       "pw": ["silu/act/act_saved", "hardswish/act/act_saved"],
                       "mix": ["gate/act/mask_bits"],
                       "last": ["leaky_relu/act/mask_bits", "sigmoid/act/act_saved",
                                "silu_1/act/act_saved"]},
             "vanilla": {"stem": ["hswish/act/act_saved"], "dw": [],
                         "pw": ["silu/act/act_saved", "hardswish/act/act_saved"],
                         "mix": ["gate/act/mask_bits"],
                         "last": ["leaky_relu/act/mask_bits", "sigmoid/act/act_saved",
                                  "silu_1/act/act_saved"]}}[method]
    assert masks == saved
    trainer = Trainer(tmp_path / "art")
    images = np.random.default_rng(1).standard_normal((3, 3, 12, 12)).astype(np.float32)
    fwd = trainer.forward(images, np.zeros(3, np.int64))
    assert fwd.tensors["hswish/act/act_saved"].dtype == np.float32
    assert fwd.tensors["hswish/act/act_saved"].shape == (3, 8, 12, 12)
    if method != "vanilla":
        assert fwd.tensors["leaky/act/mask_bits"].shape == (3, 8 * 144 // 8)
    program, _ = program_from_module(Activations(), 12)
    predicted = plan(network_of(program), 5, method, 3, 12, eps=eps)
    if method == "vanilla":  # the plan counts every mask (1 bit) as if packed: an upper bound
        for layer in predicted.layers:
            assert layer.full_bytes >= fwd.kept_full_per_layer[layer.name], layer.name
    else:
        assert {layer.name: layer.full_bytes - layer.paper_bytes
                for layer in predicted.layers[:-1]} == \
            {name: sum(fwd.tensors[t].nbytes for t in ts) for name, ts in masks.items()}
    whole = sum(fwd.tensors[t].nbytes for ts in masks.values() for t in ts
                if t.endswith("/act_saved"))
    assert sum(layer.whole_bytes for layer in predicted.layers) == whole
    assert "float32 tensors kept whole" in plan_table(predicted, 5)


class ReadAfterInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x)
        z = F.leaky_relu_(y)        # torch overwrites y ...
        return self.fc((self.act(z) + y).mean((2, 3)))  # ... which the add reads again


def test_an_in_place_activation_whose_input_is_read_again_is_refused_in_one_line():
    """torch's add would read the overwritten y; the program's the original: refused. The
    in-place ReLU module's input (z) is read by nothing after it: accepted."""
    with pytest.raises(FrontendError) as e:
        program_from_module(ReadAfterInPlace(), 8)
    assert str(e.value) == ("1 unsupported op: ReadAfterInPlace (forward): the in-place "
                            "F.leaky_relu_ overwrites a tensor that add reads after it: not "
                            "supported (make it not in-place)")


class SqueezeExcite(nn.Module):
    """A MobileNetV3 block with squeeze-excitation (pool -> 1x1 -> ReLU -> 1x1 -> hardsigmoid,
    a (C, 1, 1) gate times the map), an EfficientNet-style one (SiLU, sigmoid, torch.mul,
    the gate first), a residual, convs in execution order: stem.0 expand dw se.1 se.3 project
    mix se2.1 se2.3 last."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.Hardswish())
        self.expand = nn.Conv2d(8, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 4, 1), nn.ReLU(),
                                nn.Conv2d(4, 16, 1), nn.Hardsigmoid())
        self.project = nn.Conv2d(16, 8, 1)
        self.mix = nn.Conv2d(8, 12, 3, padding=1)
        self.se2 = nn.Sequential(nn.Identity(), nn.Conv2d(12, 3, 1), nn.SiLU(),
                                 nn.Conv2d(3, 12, 1), nn.Sigmoid())
        self.last = nn.Conv2d(12, 10, 1)
        self.fc = nn.Linear(10, 3)

    def forward(self, x):
        x = self.stem(x)
        y = F.hardswish(self.dw(F.hardswish(self.expand(x))))
        y = y * self.se(y)
        x = x + self.project(y)
        y = F.silu(self.mix(x))
        y = torch.mul(self.se2(y.mean((2, 3), keepdim=True)), y)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.last(y), 1), 1))


@pytest.mark.parametrize("method,eps", [("vanilla", None), ("hosvd", 1.0), ("asi", 1.0),
                                        ("svd", 1.0)])
# 2: the multiplies frozen; 3: the gate's conv fine-tuned, not the map; 5: the gate's path and
# the map's; 6: also through the first block's multiply; 10: every conv
@pytest.mark.parametrize("n_convs", [2, 3, 5, 6, 10])
def test_squeeze_excitation_trains_with_autograds_gradients(tmp_path, method, eps, n_convs):
    torch.manual_seed(3)
    net = SqueezeExcite()
    program, _ = program_from_module(net, 12)
    assert [op.kind for op in program.ops if op.kind in ("mean", "mul", "gap")] == \
        ["mean", "mul", "mean", "mul", "gap"]
    assert_trains_like_autograd(net, tmp_path / "art", 12, n_convs, method, eps, seed=5)


# 3: the second gate is its sigmoid's saved output, the map it scales (silu of the frozen
# mix) is kept; 6: the first map (hardswish of the frozen dw) is kept for its gate's
# gradient, the gate is not (the frozen map needs no gradient); 10: the maps are silu's and
# hardswish's of their saved inputs, recomputed, the first gate (a hardsigmoid: 1 bit an
# element) is kept
@pytest.mark.parametrize("n_convs,factors", [
    (3, {"se2.3": ["mul_1/mul/factor_1"]}),
    (6, {"se.3": ["mul/mul/factor_0"], "se2.3": []}),
    (10, {"se.3": ["mul/mul/factor_1"], "se2.3": []})])
def test_what_a_multiply_keeps_is_held_and_planned(tmp_path, n_convs, factors):
    """A multiply's factor is kept whole (float32), counted with the conv before it, unless a
    fine-tuned act's saved tensor gives it; the plan's per-layer bytes are what the runner
    holds."""
    from actcomp_edge.core.memory import plan
    from actcomp_edge.core.program import network_of
    net = SqueezeExcite()
    manifest = export_module(net, tmp_path / "art",
                             TrainConfig(n_layers=n_convs, method="hosvd", eps=1.0, momentum=0.0),
                             ModuleOptions(input_size=12, batch_size=3))
    masks = {layer.name: layer.masks for layer in manifest.trainable_layers}
    assert {name: [t for t in masks[name] if "/factor_" in t] for name in factors} == factors
    trainer = Trainer(tmp_path / "art")
    images = np.random.default_rng(1).standard_normal((3, 3, 12, 12)).astype(np.float32)
    fwd = trainer.forward(images, np.zeros(3, np.int64))
    shapes = {"mul_1/mul/factor_1": (3, 12, 12, 12), "mul/mul/factor_1": (3, 16, 1, 1),
              "mul/mul/factor_0": (3, 16, 12, 12)}
    held = [t for ts in factors.values() for t in ts]
    assert {t: fwd.tensors[t].shape for t in held} == {t: shapes[t] for t in held}
    program, _ = program_from_module(net, 12)
    predicted = plan(network_of(program), n_convs, "hosvd", 3, 12, eps=1.0)
    assert {layer.name: layer.full_bytes - layer.paper_bytes
            for layer in predicted.layers[:-1]} == \
        {name: sum(fwd.tensors[t].nbytes for t in ts) for name, ts in masks.items()}


class Indexed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(self.conv(x)[:, :2].mean((2, 3)))


class CatOnWidth(OneConv):
    def forward(self, x):
        y = self.conv(x)
        return self.fc(torch.cat([y, y], 3).mean((2, 3)))


class Transposed(OneConv):
    def forward(self, x):
        return self.fc(self.conv(x).transpose(2, 3).mean((2, 3)))


class Reshaped(OneConv):
    def forward(self, x):
        y = self.conv(x)
        return self.fc(y.view(y.size(0), 4, -1).mean(2))


class FlattenedMap(OneConv):
    """A feature map viewed as one vector per sample, without a global pool (8 px -> 6x6)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(y.view(y.size(0), -1))


class PoolIndices(OneConv):
    def forward(self, x):
        y, _ = F.max_pool2d(self.conv(x), 2, return_indices=True)
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("module,message", [
    (PoolIndices(), "1 unsupported op: PoolIndices (forward): F.max_pool2d_with_indices is not "
                    "supported"),
    (Indexed(), "Indexed (forward): indexing a tensor is not supported (only the pieces of "
                "chunk / split on channels)"),
    (CatOnWidth(), "CatOnWidth (forward): torch.cat on dim 3 is not supported (only on "
                   "channels, dim 1)"),
    (Transposed(), "Transposed (forward): a transpose is supported only in a channel shuffle "
                   "(view, transpose(1, 2), view)"),
    (Reshaped(), "Reshaped (forward): a view of a feature map is supported only as a channel "
                 "shuffle (view, transpose(1, 2), view) or a flatten after the global pool"),
    (FlattenedMap(), "FlattenedMap (forward): a view of a feature map is supported only as a "
                     "channel shuffle (view, transpose(1, 2), view) or a flatten after the "
                     "global pool"),
])
def test_a_tensor_op_that_is_not_a_channel_cat_split_or_shuffle_is_one_line(module, message):
    with pytest.raises(FrontendError) as e:
        program_from_module(module, 8)
    assert str(e.value) == message


class Pools(nn.Module):
    """GoogLeNet's ceil_mode max-pools (one with a partial last window), Inception's local
    average pools (padding counted or not, a floor that leaves a row out), each fine-tuned."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3)                                 # 15 -> 13
        self.ceil = nn.MaxPool2d(3, 2, ceil_mode=True)                 # 13 -> 6
        self.a = nn.Conv2d(6, 6, 3, padding=1)
        self.avg = nn.AvgPool2d(3, 1, 1, count_include_pad=False)      # 6 -> 6
        self.b = nn.Conv2d(6, 8, 1)
        self.avg2 = nn.AvgPool2d(2, 2)                                 # 6 -> 3
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.edge = nn.MaxPool2d(2, 2, ceil_mode=True)                 # 3 -> 2, one row
        self.avg3 = nn.AvgPool2d(3, 2, 1)                              # 2 -> 1, pads counted
        self.d = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.ceil(F.relu(self.stem(x)))
        x = self.avg(F.relu(self.a(x)))
        x = self.avg2(self.b(x))
        x = self.avg3(self.edge(F.relu(self.c(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.d(x), 1), 1))


class FunctionalPools(Pools):
    """The same pools as F.max_pool2d / F.avg_pool2d calls (positional and keyword)."""

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2, ceil_mode=True)
        x = F.avg_pool2d(F.relu(self.a(x)), 3, 1, 1, count_include_pad=False)
        x = F.avg_pool2d(self.b(x), 2)
        x = F.avg_pool2d(F.max_pool2d(F.relu(self.c(x)), kernel_size=2, stride=2,
                                      ceil_mode=True), 3, 2, 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.d(x), 1), 1))


@pytest.mark.parametrize("method,eps", [("vanilla", None), ("hosvd", 1.0)])
@pytest.mark.parametrize("n_convs", [2, 5])
@pytest.mark.parametrize("pools", [Pools, FunctionalPools])
def test_ceil_mode_and_local_average_pools_train_with_autograds_gradients(tmp_path, method,
                                                                          eps, n_convs, pools):
    torch.manual_seed(2)
    net = pools()
    program, _ = program_from_module(net, 15)
    assert [program.shapes[op.output] for op in program.ops
            if op.kind in ("maxpool", "avgpool")] == \
        [(6, 6, 6), (6, 6, 6), (8, 3, 3), (8, 2, 2), (8, 1, 1)]
    assert_trains_like_autograd(net, tmp_path / "art", 15, n_convs, method, eps, seed=3)


class DroppedWindow(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pool = nn.MaxPool2d(2, 2, padding=1, ceil_mode=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.pool(self.conv(x)).mean((2, 3)))


def test_a_ceil_mode_pool_whose_last_window_torch_drops_is_refused_in_one_line():
    """At 7 px the conv gives 5, and the pool's fourth window would start at 6, in the
    padding; at 6 px (4 -> 3) every window starts inside."""
    program_from_module(DroppedWindow(), 6)
    with pytest.raises(FrontendError) as e:
        program_from_module(DroppedWindow(), 7)
    assert str(e.value) == ("pool: MaxPool2d with ceil_mode whose last window would start in "
                            "the padding (torch drops it, onnxruntime does not) is not "
                            "supported at this input size")


class TwoProblems(nn.Module):
    """Two blockers found while lowering (after the op-name check), and ops that would fail
    only because their input did (the index of the cat, the adds): the two, at once."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
        self.other = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.other(x)
        z = torch.cat([y, y], 2)
        return self.fc((self.conv(x) + y + z[:, :, :8]).mean((2, 3)))


def test_every_blocker_found_while_lowering_is_named_at_once():
    with pytest.raises(FrontendError) as e:
        program_from_module(TwoProblems(), 8)
    assert str(e.value) == ("2 problems: TwoProblems (forward): torch.cat on dim 2 is not "
                            "supported (only on channels, dim 1); conv: padding_mode='reflect' "
                            "is not supported (zeros only)")


class LinearSqueeze(nn.Module):
    """Squeeze-excitation written with Linears: a mean and a view back to (C, 1, 1), then a
    pool, a flatten and a reshape."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.se1 = nn.Sequential(nn.Linear(8, 2), nn.ReLU(), nn.Linear(2, 8), nn.Sigmoid())
        self.conv2 = nn.Conv2d(8, 6, 3)
        self.se2 = nn.Sequential(nn.Linear(6, 3), nn.SiLU(), nn.Linear(3, 6), nn.Hardsigmoid())
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = F.relu(self.conv1(x))
        y = y * self.se1(y.mean((2, 3))).view(y.size(0), 8, 1, 1)
        y = F.relu(self.conv2(y))
        gate = self.se2(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))
        return self.fc((y * gate.reshape(-1, 6, 1, 1)).mean((2, 3)))


# 1: the squeeze-excitations' Linears come before the fine-tuned conv: frozen; 2: trained
@pytest.mark.parametrize("n_convs,trained", [
    (1, ["conv2", "se2.0", "se2.2", "fc"]),
    (2, ["conv1", "se1.0", "se1.2", "conv2", "se2.0", "se2.2", "fc"])])
@pytest.mark.parametrize("method,eps", [("vanilla", None), ("hosvd", 1.0)])
def test_a_squeeze_excitation_of_linears_trains_with_autograds_gradients(tmp_path, n_convs,
                                                                        trained, method, eps):
    """Its Linears train with the convs they follow; the plan is what the runner holds."""
    from actcomp_edge.core.memory import plan
    from actcomp_edge.core.program import network_of
    torch.manual_seed(4)
    net = LinearSqueeze()
    program, _ = program_from_module(net, 10)
    assert [op.kind for op in program.ops if op.kind in ("mean", "reshape", "gap")] == \
        ["mean", "reshape", "reshape", "mean", "reshape", "reshape", "gap"]
    manifest = export_module(net, tmp_path / "art",
                             TrainConfig(n_layers=n_convs, method=method, eps=eps, momentum=0.0),
                             ModuleOptions(input_size=10, batch_size=3))
    trainer = Trainer(tmp_path / "art")
    rng = np.random.default_rng(6)
    images = rng.standard_normal((3, 3, 10, 10)).astype(np.float32)
    labels = rng.integers(0, 3, 3).astype(np.int64)
    net.eval()
    with torch.no_grad():
        assert rel_max_error(trainer.evaluate(images), net(torch.from_numpy(images)).numpy()) < TOL
    loss, grads, _ = torch_sgd_step(net, n_convs, images, labels, 0.1, modules=trained)
    assert sorted(manifest.trainable_params) == sorted(grads)
    result = trainer.step(images, labels, lr=0.1)
    assert abs(result.loss - loss) < TOL * abs(loss)
    for name, grad in grads.items():
        assert rel_max_error(result.grads[name], grad) < TOL, name
    fwd = trainer.forward(images, labels)
    predicted = plan(network_of(program), n_convs, method, 3, 10, eps=eps)
    if method != "vanilla":
        assert {layer.name: layer.full_bytes - layer.paper_bytes for layer in predicted.layers} \
            == {name: fwd.kept_full_per_layer[name] - fwd.kept_bytes.get(name, 0)
                for name in fwd.kept_full_per_layer}
