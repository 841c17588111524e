"""The device runner end to end: CLI, data, checkpoints after SIGKILL, bad input, no torch."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from actcomp_edge.core.npz import load_npz
from device_runner import checkpoint
from device_runner.data import DataError, load
from device_helpers import DEVICE, SIZE, device, train_args, wait_for_checkpoint
from helpers import ENV, REPO, SHARED, assert_error_among_progress, assert_one_line_error


def test_image_folder_loads_resizes_and_counts_junk(image_folder):
    data = load(image_folder, SIZE, num_classes=3)
    assert len(data) == 36 and data.images.shape == (36, 64, 64, 3)
    assert data.classes == ["blue", "green", "red"]
    assert sorted(Path(p).name for p, _ in data.skipped) == ["broken.jpg", "notes.txt"]
    x, y = data.batch(np.arange(4), [0.5] * 3, [0.5] * 3)
    assert x.shape == (4, 3, 64, 64) and x.dtype == np.float32 and -1 <= x.min() <= x.max() <= 1


def test_batch_is_normalised_per_channel_and_reuses_a_buffer():
    from device_runner.data import Dataset
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 5, 7, 3), dtype=np.uint8)
    data = Dataset(images, np.arange(6) % 2, ["a", "b"])
    mean, std = [0.1, 0.5, 0.9], [0.2, 0.5, 1.0]
    idx = np.array([4, 0, 3])
    expected = ((images[idx].astype(np.float64) / 255 - mean) / std).transpose(0, 3, 1, 2)
    x, y = data.batch(idx, mean, std)
    np.testing.assert_allclose(x, expected, rtol=1e-6, atol=1e-6)
    assert list(y) == [0, 0, 1]
    buffer = np.full((4, 3, 5, 7), np.nan, np.float32)
    xb, _ = data.batch(idx, mean, std, out=buffer)
    assert np.shares_memory(xb, buffer) and xb.shape == (3, 3, 5, 7)
    np.testing.assert_array_equal(xb, x)
    assert np.isnan(buffer[3]).all()  # the rows past the batch are left alone
    with pytest.raises(ValueError, match="cannot hold"):
        data.batch(np.arange(5), mean, std, out=buffer)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.parametrize("save, size", [(np.savez, (64, 64)), (np.savez_compressed, (64, 64)),
                                        (np.savez, (48, 40))])
def test_npz_images_are_read_from_disk_per_batch(tmp_path, save, size):
    """An uncompressed .npz at the artifact's size is read in place; a compressed one or one
    of another size is spooled, resized once, to an unlinked file: either way the batches are
    the images np.load gives (resized as the loader's resize), and the process does not hold
    the 24 MiB of images (RSS before/after the load and a pass over every image)."""
    from device_runner.data import ImageFile, resize
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2000, 64, 64, 3), dtype=np.uint8)
    labels = np.arange(2000) % 3
    path = tmp_path / "d.npz"
    save(path, images=images, labels=labels)
    spool = tmp_path / "spool"
    spool.mkdir()
    before = rss_mib()
    data = load(path, size, num_classes=3, spool_dir=spool)
    for start in range(0, 2000, 100):
        data.batch(np.arange(start, start + 100), [0.5] * 3, [0.5] * 3)
    grown = rss_mib() - before
    assert isinstance(data.images, ImageFile) and data.images.shape == (2000, *size, 3)
    in_place = save is np.savez and size == (64, 64)
    assert (getattr(data.images.file, "name", None) == str(path)) == in_place
    assert grown < 8, f"loading and reading 24 MiB of images grew RSS by {grown:.1f} MiB"
    assert list(spool.iterdir()) == []  # the spool is unlinked: nothing is left on disk
    idx = np.array([1999, 0, 7, 7, 1234])
    want = np.stack([resize(images[i], size) for i in idx])
    np.testing.assert_array_equal(data.images[idx], want)
    np.testing.assert_array_equal(data.images[5], resize(images[5], size))
    train, held_out = data.split(0.25, seed=3)
    rows = np.random.default_rng(3).permutation(2000)
    np.testing.assert_array_equal(held_out.images[np.arange(3)],
                                  np.stack([resize(images[i], size) for i in rows[:3]]))
    assert list(train.labels[:4]) == list(labels[rows[500:504]])
    x, y = train.batch(np.array([2, 0]), [0.0] * 3, [1.0] * 3)
    np.testing.assert_allclose(x[0], want_i := resize(images[rows[502]], size).transpose(
        2, 0, 1) / np.float32(255), rtol=1e-6)
    assert want_i.shape == (3, *size) and list(y) == [labels[rows[502]], labels[rows[500]]]


def test_npz_cut_short_is_one_line(tmp_path):
    path = tmp_path / "d.npz"
    np.savez_compressed(path, images=np.zeros((50, 8, 8, 3), np.uint8), labels=np.zeros(50))
    raw = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[:len(raw) // 3])
    with pytest.raises(DataError, match="cannot read dataset"):
        load(tmp_path / "cut.npz", (8, 8))


def test_npz_data_and_label_range(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((5, 32, 32, 3), np.uint8), labels=np.array([0, 1, 2, 3, 4]))
    with pytest.raises(DataError, match="label 3 is out of range"):
        load(path, SIZE, num_classes=3)
    np.savez(path, images=np.zeros((5, 32, 32), np.float32), labels=np.zeros(5))
    with pytest.raises(DataError, match="uint8"):
        load(path, SIZE)
    with pytest.raises(DataError, match="does not exist"):
        load(tmp_path / "nope", SIZE)


def test_train_writes_weights_inference_model_and_summary(artifact, image_folder, tmp_path):
    import onnxruntime as ort
    from device_runner.runtime import Trainer
    out = tmp_path / "run"
    proc = device(*train_args(artifact, image_folder, out, "--summary", tmp_path / "s.json"))
    assert proc.returncode == 0, proc.stderr
    assert "skipped 2 unreadable or non-image files" in proc.stderr
    assert "broken.jpg" in proc.stderr and "notes.txt" in proc.stderr  # each one named
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["steps"] == 2 * 4 and summary["epochs"] == 2   # 36 - 4 held out = 32 / 8
    assert summary["peak_rss_bytes"] >= summary["baseline_rss_bytes"] > 0
    assert 0 < summary["kept_bytes_peak"]["paper"] < summary["predicted_kept_bytes"]["paper"]
    assert {"final_train_loss", "final_val_accuracy", "median_step_seconds",
            "budget_violations"} <= set(summary)
    split = summary["step_split_seconds"]  # where the time goes: each part's median
    assert set(split) == {"prefix", "forward", "compress", "backward", "update"}
    assert all(v >= 0 for v in split.values()) and split["backward"] > 0 < split["update"]
    assert sum(split.values()) <= 1.5 * summary["median_step_seconds"]
    trainer = Trainer(artifact)
    trained = load_npz(out / "weights.npz")
    assert any(not np.array_equal(trained[k], trainer.params[k]) for k in trained)
    trainer.params = trained
    images = np.random.default_rng(0).standard_normal((3, 3) + SIZE).astype(np.float32)
    session = ort.InferenceSession(str(out / "inference.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    np.testing.assert_allclose(session.run(None, {"image": images})[0], trainer.evaluate(images),
                               rtol=1e-5, atol=1e-5)


def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_weights(artifact, image_folder,
                                                                      tmp_path):
    reference = tmp_path / "reference"
    assert device(*train_args(artifact, image_folder, reference)).returncode == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([*DEVICE, *map(str, train_args(artifact, image_folder, out))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    step = wait_for_checkpoint(out / "checkpoints", 4, proc)   # mid first epoch or later
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "weights.npz").exists() and step < 8
    resumed = device(*train_args(artifact, image_folder, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step" in resumed.stdout
    expected, got = load_npz(reference / "weights.npz"), load_npz(out / "weights.npz")
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, atol=1e-7, err_msg=key)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(artifact, image_folder, tmp_path):
    out = tmp_path / "run"
    assert device(*train_args(artifact, image_folder, out, "--max-steps", "4")).returncode == 0
    entries = json.loads((out / "checkpoints" / "checkpoints.json").read_text())
    newest = out / "checkpoints" / entries[-1]["file"]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x55
    newest.write_bytes(bytes(data))
    messages = []
    meta, _ = checkpoint.load_latest(out / "checkpoints", log=messages.append)
    assert meta["step"] == entries[-2]["step"]
    assert "fails its SHA-256 check" in messages[0]


@pytest.mark.parametrize("extra,code,message", [
    (["--budget", "1KiB"], 3, "too small"),
    (["--lr", "1e38"], 2, "non-finite loss"),
    (["--budget", "lots"], 2, "cannot read memory size"),
])
def test_bad_runs_stop_with_one_line(artifact, image_folder, tmp_path, extra, code, message):
    proc = device(*train_args(artifact, image_folder, tmp_path / "run", *extra))
    assert_error_among_progress(proc, message, code=code)


def test_tampered_artifact_and_bad_data_are_refused(artifact, tmp_path):
    import shutil
    copy = tmp_path / "art"
    shutil.copytree(artifact, copy)
    with open(copy / "backward_1.onnx", "ab") as f:
        f.write(b"\x00")
    proc = device("info", copy)
    assert proc.returncode == 2 and "fails its SHA-256 check" in proc.stderr
    bad = tmp_path / "labels.npz"
    np.savez(bad, images=np.zeros((4, 8, 8, 3), np.uint8), labels=np.array([0, 1, 7, 2]))
    proc = device("train", artifact, "--data", bad, "--out", tmp_path / "run")
    assert proc.returncode == 2 and "label 7 is out of range" in proc.stderr


def test_device_side_never_imports_torch(artifact, image_folder, tmp_path):
    """Run info, train and eval in a process where `import torch` fails."""
    code = f"""
import sys
sys.modules["torch"] = None  # any import of torch now raises ImportError
from device_runner.cli import main
assert main(["info", {str(artifact)!r}]) == 0
assert main(["train", {str(artifact)!r}, "--data", {str(image_folder)!r}, "--max-steps", "2",
             "--batch-size", "4", "--out", {str(tmp_path / 'run')!r}]) == 0
assert main(["eval", {str(artifact)!r}, "--data", {str(image_folder)!r}]) == 0
assert not any(name == "torch" or name.startswith("torch.") for name in sys.modules
               if sys.modules[name] is not None)
print("no torch")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no torch" in proc.stdout


@pytest.fixture(scope="module")
def real_or_generated(image_folder, tmp_path_factory):
    """96 ants/bees images from ../shared when present, else the generated folder."""
    shared = SHARED / "data" / "hymenoptera_train.npz"
    if not shared.exists():
        return image_folder
    with np.load(shared, allow_pickle=False) as d:
        path = tmp_path_factory.mktemp("real") / "antsbees.npz"
        np.savez(path, images=d["images"][:96], labels=d["labels"][:96])
    return path


class PtyHost:
    """The host end of a pseudo-terminal pair: a thread feeding a Receiver, ACKs written back."""

    def __init__(self):
        import select
        import threading
        import tty
        from actcomp_edge.core.protocol import Receiver
        self.master, self.slave = os.openpty()
        tty.setraw(self.master)
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)   # we keep the slave open: no hang-up between runs
        self.records = []
        self.stop = threading.Event()

        def read():
            ready, _, _ = select.select([self.master], [], [], 0.05)
            return os.read(self.master, 65536) if ready else b""
        self.receiver = Receiver(read=read, write=lambda data: os.write(self.master, data))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            self.records += [(f.seq, f.record) for f in self.receiver.poll()]

    def close(self):
        self.stop.set()
        self.thread.join(5)
        os.close(self.master)
        os.close(self.slave)


def test_end_to_end_kill_resume_and_complete_profile_stream_over_a_pty(artifact,
                                                                        real_or_generated,
                                                                        tmp_path):
    """Train through the CLI streaming profiles over a pty, SIGKILL mid-epoch, resume: same
    weights as an uninterrupted run, and the host got every record once, in order."""
    common = ["--epochs", "1", "--batch-size", "8", "--lr", "0.002", "--threads", "1",
              "--checkpoint-every", "3"]
    reference = tmp_path / "reference"
    proc = device("train", artifact, "--data", real_or_generated, *common, "--out", reference)
    assert proc.returncode == 0, proc.stderr
    host = PtyHost()
    try:
        out = tmp_path / "run"
        args = ["train", artifact, "--data", real_or_generated, *common, "--out", out,
                "--report", host.path, "--report-timeout", "20"]
        runner = subprocess.Popen([*DEVICE, *map(str, args)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=ENV)
        killed_at = wait_for_checkpoint(out / "checkpoints", 6, runner)
        runner.send_signal(signal.SIGKILL)
        runner.wait()
        resumed = device(*args, "--resume")
        assert resumed.returncode == 0, resumed.stderr
        deadline = time.time() + 20
        while time.time() < deadline and not any(r.get("type") == "summary"
                                                 for _, r in host.records):
            time.sleep(0.1)
    finally:
        host.close()
    expected, got = load_npz(reference / "weights.npz"), load_npz(out / "weights.npz")
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, atol=1e-7, err_msg=key)
    seqs = [seq for seq, _ in host.records]
    assert seqs == list(range(len(seqs)))          # every record once, in order
    assert host.receiver.lost == 0
    steps = [r["step"] for _, r in host.records if r.get("type") == "step"]
    total = json.loads(json.dumps(host.records[-1][1]))["steps"]
    assert host.records[-1][1]["type"] == "summary"
    assert set(steps) == set(range(1, total + 1))  # steps after the last checkpoint run twice
    resumed_at = int(resumed.stdout.split("resumed from step ")[1].split()[0])
    assert resumed_at >= killed_at                 # (a later checkpoint may beat the kill)
    tail = steps[len(steps) - (total - resumed_at):]
    assert tail == list(range(resumed_at + 1, total + 1))
    assert all(r["kept_bytes_total"] > 0 and r["ranks"] for _, r in host.records
               if r.get("type") == "step")


def test_profile_budget_is_the_default_budget(artifact, image_folder, tmp_path):
    text = (REPO / "profiles" / "pi-zero-2w.toml").read_text()
    lines = [('budget = "1KiB"' if line.split("=")[0].strip() == "budget" else line)
             for line in text.splitlines()]
    profile = tmp_path / "tiny.toml"
    profile.write_text("\n".join(lines) + "\n")
    proc = device(*train_args(artifact, image_folder, tmp_path / "run", "--profile", profile))
    assert proc.returncode == 3 and "budget 0.0 MiB is too small" in proc.stderr, proc.stderr


def test_threads_bound_onnxruntime_and_blas_and_default_to_the_profile_cores(artifact,
                                                                             image_folder,
                                                                             tmp_path):
    env = dict(ENV, OPENBLAS_NUM_THREADS="3", OMP_NUM_THREADS="3")
    code = ("import sys; from threadpoolctl import threadpool_info; "
            "from device_runner.runtime import Trainer; Trainer(sys.argv[1], threads=1); "
            "print(sorted({p['num_threads'] for p in threadpool_info() "
            "if p['user_api'] == 'blas'}))")
    proc = subprocess.run([sys.executable, "-c", code, str(artifact)], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[1]", proc.stderr
    profile = REPO / "profiles" / "pi-zero-2w.toml"
    summary = tmp_path / "s.json"
    args = train_args(artifact, image_folder, tmp_path / "run", "--profile", profile,
                      "--budget", "1GiB", "--max-steps", "1", "--summary", summary)
    at = args.index("--threads")
    proc = device(*(args[:at] + args[at + 2:]))  # no --threads: the profile's cores
    assert proc.returncode == 0, proc.stderr
    cores = next(int(line.split("=")[1].split("#")[0]) for line in profile.read_text().splitlines()
                 if line.split("=")[0].strip() == "cores")
    assert json.loads(summary.read_text())["threads"] == cores
    # eps ranks: the plan at their bound before the dry run, at the dry run's ranks after it
    out = proc.stdout + proc.stderr
    bound = float(re.search(r"predicts a working set of ([\d.]+) MiB", out).group(1))
    seen = float(re.search(r"the memory plan at its ranks: ([\d.]+) MiB", out).group(1))
    assert 0 < seen <= bound, out
    assert f"--threads {cores} from profile" in proc.stderr  # said, with this machine's cores
    assert (f"this machine has {os.cpu_count()} cores" in proc.stderr) == (os.cpu_count() < cores)


def readme_example() -> str:
    """The README's onnxruntime example (section "Deploy what you trained")."""
    text = (REPO / "README.md").read_text()
    after = text.split("The same with onnxruntime, numpy and Pillow only:", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def test_predict_names_each_images_class_as_the_readme_example_does(artifact, image_folder,
                                                                     tmp_path):
    """A run's inference.onnx carries the ImageFolder's class names and its preprocessing in
    its metadata; `actcomp-device predict` and the README's 10 lines give the same answer."""
    import onnxruntime as ort
    out = tmp_path / "run"
    assert device(*train_args(artifact, image_folder, out)).returncode == 0
    meta = ort.InferenceSession(str(out / "inference.onnx"), providers=[
        "CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert json.loads(meta["classes"]) == ["blue", "green", "red"]  # the folders, sorted
    assert json.loads(meta["input_size"]) == list(SIZE) and meta["input_name"] == "image"
    images = [image_folder / "red" / "1.png", image_folder / "green" / "2.jpg"]
    proc = device("predict", out, *images)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(p) for p in images]
    assert all(line.split(": ")[1].split()[0] in ("blue", "green", "red") for line in lines)
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    assert len(readme_example().strip().splitlines()) <= 10
    for image, line in zip(images, lines):
        example = subprocess.run([sys.executable, str(script), str(out / "inference.onnx"),
                                  str(image)], capture_output=True, text=True, env=ENV)
        assert example.returncode == 0, example.stderr
        assert example.stdout.strip() == line
    folder = device("predict", out, image_folder / "red", str(image_folder / "green" / "*.png"))
    assert folder.returncode == 2  # red/broken.jpg is unreadable: said, the rest printed
    assert "broken.jpg: unreadable" in folder.stderr
    assert len(folder.stdout.strip().splitlines()) == 12 + 6
    assert_one_line_error(device("predict", out, tmp_path / "nope.jpg"),
                          "no such image, folder or pattern")


def test_an_image_stretched_by_the_resize_is_noted(artifact, tmp_path):
    from PIL import Image
    rng = np.random.default_rng(1)
    for name in ("blue", "green", "red"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3)).astype(np.uint8)).save(
                tmp_path / "data" / name / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (20, 400, 3)).astype(np.uint8)).save(
        tmp_path / "data" / "red" / "wide.png")  # 20:1 against the artifact's 1:1
    proc = device("train", artifact, "--data", tmp_path / "data", "--max-steps", "1",
                  "--batch-size", "4", "--threads", "1", "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    note = [line for line in proc.stderr.splitlines() if "aspect ratio" in line]
    assert len(note) == 1 and "1 images were resized" in note[0] and "wide.png" in note[0]


def test_numpy_random_is_imported_without_openssl():
    """procmem.import_numpy_random: numpy.random works and is seeded as ever, OpenSSL's
    hashlib stays out, and a later `import secrets` is the real module."""
    code = """
import sys
from device_runner import procmem
procmem.import_numpy_random()
import numpy as np
print(np.random.default_rng(3).permutation(5).tolist(), "_hashlib" in sys.modules)
import secrets
print(secrets.token_hex(2) != "", hasattr(secrets, "choice"))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=ENV, check=True).stdout.split("\n")
    want = np.random.default_rng(3).permutation(5).tolist()
    assert out[0] == f"{want} False"
    assert out[1] == "True True"


def test_a_steps_results_own_their_memory(artifact):
    """Gradients, logits and new weights are numpy's own arrays, not views of onnxruntime's
    arena: a view holds its arena block for as long as the result lives (a step later for a
    gradient), and the arena then fragments beyond its plan."""
    from device_runner.runtime import Trainer
    trainer = Trainer(artifact)
    size = trainer.manifest.input.height
    images = np.random.default_rng(0).standard_normal((4, 3, size, size)).astype(np.float32)
    result = trainer.step(images, np.array([0, 1, 0, 1]), lr=0.01)
    for array in [result.logits, *result.grads.values(), *trainer.params.values()]:
        owner = array if array.base is None else array.base
        assert isinstance(owner, np.ndarray) and owner.flags.owndata, type(owner)
