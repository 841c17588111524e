"""Every .onnx the project writes is valid ONNX for any tool: onnx.checker's full check,
shapes on the overview's every edge, and a run's inference model with initializers only."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from device_helpers import device, train_args
from device_runner.runtime import Trainer
from export.training_graph import TrainConfig
from export_helpers import export, random_model
from helpers import actcomp, require_shared

METHODS = {"vanilla": {}, "hosvd": {"eps": 0.8}, "asi": {"eps": 0.8},
           "svd": {"eps": 0.8}, "gf-r2": {}}


@pytest.mark.parametrize("name,method", [("mcunet-in1", m) for m in METHODS]
                         + [("resnet18", "vanilla"), ("mobilenet_v2", "hosvd")])
def test_every_artifact_graph_passes_the_full_check_and_the_overview_has_shapes(name, method,
                                                                                tmp_path):
    """(resnet18: a gradient made by two backward partitions, summed in the overview)"""
    spec, model = random_model(name, 3)
    config = TrainConfig(n_layers=4, method=method, **METHODS[method])
    folder = export(model, spec, tmp_path, config, 2, (64, 64)).folder
    files = sorted(folder.glob("*.onnx"))
    assert len(files) >= 10
    for path in files:
        onnx.checker.check_model(onnx.load(path), full_check=True)
    overview = onnx.load(folder / "overview.onnx")
    edges = {o for node in overview.graph.node for o in node.output}
    infos = list(overview.graph.value_info) + list(overview.graph.output)
    shaped = {v.name for v in infos if v.type.tensor_type.HasField("shape")}
    assert edges <= shaped, sorted(edges - shaped)[:5]
    inputs = [v for v in overview.graph.input]
    assert inputs and all(v.type.tensor_type.HasField("shape") for v in inputs)
    types = {v.name: v.type.tensor_type.elem_type for v in inputs}
    assert types["labels"] == onnx.TensorProto.INT64


@pytest.mark.parametrize("method", ["vanilla", "hosvd"])
def test_the_real_mcunet_overview_is_valid(method, tmp_path):
    """The pretrained mcunet-5fps of ../shared (its blocks end in a clipped residual: inner
    tensor names of two partitions coincide; each is its graph's own in the overview)."""
    spec = require_shared("weights", "tt_mcunet-5fps_int8dq.json")
    out = tmp_path / "art"
    proc = actcomp("export", "--model", spec, "--weights", spec.with_suffix(".npz"),
                   "--num-classes", "2", "--layers", "4", "--method", method,
                   *(["--eps", "0.8"] if method == "hosvd" else []),
                   "--batch-size", "4", "--input-size", "64", "-o", out)
    assert proc.returncode == 0, proc.stderr
    onnx.checker.check_model(onnx.load(out / "overview.onnx"), full_check=True)


def test_a_runs_inference_model_keeps_its_weights_as_initializers_only(artifact, image_folder,
                                                                        tmp_path):
    out = tmp_path / "run"
    proc = device(*train_args(artifact, image_folder, out, "--max-steps", "2"))
    assert proc.returncode == 0, proc.stderr
    trainer = Trainer(artifact)
    trainer.params = dict(np.load(out / "weights.npz"))
    for name in ("inference.onnx", "best_inference.onnx"):
        model = onnx.load(out / name)
        onnx.checker.check_model(model, full_check=True)
        initializers = {i.name for i in model.graph.initializer}
        assert [i.name for i in model.graph.input] == ["image"]
        assert set(trainer.params) <= initializers
    session = ort.InferenceSession(str(out / "inference.onnx"), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"image": images})[0],
                               trainer.evaluate(images), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("old,new", [('\n "batch_size": 8', '\n "batch_size": 9'),
                                     ('"eps": 0.9', '"eps": 0.8')])
def test_a_one_byte_edit_of_the_manifest_is_refused_in_one_line(artifact, image_folder, tmp_path,
                                                                old, new):
    import shutil
    folder = tmp_path / "art"
    shutil.copytree(artifact, folder)
    text = (folder / "manifest.json").read_text()
    assert old in text
    (folder / "manifest.json").write_text(text.replace(old, new, 1))
    proc = device(*train_args(folder, image_folder, tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "edited after export" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_gradient_filter_manifest_with_a_pair_stride_is_refused_in_one_line(tmp_path):
    """Even with its digest recomputed: gf-r2 sums square patches, so its layers' strides
    are single integers (the exporter never writes a pair for it)."""
    import json

    from actcomp_edge.core.manifest import ArtifactError, content_digest, load_manifest
    spec, model = random_model("mcunet-in1", 3)
    folder = export(model, spec, tmp_path, TrainConfig(n_layers=2, method="gf-r2", eps=None),
                    2, (64, 64)).folder
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["trainable_layers"][1]["stride"] = [1, 2]
    manifest["digest"] = content_digest(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"key 'trainable_layers\[1\].stride' must be one "
                                            r"integer for gf-r2, got \[1, 2\]"):
        load_manifest(folder)
