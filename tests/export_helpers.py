"""Shared by the exporter tests: a zoo model with non-trivial frozen BN, exported, and the torch
reference of one training step on the same batch."""
import numpy as np
import torch
import torch.nn.functional as F

from device_runner.runtime import Trainer
from export import zoo
from export.artifact import export_artifact
from export.reference import compress_last_n


def random_model(name, num_classes, seed=0, calibration_hw=(96, 96)):
    """Zoo model with random weights, random BN affine and BN statistics calibrated on
    random images (so activations neither vanish nor explode), in eval mode."""
    torch.manual_seed(seed)
    spec = zoo.load_spec(name, num_classes)
    model = zoo.build_model(spec)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.2, 0.2, generator=gen)
                m.momentum = None  # cumulative average over the calibration batches
            elif isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 0.1, generator=gen)
        model.train()
        for i in range(2):
            model(torch.from_numpy(batch(8, calibration_hw, 2, seed=100 + i)[0]))
    return spec, model.eval()


def images(size, hw, rng):
    """Smooth random images (16-pixel blobs plus noise), normalised scale."""
    low = rng.standard_normal((size, 3, hw[0] // 16 + 1, hw[1] // 16 + 1)) * 1.5
    x = np.kron(low, np.ones((1, 1, 16, 16)))[:, :, :hw[0], :hw[1]]
    return (x + 0.3 * rng.standard_normal(x.shape)).astype(np.float32)


def batch(size, hw, num_classes, seed=0):
    rng = np.random.default_rng(seed)
    return images(size, hw, rng), rng.integers(0, num_classes, size).astype(np.int64)


def export(model, spec, tmp_path, config, batch_size, hw):
    out = tmp_path / f"art-{config.method}-{config.n_layers}"
    export_artifact(spec, zoo.model_arrays(model, spec), out, config, batch_size, hw, force=True)
    return Trainer(out)


def torch_step(model, n_layers, images, labels, method="vanilla", eps=None, ranks=None,
               label_smoothing=0.0, conv_inputs=None):
    """One reference forward/backward (gradients land in .grad): returns loss, logits and the
    names of the fine-tuned convs.

    conv_inputs: optional list of the artifact's inputs of the fine-tuned convs. Each conv
    then sees exactly that value (x + (given - x).detach(): same value, same gradient path),
    so both sides decompose the same tensor and take the same ReLU masks; the relative
    difference of torch's own value is appended to ``model.input_rel_diff``."""
    replaced = compress_last_n(model, n_layers, method, eps=eps, ranks=ranks)
    model.input_rel_diff = []
    if conv_inputs is not None:
        modules = dict(model.named_modules())
        for name, given in zip(replaced, conv_inputs):
            def substitute(mod, args, given=torch.from_numpy(given)):
                x = args[0]
                model.input_rel_diff.append(float((x.detach() - given).norm() / given.norm()))
                return (x + (given - x).detach(),)
            modules[name].register_forward_pre_hook(substitute)
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
