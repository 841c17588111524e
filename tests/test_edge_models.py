"""MobileNetV3-Small, EfficientNet-B0, RegNetY and ShuffleNetV2 as a user writes them (tests/edge_models.py):
each exports with its last 4 convs and with all of them, and one runner step equals
torch.autograd's gradients and SGD's update; the plan sizes what the runner holds."""
import numpy as np
import pytest
import torch

from device_runner.runtime import Trainer
from edge_models import CLASSES, MODELS, SIZE, MobileNetV3Small, model
from export.module_export import ModuleOptions, export_module
from export.torch_frontend import program_from_module
from export_helpers import TOL, assert_update_is_sgds, torch_sgd_step
from helpers import rel_max_error
from export.training_graph import TrainConfig

BATCH = 2


def n_convs(net) -> int:
    return sum(isinstance(m, torch.nn.Conv2d) for m in net.modules())


@pytest.mark.parametrize("method,eps", [("vanilla", None), ("hosvd", 1.0)])
@pytest.mark.parametrize("layers", ["4", "all"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_an_edge_cnn_trains_with_autograds_gradients_and_sgds_step(tmp_path, name, layers,
                                                                    method, eps):
    net = model(name)
    n = 4 if layers == "4" else n_convs(net)
    export_module(net, tmp_path / "art",
                  TrainConfig(n_layers=n, method=method, eps=eps, momentum=0.0),
                  ModuleOptions(input_size=SIZE, batch_size=BATCH))
    trainer = Trainer(tmp_path / "art")
    rng = np.random.default_rng(1)
    images = rng.standard_normal((BATCH, 3, SIZE, SIZE)).astype(np.float32)
    labels = rng.integers(0, CLASSES, BATCH).astype(np.int64)
    with torch.no_grad():
        assert rel_max_error(trainer.evaluate(images), net(torch.from_numpy(images)).numpy()) < TOL
    assert_update_is_sgds(trainer, net, n, images, labels)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_plan_of_an_edge_cnn_is_what_the_runner_holds(tmp_path, name):
    """Every conv fine-tuned, HOSVD at eps 1: the plan's full bytes per layer (and the head's)
    equal what the runner's forward hands the backward."""
    from actcomp_edge.core.memory import plan
    from actcomp_edge.core.program import network_of
    net = model(name)
    n = n_convs(net)
    export_module(net, tmp_path / "art",
                  TrainConfig(n_layers=n, method="hosvd", eps=1.0, momentum=0.0),
                  ModuleOptions(input_size=SIZE, batch_size=BATCH))
    trainer = Trainer(tmp_path / "art")
    images = np.random.default_rng(2).standard_normal((BATCH, 3, SIZE, SIZE)).astype(np.float32)
    fwd = trainer.forward(images, np.zeros(BATCH, np.int64))
    program, _ = program_from_module(net, SIZE)
    predicted = plan(network_of(program), n, "hosvd", BATCH, SIZE, eps=1.0)
    held = {layer.name: layer.full_bytes - layer.paper_bytes for layer in predicted.layers}
    assert held == {name: fwd.kept_full_per_layer[name] - fwd.kept_bytes.get(name, 0)
                    for name in held}


def test_num_classes_replaces_the_last_linear_of_a_head(tmp_path):
    from actcomp_edge.core.npz import load_npz
    net = model("mobilenet_v3_small")
    export_module(net, tmp_path / "art",
                  TrainConfig(n_layers=4, method="vanilla", eps=None, momentum=0.0),
                  ModuleOptions(input_size=SIZE, batch_size=BATCH, num_classes=4))
    weights = load_npz(tmp_path / "art" / "weights.npz")
    assert np.array_equal(weights["classifier.0.weight"], net.classifier[0].weight.detach().numpy())
    assert weights["classifier.3.weight"].shape == (4, net.classifier[3].in_features)
    trainer = Trainer(tmp_path / "art")
    images = np.zeros((BATCH, 3, SIZE, SIZE), np.float32)
    assert trainer.evaluate(images).shape == (BATCH, 4)


MODEL_FILE = '''
import sys
sys.path.insert(0, {tests!r})
from edge_models import MobileNetV3Small


def build():
    return MobileNetV3Small(num_classes=10)
'''


@pytest.mark.parametrize("layers", ["4", "all"])
def test_a_paper_mobilenet_v3_small_through_the_clis_updates_like_autograd(tmp_path, layers):
    """MobileNetV3-Small at full width, as a user brings it: `actcomp export --model FILE.py:
    build --weights W.pth`, then one step of `actcomp-device train` (constant lr, no clipping,
    no augmentation): every trained parameter's update is torch.autograd + SGD's."""
    import subprocess
    import sys
    from pathlib import Path

    from actcomp_edge.core.npz import load_npz
    tests = Path(__file__).resolve().parent
    torch.manual_seed(0)
    net = MobileNetV3Small(num_classes=10)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        net.train()(torch.randn(8, 3, 64, 64))
    net.eval()
    (tmp_path / "mbv3.py").write_text(MODEL_FILE.format(tests=str(tests)))
    torch.save(net.state_dict(), tmp_path / "mbv3.pth")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 4)
    np.savez(tmp_path / "data.npz", images=pixels, labels=labels)
    n = 4 if layers == "4" else n_convs(net)
    bin_dir = Path(sys.executable).parent
    for command in ([bin_dir / "actcomp", "export", "--model", f"{tmp_path / 'mbv3.py'}:build",
                     "--weights", tmp_path / "mbv3.pth", "--input-size", "64", "--batch-size",
                     "4", "--layers", str(n), "--method", "vanilla", "-o", tmp_path / "art"],
                    [bin_dir / "actcomp-device", "train", tmp_path / "art", "--data",
                     tmp_path / "data.npz", "--val-data", tmp_path / "data.npz",
                     "--max-steps", "1", "--lr", "0.1", "--schedule", "constant",
                     "--clip-grad-norm", "0", "--no-augment", "--threads", "1",
                     "--out", tmp_path / "run"]):
        done = subprocess.run([str(c) for c in command], capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    images = (pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255 - 0.5) / 0.5
    _, _, after = torch_sgd_step(net, n, images, labels.astype(np.int64), lr=0.1)
    before = load_npz(tmp_path / "art" / "weights.npz")
    trained = load_npz(tmp_path / "run" / "weights.npz")
    assert {k for k in trained if not np.array_equal(trained[k], before[k])} == set(after)
    for key, want in after.items():
        assert rel_max_error(trained[key] - before[key], want - before[key]) < 1e-3, key
