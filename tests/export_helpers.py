"""Shared by the exporter tests: a zoo model with non-trivial frozen BN, exported, and the torch
reference of one training step on the same batch (of a zoo model, or of any nn.Module)."""
import numpy as np
import torch
import torch.nn.functional as F

from device_runner.runtime import Trainer
from export import zoo
from export.artifact import export_artifact
from export.reference import compress_last_n
from helpers import rel_l2_error, rel_max_error

TOL = 1e-4  # the runner against torch: relative error of losses, gradients and weights


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


def export(model, spec, tmp_path, config, batch_size, hw, kernels="auto"):
    out = tmp_path / f"art-{config.method}-{config.n_layers}"
    export_artifact(spec, zoo.model_arrays(model, spec), out, config, batch_size, hw, force=True)
    return Trainer(out, kernels=kernels)


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
                model.input_rel_diff.append(rel_l2_error(x, given))
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


def torch_sgd_step(net, n_convs, images, labels, lr, modules=None):
    """torch.autograd gradients and one torch.optim.SGD step of the last n convs (in
    definition order) + every Linear (the head), or of these modules, BN frozen (eval),
    dropout off."""
    convs = [name for name, m in net.named_modules()
             if isinstance(m, torch.nn.Conv2d)][-n_convs:]
    head = [name for name, m in net.named_modules() if isinstance(m, torch.nn.Linear)]
    trainable = {f"{m}.{p}" for m in modules or convs + head for p in ("weight", "bias")}
    params = {k: p for k, p in net.named_parameters() if k in trainable}
    for k, p in net.named_parameters():
        p.requires_grad_(k in trainable)
    net.eval()
    loss = F.cross_entropy(net(torch.from_numpy(images)), torch.from_numpy(labels))
    loss.backward()
    grads = {k: p.grad.detach().numpy().copy() for k, p in params.items()}
    torch.optim.SGD(params.values(), lr=lr).step()
    return float(loss.detach()), grads, {k: p.detach().numpy().copy() for k, p in params.items()}


def assert_update_is_sgds(trainer, net, n_convs, images, labels):
    """One runner step trains exactly the last n_convs and the head, with torch.autograd's
    loss and gradients and torch.optim.SGD's new params (lr 0.1)."""
    loss, grads, after = torch_sgd_step(net, n_convs, images, labels, lr=0.1)
    result = trainer.step(images, labels, lr=0.1)
    assert sorted(result.grads) == sorted(grads) == sorted(trainer.manifest.trainable_params)
    assert abs(result.loss - loss) < TOL * abs(loss)
    for name, grad in grads.items():
        assert rel_max_error(result.grads[name], grad) < TOL, name
        assert rel_max_error(trainer.params[name], after[name]) < TOL, name


def assert_step_is_autograds(trainer, net, n_convs, images, labels):
    """The runner's loss and gradients of one step equal torch.autograd's."""
    loss, grads, _ = torch_sgd_step(net, n_convs, images, labels, lr=0.1)
    result = trainer.step(images, labels, lr=0.1)
    assert abs(result.loss - loss) < TOL * abs(loss)
    for name, grad in grads.items():
        assert rel_max_error(result.grads[name], grad) < TOL, name
