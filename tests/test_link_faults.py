"""Fault injection on the profile link: nothing is lost, nothing comes twice.

A `ProfileSender` streams records over a real TCP connection to a host `Receiver`
(link_helpers.Host) through link_helpers.LossyProxy, which injects, in both directions
(DATA frames to the host and ACKs back), from seeded random.Random generators:

- bit flips in bytes and dropped bytes (each about 1 byte in 6000; in 300 for ACKs);
- whole frames sent twice, and chunks of the older stream in that direction (1 to 4
  frames, from this or an earlier connection, sometimes cut mid-frame) sent again
  (each for 2% of the frames; 10% of the ACKs);
- an outage: the proxy unplugged for more than 120 s (every connection cut, new ones
  refused) while training goes on sending a record every 20-50 ms, then plugged back;
- a host restart while the backlog drains: a new Receiver continuing from the position
  the host saved, as `actcomp monitor` does.

Two such runs go on concurrently (one fixture, two threads) so the module takes 2 to 2.5
minutes:

- unbounded: the spool holds the whole outage; the host receives every record sent,
  exactly once and in order ([(seq, record)] compared with what was sent), nothing
  dropped or skipped, nothing delivered while unplugged;
- bounded (max_spool_records far below what the outage produces): while unplugged the
  spool on disk, sampled every second, never holds more than max_spool_records records
  and its files stay within the frames and bytes that bound implies; `sender.dropped`
  counts the drops; the host receives the records from before the outage, then one
  {"type": "spool_overflow", "dropped": K, "first_seq": a, "last_seq": b} report whose
  range is exactly the records that never arrived, then every later record exactly once
  in order; the host's `Receiver.lost` is b - a (the report itself took seq b).
  For the report to be exact the run is synchronised with the host where the sender
  cannot know what the host holds: everything is acknowledged before the unplug, and
  training waits after the plug until the backlog is half drained (a record dropped
  while its frame is on the wire may have reached the host anyway).

In both: send() never takes more than a second (training never waits for the link), and
the faults did happen (their counts are in every assertion message).
"""
import random
import threading
import time
import traceback
from pathlib import Path

import pytest

from actcomp_edge.core.protocol import ACK, DATA, FrameDecoder, encode_frame
from device_runner import transport
from device_runner.transport import ProfileSender
from link_helpers import Host, LossyProxy, make_records, wait_until

OUTAGE = 121.0                  # seconds unplugged, at least 120
PACE = (0.02, 0.05)             # seconds between records, as a training step
RATE = 1 / 6000                 # per byte: dropped, and again: a bit flipped
DUPLICATE = REPLAY = 0.02       # per frame
ACKS = {"rate": 1 / 300, "duplicate": 0.1, "replay": 0.1}  # the few, short ACKs: more often
SEGMENT_FRAMES = 64             # small segments: the spool rotates and deletes often
BOUND = 400                     # max_spool_records of the bounded run
FLUSH_TIMEOUT = 120.0           # generous: a loaded 2-core machine
SEEDS = {"unbounded": 7100, "bounded": 7200}


class Outage(threading.Thread):
    """One run: records before, during and after an outage, and a host restart."""

    def __init__(self, name, folder: Path, bounded: bool):
        super().__init__(name=f"outage-{name}", daemon=True)
        self.label, self.folder, self.bounded = name, folder, bounded
        self.seed = SEEDS[name]
        self.rng = random.Random(self.seed)
        self.max_spool = BOUND if bounded else 100_000
        self.sent, self.slowest, self.error = [], 0.0, None
        self.facts = {}                 # what was seen on the way, asserted by the test
        self.spool_samples = []         # while unplugged (bounded run)
        self.host = self.proxy = self.sender = None

    # ---- the run, in the thread

    def run(self):
        try:
            self._run()
        except Exception:  # for the test to report
            self.error = traceback.format_exc()
        finally:
            for end in (self.sender and self.sender.close, self.proxy and self.proxy.unplug,
                        self.host and self.host.stop):
                if end:
                    end()

    def send(self):
        record = make_records(1, start=len(self.sent))[0]
        start = time.perf_counter()
        seq = self.sender.send(record)
        self.slowest = max(self.slowest, time.perf_counter() - start)
        assert seq == len(self.sent), (seq, len(self.sent))
        self.sent.append(record)
        time.sleep(self.rng.uniform(*PACE))

    def _run(self):
        facts, began = self.facts, time.monotonic()
        self.host = host = Host()
        self.proxy = proxy = LossyProxy(host.port, RATE, seed=100 * self.seed,
                                        duplicate=DUPLICATE, replay=REPLAY, back=ACKS)
        self.sender = sender = ProfileSender(
            f"socket://127.0.0.1:{proxy.port}", self.folder, max_spool_records=self.max_spool,
            resend_after=0.3, backoff=(0.1, 2.0))

        for _ in range(60):
            self.send()
        if self.bounded:  # the host holds exactly what the sender forgot
            facts["synced_before"] = sender.flush(timeout=FLUSH_TIMEOUT)
            facts["head_at_unplug"] = sender.next_seq
            # the host acknowledges a feed before it has saved it: wait for the saving
            wait_until(lambda: host.next_seq == sender.next_seq, 10)
            facts["host_at_unplug"] = host.next_seq

        proxy.unplug()
        unplugged = time.monotonic()
        facts["seconds_before"] = unplugged - began
        delivered_while_down, connected_while_down = set(), 0
        next_sample = unplugged + 1.0
        while time.monotonic() - unplugged < OUTAGE:
            self.send()
            now = time.monotonic()
            if now >= next_sample:
                next_sample = now + 1.0
                if now - unplugged > 5.0:  # what was in the host's socket is in by now
                    delivered_while_down.add(len(host.wait_for(0, 0)))
                    connected_while_down += sender.connected
                if self.bounded:
                    self.spool_samples.append(dict(spool_state(self.folder),
                                                   pending=sender.pending,
                                                   dropped=sender.dropped))
        facts["outage_seconds"] = time.monotonic() - unplugged
        if self.spool_samples:
            facts["spool_worst"] = {key: max(s[key] for s in self.spool_samples)
                                    for key in self.spool_samples[0]}
        facts["delivered_while_down"] = sorted(delivered_while_down)
        facts["connected_while_down"] = connected_while_down
        facts["dropped_at_plug"] = sender.dropped
        facts["next_seq_at_plug"] = sender.next_seq
        facts["pending_at_plug"] = sender.pending

        proxy.plug()
        plugged = time.monotonic()
        if self.bounded:  # below the bound again before training goes on
            facts["drained_after_plug"] = wait_until(
                lambda: sender.pending <= BOUND // 2, FLUSH_TIMEOUT)
            for _ in range(30):
                self.send()
        else:  # restart the host while the outage's backlog is on its way
            mark = len(host.wait_for(0, 0))
            deadline = time.monotonic() + FLUSH_TIMEOUT
            while len(host.wait_for(0, 0)) < mark + 200 and time.monotonic() < deadline:
                self.send()
        facts["pending_at_restart"] = sender.pending
        facts["seconds_plug_to_restart"] = time.monotonic() - plugged
        host.restart(down_seconds=0.5)
        for _ in range(60):
            self.send()

        flushing = time.monotonic()
        facts["flushed"] = sender.flush(timeout=FLUSH_TIMEOUT)
        facts["seconds_flush"] = time.monotonic() - flushing
        facts["slowest_send"] = self.slowest
        facts["pending_after_flush"] = sender.pending
        facts["last_error"] = sender.last_error
        wait_until(lambda: host.next_seq == len(self.sent), 30)  # saved after it acked
        self.delivered = [(f.seq, f.record) for f in host.wait_for(0, 0)]
        facts["lost"], facts["duplicates"] = host.lost, host.duplicates
        facts["corrupt"], facts["connections"] = host.corrupt, host.connections
        facts["dropped"], facts["resends"] = sender.dropped, sender.resends
        facts["spool_after"] = spool_state(self.folder)

    # ---- for the assertions, in the test

    def finish(self, timeout):
        self.join(timeout)
        assert not self.is_alive(), f"{self.label} run still going after {timeout} s"
        assert self.error is None, self.error

    def counts(self):
        """The faults injected and what the ends saw of them, for assertion messages."""
        up, down = self.proxy.counts("up"), self.proxy.counts("down")
        return (f"seed {self.seed}: to the host {up}, acks back {down}; sender resends "
                f"{self.sender.resends}, dropped {self.sender.dropped}; host duplicates "
                f"{self.host.duplicates}, corrupt frames {self.host.corrupt}, lost "
                f"{self.host.lost}, connections {self.host.connections}; "
                f"records sent {len(self.sent)}; {self.facts}")


def spool_state(folder: Path) -> dict:
    """What the spool files hold right now, read as a restarted sender would: files, bytes,
    frames, and the records still kept (seqs from the head to the last one)."""
    files = size = 0
    frames = []
    for path in sorted(folder.glob("segment-*.frames")):
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # deleted by the sender meanwhile
            continue
        files, size = files + 1, size + len(data)
        frames += FrameDecoder().feed(data)
    head = max([f.base for f in frames if f.kind == DATA]
               + [f.seq + 1 for f in frames if f.kind == ACK] + [0])
    last = max((f.seq for f in frames if f.kind == DATA), default=-1)
    return {"files": files, "bytes": size, "frames": len(frames),
            "records": max(0, last - head + 1)}


def describe(delivered, expected):
    """Where two lists of (seq, record) first differ."""
    for i, (got, want) in enumerate(zip(delivered, expected)):
        if got != want:
            return f"first difference at #{i}: got {got}, expected {want}"
    return f"lengths {len(delivered)} and {len(expected)} (equal up to the shorter)"


@pytest.fixture(scope="module")
def outages(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transport.Spool, "SEGMENT_FRAMES", SEGMENT_FRAMES)
        runs = {name: Outage(name, tmp_path_factory.mktemp(name) / "spool",
                             bounded=name == "bounded") for name in SEEDS}
        for run in runs.values():
            run.start()
        yield runs
        for run in runs.values():
            run.join(2 * OUTAGE + 4 * FLUSH_TIMEOUT)


def check_common(run):
    facts, counts = run.facts, run.counts()
    print(f"{run.label}: {counts}")
    assert facts["outage_seconds"] >= 120, counts
    assert len(facts["delivered_while_down"]) == 1, counts  # nothing came while unplugged
    assert facts["connected_while_down"] == 0, counts
    assert facts["flushed"] and facts["pending_after_flush"] == 0, counts
    assert run.slowest < 1.0, f"send() took {run.slowest:.3f} s; {counts}"
    up, down = run.proxy.counts("up"), run.proxy.counts("down")
    total = {key: up[key] + down[key] for key in up}
    assert all(total.values()), counts  # every kind of fault happened
    assert run.sender.resends > 0 and run.host.duplicates > 0 and run.host.corrupt > 0, counts
    assert facts["connections"] >= 3, counts  # before, after the plug, after the restart
    # acknowledged segments are deleted: the newest stays, and one being retired
    assert facts["spool_after"]["files"] <= 2 and facts["spool_after"]["records"] == 0, counts


def test_an_outage_within_the_spool_bound_loses_nothing(outages):
    run = outages["unbounded"]
    run.finish(2 * OUTAGE + 4 * FLUSH_TIMEOUT)
    counts = run.counts()
    expected = list(enumerate(run.sent))
    assert run.delivered == expected, f"{describe(run.delivered, expected)}; {counts}"
    assert run.facts["dropped"] == 0 and run.facts["lost"] == 0, counts
    assert run.facts["pending_at_plug"] > OUTAGE / 0.1, counts  # the outage's backlog
    check_common(run)
    up, down = run.proxy.counts("up"), run.proxy.counts("down")
    assert all(up.values()) and all(down.values()), counts  # both directions, every fault


def test_an_outage_beyond_the_spool_bound_reports_exactly_what_was_dropped(outages):
    run = outages["bounded"]
    run.finish(2 * OUTAGE + 4 * FLUSH_TIMEOUT)
    facts, counts = run.facts, run.counts()
    assert facts["synced_before"] and facts["host_at_unplug"] == facts["head_at_unplug"], counts
    assert facts["drained_after_plug"], counts

    # on disk while unplugged: never more than the bound, reached all the same
    samples = run.spool_samples
    frame_size = max(len(encode_frame(seq, record, seq)) for seq, record in
                     enumerate(run.sent))
    frame_size = max(frame_size, len(encode_frame(
        2 ** 31, {"type": "spool_overflow", "dropped": 2 ** 31, "first_seq": 2 ** 31,
                  "last_seq": 2 ** 31}, 2 ** 31)))
    # the oldest record kept (seq head) is in the oldest segment kept, after at most
    # SEGMENT_FRAMES - 1 older frames; each of the BOUND - 1 sends since wrote a report
    # (the drop) and its record
    frames_bound = SEGMENT_FRAMES - 1 + 1 + 2 * (BOUND - 1)
    assert len(samples) >= OUTAGE / 2, counts
    worst = facts["spool_worst"]
    assert worst["records"] == BOUND and worst["pending"] == BOUND, (worst, counts)
    assert worst["frames"] <= frames_bound, (worst, counts)
    assert worst["bytes"] <= frames_bound * frame_size, (worst, frame_size, counts)
    assert worst["files"] <= frames_bound // SEGMENT_FRAMES + 2, (worst, counts)
    assert worst["dropped"] > 0 and samples[-1]["dropped"] > samples[0]["dropped"], counts

    # the drops, as counted, reported and received
    first, plugged = facts["head_at_unplug"], facts["next_seq_at_plug"]
    last = plugged - BOUND            # the report takes the oldest kept seq
    dropped = last - first + 1
    assert dropped > OUTAGE / 0.1 - BOUND, counts
    assert facts["dropped_at_plug"] == dropped, counts
    assert facts["dropped"] == dropped, f"records dropped after the plug; {counts}"
    report = {"type": "spool_overflow", "dropped": dropped, "first_seq": first,
              "last_seq": last}
    expected = (list(enumerate(run.sent[:first])) + [(last, report)]
                + [(seq, run.sent[seq]) for seq in range(last + 1, len(run.sent))])
    assert run.delivered == expected, f"{describe(run.delivered, expected)}; {counts}"
    assert facts["lost"] == last - first, counts
    check_common(run)
