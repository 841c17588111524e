"""The fleet on Flower: shards, FedProx's term, the ClientApp's round (no torch), and
`actcomp fleet local` as users run it: real SuperLink and SuperNode processes on 127.0.0.1,
FedAvg's arithmetic on the files the nodes wrote, a node SIGKILLed mid-round, a node over
its budget, and no process left behind."""
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

from actcomp_edge.host.fleet import parse_partition, partition
from actcomp_edge.core.npz import load_npz
from device_helpers import device
from helpers import ACTCOMP, ENV, REPO, actcomp, assert_one_line_error, write_profile

pytest.importorskip("flwr", reason="the fleet tests need the `fleet` extra (flwr)")


# ---- shards --------------------------------------------------------------------------

def test_iid_shards_are_equal_disjoint_and_cover_the_data():
    labels = np.repeat([0, 1, 2], 10)
    shards = partition(labels, 3, parse_partition("iid"), seed=1)
    assert [len(s) for s in shards] == [10, 10, 10]
    assert sorted(np.concatenate(shards).tolist()) == list(range(30))


def test_dirichlet_shards_skew_the_labels_and_are_seeded():
    labels = np.repeat([0, 1], 500)
    shards = partition(labels, 4, parse_partition("dirichlet:0.1"), seed=3)
    assert sorted(np.concatenate(shards).tolist()) == list(range(1000))
    assert min(len(s) for s in shards) >= 4
    share = [labels[s].mean() for s in shards]  # the share of class 1 on each node
    assert max(share) - min(share) > 0.5          # alpha 0.1: far from the global 0.5
    again = partition(labels, 4, parse_partition("dirichlet:0.1"), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))
    wide = partition(labels, 4, parse_partition("dirichlet:1000"), seed=3)
    assert all(abs(labels[s].mean() - 0.5) < 0.1 for s in wide)  # large alpha: near iid


@pytest.mark.parametrize("text", ["dirichlet", "dirichlet:0", "dirichlet:-1", "dirichlet:nan",
                                  "noniid", "iid:2"])
def test_bad_partitions_are_refused(text):
    with pytest.raises(ValueError, match="--partition must be iid or dirichlet:ALPHA"):
        parse_partition(text)


def test_too_few_images_for_the_nodes_is_refused():
    with pytest.raises(ValueError, match="cannot give 5 nodes 4 each"):
        partition(np.zeros(12, np.int64), 5, ("iid", None))


# ---- FedProx's term in the runner's step ----------------------------------------------

def test_fedprox_adds_mu_times_the_drift_to_the_gradient(artifact, image_folder):
    """Two SGD steps: the second with FedProx's term moves the weights by exactly
    -lr * mu * (w1 - w0) more than without it (momentum or not: the state after step 1 is
    the same), with clipping off."""
    from device_runner.data import load
    from device_runner.runtime import Trainer
    trainer = Trainer(artifact, threads=1)
    m = trainer.manifest
    data = load(image_folder, (m.input.height, m.input.width), m.num_classes)
    x, y = data.batch(np.arange(8), m.input.mean, m.input.std)
    w0 = {k: v.copy() for k, v in trainer.params.items()}
    lr, mu = 0.05, 0.5
    assert trainer.step(x, y, lr, None, proximal=(mu, w0)).applied  # w == w0: no term yet
    after_one = {k: np.array(v, copy=True) for k, v in trainer.state_arrays().items()}
    w1 = {k: v.copy() for k, v in trainer.params.items()}
    trainer.step(x, y, lr)
    plain = {k: v.copy() for k, v in trainer.params.items()}
    trainer.load_state_arrays(after_one)
    trainer.step(x, y, lr, None, proximal=(mu, w0))
    for name in w0:
        expected = plain[name] - lr * mu * (w1[name] - w0[name])
        scale = np.abs(w1[name] - w0[name]).max() * lr * mu
        assert scale > 0, name
        assert np.abs(trainer.params[name] - expected).max() <= 1e-3 * scale + 1e-7, name


# ---- the ClientApp's round, in a process where torch cannot be imported ---------------

NODE_SCRIPT = """
import json, sys
sys.modules["torch"] = None  # any import of torch now fails
from pathlib import Path
import numpy as np
from device_runner import fleet
from actcomp_edge.core.npz import load_npz, save_npz
artifact, data, out, run_id, rounds = sys.argv[1:4] + [int(sys.argv[4]), json.loads(sys.argv[5])]
node = fleet.parse_node({"artifact": artifact, "data": data, "out": out, "name": "n0",
                         "threads": 1, "checkpoint-every": 1})
infos = {}
for r, epochs in rounds:  # each round starts from the previous one's weights (one node)
    start = (load_npz(Path(artifact) / "weights.npz") if r == 1 else
             load_npz(Path(out) / f"round-{r - 1:04d}" / "weights.npz"))
    params, metrics, info = fleet.train_round(
        node, start, {"server-round": r, "rounds": 3, "local-epochs": epochs}, run_id)
    infos[r] = dict(info, steps=metrics["steps"])
print(json.dumps({"infos": infos, "torch": any(
    n == "torch" or n.startswith("torch.") for n in sys.modules if sys.modules[n] is not None)}))
"""


def node_rounds(artifact, data, out, run_id, rounds, crash_at=None):
    env = dict(ENV, ACTCOMP_CRASH_AT=f"step:{crash_at}") if crash_at else ENV
    return subprocess.run([sys.executable, "-c", NODE_SCRIPT, str(artifact), str(data),
                           str(out), str(run_id), json.dumps(rounds)],
                          capture_output=True, text=True, env=env, timeout=600)


def rounds_kept(out: Path) -> list:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("round-"))


def test_a_node_killed_mid_round_resumes_it_exactly_and_never_imports_torch(
        artifact, image_folder, tmp_path):
    """A node SIGKILLed at step 3 of round 2 (a checkpoint every step), started again for the
    same run and round, ends round 2 with the weights of a node never killed; round 3 takes
    its state from round 2; only two rounds stay on disk; torch is never imported."""
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    done = node_rounds(artifact, image_folder, clean, 7, [[1, 1], [2, 1], [3, 1]])
    assert done.returncode == 0, done.stderr[-2000:]
    ran = json.loads(done.stdout.strip().splitlines()[-1])
    assert not ran["torch"] and ran["infos"]["1"]["steps"] == 5  # 36 images, batch 8
    assert ran["infos"]["3"]["state_from"].endswith("round-0002")
    crash = node_rounds(artifact, image_folder, killed, 7, [[1, 1], [2, 1]], crash_at=8)
    assert crash.returncode == -signal.SIGKILL
    again = node_rounds(artifact, image_folder, killed, 7, [[2, 1], [3, 1]])
    assert again.returncode == 0, again.stderr[-2000:]
    infos = json.loads(again.stdout.strip().splitlines()[-1])["infos"]
    assert infos["2"]["resumed"] and not infos["3"]["resumed"]
    for r in ("round-0002", "round-0003"):
        want, got = load_npz(clean / r / "weights.npz"), load_npz(killed / r / "weights.npz")
        assert all(np.array_equal(want[k], got[k]) for k in want), r
    assert rounds_kept(killed) == ["round-0002", "round-0003"]


def test_a_round_resumes_only_for_the_same_run_and_settings(artifact, image_folder,
                                                            tmp_path):
    out = tmp_path / "node"
    assert node_rounds(artifact, image_folder, out, 7, [[1, 1]]).returncode == 0
    trained = load_npz(out / "round-0001" / "weights.npz")
    same = node_rounds(artifact, image_folder, out, 7, [[1, 1]])  # the same round again
    info = json.loads(same.stdout.strip().splitlines()[-1])["infos"]["1"]
    assert info["resumed"] and info["steps"] == 5  # its result again, nothing retrained
    again = load_npz(out / "round-0001" / "weights.npz")
    assert all(np.array_equal(trained[k], again[k]) for k in trained)
    other = node_rounds(artifact, image_folder, out, 7, [[1, 2]])  # 2 local epochs now
    assert other.returncode == 0, other.stderr[-2000:]
    info = json.loads(other.stdout.strip().splitlines()[-1])["infos"]["1"]
    assert not info["resumed"] and info["steps"] == 10
    assert node_rounds(artifact, image_folder, out, 7, [[2, 1]]).returncode == 0
    new_run = node_rounds(artifact, image_folder, out, 8, [[1, 1]])  # another federation
    info = json.loads(new_run.stdout.strip().splitlines()[-1])["infos"]["1"]
    assert not info["resumed"] and info["state_from"] == ""
    assert rounds_kept(out) == ["round-0001"]  # run 7's rounds are gone


def test_a_node_started_with_report_streams_its_profiles(artifact, image_folder, tmp_path):
    """report=URL: every local step's memory record reaches the stream, as from
    `actcomp-device train --report`, and the spool is kept in the node's folder."""
    from device_runner import fleet
    stream = tmp_path / "profiles.jsonl"
    node = fleet.parse_node({"artifact": str(artifact), "data": str(image_folder),
                             "out": str(tmp_path / "node"), "threads": 1,
                             "report": f"file://{stream}"})
    _, metrics, _ = fleet.train_round(node, load_npz(artifact / "weights.npz"),
                                      {"server-round": 1, "local-epochs": 1}, log=lambda m: None)
    records = [json.loads(line) for line in stream.read_text().splitlines()]
    steps = [r for r in records if r["type"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, metrics["steps"] + 1))
    # in this (pytest) process the heap may already hold the step's memory: the working set
    # can be 0 here, but it is always the record's own peak over its baseline
    assert all(r["working_set_bytes"] == r["peak_rss_bytes"] - r["baseline_rss_bytes"] >= 0
               for r in steps)
    assert all(r["ranks"] and all(r["ranks"].values()) for r in steps)
    assert (tmp_path / "node" / "spool").is_dir()


def test_bad_node_configs_are_one_line_errors(artifact, image_folder, tmp_path):
    from device_runner.fleet import NodeConfigError, parse_node
    cases = [({"data": str(image_folder)}, "node-config needs artifact=PATH"),
             ({"artifact": str(tmp_path), "data": str(image_folder)}, "no manifest.json"),
             ({"artifact": str(artifact), "data": str(tmp_path / "none")}, "no such file"),
             ({"artifact": str(artifact), "data": str(image_folder), "colour": 1},
              "unknown key 'colour'"),
             ({"artifact": str(artifact), "data": str(image_folder), "budget": "lots"},
              "node-config budget"),
             ({"artifact": str(artifact), "data": str(image_folder), "threads": 0},
              "threads must be a positive integer")]
    for config, message in cases:
        with pytest.raises(NodeConfigError, match=message):
            parse_node(config)


# ---- `actcomp fleet local`: real Flower processes ---------------------------------------

def fleet_args(artifact, data, out, *extra):
    return ["fleet", "local", artifact, "--data", data, "--val-data", data, "--threads", "1",
            "--out", out, *extra]


def leftover(run: Path) -> list:
    """Live processes of a finished run: in a process group the run started or saw (its
    fleet.json), or naming its SuperLink's port."""
    recorded = json.loads((run / "fleet.json").read_text())
    groups, port = set(recorded["groups"]), recorded["superlink_port"]
    assert set(recorded["pids"].values()) <= groups
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if stat[0] != "Z" and (int(stat[2]) in groups or f":{port}" in cmdline
                                   or f"--port {port}" in cmdline):
                found.append(cmdline)
    return found


BOARD = {"name": "test board", "ram": "4GiB", "cores": 1, "budget": "2GiB",
         "runtime_baseline": "100MiB", "serial_port": "/dev/null", "arch": "x86_64"}


def test_two_nodes_one_round_is_fedavg_of_what_the_nodes_wrote(artifact, image_folder,
                                                               tmp_path):
    out = tmp_path / "run"
    proc = actcomp(*fleet_args(artifact, image_folder, out, "--nodes", "2", "--rounds", "1",
                               "--profile", write_profile(tmp_path / "board.toml", BOARD)))
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["flwr_version"] == version("flwr")
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    first = summary["rounds"][1]
    assert first["nodes_replied"] == 2 and first["failures"] == []
    params = load_npz(artifact / "weights.npz")
    raw = sum(v.nbytes for v in params.values())
    # each node gets every trainable array once (.npy framing: < 200 bytes an array)
    assert 2 * raw < first["bytes_sent"] < 2 * (raw + 200 * len(params))
    assert first["bytes_received"] == first["bytes_sent"]
    # FedAvg: the new global is the example-weighted mean of the weights the nodes wrote
    nodes = {n["node"]: n for n in summary["nodes"]}
    assert set(nodes) == {"node-0", "node-1"}
    trained = {name: load_npz(out / "nodes" / name / "round-0001" / "weights.npz")
               for name in nodes}
    total = sum(nodes[name]["examples"] for name in nodes)
    glob = load_npz(out / "server" / "global_weights.npz")
    assert set(glob) == set(params)
    for key in params:
        mean = sum(nodes[name]["examples"] * trained[name][key].astype(np.float64)
                   for name in nodes) / total
        assert np.allclose(glob[key], mean, rtol=1e-5, atol=1e-7), key
    assert not np.allclose(glob["classifier.weight"], params["classifier.weight"])
    for n in nodes.values():
        assert n["peak_rss_bytes"] > n["working_set_bytes"] > 0
        assert n["budget_bytes"] == 2 * 2 ** 30 and n["budget_violations"] == 0
        assert n["flower_processes_peak_rss_bytes"] > 0
        assert n["client_entry_rss_bytes"] > 0
    assert sum(summary["shard_sizes"]) == 38  # 36 images + the 2 junk files, linked
    journal = [json.loads(line) for line in (out / "server" / "fleet.jsonl").read_text()
               .splitlines()]
    assert [r["round"] for r in journal] == [0, 1]
    # the global weights as a deployable model: `actcomp-device eval --write-inference`
    done = device("eval", artifact, "--weights", out / "server" / "global_weights.npz",
                  "--data", image_folder, "--write-inference", tmp_path / "model.onnx")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["accuracy"] == journal[-1]["val_accuracy"]
    import onnxruntime as ort
    from device_runner.data import load
    manifest = json.loads((artifact / "manifest.json").read_text())
    norm = manifest["input"]
    data = load(image_folder, (norm["height"], norm["width"]), manifest["num_classes"])
    x, y = data.batch(np.arange(len(data)), norm["mean"], norm["std"])
    session = ort.InferenceSession(str(tmp_path / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert float((logits.argmax(axis=1) == y).mean()) == pytest.approx(journal[-1]["val_accuracy"])
    # `actcomp report` plots the journal: accuracy per round, memory per node
    from actcomp_edge.host.report import build_report
    report = build_report([out / "server" / "fleet.jsonl"], tmp_path / "report")
    assert set(report["plots"]) == {"fleet"} and (tmp_path / "report" / "fleet.png").is_file()
    drawn = report["plots"]["fleet"]
    assert drawn["fleet central val accuracy"] == ([0, 1], [r["val_accuracy"] for r in journal])
    assert drawn["fleet: node-0 peak RSS"] == ([1], [nodes["node-0"]["peak_rss_bytes"] / 2 ** 20])
    assert leftover(out) == []


def test_fedadam_ends_with_the_artifacts_dtypes(artifact, image_folder, tmp_path):
    """FedAdam's server update is float64: the global weights are saved, evaluated and sent
    as the artifact's float32."""
    out = tmp_path / "run"
    proc = actcomp(*fleet_args(artifact, image_folder, out, "--nodes", "2", "--rounds", "2",
                               "--strategy", "fedadam", "--server-lr", "0.001"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounds = json.loads((out / "summary.json").read_text())["rounds"]
    assert [r["nodes_replied"] for r in rounds] == [0, 2, 2]
    start, glob = load_npz(artifact / "weights.npz"), load_npz(out / "server" /
                                                               "global_weights.npz")
    assert all(glob[k].dtype == start[k].dtype for k in start)
    # Flower's FedAdam moves a coordinate by < 0.75 eta in round 1 and < 0.86 eta in round 2
    # (its bias-corrected step, |m| / sqrt(v) <= 1.35 after two rounds)
    moved = max(float(np.abs(glob[k] - start[k]).max()) for k in start)
    assert 0.0005 < moved < 1.61 * 0.001


def test_a_node_killed_mid_round_is_left_out_and_rejoins_from_its_checkpoint(
        artifact, image_folder, tmp_path):
    out = tmp_path / "run"
    argv = [*ACTCOMP, *map(str, fleet_args(artifact, image_folder, out, "--nodes", "2",
                                           "--rounds", "2", "--local-epochs", "12"))]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)
    try:
        index = out / "nodes" / "node-1" / "round-0001" / "checkpoints" / "checkpoints.json"
        deadline = time.time() + 300
        while not index.exists():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.05)
        pid = json.loads((out / "fleet.json").read_text())["pids"]["node-1"]
        os.killpg(pid, signal.SIGKILL)  # the board loses power: SuperNode, SuperExec, runner
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "node-1 exited (signal SIGKILL): started again" in stdout
    summary = json.loads((out / "summary.json").read_text())
    first, second = summary["rounds"][1], summary["rounds"][2]
    assert first["nodes_replied"] == 1 and len(first["failures"]) == 1
    assert "heartbeat" in first["failures"][0]
    assert second["nodes_replied"] == 2 and second["failures"] == []
    node1 = next(n for n in summary["nodes"] if n["node"] == "node-1")
    assert node1["rounds"] == [2]
    assert node1["state_from"][0][0] == 2 and node1["state_from"][0][1].endswith("round-0001")
    assert summary["restarts"] == {"node-1": 1}
    assert leftover(out) == []


def test_a_node_over_its_budget_says_so_and_is_left_out(artifact, image_folder, tmp_path):
    out = tmp_path / "run"
    big = write_profile(tmp_path / "big.toml", BOARD)
    tiny = write_profile(tmp_path / "tiny.toml", BOARD, budget="1MiB")
    profiles = f"{big},{tiny}"
    proc = actcomp(*fleet_args(artifact, image_folder, out, "--nodes", "2", "--rounds", "1",
                               "--profile", profiles))
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads((out / "summary.json").read_text())["rounds"][1]
    assert first["nodes_replied"] == 1
    assert len(first["failures"]) == 1
    assert first["failures"][0].startswith("node-1: budget 1.0 MiB is too small")
    assert "left out: node-1: budget 1.0 MiB is too small" in proc.stdout


def test_bad_fleet_input_is_one_line_before_any_process(artifact, image_folder, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("results")
    no_images = tmp_path / "labels.npz"
    np.savez(no_images, labels=np.zeros(10, np.int64))
    cases = [(["--data", tmp_path / "none"], "--data"),
             (["--partition", "dirichlet:-1"], "--partition must be"),
             (["--proximal-mu", "0.1"], "give --strategy fedprox"),
             (["--out", tmp_path / "full"], "is not an empty folder"),
             (["--out", tmp_path / "full" / "x"], "is not an empty folder"),
             (["--summary", tmp_path / "none" / "s.json"], "its folder does not exist"),
             (["--data", no_images], "cannot read dataset"),
             (["--profile", "no-such-board"], "unknown device profile"),
             (["--nodes", "0"], "expected a positive integer"),
             (["--schedule", "sawtooth"], "unknown schedule 'sawtooth'")]
    for extra, message in cases:
        argv = ["fleet", "local", artifact, "--data", image_folder, "--val-data", image_folder,
                "--out", tmp_path / "new", *extra]
        assert_one_line_error(actcomp(*argv, timeout=120), message)
    assert not (tmp_path / "new").exists() or not any((tmp_path / "new").iterdir())


def test_the_fleet_extra_is_bounded_and_the_device_extra_never_pulls_flwr():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert extras["fleet"] == ["flwr>=1.42,<1.43"]
    assert not any("flwr" in r or "fleet" in r for r in extras["device"])
