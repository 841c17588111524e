"""Weight files: .npz, .pth (tensors only) and .safetensors give the same artifact; what
cannot be read or must not be unpickled is one line; torchvision's MobileNetV2 loads."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from device_runner.runtime import Trainer
from export import zoo
from export.weight_files import WeightsError, read_weight_file
from helpers import actcomp, assert_one_line_error, rel_max_error


def export_args(weights, out, model="mcunet-in1", classes="10", layers="2", size="64"):
    return ["export", "--model", model, "--weights", str(weights), "--num-classes", classes,
            "--layers", layers, "--method", "vanilla", "--batch-size", "2", "--input-size", size,
            "-o", str(out)]


def test_npz_pth_and_safetensors_give_byte_identical_artifacts(tmp_path):
    torch.manual_seed(0)
    spec = zoo.load_spec("mcunet-in1", 10)
    model = zoo.build_model(spec)
    arrays = zoo.model_arrays(model, spec)
    tensors = {n: torch.from_numpy(a) for n, a in arrays.items()}
    np.savez(tmp_path / "w.npz", **arrays)
    torch.save(tensors, tmp_path / "w.pth")
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, tmp_path / "wrapped.pt")
    save_file(tensors, str(tmp_path / "w.safetensors"))
    files = {}
    for name in ("w.npz", "w.pth", "wrapped.pt", "w.safetensors"):
        out = tmp_path / f"art-{name}"
        proc = actcomp(*export_args(tmp_path / name, out))
        assert proc.returncode == 0, proc.stderr
        files[name] = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}
    reference = files.pop("w.npz")
    assert "weights.npz" in reference and "forward_1.onnx" in reference
    for name, got in files.items():
        assert got == reference, name


class Opaque:
    """An object whose unpickling would need this module's code."""


def test_a_pickle_that_needs_code_is_refused(tmp_path):
    torch.save({"w": torch.zeros(2), "extra": Opaque()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="would run code"):
        read_weight_file(tmp_path / "evil.pth")
    proc = actcomp(*export_args(tmp_path / "evil.pth", tmp_path / "out"))
    assert len(assert_one_line_error(proc, "would run code")) < 400
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,content,message", [
    ("notes.pth", b"hello, not a checkpoint\n" * 50, "not a torch file"),
    ("notes.safetensors", b"\x00" * 64, "not a .safetensors file"),
    ("notes.npz", b"text", "not an .npz"),
    ("notes.txt", b"text", "unknown format '.txt'"),
])
def test_unreadable_weights_are_one_short_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    proc = actcomp(*export_args(tmp_path / name, tmp_path / "out"))
    assert len(assert_one_line_error(proc, message)) < 400
    assert not (tmp_path / "out").exists()


def test_a_state_dict_that_is_not_tensors_is_refused(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="holds a list, not a state_dict"):
        read_weight_file(tmp_path / "list.pth")


def test_a_name_mismatch_is_a_short_list_with_a_hint(tmp_path):
    np.savez(tmp_path / "w.npz", **{"backbone.conv0.weight": np.zeros((16, 3, 3, 3), np.float32)})
    proc = actcomp(*export_args(tmp_path / "w.npz", tmp_path / "out"))
    assert len(assert_one_line_error(proc, "missing stem.weight")) < 400
    assert "(+" in proc.stderr and "README" in proc.stderr


# torchvision's MobileNetV2, written from its published module structure (torchvision is
# not importable beside this torch): Conv2dNormActivation = Sequential(conv, bn, ReLU6)
class ConvBNReLU(nn.Sequential):
    def __init__(self, cin, cout, kernel=3, stride=1, groups=1):
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups,
                                   bias=False), nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = round(cin * expand)
        self.use_res_connect = stride == 1 and cin == cout
        layers = [] if expand == 1 else [ConvBNReLU(cin, hidden, 1)]
        layers += [ConvBNReLU(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class TorchvisionMobileNetV2(nn.Module):
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1)]  # expand t, channels c, repeats n, stride s

    def __init__(self, num_classes=1000):
        super().__init__()
        features, cin = [ConvBNReLU(3, 32, stride=2)], 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        features.append(ConvBNReLU(cin, 1280, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def test_a_torchvision_mobilenet_v2_state_dict_loads_and_gives_its_logits(tmp_path):
    torch.manual_seed(1)
    net = TorchvisionMobileNetV2(num_classes=10)
    with torch.no_grad():  # BN statistics and affines that are not the identity
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    net.eval()
    torch.save(net.state_dict(), tmp_path / "mbv2.pth")
    out = tmp_path / "art"
    proc = actcomp(*export_args(tmp_path / "mbv2.pth", out, model="mobilenet_v2", layers="3",
                                size="96"))
    assert proc.returncode == 0, proc.stderr
    assert "torchvision MobileNetV2 names mapped" in proc.stdout
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        want = net(x).numpy()
    got = Trainer(out).evaluate(x.numpy())
    assert rel_max_error(got, want) < 1e-4


def test_a_torchvision_resnet18_state_dict_loads_as_it_is(tmp_path):
    """The built-in ResNet is torchvision's module layout: its state_dict, saved as a .pth as
    torchvision's would be, exports and gives the module's logits."""
    torch.manual_seed(2)
    spec = zoo.load_spec("resnet18", 10)
    net = zoo.build_model(spec).eval()
    state = net.state_dict()
    assert "layer1.0.conv1.weight" in state and "fc.weight" in state  # torchvision's names
    torch.save(state, tmp_path / "resnet18.pth")
    out = tmp_path / "art"
    proc = actcomp(*export_args(tmp_path / "resnet18.pth", out, model="resnet18", layers="3",
                                size="64"))
    assert proc.returncode == 0, proc.stderr
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = net(x).numpy()
    got = Trainer(out).evaluate(x.numpy())
    assert rel_max_error(got, want) < 1e-4
