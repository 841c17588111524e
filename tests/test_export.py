"""The exported training step against torch.autograd and the PyTorch reference."""
import copy
import json
import platform
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from actcomp_edge.core.manifest import ArtifactError, load_manifest, manifest_bytes
from device_runner.runtime import KERNELS, Trainer, nchwc_works
from export.memory_plan import concrete, tensor_bytes
from export.training_graph import TrainConfig
from export_helpers import TOL, batch, export, random_model, torch_step, trainable_grads
from helpers import actcomp, assert_error_among_progress, assert_one_line_error, rel_l2_error


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split()[2:]}
    except OSError:
        return set()


# MLAS has NCHWc kernels on x86-64 with AVX2 (blocks of 8) or AVX-512 (16)
HAS_NCHWC_KERNELS = platform.machine() in ("x86_64", "AMD64") and "avx2" in cpu_flags()


def check_step(name, n_layers, method, tmp_path, eps=None, batch_size=3, hw=(96, 96),
               num_classes=10, config_kwargs=None, seed=0, kernels="auto"):
    spec, model = random_model(name, num_classes, seed)
    config = TrainConfig(n_layers=n_layers, method=method, eps=eps, **(config_kwargs or {}))
    trainer = export(model, spec, tmp_path, config, batch_size, hw, kernels)
    images, labels = batch(batch_size, hw, num_classes, seed)
    ref = copy.deepcopy(model)
    # Float32 rounding differs between onnxruntime (BN folded into the frozen prefix) and
    # torch by ~1e-5 after 40 layers. A ReLU mask or a truncated decomposition can amplify
    # that (a subspace moves by rounding / singular-value gap), so the reference runs its
    # fine-tuned part on the artifact's own conv inputs; how close torch's were is checked.
    conv_inputs = []
    own_compress = trainer.compress

    def recording(layer, x):
        conv_inputs.append(x.copy())
        return own_compress(layer, x)
    trainer.compress = recording
    result = trainer.step(images, labels, lr=0.05)
    ref_method = "hosvd" if method == "asi" else method  # asi's first step: the exact HOSVD
    loss, logits, replaced = torch_step(ref, n_layers, images, labels, ref_method, eps=eps,
                                        label_smoothing=config.label_smoothing,
                                        conv_inputs=conv_inputs)
    assert len(ref.input_rel_diff) == n_layers and max(ref.input_rel_diff) < TOL
    grads = trainable_grads(ref)
    assert sorted(grads) == sorted(result.grads) == sorted(trainer.manifest.trainable_params)
    assert abs(result.loss - loss) <= TOL * abs(loss)
    np.testing.assert_allclose(result.logits, logits, rtol=1e-4, atol=1e-4)
    for key in grads:
        assert rel_l2_error(result.grads[key], grads[key]) < TOL, key
    if method in ("hosvd", "asi", "svd"):
        modules = dict(ref.named_modules())
        for layer, conv_name in zip(trainer.manifest.trainable_layers, replaced):
            assert result.ranks[layer.name] == tuple(modules[conv_name].last_ranks)
    return trainer, ref, result


@pytest.mark.parametrize("name", ["mobilenet_v2", "mcunet-in1", "resnet18"])
@pytest.mark.parametrize("n_layers", [2, 4])
def test_vanilla_gradients_and_sgd_step_equal_autograd(name, n_layers, tmp_path):
    wd, momentum, lr = 1e-3, 0.9, 0.05
    trainer, ref, _ = check_step(name, n_layers, "vanilla", tmp_path,
                                 config_kwargs=dict(momentum=momentum, weight_decay=wd))
    params = [p for p in ref.parameters() if p.requires_grad]
    torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd).step()
    named = {k: v for k, v in zip(sorted(trainable_grads(ref)), [None] * len(params))}
    after = {}
    for mod_name, p in ref.named_parameters():
        if p.requires_grad:
            after[mod_name.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias")] = p
    assert sorted(after) == sorted(named)
    for key, p in after.items():
        assert rel_l2_error(trainer.params[key], p.detach().numpy()) < TOL, key


@pytest.mark.parametrize("name,n_layers,hw", [("mcunet-in1", 12, (128, 128)),  # dw 7x7 stride 2
                                              ("resnet18", 5, (96, 96))])      # 3x3 s2, 1x1 s2
@pytest.mark.parametrize("kernels", KERNELS)
def test_stride_two_and_depthwise_layers(name, n_layers, hw, kernels, tmp_path):
    """Both kernel sets where the machine has NCHWc kernels (x86-64), the portable one else."""
    trainer, _, _ = check_step(name, n_layers, "vanilla", tmp_path, hw=hw, kernels=kernels)
    nchwc = trainer.manifest.graphs.nchwc
    assert bool(nchwc) == (name == "mcunet-in1")  # its depthwise convs of 16k channels
    if kernels == "portable" or not nchwc:
        assert trainer.kernels == "portable"
    else:
        assert trainer.kernels == ("nchwc" if HAS_NCHWC_KERNELS else trainer.kernels)
    layers = trainer.manifest.trainable_layers
    assert any(layer.stride == 2 for layer in layers)
    if name == "mcunet-in1":
        assert any(layer.extra["groups"] > 1 and layer.stride == 2 for layer in layers)


# backward forms of a fine-tuned conv (methods.hosvd_weight_grad), by a node each makes
HOSVD_FORMS = {"pointwise U3 (x) U4": "/U3_kron_U4", "pointwise U4 then U3": "/dY_x_U4_T",
               "grouped rows": "/x_rows", "K2 channels": "/lowrank/"}


@pytest.mark.parametrize("name,n_layers,hw", [("mcunet-in1", 4, (128, 128)),
                                              ("mcunet-in1", 12, (128, 128)),
                                              ("mcunet-in1", 33, (128, 128)),
                                              ("mobilenet_v2", 4, (96, 96)),
                                              ("resnet18", 5, (96, 96))])
@pytest.mark.parametrize("eps", [0.8, 0.95])
def test_hosvd_gradients_equal_reference(name, n_layers, hw, eps, tmp_path):
    trainer, _, result = check_step(name, n_layers, "hosvd", tmp_path, eps=eps, hw=hw,
                                    batch_size=7)
    if n_layers == 33:  # 4x4 to 32x32 maps: every form of the low-rank weight gradient
        nodes = {node.name for path in tmp_path.rglob("backward_*.onnx")
                 for node in onnx.load(str(path)).graph.node}
        assert {form for form, mark in HOSVD_FORMS.items()
                if any(mark in node for node in nodes)} == set(HOSVD_FORMS)
    # the comparison must cover real truncations: ranks above 1, channel rank below full
    for layer in trainer.manifest.trainable_layers:
        ranks = result.ranks[layer.name]
        assert max(ranks) > 1 and ranks[1] < layer.input_shape[0]


@pytest.mark.parametrize("method", ["vanilla", "svd"])
def test_an_rgb_stem_takes_the_column_form_of_its_weight_gradient(method, tmp_path):
    """Every conv of mcunet-in1 fine-tuned: the stem (3 channels, 3x3, stride 2) takes
    tap_weight_grad (a one-hot Conv makes x's columns), vanilla with the batch for N, svd
    with its k rows."""
    check_step("mcunet-in1", 42, method, tmp_path, eps=0.9 if method == "svd" else None,
               hw=(48, 48), batch_size=3)
    graphs = [onnx.load(str(path)) for path in tmp_path.rglob("backward_*.onnx")]
    for graph in graphs:
        onnx.checker.check_model(graph, full_check=True)
    assert any(node.name.startswith("stem/backward/columns")
               for graph in graphs for node in graph.graph.node)


@pytest.mark.parametrize("method", ["svd", "gf-r2"])
def test_svd_and_gradient_filter_equal_reference(method, tmp_path):
    check_step("mcunet-in1", 12, method, tmp_path, eps=0.9 if method == "svd" else None,
               hw=(128, 128), batch_size=5)


@pytest.mark.parametrize("optimizer,kwargs", [
    ("adamw", dict(weight_decay=0.05)),
    ("sgd", dict(momentum=0.9, weight_decay=1e-3)),
    ("sgd", dict(momentum=0.0, weight_decay=0.0))])
def test_optimizer_updates_equal_torch(optimizer, kwargs, tmp_path):
    """Three steps of the update baked into the backward graph against torch.optim fed the
    artifact's own gradients (the gradients themselves are checked above)."""
    lr = 0.01
    spec, model = random_model("mcunet-in1", 10)
    config = TrainConfig(n_layers=3, method="vanilla", eps=None, optimizer=optimizer, **kwargs)
    trainer = export(model, spec, tmp_path, config, 4, (96, 96))
    params = {k: torch.from_numpy(v.copy()) for k, v in trainer.params.items()}
    if optimizer == "adamw":
        opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=kwargs["weight_decay"])
    else:
        opt = torch.optim.SGD(list(params.values()), lr=lr, **kwargs)
    for step in range(3):
        images, labels = batch(4, (96, 96), 10, seed=step)
        result = trainer.step(images, labels, lr=lr)
        for key, p in params.items():
            p.grad = torch.from_numpy(result.grads[key])
        opt.step()
        for key, p in params.items():
            # 1e-4 as elsewhere: Adam's first steps divide by |g| + eps, so where a gradient
            # is ~1e-8 float32 rounding in that division is amplified (seen: 3.7e-5)
            assert rel_l2_error(trainer.params[key], p.numpy()) < TOL, (step, key)


def test_asi_first_step_is_the_exact_hosvd_then_ranks_stay_and_training_converges(tmp_path):
    trainer, _, first = check_step("mcunet-in1", 4, "asi", tmp_path, eps=0.9,
                                   hw=(128, 128), batch_size=8)
    images, labels = batch(8, (128, 128), 10, seed=0)
    losses, ranks = [], []
    for _ in range(12):  # overfit one batch: subspace steps from the first step's ranks
        result = trainer.step(images, labels, lr=0.002)
        losses.append(result.loss)
        ranks.append(result.ranks)
    assert losses[-1] < 0.2 * losses[0]
    assert all(r == first.ranks for r in ranks)


@pytest.mark.parametrize("name", ["mcunet-in1", "resnet18"])
def test_asi_at_full_rank_equals_vanilla_after_the_first_step(name, tmp_path):
    """Full ranks keep A exactly, so every subspace step's gradients are vanilla's (which
    equal torch.autograd: test_vanilla_gradients_and_sgd_step_equal_autograd)."""
    spec, model = random_model(name, 10)
    vanilla = export(model, spec, tmp_path, TrainConfig(n_layers=4, method="vanilla",
                                                        eps=None), 6, (64, 64))
    asi = export(model, spec, tmp_path, TrainConfig(n_layers=4, method="asi", eps=None,
                                                    ranks=(10 ** 6,) * 4), 6, (64, 64))
    for seed in range(3):  # the first step is the HOSVD, the others subspace steps
        images, labels = batch(6, (64, 64), 10, seed)
        want, got = vanilla.step(images, labels, lr=0.0), asi.step(images, labels, lr=0.0)
        assert got.ranks != {} and all(k[0] == 6 for k in got.ranks.values())
        for key in want.grads:
            assert rel_l2_error(got.grads[key], want.grads[key]) < TOL, (seed, key)


def test_label_smoothing(tmp_path):
    check_step("mcunet-in1", 2, "vanilla", tmp_path, config_kwargs=dict(label_smoothing=0.1))


@pytest.mark.parametrize("batch_size,hw,num_classes", [
    (1, (96, 96), 2), (3, (128, 128), 37), (7, (160, 160), 2), (3, (224, 224), 10),
    (3, (160, 128), 37)])
def test_odd_shapes(batch_size, hw, num_classes, tmp_path):
    check_step("mcunet-in1", 4, "hosvd", tmp_path, eps=0.9, batch_size=batch_size, hw=hw,
               num_classes=num_classes)


def test_evaluate_and_inference_graphs_give_the_model_logits(tmp_path):
    import onnxruntime as ort
    spec, model = random_model("mcunet-in1", 10)
    trainer = export(model, spec, tmp_path, TrainConfig(n_layers=4, method="hosvd", eps=0.8),
                     4, (96, 96))
    images, _ = batch(4, (96, 96), 10)
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(trainer.evaluate(images), expected, rtol=1e-4, atol=1e-4)
    session = ort.InferenceSession(str(trainer.folder / "inference.onnx"),
                                   providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"image": images})[0], expected,
                               rtol=1e-4, atol=1e-4)


def test_kept_between_forward_and_backward_is_only_the_compressed_form(tmp_path):
    """No backward partition takes a full activation of a fine-tuned conv: only kept pieces,
    bool masks, gradients and the classifier input; each partition takes exactly one conv's
    kept pieces; what the device holds matches the ranks."""
    import onnxruntime as ort
    spec, model = random_model("mcunet-in1", 10)
    trainer = export(model, spec, tmp_path, TrainConfig(n_layers=4, method="hosvd", eps=0.8),
                     8, (128, 128))
    backward = trainer.manifest.graphs.backward
    assert backward == ["backward_4.onnx", "backward_3.onnx", "backward_2.onnx",
                        "backward_1.onnx", "update.onnx"]
    inputs, kept_by = {}, []
    for name in backward[:-1]:
        session = ort.InferenceSession(str(trainer.folder / name),
                                       providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        kept_by.append({n.split("/kept/")[0] for n in names if "/kept/" in n})
        inputs.update((i.name, i) for i in session.get_inputs())
    assert [len(k) for k in kept_by] == [1, 1, 1, 1]
    conv_inputs = {layer.input for layer in trainer.manifest.trainable_layers}
    assert not conv_inputs & set(inputs)
    for layer in trainer.manifest.trainable_layers:
        assert [n for n in inputs if n.startswith(layer.name + "/kept/")] == layer.kept
    masks = [i for n, i in inputs.items() if n.endswith("/mask_bool")]
    assert masks and all(i.type == "tensor(bool)" for i in masks)
    from actcomp_edge.core import names as tensor_names
    assert not [n for n in inputs if n.endswith("/mask_bits")]
    import onnx
    overview = onnx.load(str(trainer.folder / "overview.onnx"))
    decompositions = [n for n in overview.graph.node if n.domain == "ai.actcomp"]
    assert [n.op_type for n in decompositions] == ["HOSVD"] * 4
    assert [list(n.output) for n in decompositions] == [  # and the masks the runner makes
        layer.kept + ([tensor_names.mask_bool(layer.input)] if layer.input_mask else [])
        for layer in trainer.manifest.trainable_layers]
    assert sum(bool(layer.input_mask) for layer in trainer.manifest.trainable_layers) == 2
    images, labels = batch(8, (128, 128), 10)
    result = trainer.step(images, labels, lr=0.01)
    for layer in trainer.manifest.trainable_layers:
        k = result.ranks[layer.name]
        d = (8,) + tuple(layer.input_shape)
        assert result.kept_bytes[layer.name] == 4 * (np.prod(k) + sum(a * b for a, b in zip(d, k)))


def test_export_is_deterministic(tmp_path):
    spec, model = random_model("mcunet-in1", 10)
    config = TrainConfig(n_layers=4, method="hosvd", eps=0.8)
    a = export(model, spec, tmp_path / "a", config, 8, (96, 96)).folder
    b = export(model, spec, tmp_path / "b", config, 8, (96, 96)).folder
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_tampered_truncated_and_too_new_artifacts_are_refused(tmp_path):
    spec, model = random_model("mcunet-in1", 10)
    folder = export(model, spec, tmp_path, TrainConfig(n_layers=2, method="vanilla", eps=None),
                    2, (96, 96)).folder
    load_manifest(folder, "1.16.3")
    with pytest.raises(ArtifactError, match="too old"):
        load_manifest(folder, "1.15.1")
    data = bytearray((folder / "weights.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "weights.npz").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="weights.npz fails its SHA-256"):
        Trainer(folder)
    (folder / "backward_1.onnx").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_manifest(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format_version"] = 99
    (folder / "manifest.json").write_bytes(manifest_bytes(manifest))
    with pytest.raises(ArtifactError, match="newer"):
        load_manifest(folder)
    manifest["format_version"] = 3  # its graphs packed the masks: not runnable here
    (folder / "manifest.json").write_bytes(manifest_bytes(manifest))
    with pytest.raises(ArtifactError, match="version 3 is older than this runner runs"):
        load_manifest(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_manifest(folder)


def test_cli_export_writes_a_working_artifact(tmp_path):
    out = tmp_path / "art"
    proc = actcomp("export", "--model", "mcunet-in1", "--num-classes", "10", "--layers", "4",
                   "--method", "hosvd", "--eps", "0.8", "--batch-size", "4", "--input-size",
                   "96", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "randomly initialised" in proc.stderr
    assert "blocks.13.dw" in proc.stdout and "total" in proc.stdout
    manifest = load_manifest(out)
    assert manifest.train.eps == 0.8 and manifest.predicted_memory.full_bytes > 0
    images, labels = batch(4, (96, 96), 10)
    assert np.isfinite(Trainer(out).step(images, labels, 0.01).loss)


@pytest.mark.parametrize("argv,message", [
    (["--model", "nosuchnet", "--layers", "2", "--method", "vanilla"], "unknown model"),
    (["--model", "mcunet-in1", "--layers", "43", "--method", "vanilla"], "between 1 and 42"),
    (["--model", "mcunet-in1", "--layers", "2", "--eps", "1.5"], "eps must be in (0, 1]"),
    (["--model", "mcunet-in1", "--layers", "2", "--method", "hosvd"], "needs --eps"),
])
def test_cli_export_errors(argv, message, tmp_path):
    proc = actcomp("export", *argv, "-o", str(tmp_path / "x"))
    assert_error_among_progress(proc, message)
    assert len(proc.stderr.strip().splitlines()) <= 2  # maybe the random-init warning


@pytest.mark.parametrize("argv,message", [
    (["--method", "vanilla", "--momentum", "1.5"], "--momentum must be in [0, 1)"),
    (["--method", "vanilla", "--momentum", "1.0"], "--momentum must be in [0, 1)"),
    (["--method", "hosvd", "--ranks", "4", "4"], "hosvd takes 4 --ranks value(s)"),
    (["--method", "svd", "--ranks", "4", "4"], "svd takes 1 --ranks value(s)"),
    (["--method", "vanilla", "--ranks", "4"], "--ranks applies to the methods with ranks"),
    (["--method", "vanilla", "--eps", "0.8"], "--eps applies to the methods with ranks"),
    (["--method", "gf-r2", "--rank-cap", "2"], "--rank-cap applies to the methods with ranks"),
    (["--method", "hosvd", "--ranks", "2", "2", "2", "2", "--rank-cap", "1"],
     "give --ranks or --rank-cap, not both"),
    (["--method", "hosvd", "--eps", "0.8", "--rank-cap", "2", "3"], "1 or 4 --rank-cap"),
    (["--method", "vanilla", "--classes", "no-such-file.txt"], "--classes no-such-file.txt"),
    (["--method", "hosvd", "--activation-budget", "1MiB"], "the fixed ranks of --method asi"),
    (["--method", "asi", "--ranks", "2", "2", "1", "1", "--activation-budget", "1MiB"],
     "not both"),
    (["--method", "asi", "--activation-budget", "lots"], "--activation-budget"),
])
def test_cli_export_refuses_a_bad_recipe_before_writing(argv, message, tmp_path):
    """A recipe that would train uphill (the default lr is 0.05 (1 - momentum)) or fail after
    files are written is refused in one line, and -o is never created."""
    out = tmp_path / "x"
    proc = actcomp("export", "--model", "mcunet-in1", "--layers", "2", "--input-size", "32",
                   *argv, "-o", str(out))
    assert_one_line_error(proc, message)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_export_refuses_an_activation_budget_below_rank_one(tmp_path):
    """Rank 1 in every mode of the 2 fine-tuned convs (batch 32) is the smallest budget there
    is: below it the export stops in one line before writing."""
    out = tmp_path / "x"
    proc = actcomp("export", "--model", "mcunet-in1", "--layers", "2", "--input-size", "32",
                   "--method", "asi", "--activation-budget", "1KiB", "-o", str(out))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--activation-budget 0.000977 MiB is below rank 1" in proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_export_never_overwrites_a_run(tmp_path):
    """-o onto an artifact is refused (its files unchanged); --force replaces the artifact's
    files, keeps its run/ and anything else, and drops graphs the new export has no more."""
    out = tmp_path / "art"
    argv = ["--model", "mcunet-in1", "--input-size", "32", "--method", "vanilla", "-o", str(out)]
    assert actcomp("export", "--layers", "4", *argv[:4], "--method", "hosvd", "--eps", "0.8",
                   "-o", str(out)).returncode == 0
    (out / "run").mkdir()
    (out / "run" / "checkpoint.npz").write_bytes(b"the user's run")
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    old_files = set(load_manifest(out).files)

    proc = actcomp("export", "--layers", "2", *argv)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--force" in proc.stderr and "run/" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before

    proc = actcomp("export", "--layers", "2", "--force", *argv)
    assert proc.returncode == 0, proc.stderr
    assert (out / "run" / "checkpoint.npz").read_bytes() == b"the user's run"
    assert (out / "notes.txt").read_text() == "mine"
    manifest = load_manifest(out)  # every listed file is there with its digest
    assert len(manifest.trainable_layers) == 2
    stale = old_files - set(manifest.files)
    assert stale and not any((out / name).exists() for name in stale)
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no staging folder left

    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = actcomp("export", "--layers", "2", *argv[:-1], str(afile))
    assert proc.returncode == 2 and "existing file" in proc.stderr
    assert afile.read_text() == "x"
    proc = actcomp("export", "--layers", "2", *argv[:-1], "/proc/actcomp-art")
    assert_error_among_progress(proc)
    assert len(proc.stderr.strip().splitlines()) <= 2  # maybe the random-init warning


def test_runner_refuses_a_manifest_whose_momentum_trains_uphill(tmp_path):
    out = tmp_path / "art"
    assert actcomp("export", "--model", "mcunet-in1", "--layers", "2", "--input-size", "32",
                   "--method", "vanilla", "--momentum", "0.9", "-o", str(out)).returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["train"]["momentum"] = 1.5
    manifest.pop("digest", None)
    (out / "manifest.json").write_bytes(manifest_bytes(manifest))
    with pytest.raises(ArtifactError, match="train.momentum"):
        load_manifest(out)


def test_an_artifact_of_the_retired_hosvd_tracked_names_its_successor(tmp_path):
    out = tmp_path / "art"
    assert actcomp("export", "--model", "mcunet-in1", "--layers", "2", "--input-size", "32",
                   "--method", "asi", "--eps", "0.8", "-o", str(out)).returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["train"]["method"] = "hosvd-tracked"
    manifest.pop("digest", None)
    (out / "manifest.json").write_bytes(manifest_bytes(manifest))
    with pytest.raises(ArtifactError, match="asi replaced: export the model again"):
        load_manifest(out)


def test_cli_export_unsupported_layer_and_bad_weights(tmp_path):
    spec = json.loads(json.dumps(__import__("actcomp_edge.core.arch", fromlist=["x"]).load_spec(
        "mcunet-in1", 10)))
    spec["blocks"][3]["layers"][1]["type"] = "deform_conv"
    path = tmp_path / "user.json"
    path.write_text(json.dumps(spec))
    proc = actcomp("export", "--model", str(path), "--layers", "2", "--method", "vanilla",
                   "-o", str(tmp_path / "x"))
    assert proc.returncode == 2 and "blocks.3.dw" in proc.stderr and "deform_conv" in proc.stderr
    bad = tmp_path / "bad.npz"
    np.savez(bad, **{"stem.weight": np.zeros((1, 1, 1, 1), np.float32)})
    proc = actcomp("export", "--model", "mcunet-in1", "--weights", str(bad), "--layers", "2",
                   "--method", "vanilla", "-o", str(tmp_path / "y"))
    assert proc.returncode == 2 and "stem.weight" in proc.stderr and "Traceback" not in proc.stderr


def test_masks_are_held_as_packbits_of_the_forwards_bool_also_by_micro_batch(tmp_path):
    """A forward graph outputs each mask as bool, or the runner makes it from a fine-tuned
    conv's input (Layer.input_mask); the runner holds np.packbits of it (1 bit an element,
    also when C*H*W is not a multiple of 8), packed slice by slice when the run is sliced,
    and feeds the backward the same bool back."""
    from actcomp_edge.core import names
    from actcomp_edge.core.manifest import Run
    spec, model = random_model("mcunet-in1", 10, 0)
    trainer = export(model, spec, tmp_path, TrainConfig(n_layers=4, method="hosvd", eps=0.8),
                     3, (96, 96))
    images, labels = batch(3, (96, 96), 10)
    bits = {n: v for n, v in trainer.forward(images, labels).tensors.items()
            if names.is_mask_bits(n)}
    held = [m for layer in trainer.manifest.trainable_layers for m in layer.masks]
    assert held and sorted(held) == sorted(bits)
    checked = 0
    for position, item in enumerate(trainer.schedule):
        made_here = [n for n in trainer.io.get(getattr(item, "graph", None), ((), ()))[1]
                     if names.is_mask_bool(n)]
        if not made_here:
            continue
        before = trainer.forward(images, labels, decompose=False, until=position).tensors
        inputs, outputs = trainer.io[item.graph]
        feeds = {n: trainer._feed(n, before) for n in inputs}
        made = dict(zip(outputs, trainer.sessions[item.graph].run(None, {
            n: trainer.unpack_mask(n, v) if names.is_mask_bool(n) else v
            for n, v in feeds.items()})))
        for n in made_here:
            mask = made[n]
            assert mask.dtype == np.bool_ and mask.shape[0] == 3
            np.testing.assert_array_equal(bits[names.stored(n)],
                                          np.packbits(mask.reshape(3, -1), axis=1))
            np.testing.assert_array_equal(  # what the backward reads
                trainer.unpack_mask(n, bits[names.stored(n)]), mask)
            checked += 1
    made_by_runner = 0  # the masks of fine-tuned convs' inputs: packed from the input
    inputs = {}
    trainer.forward(images, labels, decompose=False,
                    inspect=lambda layer, x: inputs.__setitem__(layer.name, x.copy()))
    for layer in trainer.manifest.trainable_layers:
        mask = layer.input_mask
        if mask:
            x = inputs[layer.name]
            expect = (x > mask["above"]) & (x < mask.get("below", np.inf))
            np.testing.assert_array_equal(bits[mask["bits"]],
                                          np.packbits(expect.reshape(3, -1), axis=1))
            made_by_runner += 1
    assert made_by_runner >= 2 and checked + made_by_runner == len(held)
    last_forward = trainer.schedule[trainer.backward_from - 1].graph
    trainer.schedule = [Run(i.graph, 1) if isinstance(i, Run) and i.graph.startswith("forward_")
                        and i.graph != last_forward else i for i in trainer.schedule]
    sliced = trainer.forward(images, labels).tensors
    for n, value in bits.items():
        np.testing.assert_array_equal(sliced[n], value)


@pytest.mark.parametrize("method,packed", [("vanilla", 0), ("hosvd", 2)])
def test_vanilla_reads_relu_masks_from_the_kept_inputs(method, packed, tmp_path):
    """mcunet, last 4 convs: the two ReLU6 outputs in that region are fine-tuned convs'
    inputs, so vanilla packs no mask (lo < x < hi is lo < y < hi of the kept y; its
    gradients equal autograd's in test_vanilla_gradients_and_sgd_step_equal_autograd), and
    a compressed method packs both, each read by a backward partition."""
    spec, model = random_model("mcunet-in1", 10, 0)
    config = TrainConfig(n_layers=4, method=method, eps=0.8 if method == "hosvd" else None)
    trainer = export(model, spec, tmp_path, config, 2, (96, 96))
    masks = [m for layer in trainer.manifest.trainable_layers for m in layer.masks]
    backward_inputs = trainer.backward_inputs  # as the runner holds them (masks as bits)
    assert len(masks) == packed, masks
    assert all(m in backward_inputs for m in masks)
    kept_inputs = [layer.kept[0] for layer in trainer.manifest.trainable_layers]
    assert sum(k in backward_inputs for k in kept_inputs) == len(kept_inputs)


@pytest.mark.parametrize("method,eps", [("vanilla", None), ("hosvd", 0.8)])
def test_a_non_finite_batch_is_rejected_and_the_weights_kept(method, eps, tmp_path):
    """vanilla keeps x itself (no finite check before a decomposition): the NaN reaches the
    loss and the step is rejected there, as hosvd's is before its decomposition."""
    spec, model = random_model("mcunet-in1", 3)
    trainer = export(model, spec, tmp_path, TrainConfig(n_layers=4, method=method, eps=eps),
                     2, (64, 64))
    before = {k: v.copy() for k, v in trainer.params.items()}
    images, labels = batch(2, (64, 64), 3)
    images[1, 0, 5, 5] = np.nan
    result = trainer.step(images, labels, lr=0.05)
    assert not result.applied and trainer.step_count == 0
    assert all(np.array_equal(before[k], trainer.params[k]) for k in before)
    assert trainer.step(*batch(2, (64, 64), 3), lr=0.05).applied


def test_cli_export_takes_the_class_names_of_an_image_folder(tmp_path, image_folder):
    """--classes DIR: an ImageFolder's sub-folder names, sorted as the runner labels them,
    become the artifact's classes (and --num-classes follows); a folder without class
    sub-folders is one line."""
    out = tmp_path / "art"
    proc = actcomp("export", "--model", "mcunet-in1", "--layers", "2", "--input-size", "32",
                   "--method", "vanilla", "--classes", str(image_folder), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    manifest = load_manifest(out)
    assert manifest.classes == ["blue", "green", "red"] and manifest.num_classes == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = actcomp("export", "--model", "mcunet-in1", "--layers", "2", "--input-size", "32",
                   "--method", "vanilla", "--classes", str(empty), "-o", str(tmp_path / "x"))
    assert_one_line_error(proc, "a folder without class sub-folders")
    assert not (tmp_path / "x").exists()


def test_the_actcomp_parser_with_export_imports_neither_torch_nor_onnx():
    """`actcomp plan`, `check` ... build the parser export's subcommand is part of: it, and
    the export subcommand's parsed arguments, load neither torch nor onnx (an export does)."""
    code = ("import sys\n"
            "from actcomp_edge.host.cli import build_parser\n"
            "args = build_parser().parse_args(['export', '--model', 'mcunet-in1', '--layers',"
            " '2', '-o', 'art'])\n"
            "assert args.func.__module__ == 'export.cli', args.func\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def nchwc_artifact(tmp_path):
    """mcunet's last 4 convs (two depthwise of 576 channels): backward graphs with an NCHWc
    variant."""
    spec, model = random_model("mcunet-in1", 10)
    return export(model, spec, tmp_path, TrainConfig(n_layers=4, method="vanilla"), 2,
                  (64, 64), kernels="portable").folder


def test_the_nchwc_probe_decides_the_kernels(tmp_path):
    folder = nchwc_artifact(tmp_path)
    nchwc = load_manifest(folder).graphs.nchwc
    assert set(nchwc["variants"]) == {"forward_3.onnx", "backward_3.onnx"}  # blocks.13.dw
    if HAS_NCHWC_KERNELS:
        assert nchwc_works(folder, nchwc)
    data = dict(np.load(folder / nchwc["probe_data"]))
    data["dw"] = data["dw"] * 1.01  # what a kernel that computes wrongly would give
    np.savez(folder / nchwc["probe_data"], **data)
    assert not nchwc_works(folder, nchwc)
    assert Trainer(folder, verify=False).kernels == "portable"
    (folder / nchwc["probe"]).write_bytes(b"not onnx")  # a build without them refuses it
    assert not nchwc_works(folder, nchwc)
    assert not nchwc_works(folder, {})


@pytest.mark.parametrize("bad", [[], {"variants": {}}, {"variants": {"backward_9.onnx": "x.onnx"},
                                                        "probe": "p.onnx", "probe_data": "p.npz"},
                                 {"variants": {"backward_3.onnx": "../x.onnx"},
                                  "probe": "p.onnx", "probe_data": "p.npz"}])
def test_a_malformed_nchwc_entry_is_refused_in_one_line(bad, tmp_path):
    folder = nchwc_artifact(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["graphs"]["nchwc"] = bad
    (folder / "manifest.json").write_bytes(manifest_bytes(manifest))
    with pytest.raises(ArtifactError, match="graphs.nchwc") as e:
        load_manifest(folder, verify=False)
    assert "\n" not in str(e.value)


def test_the_plan_sizes_every_tensor_of_an_nchwc_variant(tmp_path):
    """The plan's twin of the NCHWc nodes leaves no tensor unsized (an unsized one would
    count 0 bytes), and it plans the variant's arena beside the portable graph's."""
    folder = nchwc_artifact(tmp_path)
    m = load_manifest(folder)
    variant = m.graphs.nchwc["variants"]["backward_3.onnx"]
    model = concrete(onnx.load(folder / variant), {"batch": 2})
    sizes = tensor_bytes(model)
    assert all(o in sizes for node in model.graph.node for o in node.output)
    per_graph = m.memory_plan.extra["arena_bytes_per_graph"]
    assert per_graph[variant] > 0 and m.memory_plan.arena_bytes >= per_graph[variant]
