"""The fine-tuning recipe: schedules, clipping, the divergence guard, best weights,
augmentation, and the one-line refusals of bad arguments and data."""
import math
import re
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from actcomp_edge.core.npz import load_npz
from device_helpers import device, train_args
from device_runner import data as data_module
from actcomp_edge.core import schedules
from device_runner import recipe
from device_runner.runtime import Trainer
from device_runner.train import MAX_ROLLBACKS, Options, TrainingError, evaluate, fit
from export.training_graph import TrainConfig
from export_helpers import batch, export, random_model
from helpers import ENV, actcomp, assert_error_among_progress, rel_l2_error

# ---------------------------------------------------------------- schedules


def lrs(spec, total, steps_per_epoch=1, base=0.1):
    schedule = schedules.parse_schedule(spec)
    return [schedules.learning_rate(schedule, base, t, total, steps_per_epoch)
            for t in range(total)]


def test_schedules_against_hand_computed_values():
    c = (1 + math.cos(math.pi / 4)) / 2  # 0.853553...
    assert lrs("constant", 3) == [0.1, 0.1, 0.1]
    assert lrs("cosine", 4) == pytest.approx([0.1, 0.1 * c, 0.05, 0.1 * (1 - c)], rel=1e-12)
    # warm-up 2 steps (0.05, 0.1), then cosine over the remaining 4
    assert lrs("warmup-cosine:2", 6) == pytest.approx([0.05, 0.1, 0.1, 0.1 * c, 0.05,
                                                       0.1 * (1 - c)], rel=1e-12)
    # x0.5 every 2 epochs of 3 steps
    assert lrs("step:2:0.5", 13, steps_per_epoch=3) == pytest.approx(
        [0.1] * 6 + [0.05] * 6 + [0.025], rel=1e-12)
    assert lrs("warmup-cosine", 40)[0] == pytest.approx(0.1 / 2)  # default: 5 % = 2 steps


def test_cosine_is_torchs_cosine_annealing():
    total = 7
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    expected = []
    for _ in range(total):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs("cosine", total, base=0.05) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("spec", ["cosin", "step:0:0.5", "step:2:1.5", "warmup-cosine:0",
                                  "constant:3", "step:2"])
def test_bad_schedules_are_refused(spec):
    with pytest.raises(ValueError, match="unknown schedule"):
        schedules.parse_schedule(spec)


def test_default_lr_keeps_the_sgd_step_of_the_paper():
    assert recipe.default_lr("sgd", 0.0) == 0.05
    assert recipe.default_lr("sgd", 0.9) == pytest.approx(0.005)
    assert recipe.default_lr("adamw", None) == 1e-3

# ---------------------------------------------------------------- clipping


def test_clipped_sgd_steps_equal_torch(tmp_path):
    """Two momentum-SGD steps with the gradients clipped to a global norm, against
    torch.nn.utils.clip_grad_norm_ + torch.optim.SGD fed the same raw gradients."""
    lr, momentum, max_norm = 0.05, 0.9, 0.05
    spec, model = random_model("mcunet-in1", 10)
    config = TrainConfig(n_layers=3, method="vanilla", eps=None, momentum=momentum)
    clipped = export(model, spec, tmp_path, config, 4, (96, 96))
    raw = Trainer(clipped.folder)  # the same artifact: its unclipped gradients
    params = {k: torch.from_numpy(v.copy()) for k, v in clipped.params.items()}
    opt = torch.optim.SGD(list(params.values()), lr=lr, momentum=momentum)
    for step in range(2):
        images, labels = batch(4, (96, 96), 10, seed=step)
        raw.load_state_arrays(clipped.state_arrays())
        grads = {k: v.copy() for k, v in raw.step(images, labels, lr=0.0).grads.items()}
        result = clipped.step(images, labels, lr=lr, max_grad_norm=max_norm)
        norm = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
        assert result.grad_norm == pytest.approx(norm, rel=1e-6)
        assert norm > 2 * max_norm  # the clipping acted
        for key, p in params.items():
            p.grad = torch.from_numpy(grads[key])
        torch_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm)
        assert float(torch_norm) == pytest.approx(norm, rel=1e-5)
        opt.step()
        for key, p in params.items():
            assert rel_l2_error(clipped.params[key], p.numpy()) < 1e-5, (step, key)


def test_clip_grad_norm_leaves_small_gradients_alone():
    grads = {"a": np.array([3.0, 4.0], np.float32)}
    assert recipe.clip_grad_norm(grads, 10.0) == pytest.approx(5.0)
    np.testing.assert_array_equal(grads["a"], [3.0, 4.0])
    recipe.clip_grad_norm(grads, 1.0)
    np.testing.assert_allclose(grads["a"], [0.6, 0.8], rtol=1e-5)

# ---------------------------------------------------------------- divergence guard


def test_guard_counts_steps_far_above_the_running_minimum():
    guard = recipe.DivergenceGuard(num_classes=2, patience=3)
    for loss in [0.7, 0.5, 0.3, 0.3, 0.3]:
        assert not guard.observe(loss)
    floor = guard.floor  # lowest bias-corrected EMA: between 0.3 and 0.7
    assert 0.3 < floor < 0.7 and guard.threshold() == pytest.approx(floor + math.log(2))
    assert not guard.observe(floor + 1.0) and not guard.observe(floor + 1.0)
    assert not guard.observe(0.3)  # one good step resets the count
    assert [guard.observe(x) for x in (5.0, math.nan, 5.0)] == [False, False, True]


def dataset(n, classes=3, seed=0, size=(64, 64)):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.int64)
    images = rng.integers(0, 80, (n,) + size + (3,)).astype(np.uint8)
    images[np.arange(n), :, :, labels] += 150
    return data_module.Dataset(images, labels, [str(c) for c in range(classes)])


@pytest.fixture
def trainer(artifact):
    return Trainer(artifact, threads=1)


def injecting(trainer, bad_calls):
    """Wrap trainer.step: calls (1-based) in bad_calls run for real, then report a loss of
    50 and corrupt the weights; every call records (params at its start, lr)."""
    calls, real = [], trainer.step

    def step(x, y, lr, max_grad_norm=None, prefix_out=None, **options):
        calls.append(({k: v.copy() for k, v in trainer.params.items()}, lr))
        result = real(x, y, lr, max_grad_norm, prefix_out, **options)
        if len(calls) in bad_calls:
            result.loss = 50.0
            trainer.params = {k: v + 1.0 for k, v in trainer.params.items()}
        return result
    trainer.step = step
    return calls


def test_a_divergence_rolls_back_to_the_last_good_weights_with_half_the_lr(trainer, tmp_path):
    calls = injecting(trainer, bad_calls=range(4, 9))  # steps 4..8 diverge
    lines = []
    options = Options(epochs=2, batch_size=8, checkpoint_every=2, seed=0)
    summary = fit(trainer, dataset(32), dataset(8, seed=1), tmp_path / "run", options,
                  log=lines.append)
    rolled = [line for line in lines if "rolled back" in line]
    assert len(rolled) == 1 and "rolled back to step 2, lr x0.5 (rollback 1 of 3)" in rolled[0]
    # call 9 restarts from the state after step 2 (the checkpoint before the divergence)
    good, bad_lr = calls[2], calls[2][1]
    for key, value in good[0].items():
        np.testing.assert_array_equal(calls[8][0][key], value)
    assert calls[8][1] == pytest.approx(0.5 * bad_lr)
    assert summary["recipe"]["rollbacks"] == 1 and summary["recipe"]["lr_scale"] == 0.5
    assert summary["steps"] == 8 and len(calls) == 8 + 6  # steps 3..8 ran twice


def test_divergence_after_the_last_rollback_stops_with_the_best_weights_kept(trainer, tmp_path):
    injecting(trainer, bad_calls=range(6, 1000))  # diverges for good from step 6 (epoch 2)
    options = Options(epochs=3, batch_size=8, checkpoint_every=2, seed=0)
    with pytest.raises(TrainingError, match=f"after {MAX_ROLLBACKS} rollbacks") as e:
        fit(trainer, dataset(32), dataset(8, seed=1), tmp_path / "run", options, log=print)
    assert "best weights (epoch 1)" in str(e.value)
    assert (tmp_path / "run" / "best_weights.npz").exists()


def test_best_weights_are_the_best_epochs(trainer, tmp_path):
    seen = []  # (epoch, val accuracy, weights) when each epoch's line is logged

    def log(line):
        found = re.match(r"epoch (\d+)/\d+: .* val accuracy ([0-9.]+)", line)
        if found:
            seen.append((int(found[1]), float(found[2]),
                         {k: v.copy() for k, v in trainer.params.items()}))
    val = dataset(16, seed=1)
    options = Options(epochs=4, batch_size=8, lr=0.02, seed=0)
    summary = fit(trainer, dataset(32), val, tmp_path / "run", options, log=log)
    assert [s[0] for s in seen] == [1, 2, 3, 4]
    best = max(seen, key=lambda s: s[1])  # the first of the best
    assert summary["best_epoch"] == best[0]
    assert summary["best_val_accuracy"] == pytest.approx(best[1], abs=1e-4)
    saved = load_npz(tmp_path / "run" / "best_weights.npz")
    for key, value in best[2].items():
        np.testing.assert_array_equal(saved[key], value)
    # the best inference model is those weights: its accuracy on val is the best
    session = ort.InferenceSession(str(tmp_path / "run" / "best_inference.onnx"),
                                   providers=["CPUExecutionProvider"])
    norm = trainer.manifest.input
    x, y = val.batch(np.arange(len(val)), norm.mean, norm.std)
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert float((logits.argmax(1) == y).mean()) == pytest.approx(summary["best_val_accuracy"])
    trainer.load_state_arrays({**{f"param/{k}": v for k, v in saved.items()},
                               **{f"opt/{k}": v for k, v in trainer.state.items()},
                               "step_count": trainer.step_count})
    assert evaluate(trainer, val, 8) == pytest.approx(summary["best_val_accuracy"])
    assert summary["epochs"] == 4
    assert summary["final_train_loss"] is not None

# ---------------------------------------------------------------- augmentation


def test_augmentation_is_seeded_and_a_full_crop_is_the_image_or_its_mirror():
    data = dataset(6)
    norm = dict(mean=[0.5] * 3, std=[0.25] * 3)
    idx = np.arange(6)
    a = data.batch(idx, **norm, augment=np.random.default_rng([0, 1, 2]))[0]
    b = data.batch(idx, **norm, augment=np.random.default_rng([0, 1, 2]))[0]
    plain = data.batch(idx, **norm)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, plain)
    order = np.array([4, 0, 5, 2])  # the labels stay those of the images asked for
    _, labels = data.batch(order, **norm, augment=np.random.default_rng(3))
    np.testing.assert_array_equal(labels, data.labels[order])
    image = data.images[0]
    out = data_module.random_resized_crop(image, np.random.default_rng(0), scale=(1, 1),
                                          ratio=(1, 1))
    assert np.array_equal(out, image) or np.array_equal(out, image[:, ::-1])


def test_the_augmented_crop_is_pillows_bilinear_resize_of_its_box():
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(5)
    for h, w in [(64, 64), (37, 50), (1, 9)]:
        image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        for _ in range(40):
            box_w, box_h = int(rng.integers(1, w + 1)), int(rng.integers(1, h + 1))
            left, top = int(rng.integers(0, w - box_w + 1)), int(rng.integers(0, h - box_h + 1))
            ours = data_module.bilinear_box(image, left, top, box_w, box_h)
            pillow = np.asarray(Image.fromarray(image).resize(
                (w, h), Image.BILINEAR, box=(left, top, left + box_w, top + box_h)))
            assert ours.shape == pillow.shape and ours.dtype == np.uint8
            assert np.abs(ours.astype(int) - pillow).max() <= 1, (h, w, left, top, box_w, box_h)
    # by hand: columns 1-2 of a ramp 40 x, stretched to 4 columns, sample x = 0.75, 1.25,
    # 1.75, 2.25 (half-pixel centres): the taps read the columns beside the box
    ramp = np.repeat(np.arange(0, 160, 40, dtype=np.uint8)[None, :, None], 4, 0)
    row = data_module.bilinear_box(ramp, 1, 0, 2, 4)[0, :, 0]
    np.testing.assert_array_equal(row, [30, 50, 70, 90])


def test_an_augmented_run_on_an_npz_never_imports_pillow(artifact, tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, images=rng.integers(0, 256, (12, 64, 64, 3)).astype(np.uint8),
             labels=np.arange(12) % 3)
    code = f"""
import sys
sys.modules["PIL"] = None  # any import of Pillow now raises ImportError
from device_runner.cli import main
assert main(["train", {str(artifact)!r}, "--data", {str(data)!r}, "--max-steps", "2",
             "--batch-size", "4", "--out", {str(tmp_path / 'run')!r}]) == 0
print("no Pillow")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no Pillow" in proc.stdout


def test_augmentation_changes_training_and_no_augment_turns_it_off(artifact, image_folder,
                                                                   tmp_path):
    # (a kill mid-step and --resume ending at the uninterrupted run's weights, augmentation on
    # as by default: tests/test_faults.py)
    runs = {}
    for name, extra in [("on", []), ("on-again", []), ("off", ["--no-augment"])]:
        proc = device(*train_args(artifact, image_folder, tmp_path / name, "--max-steps", "3",
                                  *extra))
        assert proc.returncode == 0, proc.stderr
        runs[name] = load_npz(tmp_path / name / "weights.npz")
    key = next(iter(runs["on"]))
    np.testing.assert_array_equal(runs["on"][key], runs["on-again"][key])
    assert not np.array_equal(runs["on"][key], runs["off"][key])

# ---------------------------------------------------------------- bad input: exit 2, one line


@pytest.mark.parametrize("extra,message", [
    (["--lr", "-1"], "expected a finite number > 0, got '-1'"),
    (["--lr", "nan"], "expected a finite number > 0, got 'nan'"),
    (["--lr", "0"], "expected a finite number > 0"),
    (["--clip-grad-norm", "-2"], "expected a finite number >= 0"),
    (["--schedule", "cosin"], "unknown schedule 'cosin'"),
    (["--report", "tcp://127.0.0.1:7777"], "use socket://HOST:PORT"),
    (["--report", "/dev/ttyNOPE0"], "no such serial port"),
    (["--report", "socket://nohost"], "expected socket://HOST:PORT"),
    (["--report", "udp://1.2.3.4:5"], "unknown scheme udp://"),
    (["--val-fraction", "1.5"], "--val-fraction must be between 0 and 1"),
    (["--cache-prefix"], "--cache-prefix needs --no-augment"),
])
def test_bad_arguments_are_one_line_before_any_work(artifact, image_folder, tmp_path, extra,
                                                    message):
    out = tmp_path / "run"
    assert_error_among_progress(device(*train_args(artifact, image_folder, out, *extra)), message)
    assert not out.exists()  # nothing was trained or written


def test_data_that_does_not_match_the_artifact_is_refused(artifact, image_folder, tmp_path):
    one_class = tmp_path / "one"
    (one_class / "red").mkdir(parents=True)
    for f in sorted((image_folder / "red").glob("*.png"))[:3]:
        (one_class / "red" / f.name).write_bytes(f.read_bytes())
    assert_error_among_progress(device(*train_args(artifact, one_class, tmp_path / "a")),
                          "has the classes ['red'], the artifact ['0', '1', '2']")
    fractions = tmp_path / "fractions.npz"
    np.savez(fractions, images=np.zeros((4, 8, 8, 3), np.uint8),
             labels=np.array([0, 1, 1.5, 2]))
    assert_error_among_progress(device(*train_args(artifact, fractions, tmp_path / "b")),
                          "labels must be class indices, got 1.5")


def test_named_classes_must_match(tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, images=np.zeros((2, 8, 8, 3), np.uint8), labels=np.array([0, 1]),
             classes=np.array(["cat", "dog"]))
    with pytest.raises(data_module.DataError, match=r"\['cat', 'dog'\], the artifact"):
        data_module.load(data, (8, 8), 2, ["ants", "bees"])
    assert len(data_module.load(data, (8, 8), 2, ["0", "1"])) == 2  # unnamed artifact: count


def test_export_refuses_an_input_smaller_than_the_total_stride(tmp_path):
    proc = actcomp("export", "--model", "mcunet-in1", "--layers", "2", "--method", "vanilla",
                   "--input-size", "16", "-o", tmp_path / "a", timeout=300)
    assert_error_among_progress(proc, "smaller than the network's total stride 32")


def test_dropout_the_graphs_lack_is_recorded_not_dropped_silently(tmp_path):
    spec, model = random_model("mobilenet_v2", 3)
    trainer = export(model, spec, tmp_path, TrainConfig(n_layers=2, method="vanilla", eps=None),
                     2, (64, 64))
    assert trainer.manifest.dropout_not_applied == 0.2
    spec, model = random_model("mcunet-in1", 3)
    trainer = export(model, spec, tmp_path, TrainConfig(n_layers=2, method="vanilla", eps=None),
                     2, (64, 64))
    assert "dropout_not_applied" not in trainer.manifest.to_json()


def test_a_cached_prefix_trains_as_the_prefix_run_every_step(artifact, tmp_path):
    """Two epochs without augmentation: with --cache-prefix the frozen prefix runs once per
    image (the first epoch's batches), and the weights end as without the cache."""
    train, val = dataset(12), dataset(6, seed=1)
    weights = {}
    for cached in (False, True):
        trainer = Trainer(artifact, threads=1)
        runs, real = [], trainer.prefix_outputs
        trainer.prefix_outputs = lambda images: runs.append(len(images)) or real(images)
        options = Options(epochs=2, batch_size=4, lr=0.05, augment=False, cache_prefix=cached)
        summary = fit(trainer, train, val, tmp_path / str(cached), options, log=lambda *a: None)
        assert summary["recipe"]["cache_prefix"] is cached
        assert runs == ([4, 4, 4] if cached else [])
        weights[cached] = trainer.params
    for name, value in weights[False].items():
        assert rel_l2_error(weights[True][name], value) < 1e-6, name
