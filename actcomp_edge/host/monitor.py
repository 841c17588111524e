"""`actcomp monitor`: receive a runner's profile stream, acknowledge it, show it, keep it.

    actcomp monitor /dev/ttyACM0 --profile pi-zero-2w -o run.jsonl     # serial (pyserial URL)
    actcomp monitor tcp://0.0.0.0:7777 --profile pi4-4gb -o run.jsonl  # listen; runner: socket://
    actcomp monitor file://run.jsonl --profile pi5-8gb                 # follow a file being written

Each record is appended to the output JSONL (with its sequence number as ``_seq``) and
flushed before it is acknowledged, so a record the runner drops from its spool is on disk.
Restarting the monitor on the same output continues after the last saved sequence number.
A step whose working set (peak RSS minus the runner's baseline) exceeds the budget, or that
the runner marked ``budget_exceeded``, is a violation: printed with its step, counted; the
exit status is 1 if there was any. The monitor ends at the runner's "summary" record, after
``--idle-timeout`` seconds without data, or on Ctrl-C.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from ..core.link import check_url, host_port, open_link, split_url
from ..core.protocol import Receiver

MIB = 2 ** 20


class Store:
    """The output JSONL: one record per line, ``_seq`` added; knows where to continue."""

    def __init__(self, path):
        self.path = Path(path)
        self.next_seq = None
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    seq = json.loads(line).get("_seq")
                except ValueError:
                    continue  # a torn last line from a crash
                if isinstance(seq, int):
                    self.next_seq = seq + 1
        self.file = open(self.path, "a")

    def save(self, seq, record: dict) -> None:
        self.file.write(json.dumps(dict(record, _seq=seq), sort_keys=True) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def short_names(names: list) -> dict:
    """name -> its shortest dotted suffix that no other name ends with (blocks.12.project,
    blocks.13.project, blocks.13.dw -> 12.project, 13.project, dw); a name that is a suffix
    of another stays whole."""
    out = {}
    for name in names:
        parts = name.split(".")
        for i in range(len(parts) - 1, -1, -1):
            tail = ".".join(parts[i:])
            if not any(other != name and (other == tail or other.endswith("." + tail))
                       for other in names):
                break
        out[name] = tail
    return out


def number(value) -> float | None:
    """value when it is a number (a record's field may be missing, null or malformed)."""
    return None if isinstance(value, bool) or not isinstance(value, (int, float)) else value


def shown(value, spec: str = ".4f", scale: float = 1.0) -> str:
    """A record's number times scale, formatted by spec; "-" when it is not a number."""
    value = number(value)
    return "-" if value is None else format(value * scale, spec)


class View:
    """One status line per step (overwritten on a terminal) and a line per violation."""

    def __init__(self, budget: int | None, stream=sys.stdout):
        self.budget, self.stream, self.tty = budget, stream, stream.isatty()
        self.violations = []
        self.received = 0  # records shown

    def step(self, r: dict) -> None:
        peak, base = number(r.get("peak_rss_bytes")), number(r.get("baseline_rss_bytes"))
        working = peak - base if peak is not None and base is not None else None
        budget = number(r.get("budget_bytes")) or self.budget
        over = r.get("budget_exceeded") is True or (
            budget is not None and working is not None and working > budget)
        ranks = r.get("ranks") if isinstance(r.get("ranks"), dict) else {}
        short = short_names(list(ranks))
        rank_text = " ".join(f"{short[name]}{tuple(v)}" for name, v in ranks.items()
                             if isinstance(v, list) and v)
        line = (f"step {r.get('step')} epoch {r.get('epoch')} loss {shown(r.get('loss'))}"
                f" {shown(r.get('step_seconds'), '.0f', 1e3)} ms  working set "
                f"{shown(working, '.1f', 1 / MIB)}"
                + (f"/{budget / MIB:.1f}" if budget else "") + " MiB"
                f"  kept {shown(r.get('kept_bytes_total'), '.3f', 1 / MIB)} MiB  {rank_text}")
        if over:
            self.violations.append(r.get("step"))
            self.write(f"BUDGET VIOLATION at step {r.get('step')}: working set "
                       f"{shown(working, '.1f', 1 / MIB)} MiB > budget "
                       f"{shown(budget, '.1f', 1 / MIB)} MiB", newline=True)
        self.write(line, newline=not self.tty)

    def other(self, r: dict) -> None:
        kind = r.get("type")
        if kind == "epoch":
            self.write(f"epoch {r.get('epoch')}: val accuracy {shown(r.get('val_accuracy'))}",
                       True)
        elif kind == "summary":
            self.write(f"summary: {r.get('steps')} steps, final loss {r.get('final_train_loss')}"
                       f", val accuracy {r.get('final_val_accuracy')}", True)
        elif kind in ("spool_overflow", "spool_lost"):
            self.write(f"the runner lost records: {json.dumps(r, sort_keys=True)}", True)

    def write(self, text: str, newline: bool) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if newline else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def follow_file(path: Path, view: View, store: Store | None, idle_timeout: float) -> None:
    """file:// stream: JSON lines appended by the runner (acknowledged by the file itself)."""
    position, last_data, buffer = 0, time.time(), ""
    while time.time() - last_data < idle_timeout:
        if path.exists():
            with open(path) as f:
                f.seek(position)
                chunk = f.read()
                position = f.tell()
            if chunk:
                last_data = time.time()
                buffer += chunk
                *lines, buffer = buffer.split("\n")
                for line in lines:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    if not isinstance(record, dict):  # not a record of the runner's
                        continue
                    if store is not None:
                        store.save(record.get("_seq"), record)
                    if handle(record, view):
                        return
        time.sleep(0.2)


def handle(record: dict, view: View) -> bool:
    """Show one record (a dict: follow_file skips other JSON, the protocol decodes none);
    True when it is the runner's summary (the end of the run)."""
    view.received += 1
    if record.get("type") == "step":
        view.step(record)
    else:
        view.other(record)
    return record.get("type") == "summary"


NOTHING_RECEIVED = 3  # exit code: the link opened, but no record came before --idle-timeout


POLL_SECONDS = 0.1  # each read of the link waits at most this long


def open_monitor_link(url: str):
    """The link the monitor receives on; ValueError, one line naming the fix, for one that
    cannot be opened (a port in use, a serial port that does not exist, a socket:// nobody
    listens on)."""
    try:
        return open_link(url)
    except OSError as e:
        scheme, rest = split_url(url)
        if scheme == "tcp":
            raise ValueError(f"monitor {url}: cannot listen on port {host_port(rest)[1]}: "
                             f"{e.strerror or e} (choose another port)") from None
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"monitor {url}: cannot open it: {reason} (a serial port that "
                         f"exists, socket://HOST:PORT where a runner listens, or "
                         f"tcp://HOST:PORT to listen)") from None


def receive(link, view: View, store: Store | None, idle_timeout: float) -> int:
    """Framed stream: save each record, then acknowledge it, until the summary or
    `idle_timeout` seconds without data; the number of records that never arrived."""
    receiver = Receiver(read=lambda: link.read(POLL_SECONDS), write=link.write,
                        auto_ack=False, next_seq=store.next_seq if store else None)
    last_data, done = time.time(), False
    while not done and time.time() - last_data < idle_timeout:
        frames = receiver.poll()
        if frames:
            last_data = time.time()
        for frame in frames:
            if store is not None:
                store.save(frame.seq, frame.record)
            done = handle(frame.record, view) or done
        receiver.ack()  # after saving: what is acknowledged is on disk
    return receiver.lost


def monitor(url: str, output: str | None, budget: int | None, idle_timeout: float) -> int:
    """Receive, show and store the stream at `url`; the exit status (module docstring)."""
    try:
        check_url(url, board=False)
    except ValueError as e:
        raise ValueError(f"monitor {url}: {e}") from None
    view = View(budget)
    store = Store(output) if output else None
    try:
        scheme, rest = split_url(url)
        if scheme == "file":
            follow_file(Path(rest), view, store, idle_timeout)
        else:
            link = open_monitor_link(url)
            try:
                lost = receive(link, view, store, idle_timeout)
            finally:
                link.close()
            if lost:
                view.write(f"{lost} records never arrived (dropped by the runner)", True)
    except KeyboardInterrupt:
        view.write("interrupted", True)
    finally:
        if store is not None:
            store.close()
    if view.violations:
        view.write(f"{len(view.violations)} budget violations (steps {view.violations[:10]})", True)
        return 1
    if not view.received:
        view.write(f"no record arrived from {url} in {idle_timeout:g} s: is the runner started "
                   f"with --report pointing here?", True)
        return NOTHING_RECEIVED
    return 0
