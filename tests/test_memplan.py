"""The step's memory plan: placement by lifetime, the runner's live set against it, and the
budget refused from it before the first step."""
import json

import numpy as np
import pytest

from actcomp_edge.core import memplan
from actcomp_edge.core.manifest import Run
from actcomp_edge.core.memplan import Buffer, place
from device_helpers import SIZE, device
from export.training_graph import TrainConfig
from export_helpers import batch, export, random_model
from helpers import assert_one_line_error


def test_place_shares_memory_between_disjoint_lifetimes():
    """A [0,1] and C [2,3] never live together: same offset; B overlaps both: above them,
    at the next 64-byte boundary."""
    offsets, total = place([Buffer("A", 100, 0, 1), Buffer("B", 50, 1, 2),
                            Buffer("C", 100, 2, 3)])
    assert offsets == {"A": 0, "C": 0, "B": 128}
    assert total == 192


def test_place_never_overlaps_live_buffers_and_is_at_least_the_live_peak():
    rng = np.random.default_rng(0)
    buffers = []
    for i in range(200):
        start = int(rng.integers(0, 50))
        buffers.append(Buffer(f"t{i}", int(rng.integers(1, 5000)), start,
                              start + int(rng.integers(0, 10))))
    offsets, total = place(buffers)
    for a in buffers:
        assert offsets[a.name] % memplan.ALIGN == 0 and offsets[a.name] + a.nbytes <= total
        for b in buffers:
            if a is not b and a.overlaps(b):
                assert (offsets[a.name] + a.nbytes <= offsets[b.name]
                        or offsets[b.name] + b.nbytes <= offsets[a.name]), (a, b)
    assert total >= max(memplan.live_bytes(buffers, p) for p in range(60))


@pytest.mark.parametrize("method,eps", [("vanilla", None), ("hosvd", 0.8), ("gf-r2", None)])
def test_runner_live_set_stays_inside_the_plan(tmp_path, method, eps):
    """At every schedule position each tensor the runner holds that the plan pools sits in
    its planned place (shares memory with the pool) and is alive in the plan there; nothing
    outlives its last reader; a residual (blocks with skip adds) and a stride-2 dw in range."""
    spec, model = random_model("mcunet-in1", 3, calibration_hw=SIZE)
    trainer = export(model, spec, tmp_path, TrainConfig(n_layers=12, method=method, eps=eps),
                     4, SIZE)
    images, labels = batch(4, SIZE, 3)
    trainer.step(images, labels, lr=0.01)  # plans and allocates the pool
    buffers = trainer.plan_pool(4)
    alive = {}
    for b in buffers:
        alive.setdefault(b.name, []).append(b)
    original, seen = trainer._run, []

    def checked(position, tensors, out):
        original(position, tensors, out)
        for name, value in tensors.items():
            if name in ("loss", "logits"):
                continue
            assert trainer.last_use.get(name, -1) > position, f"{name} outlives its last use"
            if name in alive:
                assert any(b.start <= position <= b.end for b in alive[name]), name
                assert np.shares_memory(value, trainer.pool), f"{name} is not in the pool"
                seen.append(name)
    trainer._run = checked
    result = trainer.step(images, labels, lr=0.01)
    assert result.applied and seen
    plan = trainer.manifest.memory_plan
    assert plan.pool_bytes == trainer.pool.nbytes
    assert plan.working_set_bytes == (plan.pool_bytes + plan.arena_bytes + plan.numpy_peak_bytes
                                      + plan.extra["session_bytes"])


def test_steps_with_the_pool_equal_steps_without_reuse(tmp_path):
    """The pool is reused every step: three steps give the weights of three steps on a
    fresh pool each (nothing of one step leaks into the next through shared memory)."""
    spec, model = random_model("mcunet-in1", 3, calibration_hw=SIZE)
    config = TrainConfig(n_layers=12, method="vanilla", eps=None)
    a = export(model, spec, tmp_path / "a", config, 4, SIZE)
    b = export(model, spec, tmp_path / "b", config, 4, SIZE)
    rng = np.random.default_rng(1)
    for step in range(3):
        images = rng.standard_normal((4, 3) + SIZE).astype(np.float32)
        labels = rng.integers(0, 3, 4)
        a.step(images, labels, lr=0.05)
        b.pool_batch = 0  # forces a new pool for this step
        b.step(images, labels, lr=0.05)
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])


def test_budget_below_the_plan_is_refused_before_the_first_step(tmp_path):
    """1 % below the plan: exit 3, one line with the numbers, no step taken; 10 % above:
    trains, and the summary holds predicted and measured working sets."""
    spec, model = random_model("mcunet-in1", 3, calibration_hw=SIZE)
    art = export(model, spec, tmp_path / "art", TrainConfig(n_layers=4, method="vanilla",
                                                            eps=None), 8, SIZE).folder
    planned = json.loads((art / "manifest.json").read_text())["memory_plan"]["working_set_bytes"]
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (24,) + SIZE + (3,), np.uint8),
             labels=rng.integers(0, 3, 24))
    common = ["train", art, "--data", tmp_path / "d.npz", "--max-steps", "2", "--threads", "1"]
    low = device(*common, "--budget", str(int(planned * 0.99)), "--out", tmp_path / "low")
    assert_one_line_error(low, "memory plan needs", "--batch-size", code=3)
    assert not (tmp_path / "low" / "checkpoints").exists()
    high = device(*common, "--budget", str(int(planned * 1.10)), "--out", tmp_path / "high",
                  "--summary", tmp_path / "s.json")
    assert high.returncode in (0, 4), high.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["steps"] == 2 and summary["predicted_working_set_bytes"] == planned
    assert summary["working_set_bytes"] > 0
    assert "working set: predicted" in high.stdout


@pytest.mark.parametrize("method,eps", [("vanilla", None), ("svd", 0.8), ("hosvd", 0.8),
                                        ("asi", 0.8), ("gf-r2", None)])
def test_backward_in_micro_batches_equals_the_whole_batch(tmp_path, method, eps):
    """Backward partitions run on slices of 3 of a batch of 8 (summing grad/<param>) give
    the gradients and updated weights of whole-batch runs, over the last 12 convs of
    mcunet-in1 (residual adds, a stride-2 depthwise conv): to float32 summation order
    (a sum of 3 partial sums instead of one: rel < 1e-5 of the largest entry)."""
    spec, model = random_model("mcunet-in1", 3, calibration_hw=SIZE)
    whole = export(model, spec, tmp_path / "whole",
                   TrainConfig(n_layers=12, method=method, eps=eps, micro_batch=8), 8, SIZE)
    sliced = export(model, spec, tmp_path / "sliced",
                    TrainConfig(n_layers=12, method=method, eps=eps, micro_batch=3), 8, SIZE)
    assert {i.micro_batch for i in sliced.schedule
            if isinstance(i, Run) and "backward_" in i.graph} == {3}
    for seed in range(2):
        # each step from the same state: asi's factors would otherwise carry the first
        # update's float32 summation order into the second step's forward
        sliced.load_state_arrays({k: v.copy() for k, v in whole.state_arrays().items()})
        images, labels = batch(8, SIZE, 3, seed=seed)
        a, b = whole.step(images, labels, lr=0.05), sliced.step(images, labels, lr=0.05)
        assert a.ranks == b.ranks
        for name, grad in a.grads.items():
            assert np.abs(grad - b.grads[name]).max() <= 1e-5 * np.abs(grad).max() + 1e-12, name
    for name in whole.params:
        scale = np.abs(whole.params[name]).max()
        assert np.abs(sliced.params[name] - whole.params[name]).max() <= 1e-5 * scale, name


def test_a_polynomial_and_the_arena_at_ranks_by_hand():
    assert memplan.polynomial([[3, [1, 0]], [2, [2, 1]]], [5, 7]) == 3 * 5 + 2 * 25 * 7
    model = {"b.onnx": {"symbols": [["conv", 1], ["conv", 0]],
                        "positions": [[[100, [0, 0]], [4, [1, 1]]], [[10, [2, 0]]]]}}
    bound = {"a.onnx": 150, "b.onnx": 999}  # a.onnx has no model: its bound counts
    # conv ranks (K1, K2) = (3, 6): b's positions 100 + 4 * 6 * 3 = 172 and 10 * 36 = 360
    assert memplan.arena_at(model, bound, {"conv": (3, 6)}) == 360
    assert memplan.arena_at(model, bound, {"conv": (1, 2)}) == 150


def test_a_size_that_is_no_monomial_of_the_ranks_counts_at_its_bound():
    from export.memory_plan import CHECK, MOVED, PROBE, fit_positions
    def at(k1, k2):  # one position: a tensor of 4 (k1 + k2) bytes, one of 4 k1 k2
        return [{"sum": 4 * (k1 + k2), "product": 4 * k1 * k2}]
    points = [at(PROBE, PROBE), at(MOVED, PROBE), at(PROBE, MOVED), at(CHECK, CHECK), at(8, 9)]
    assert fit_positions(points) == [[[4 * (8 + 9), [0, 0]], [4, [1, 1]]]]


@pytest.mark.parametrize("method,eps", [("hosvd", 0.8), ("asi", 0.8), ("svd", 0.9)])
def test_the_plan_at_the_ranks_a_run_saw_is_the_exporters_plan_at_those_ranks(
        tmp_path, method, eps):
    """memplan.working_set_at (the board) at the bound gives the manifest's plan, and at the
    ranks a step saw the exporter's step_plan made at those ranks by shape inference; the
    run's summary predicts with the largest ranks its steps saw."""
    import onnx
    from device_runner.train import seen_working_set
    from export.memory_plan import concrete, rank_dims, step_plan
    spec, model = random_model("mcunet-in1", 3, calibration_hw=SIZE)
    trainer = export(model, spec, tmp_path, TrainConfig(n_layers=12, method=method, eps=eps),
                     4, SIZE)
    m, plan = trainer.manifest, trainer.manifest.memory_plan
    layers = m.trainable_layers
    _, bound = rank_dims(layers, method, plan.batch_size, None, None)
    assert memplan.working_set_at(plan, m.schedule, trainer.layers, trainer.row, bound,
                                  trainer.last_use) == plan.working_set_bytes
    images, labels = batch(4, SIZE, 3)
    seen = trainer.step(images, labels, lr=0.01).ranks
    assert seen != bound and plan.extra["rank_model"]["arena"]  # backward graphs modeled
    models = {f: onnx.load(str(trainer.folder / f)) for f in plan.extra["arena_bytes_per_graph"]}
    symbols = trainer.row.rank_symbols
    for ranks in (seen, {name: (1,) * len(k) for name, k in seen.items()}):
        dims = {"batch": plan.batch_size, **{f"{name}/{s}": k for name, at in ranks.items()
                                             for s, k in zip(symbols, at)}}
        expected = step_plan(models, {f: concrete(g, dims) for f, g in models.items()}, dims,
                             ranks, m.schedule, layers, method, plan.batch_size, "seen",
                             (m.graphs.nchwc or {}).get("variants", {}))
        assert seen_working_set(trainer, ranks, plan.batch_size) == expected.working_set_bytes


def test_a_runs_summary_predicts_the_working_set_at_the_ranks_its_steps_saw(tmp_path):
    from device_runner.runtime import Trainer
    from device_runner.train import seen_working_set
    spec, model = random_model("mcunet-in1", 3, calibration_hw=SIZE)
    art = export(model, spec, tmp_path / "art", TrainConfig(n_layers=4, method="hosvd",
                                                            eps=0.8), 8, SIZE).folder
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (24,) + SIZE + (3,), np.uint8),
             labels=rng.integers(0, 3, 24))
    run = device("train", art, "--data", tmp_path / "d.npz", "--max-steps", "3", "--threads",
                 "1", "--out", tmp_path / "run", "--summary", tmp_path / "s.json")
    assert run.returncode == 0, run.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    plan = json.loads((art / "manifest.json").read_text())["memory_plan"]
    assert summary["predicted_ranks"] == "seen"
    assert summary["bound_working_set_bytes"] == plan["working_set_bytes"]
    seen = {layer: tuple(k) for layer, k in summary["max_ranks"].items()}
    assert summary["predicted_working_set_bytes"] == seen_working_set(Trainer(art), seen, 8)
    assert "the ranks the steps saw; at their bound" in run.stdout


def _first_graph(plan):
    return next(iter(plan["rank_model"]["arena"].values()))


@pytest.mark.parametrize("edit,where", [
    (lambda p: p["rank_model"].update(numpy_fixed_at=p["rank_model"]["numpy_fixed_at"][:-1]),
     "numpy_fixed_at"),
    (lambda p: p["rank_model"].update(numpy_fixed_at="12"), "rank_model"),
    (lambda p: _first_graph(p)["symbols"].append(["nowhere", 0]), "rank_model"),
    (lambda p: _first_graph(p)["symbols"].__setitem__(0, ["nowhere", 0]), "nowhere"),
    (lambda p: _first_graph(p)["positions"][0].append([-1, [0, 0, 0, 0]]), "rank_model"),
    (lambda p: p["rank_model"]["arena"].update({"../x.onnx": {"symbols": [], "positions": []}}),
     "rank_model"),
    (lambda p: p.pop("arena_bytes_per_graph"), "needs memory_plan.arena_bytes_per_graph")])
def test_a_malformed_rank_model_is_refused_in_one_line(edit, where, tmp_path):
    from actcomp_edge.core.manifest import ArtifactError, load_manifest, manifest_bytes
    spec, model = random_model("mcunet-in1", 3, calibration_hw=SIZE)
    folder = export(model, spec, tmp_path, TrainConfig(n_layers=4, method="hosvd", eps=0.8),
                    4, SIZE).folder
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest["memory_plan"])
    (folder / "manifest.json").write_bytes(manifest_bytes(manifest))
    with pytest.raises(ArtifactError, match=where) as e:
        load_manifest(folder, verify=False)
    assert "\n" not in str(e.value) and "memory_plan.rank_model" in str(e.value)


def test_a_rank_model_naming_a_mode_the_method_lacks_is_refused(tmp_path):
    """svd keeps one rank (k): a symbol of mode 1 would index past it on the board."""
    from actcomp_edge.core.manifest import ArtifactError, load_manifest, manifest_bytes
    spec, model = random_model("mcunet-in1", 3, calibration_hw=SIZE)
    folder = export(model, spec, tmp_path, TrainConfig(n_layers=4, method="svd", eps=0.8),
                    4, SIZE).folder
    manifest = json.loads((folder / "manifest.json").read_text())
    _first_graph(manifest["memory_plan"])["symbols"][0][1] = 1
    (folder / "manifest.json").write_bytes(manifest_bytes(manifest))
    with pytest.raises(ArtifactError, match="names a mode past the method's 1 ranks"):
        load_manifest(folder, verify=False)
