"""The training session the runner's CLI and a fleet round share, and the step's profile record
(StepRecord) on the wire and read back."""
import dataclasses
import json

import pytest

from actcomp_edge.core.protocol import encode_record
from actcomp_edge.core.record import REQUIRED, StepRecord


def full_record() -> StepRecord:
    return StepRecord(
        step=3, loss=2.5, step_seconds=0.01, rss_bytes=100, peak_rss_bytes=120,
        baseline_rss_bytes=90, kept_bytes={"a": 10, "b": 20}, kept_bytes_total=30,
        kept_full_bytes=50, ranks={"a": [1, 2, 3, 4], "b": None}, epoch=1, lr=0.05,
        grad_norm=0.3, kept_full_bytes_per_layer={"a": 12, "b": 20, "classifier": 18},
        eps=0.8, method="hosvd", working_set_bytes=30, predicted_working_set_bytes=40,
        budget_bytes=None, budget_exceeded=False, budget_action=None,
        seconds_split={"forward": 0.004, "backward": 0.006})


def test_a_step_record_comes_back_from_the_wire_as_it_was_sent():
    record = full_record()
    sent = record.to_json()
    assert sent["type"] == "step"
    assert set(sent) == {"type"} | {f.name for f in dataclasses.fields(StepRecord)}
    assert StepRecord.from_json(json.loads(encode_record(sent))) == record


def test_a_step_record_read_back_needs_only_the_fields_every_runner_wrote():
    sent = full_record().to_json()
    lean = {k: sent[k] for k in ("type", *REQUIRED)}
    read = StepRecord.from_json(lean)
    assert read.step == 3 and read.lr is None and read.budget_action is None
    for bad in ({**lean, "type": "epoch"}, {k: v for k, v in lean.items() if k != "loss"},
                {**lean, "step": True}, {**lean, "kept_bytes": {"a": 1.5}},
                {**lean, "ranks": {"a": [1, "2"]}}, ["not", "a", "dict"],
                {**lean, "method": 5}, {**lean, "budget_bytes": 1.5},
                {**lean, "budget_exceeded": 1}, {**lean, "lr": "0.1"}):
        with pytest.raises(ValueError):
            StepRecord.from_json(bad)


def test_a_session_trains_and_streams_full_step_records(artifact, image_folder, tmp_path):
    """Session.open + load_data + train, in process: every step record has every field of
    StepRecord (the budget's None without one), and the summary counts the steps."""
    from device_runner.session import Session
    from device_runner.train import Options
    session = Session.open(artifact, 8, None, 1, log=lambda line: None)
    assert session.batch_size == 8
    train_set, val_set = session.load_data(image_folder, spool_dir=artifact).split(0.1, 0)
    stream = tmp_path / "profile.jsonl"
    options = Options(epochs=1, batch_size=session.batch_size, lr=0.002, max_steps=3)
    summary = session.train(train_set, val_set, tmp_path / "run", options,
                            f"file://{stream}", tmp_path / "run" / "spool")
    records = [json.loads(line) for line in stream.read_text().splitlines()]
    steps = [StepRecord.from_json(r) for r in records if r["type"] == "step"]
    assert [s.step for s in steps] == [1, 2, 3] == list(range(1, summary["steps"] + 1))
    optional = {"budget_bytes", "budget_exceeded", "budget_action"}
    for step in steps:
        assert all(getattr(step, f.name) is not None
                   for f in dataclasses.fields(StepRecord) if f.name not in optional)
        assert step.budget_exceeded is False and step.method == "hosvd"
    assert records[-1]["type"] == "summary" and (tmp_path / "run" / "weights.npz").is_file()



TRANSIENT_RUN = """
import json, sys
import numpy as np
from device_runner.session import Session
from device_runner.train import Options, TrainingRun
artifact, folder, out = sys.argv[1:]
session = Session.open(artifact, 8, None, 1, log=lambda line: None)
train_set = session.load_data(folder, spool_dir=artifact)
own_validate = TrainingRun.validate

def validate_with_a_transient(run):
    np.ones(24 << 20, np.float32).sum()  # 96 MiB, freed on return
    own_validate(run)
TrainingRun.validate = validate_with_a_transient
summary = session.train(train_set, None, out, Options(epochs=2, batch_size=8, lr=0.002))
print(json.dumps({**summary, "images": len(train_set)}))
"""


def test_the_working_set_leaves_out_the_work_between_epochs(artifact, image_folder, tmp_path):
    """An epoch's evaluation and writes are not steps: a 96 MiB transient there (touched,
    then freed) must not reach the next epoch's step peaks, hence the working set. In a
    fresh process, as a run is (a test process's heap after hundreds of tests may not hand
    the transient back: seen once in the full suite)."""
    import subprocess
    import sys
    from helpers import ENV
    proc = subprocess.run([sys.executable, "-c", TRANSIENT_RUN, str(artifact), str(image_folder),
                           str(tmp_path / "run")], capture_output=True, text=True, env=ENV,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] > summary["images"] // 8  # steps ran after the first evaluation
    assert summary["working_set_bytes"] < 64 << 20
    # the run's peak keeps it (a fresh mapping: RSS before the first step may since have shrunk)
    assert summary["peak_rss_bytes"] - summary["baseline_rss_bytes"] > 80 << 20
