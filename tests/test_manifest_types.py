"""actcomp_edge.core.manifest's types: every manifest the exporter writes is read into a
Manifest and written back unchanged (every method and optimizer, the exporter's own
Manifest too), and load_manifest returns the typed parts."""
import json

import pytest

from actcomp_edge.core.manifest import (MANIFEST, Compress, Layer, Manifest, Run, load_manifest,
                                        manifest_bytes)
from export import zoo
from export.artifact import export_artifact
from export.training_graph import TrainConfig
from export_helpers import random_model

CONFIGS = [dict(method="vanilla", eps=None), dict(method="hosvd", eps=0.8),
           dict(method="asi", eps=0.8), dict(method="svd", eps=0.8),
           dict(method="gf-r2", eps=None), dict(method="vanilla", eps=None, optimizer="adamw"),
           dict(method="asi", eps=None, activation_budget=1 << 20),
           dict(method="hosvd", eps=None, ranks=(2, 4, 2, 2), momentum=0.9)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_every_exported_manifest_round_trips(tmp_path, config):
    spec, model = random_model("mcunet-in1", 3)
    returned = export_artifact(spec, zoo.model_arrays(model, spec), tmp_path / "art",
                               TrainConfig(n_layers=2, **config), 4, (32, 32))
    text = (tmp_path / "art" / MANIFEST).read_bytes()
    written = json.loads(text)
    assert manifest_bytes(returned.to_json()) == text  # what the exporter wrote
    assert Manifest.from_json(written).to_json() == written
    manifest = load_manifest(tmp_path / "art")
    assert manifest.to_json() == written and manifest.digest == written["digest"]
    assert manifest.train.method == config["method"]
    assert all(isinstance(layer, Layer) for layer in manifest.trainable_layers)
    assert {type(step) for step in manifest.schedule} == {Run, Compress}
    assert manifest.memory_plan.working_set_bytes == written["memory_plan"]["working_set_bytes"]


def test_keys_the_types_do_not_name_are_kept(tmp_path):
    spec, model = random_model("mcunet-in1", 3)
    export_artifact(spec, zoo.model_arrays(model, spec), tmp_path / "art",
                    TrainConfig(n_layers=2, method="vanilla", eps=None), 4, (32, 32))
    written = json.loads((tmp_path / "art" / MANIFEST).read_text())
    written["note"] = {"any": [1, "thing"]}
    written["input"]["colour"] = "rgb"
    written["trainable_layers"][0]["dilation"] = 2
    written["memory_plan"]["extra_bytes"] = 7
    assert Manifest.from_json(written).to_json() == written
    del written["classes"], written["digest"], written["train"]["momentum"]
    assert Manifest.from_json(written).to_json() == written
