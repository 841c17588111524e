"""`actcomp monitor` against a scripted runner: over a pty, over TCP, following a file."""
import json
import os
import socket
import subprocess
import time
import tty
from pathlib import Path

import pytest

from actcomp_edge.core.protocol import ACK, FrameDecoder, encode_frame
from device_runner.transport import ProfileSender
from helpers import ACTCOMP, ENV, actcomp, assert_one_line_error
from link_helpers import free_port

MIB = 2 ** 20


def records(n=30, violation_at=17):
    """A run's stream: n steps (one over a 10 MiB budget), an epoch record, the summary."""
    out = []
    for step in range(1, n + 1):
        working = (12 if step == violation_at else 6) * MIB
        out.append({"type": "step", "step": step, "epoch": 1, "loss": 2.0 / step,
                    "step_seconds": 0.01, "rss_bytes": 100 * MIB + working,
                    "peak_rss_bytes": 100 * MIB + working, "baseline_rss_bytes": 100 * MIB,
                    "kept_bytes": {"a": 1000}, "kept_bytes_total": 1000, "kept_full_bytes": 2000,
                    "ranks": {"blocks.1.dw": [2, 3, 1, 1]}, "eps": 0.8, "method": "hosvd",
                    "budget_bytes": None, "budget_exceeded": False})
    out.append({"type": "epoch", "epoch": 1, "step": n, "val_accuracy": 0.5})
    out.append({"type": "summary", "steps": n, "final_train_loss": 2.0 / n,
                "final_val_accuracy": 0.5})
    return out


def start_monitor(url, output, *extra):
    return subprocess.Popen([*ACTCOMP, "monitor", url, "--budget", "10MiB", "-o", str(output),
                             "--idle-timeout", "60", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def check_result(proc, output, sent):
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err          # a violation was seen
    assert "BUDGET VIOLATION at step 17" in out
    saved = [json.loads(line) for line in Path(output).read_text().splitlines()]
    assert [r["_seq"] for r in saved] == list(range(len(sent)))
    assert [{k: v for k, v in r.items() if k != "_seq"} for r in saved] == sent


def test_monitor_over_a_pty(tmp_path):
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    output = tmp_path / "run.jsonl"
    proc = start_monitor(os.ttyname(slave), output)
    sent = records()
    time.sleep(1.0)  # the monitor opens the port
    for seq, record in enumerate(sent):
        os.write(master, encode_frame(seq, record))
    decoder, acked, deadline = FrameDecoder(), -1, time.time() + 60
    os.set_blocking(master, False)
    while acked < len(sent) - 1 and time.time() < deadline:  # the ACKs come back
        try:
            data = os.read(master, 4096)
        except BlockingIOError:
            time.sleep(0.05)
            continue
        acked = max([acked] + [f.seq for f in decoder.feed(data) if f.kind == ACK])
    assert acked == len(sent) - 1
    check_result(proc, output, sent)
    os.close(master)
    os.close(slave)


def test_monitor_over_tcp_with_a_real_sender(tmp_path):
    port = free_port()
    output = tmp_path / "run.jsonl"
    proc = start_monitor(f"tcp://127.0.0.1:{port}", output)
    sent = records()
    sender = ProfileSender(f"socket://127.0.0.1:{port}", tmp_path / "spool")
    for record in sent:
        sender.send(record)
    assert sender.flush(timeout=60)            # everything acknowledged by the monitor
    sender.close()
    check_result(proc, output, sent)


def test_monitor_follows_a_file(tmp_path):
    stream = tmp_path / "stream.jsonl"
    output = tmp_path / "run.jsonl"
    proc = start_monitor(f"file://{stream}", output)
    sender = ProfileSender(f"file://{stream}", tmp_path / "spool")
    sent = records()
    for record in sent:
        sender.send(record)
    assert sender.flush(timeout=30)
    sender.close()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "BUDGET VIOLATION at step 17" in out, err
    saved = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["step"] for r in saved if r["type"] == "step"] == list(range(1, 31))


def test_monitor_without_violations_exits_zero_and_bad_budget_is_one_line(tmp_path):
    port = free_port()
    proc = start_monitor(f"tcp://127.0.0.1:{port}", tmp_path / "run.jsonl")
    sender = ProfileSender(f"socket://127.0.0.1:{port}", tmp_path / "spool")
    for record in records(violation_at=None):
        sender.send(record)
    assert sender.flush(timeout=60)
    sender.close()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert_one_line_error(monitor_cli("loop://", "--budget", "lots"))


def monitor_cli(*argv):
    return actcomp("monitor", *argv, timeout=60)


def test_a_link_that_cannot_open_is_one_line_and_exit_two(tmp_path):
    """No port, a port out of range or in use, a serial port that does not exist, a
    socket:// nobody listens on: refused in one line naming the fix, before any wait."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    cases = {"tcp://localhost": "expected tcp://HOST:PORT",
             "tcp://127.0.0.1:99999": "port in 1..65535",
             f"tcp://127.0.0.1:{taken.getsockname()[1]}": "cannot listen on port",
             str(tmp_path / "ttyNOPE"): "cannot open it",
             f"socket://127.0.0.1:{free_port()}": "cannot open it"}
    try:
        for url, message in cases.items():
            assert_one_line_error(monitor_cli(url, "--idle-timeout", "5"), message)
    finally:
        taken.close()


def test_the_monitor_refuses_a_bad_url_in_the_boards_words(tmp_path):
    """A URL neither end can use gets the same one line from `actcomp monitor` as from the
    board's --report (the monitor printed pyserial's words without its URL for an unknown
    scheme, a TypeError for a socket:// without a port, and a traceback for a folder)."""
    from device_runner.transport import check_url
    for url in ("udp://1.2.3.4:5", "socket://nohost", f"file://{tmp_path}"):
        with pytest.raises(ValueError) as board:
            check_url(url)
        proc = monitor_cli(url, "--idle-timeout", "5")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (url, proc.stderr)
        words = str(board.value).removeprefix(f"--report {url}: ").split(" (")[0]
        assert proc.stderr.strip().startswith(f"actcomp: error: monitor {url}: {words}"), \
            (url, proc.stderr)


def test_a_monitor_that_receives_nothing_says_so(tmp_path):
    proc = monitor_cli(f"tcp://127.0.0.1:{free_port()}", "--idle-timeout", "1")
    assert proc.returncode == 3
    assert "no record arrived" in proc.stdout + proc.stderr


def test_layer_names_are_shortened_only_where_unambiguous():
    """The monitor's rank text names each layer by its shortest suffix no other layer has
    (it printed the last part: project ... project, and 0(...) 0(...) for a user's model)."""
    from actcomp_edge.host.monitor import View, short_names
    assert short_names(["blocks.12.project", "blocks.13.expand", "blocks.13.dw",
                        "blocks.13.project"]) == {
        "blocks.12.project": "12.project", "blocks.13.expand": "expand",
        "blocks.13.dw": "dw", "blocks.13.project": "13.project"}
    assert short_names(["features.0", "classifier.0", "0"]) == {
        "features.0": "features.0", "classifier.0": "classifier.0", "0": "0"}

    class Out:
        text = ""

        def write(self, s):
            Out.text += s

        def isatty(self):
            return False

        def flush(self):
            pass

    View(None, Out()).step({"step": 1, "ranks": {"features.0": [1, 2, 1, 1],
                                                 "classifier.0": [3, 1, 1, 1]}})
    assert "features.0(1, 2, 1, 1) classifier.0(3, 1, 1, 1)" in Out.text


def test_malformed_records_are_shown_as_far_as_they_go_not_a_traceback(tmp_path):
    """A line that is no record ([1]), a step with a null loss and no sizes, an epoch
    without val_accuracy, ranks of the wrong type: the live view shows what it can ("-"
    for what is missing) and follows the stream to the summary."""
    stream = tmp_path / "stream.jsonl"
    lines = [[1], "text",
             {"type": "step", "step": 1, "epoch": 1, "loss": None, "ranks": [3]},
             {"type": "step", "step": 2, "epoch": 1, "loss": "x", "step_seconds": "fast",
              "ranks": {"a": 5}, "peak_rss_bytes": 10, "baseline_rss_bytes": None},
             {"type": "epoch", "epoch": 1},
             {"type": "summary", "steps": 2}]
    stream.write_text("".join(json.dumps(line) + "\n" for line in lines))
    proc = start_monitor(f"file://{stream}", tmp_path / "run.jsonl")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert "step 1 epoch 1 loss - - ms  working set -/10.0 MiB  kept - MiB" in out
    assert "epoch 1: val accuracy -" in out and "summary: 2 steps" in out
