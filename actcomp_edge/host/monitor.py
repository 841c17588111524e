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
import select
import socket
import sys
import time
from pathlib import Path

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


class View:
    """One status line per step (overwritten on a terminal) and a line per violation."""

    def __init__(self, budget: int | None, stream=sys.stdout):
        self.budget, self.stream, self.tty = budget, stream, stream.isatty()
        self.violations = []
        self.received = 0  # records shown

    def step(self, r: dict) -> None:
        working = r.get("peak_rss_bytes", 0) - r.get("baseline_rss_bytes", 0)
        budget = r.get("budget_bytes") or self.budget
        over = bool(r.get("budget_exceeded")) or (budget is not None and working > budget)
        ranks = r.get("ranks") or {}
        short = short_names(list(ranks))
        rank_text = " ".join(f"{short[name]}{tuple(v)}" for name, v in ranks.items() if v)
        line = (f"step {r.get('step')} epoch {r.get('epoch')} loss {r.get('loss', float('nan')):.4f}"
                f" {1e3 * r.get('step_seconds', 0):.0f} ms  working set {working / MIB:.1f}"
                + (f"/{budget / MIB:.1f}" if budget else "") + " MiB"
                f"  kept {r.get('kept_bytes_total', 0) / MIB:.3f} MiB  {rank_text}")
        if over:
            self.violations.append(r.get("step"))
            self.write(f"BUDGET VIOLATION at step {r.get('step')}: working set "
                       f"{working / MIB:.1f} MiB > budget {budget / MIB:.1f} MiB", newline=True)
        self.write(line, newline=not self.tty)

    def other(self, r: dict) -> None:
        kind = r.get("type")
        if kind == "epoch":
            self.write(f"epoch {r.get('epoch')}: val accuracy {r.get('val_accuracy'):.4f}", True)
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


class TcpServer:
    """Listen on host:port; one runner connection at a time, re-accepted after a drop."""

    def __init__(self, host: str, port: int):
        self.server = socket.create_server((host, port), reuse_port=False)
        self.server.setblocking(False)
        self.conn = None

    def read(self) -> bytes:
        if self.conn is None:
            ready, _, _ = select.select([self.server], [], [], 0.1)
            if ready:
                self.conn, _ = self.server.accept()
            return b""
        ready, _, _ = select.select([self.conn], [], [], 0.1)
        if not ready:
            return b""
        try:
            data = self.conn.recv(65536)
        except OSError:
            data = b""
        if not data:  # the runner went away: wait for it to reconnect
            self.conn.close()
            self.conn = None
        return data

    def write(self, data: bytes) -> None:
        if self.conn is not None:
            self.conn.sendall(data)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.server.close()


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
                    if store is not None:
                        store.save(record.get("_seq"), record)
                    if handle(record, view):
                        return
        time.sleep(0.2)


def handle(record: dict, view: View) -> bool:
    """Show one record; True when it is the runner's summary (the end of the run)."""
    view.received += 1
    if record.get("type") == "step":
        view.step(record)
    else:
        view.other(record)
    return record.get("type") == "summary"


NOTHING_RECEIVED = 3  # exit code: the link opened, but no record came before --idle-timeout


def open_monitor_link(url: str) -> tuple:
    """(read, write, close) of the link the monitor listens on; ValueError, one line naming
    the fix, for a URL that cannot be opened (a port missing, in use or out of range, a serial
    port that does not exist, a socket:// nobody listens on)."""
    if url.startswith("tcp://"):
        host, _, port = url[len("tcp://"):].rpartition(":")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"monitor {url}: expected tcp://HOST:PORT with a port in 1..65535 "
                             f"(e.g. tcp://0.0.0.0:7777)")
        try:
            link = TcpServer(host or "0.0.0.0", int(port))
        except OSError as e:
            raise ValueError(f"monitor {url}: cannot listen on port {port}: "
                             f"{e.strerror or e} (choose another port)") from None
        return link.read, link.write, link.close
    import serial
    try:
        port = serial.serial_for_url(url, timeout=0.1)
    except serial.SerialException as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"monitor {url}: cannot open it: {reason} (a serial port that "
                         f"exists, socket://HOST:PORT where a runner listens, or "
                         f"tcp://HOST:PORT to listen)") from None
    return (lambda: port.read(max(1, port.in_waiting))), port.write, port.close


def monitor(url: str, output: str | None, budget: int | None, idle_timeout: float) -> int:
    view = View(budget)
    store = Store(output) if output else None
    try:
        if url.startswith("file://"):
            follow_file(Path(url[len("file://"):]), view, store, idle_timeout)
        else:
            read, write, close = open_monitor_link(url)
            receiver = Receiver(read=read, write=write, auto_ack=False,
                                next_seq=store.next_seq if store else None)
            last_data, done = time.time(), False
            try:
                while not done and time.time() - last_data < idle_timeout:
                    frames = receiver.poll()
                    if frames:
                        last_data = time.time()
                    for frame in frames:
                        if store is not None:
                            store.save(frame.seq, frame.record)
                        done = handle(frame.record, view) or done
                    receiver.ack()  # after saving: what is acknowledged is on disk
            finally:
                close()
            if receiver.lost:
                view.write(f"{receiver.lost} records never arrived (dropped by the runner)", True)
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
