"""Shared by the exporter tests: a zoo model with non-trivial frozen BN, exported, and the torch
reference of one training step on the same batch."""
import numpy as np
import torch
import torch.nn.functional as F

from device_runner.runtime import Trainer
from export import zoo
from export.artifact import export_artifact
from export.reference import compress_last_n
from export.training_graph import TrainConfig


def random_model(name, num_classes, seed=0):
    """Zoo model with random weights and random (frozen) BN statistics, in eval mode."""
    torch.manual_seed(seed)
    spec = zoo.load_spec(name, num_classes)
    model = zoo.build_model(spec)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.2, 0.2, generator=gen)
                m.running_mean.uniform_(-0.2, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
            elif isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 0.1, generator=gen)
    return spec, model.eval()


def model_arrays(model, spec, tmp_path):
    path = tmp_path / "weights.npz"
    zoo.save_weights(model, spec, path)
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def batch(size, hw, num_classes, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((size, 3) + tuple(hw)).astype(np.float32)
    labels = rng.integers(0, num_classes, size).astype(np.int64)
    return images, labels


def export(model, spec, tmp_path, config, batch_size, hw):
    out = tmp_path / f"art-{config.method}-{config.n_layers}"
    export_artifact(spec, model_arrays(model, spec, tmp_path), out, config, batch_size, hw)
    return Trainer(out)


def torch_step(model, n_layers, images, labels, method="vanilla", eps=None, ranks=None,
               label_smoothing=0.0):
    """Reference gradients {npz-style param name: grad} and the trainable modules' names."""
    replaced = compress_last_n(model, n_layers, method, eps=eps, ranks=ranks)
    model.train()  # BN stays frozen (compress_last_n); dropout must not act: set it off
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    logits = model(torch.from_numpy(images))
    loss = F.cross_entropy(logits, torch.from_numpy(labels), label_smoothing=label_smoothing)
    loss.backward()
    return float(loss.detach()), logits.detach().numpy(), replaced


def npz_name(module_name, param):
    """state_dict name -> npz/artifact name (ConvUnit 'X.conv.weight' -> 'X.weight')."""
    full = f"{module_name}.{param}"
    return full.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias")


def trainable_grads(model):
    return {npz_name(*name.rsplit(".", 1)): p.grad.numpy().copy()
            for name, p in model.named_parameters() if p.requires_grad}


def rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
