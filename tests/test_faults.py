"""Fault injection on the device runner: nothing is lost.

- SIGKILL at 24 seeded random points (`actcomp_edge.core.faults`: mid-step, mid-write of a
  checkpoint, its index or the results, between a checkpoint's rename and its index, mid-append
  to the profile spool): the index never lists a torn file, every resume starts from a valid
  checkpoint, the finished weights equal an uninterrupted run's, and the host receives every
  profile record exactly once, in order, across the kill.
- A disk that fills up during a checkpoint (a small tmpfs): one clear error, exit 5, the
  previous checkpoint intact and resumable.
- Bad input through the CLI: each a one-line error and a non-zero exit (the ones already in
  test_device: labels out of range, a budget below the minimum, NaN loss in a row, junk image
  files skipped and counted).
- A NaN/Inf step mid-training is rejected and training continues from the last good state.

The link's own faults (corruption, drops, duplicates, outages, host restarts) are in
test_link_faults.py; the decoders and loaders are fuzzed in test_fuzz.py.
"""
import json
import random
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from actcomp_edge.core.manifest import manifest_bytes, sha256_file
from actcomp_edge.core.npz import load_npz
from device_helpers import device, train_args
from device_runner import checkpoint
from helpers import ENV, assert_error_among_progress
from link_helpers import Host

STEPS = 8            # train_args: 2 epochs x 4 steps, a checkpoint every 2 steps
CHECKPOINTS = 4      # steps 2, 4, 6, 8
RECORDS = STEPS + 2 + 1  # step records, 2 epoch records, the summary


@pytest.fixture(scope="module")
def reference(artifact, image_folder, tmp_path_factory):
    """The weights of an uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    proc = device(*train_args(artifact, image_folder, out))
    assert proc.returncode == 0, proc.stderr
    return load_npz(out / "weights.npz")


def assert_same_weights(got, expected):
    assert sorted(got) == sorted(expected)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, atol=1e-7, err_msg=key)


def assert_index_lists_only_complete_files(folder: Path):
    """Every file the checkpoint index names exists with its SHA-256; load_latest takes the
    newest without skipping any."""
    if not (folder / checkpoint.INDEX).exists():
        return None
    entries = json.loads((folder / checkpoint.INDEX).read_text())
    for entry in entries:
        assert sha256_file(folder / entry["file"]) == entry["sha256"], entry
    skipped = []
    found = checkpoint.load_latest(folder, log=skipped.append)
    assert skipped == [] and (found is None) == (entries == [])
    return found[0]["step"] if found else None


def crash_trials(count_per_site=6, seed=7):
    """(site, N): kill at the N-th crossing of the site, N drawn where the site is reached."""
    rng = random.Random(seed)
    reached = {"step": STEPS - 1,                   # the last step's kill leaves work to resume
               "write_atomic": 2 * CHECKPOINTS,     # each checkpoint: its file, then the index
               "checkpoint": CHECKPOINTS,
               "spool": RECORDS - 1}
    return [(site, rng.randint(1, top)) for site, top in reached.items()
            for _ in range(count_per_site)]


@pytest.mark.parametrize("site,hit", crash_trials())
def test_sigkill_at_a_random_point_then_resume_loses_nothing(site, hit, artifact, image_folder,
                                                             reference, tmp_path):
    host = Host()
    try:
        out = tmp_path / "run"
        args = train_args(artifact, image_folder, out, "--report",
                          f"socket://127.0.0.1:{host.port}", "--report-timeout", "30")
        killed = device(*args, env=dict(ENV, ACTCOMP_CRASH_AT=f"{site}:{hit}"))
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        assert not (out / "weights.npz").exists()
        resumed_from = assert_index_lists_only_complete_files(out / "checkpoints")
        resumed = device(*args, "--resume")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        if resumed_from is not None:
            assert f"resumed from step {resumed_from} " in resumed.stdout
        assert_same_weights(load_npz(out / "weights.npz"), reference)
        assert assert_index_lists_only_complete_files(out / "checkpoints") == STEPS
        listed = {e["file"] for e in json.loads((out / "checkpoints" / checkpoint.INDEX)
                                                .read_text())}
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == \
            sorted(listed | {checkpoint.INDEX})  # no temp file or stale checkpoint left
        delivered = host.wait_for(1, 0)
        assert [f.seq for f in delivered] == list(range(len(delivered)))  # once, in order
        assert delivered[-1].record["type"] == "summary" and host.lost == 0
        steps = [f.record["step"] for f in delivered if f.record.get("type") == "step"]
        assert set(steps) == set(range(1, STEPS + 1))  # steps after a checkpoint run twice
    finally:
        host.stop()


# ---------------------------------------------------------------- a disk that fills up

@pytest.fixture
def small_disk(tmp_path):
    """A mount point for a tmpfs of a given size (root only), unmounted afterwards."""
    mounts = []

    def mount(size_bytes):
        point = tmp_path / f"disk{len(mounts)}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs",
                               str(point)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
        mounts.append(point)
        return point
    yield mount
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_a_disk_full_during_a_checkpoint_is_one_error_and_keeps_the_last_one(
        artifact, image_folder, reference, small_disk, tmp_path):
    probe = tmp_path / "probe"
    assert device(*train_args(artifact, image_folder, probe, "--max-steps", "2")).returncode == 0
    size = (probe / "checkpoints" / "ckpt-00000002.npz").stat().st_size
    best = sum((probe / name).stat().st_size for name in ("best_weights.npz",
                                                           "best_inference.onnx"))
    # room for the best-epoch results, two checkpoints and the temp file of a third, not for
    # three and a temp file
    disk = small_disk(best + int(3.5 * size) + 64 * 1024)
    out = disk / "run"
    error = assert_error_among_progress(device(*train_args(artifact, image_folder, out)),
                                  "No space left on device", "cannot write checkpoint", code=5)
    newest = assert_index_lists_only_complete_files(out / "checkpoints")
    assert newest is not None and f"step {newest} is the newest intact one" in error
    assert not [p for p in (out / "checkpoints").iterdir() if ".tmp-" in p.name]
    # space freed (the run moved to a roomy disk): it resumes and ends where it should
    roomy = tmp_path / "roomy"
    shutil.copytree(out, roomy)
    resumed = device(*train_args(artifact, image_folder, roomy, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {newest} " in resumed.stdout
    assert_same_weights(load_npz(roomy / "weights.npz"), reference)


# ---------------------------------------------------------------- bad input, one line each

def rewrite_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_bytes(manifest_bytes(manifest))


def truncate(folder, name):
    path = folder / name
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def corrupt_graph_with_a_valid_hash(folder):
    """backward_1.onnx replaced by junk whose SHA-256 the manifest lists: onnxruntime refuses it."""
    (folder / "backward_1.onnx").write_bytes(b"\x08\x07 not a model")
    rewrite_manifest(folder, lambda m: m["files"].update(
        {"backward_1.onnx": sha256_file(folder / "backward_1.onnx")}))


BAD_ARTIFACTS = {
    "truncated weights": (lambda f: truncate(f, "weights.npz"), "weights.npz fails its SHA-256"),
    "tampered graph": (lambda f: (f / "forward_0.onnx").write_bytes(
        (f / "forward_0.onnx").read_bytes() + b"\x00"), "forward_0.onnx fails its SHA-256"),
    "missing file": (lambda f: (f / "optimizer.npz").unlink(), "optimizer.npz is missing"),
    "newer format": (lambda f: rewrite_manifest(f, lambda m: m.update(format_version=99)),
                     "newer than this runner supports"),
    "onnxruntime too old": (lambda f: rewrite_manifest(f, lambda m: m.update(
        min_onnxruntime="99.0")), "is too old for this artifact (needs >= 99.0)"),
    "manifest not JSON": (lambda f: (f / "manifest.json").write_text('{"format": '),
                          "not valid JSON"),
    "graph onnxruntime cannot load": (corrupt_graph_with_a_valid_hash,
                                      "onnxruntime cannot load backward_1.onnx"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARTIFACTS))
def test_a_bad_artifact_is_one_line_and_exit_2(case, artifact, image_folder, tmp_path):
    spoil, message = BAD_ARTIFACTS[case]
    folder = tmp_path / "art"
    shutil.copytree(artifact, folder)
    spoil(folder)
    commands = [train_args(folder, image_folder, tmp_path / "run")]
    if case != "graph onnxruntime cannot load":  # info reads the manifest, not the graphs
        commands.append(["info", folder])
    for argv in commands:
        proc = device(*argv)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (argv[0], proc.stderr)
        assert message in lines[0] and lines[0].startswith("actcomp-device: error:"), lines[0]


def junk_only_folder(root: Path) -> Path:
    (root / "ants").mkdir(parents=True)
    (root / "ants" / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "ants" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    (root / "ants" / "c.txt").write_text("hello")
    return root


def truncated_png_folder(root: Path, good: Path) -> Path:
    """A copy of the good folder with one real PNG cut in half (a torn copy from an SD card)."""
    shutil.copytree(good, root)
    victim = sorted((root / "red").glob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])
    return root


def test_a_dataset_of_junk_only_is_refused(artifact, tmp_path):
    proc = device("train", artifact, "--data", junk_only_folder(tmp_path / "junk"),
                  "--out", tmp_path / "run")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "has no usable images" in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_truncated_image_is_skipped_and_counted(artifact, image_folder, tmp_path):
    data = truncated_png_folder(tmp_path / "data", image_folder)
    proc = device(*train_args(artifact, data, tmp_path / "run", "--max-steps", "1"))
    assert proc.returncode == 0, proc.stderr
    assert "skipped 3 unreadable or non-image files" in proc.stderr  # 2 junk + the torn PNG


def test_a_corrupt_npz_dataset_is_one_line(artifact, tmp_path):
    bad = tmp_path / "data.npz"
    np.savez(bad, images=np.zeros((4, 8, 8, 3), np.uint8), labels=np.arange(4) % 3)
    bad.write_bytes(bad.read_bytes()[:100])
    proc = device("train", artifact, "--data", bad, "--out", tmp_path / "run")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "cannot read dataset" in lines[0]


def test_a_non_finite_step_is_rejected_and_training_goes_on_from_the_last_good_state(artifact):
    from device_runner.runtime import Trainer
    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, 8, 3, 64, 64)).astype(np.float32)
    labels = rng.integers(0, 3, (2, 8))
    clean = Trainer(artifact)
    clean.step(images[0], labels[0], 0.01)
    clean.step(images[1], labels[1], 0.01)
    trainer = Trainer(artifact)
    trainer.step(images[0], labels[0], 0.01)
    good = {k: v.copy() for k, v in trainer.state_arrays().items()}
    poisoned = images[1].copy()
    poisoned[3, 0, 5, 5] = np.nan
    result = trainer.step(poisoned, labels[1], 0.01)
    assert not result.applied and not np.isfinite(result.loss)
    for key, value in trainer.state_arrays().items():
        np.testing.assert_array_equal(value, good[key], err_msg=key)
    assert trainer.step(images[1], labels[1], 0.01).applied
    for key, value in trainer.params.items():
        np.testing.assert_array_equal(value, clean.params[key], err_msg=key)
