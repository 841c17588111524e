"""The profile stream: frames on the wire, the decoder against splits, garbage and
corruption (fuzzed in test_fuzz.py), the Receiver, delivery over a real pty and over TCP
through a lossy, unpluggable proxy with a host restart, a fresh host after a half-acknowledged
backlog, the spool across SIGKILL and its bound, file://, and a send() that never waits for
the link (the link's faults at length: test_link_faults.py)."""
import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
import tty
import zlib

import pytest
import serial

from actcomp_edge.core.link import open_link
from actcomp_edge.core.protocol import (ACK, DATA, MAX_PAYLOAD, Frame, FrameDecoder, ProtocolError,
                                   Receiver, encode_ack, encode_frame)
from device_runner.transport import ProfileSender
from helpers import REPO
from link_helpers import Host, LossyProxy, free_port, listen, make_records, wait_until


def data_frame(seq, record, base=0):
    return Frame(DATA, seq, base, record)


# ---------------------------------------------------------------- bytes on the wire

def test_frame_bytes_are_the_documented_layout():
    record = {"step": 3, "loss": 0.5, "name": "conv"}
    frame = encode_frame(7, record, base=5)
    payload = b'{"loss":0.5,"name":"conv","step":3}'  # sorted keys, no spaces
    header = (b"AC" + b"\x01" + b"\x01"                   # magic, version, DATA
              + b"\x00\x00\x00\x07" + b"\x00\x00\x00\x05"    # seq 7, base 5
              + b"\x00\x00\x00\x23")                        # payload length 35
    assert len(payload) == 0x23
    assert frame[:16] == header
    assert frame[16:20] == bytes.fromhex("f9549602")            # crc32(header)
    assert frame[20:-4] == payload
    assert frame[-4:] == bytes.fromhex("22daab45")              # crc32(header, hcrc, payload)
    assert zlib.crc32(header) == 0xF9549602 and zlib.crc32(frame[:-4]) == 0x22DAAB45
    assert zlib.crc32(b"123456789") == 0xCBF43926               # the standard CRC-32
    assert len(frame) == 20 + 35 + 4

    ack = encode_ack(7)
    assert ack == bytes.fromhex("41430102 00000007 00000000 00000000 2e1904ce bca32063")
    assert FrameDecoder().feed(frame + ack) == [data_frame(7, record, 5), Frame(ACK, 7)]


def test_encoding_errors_are_protocol_errors():
    for bad in ([1, 2], "text", None):
        with pytest.raises(ProtocolError):
            encode_frame(0, bad)
    with pytest.raises(ProtocolError):
        encode_frame(0, {"x": object()})
    with pytest.raises(ProtocolError):
        encode_frame(0, {"x": "y" * MAX_PAYLOAD})
    for seq, base in [(-1, 0), (2 ** 32, 0), (3, 4), (1.0, 0)]:
        with pytest.raises(ProtocolError):
            encode_frame(seq, {}, base)
    assert issubclass(ProtocolError, ValueError)
    with pytest.raises(ProtocolError):
        FrameDecoder().feed("AC")


def test_numpy_values_and_nan_are_carried():
    np = pytest.importorskip("numpy")
    record = {"loss": np.float32(0.25), "n": np.int64(3), "shape": np.array([2, 3]),
              "ok": np.bool_(True), "bad": float("nan")}
    (frame,) = FrameDecoder().feed(encode_frame(0, record))
    assert frame.record["loss"] == 0.25 and frame.record["n"] == 3
    assert frame.record["shape"] == [2, 3] and frame.record["ok"] is True
    assert frame.record["bad"] != frame.record["bad"]  # NaN


# ---------------------------------------------------------------- decoder

def sample_stream():
    records = make_records(3)
    frames = [data_frame(0, records[0]), Frame(ACK, 41), data_frame(1, records[1], 0),
              data_frame(2, records[2], 1)]
    wire = [encode_frame(f.seq, f.record, f.base) if f.kind == DATA else encode_ack(f.seq)
            for f in frames]
    return frames, wire


def test_frames_split_at_every_byte_boundary():
    frames, wire = sample_stream()
    stream = b"".join(wire)
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        assert decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]) == frames, cut
        assert decoder.dropped == decoder.skipped == 0
    decoder = FrameDecoder()
    assert [f for i in range(len(stream)) for f in decoder.feed(stream[i:i + 1])] == frames
    rng = random.Random(1)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 8)))
        decoder = FrameDecoder()
        pieces = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
        assert [f for piece in pieces for f in decoder.feed(piece)] == frames


def test_garbage_between_frames_is_skipped():
    frames, wire = sample_stream()
    garbage = [b"", b"A", b"AC", b"AC\x01", b"AC\x01\x01\x00\x00", b"\x00" * 50,
               bytes(range(256)), wire[0][:30], b"ACAC" * 10, b"A"]
    rng = random.Random(2)
    for _ in range(100):
        stream = b"".join(rng.choice(garbage) + w for w in wire) + rng.choice(garbage)
        decoder = FrameDecoder()
        got = [f for i in range(0, len(stream), 7) for f in decoder.feed(stream[i:i + 7])]
        assert got == frames
        assert decoder.skipped > 0 or all(not g for g in garbage)


def test_a_corrupted_byte_loses_that_frame_only():
    frames, wire = sample_stream()
    target = 2  # the middle DATA frame
    for position in range(len(wire[target])):
        for bit in (0, 7):
            bad = bytearray(wire[target])
            bad[position] ^= 1 << bit
            stream = b"".join(wire[:target]) + bytes(bad) + b"".join(wire[target + 1:])
            decoder = FrameDecoder()
            assert decoder.feed(stream) == frames[:target] + frames[target + 1:], position
            if position >= 3:  # past magic and version: a frame, rejected
                assert decoder.dropped == 1, position


def test_a_corrupted_length_does_not_stall_the_stream():
    frames, wire = sample_stream()
    bad = bytearray(wire[2])
    bad[12:16] = (MAX_PAYLOAD).to_bytes(4, "big")  # in range, but the header CRC disagrees
    decoder = FrameDecoder()
    assert decoder.feed(wire[0] + bytes(bad) + wire[3]) == [frames[0], frames[3]]
    assert decoder.dropped == 1
    # a header that checks out but announces more than MAX_PAYLOAD: rejected at once
    header = b"AC\x01\x01" + (5).to_bytes(4, "big") * 2 + (MAX_PAYLOAD + 1).to_bytes(4, "big")
    huge = header + zlib.crc32(header).to_bytes(4, "big")
    decoder = FrameDecoder()
    assert decoder.feed(huge + wire[3]) == [frames[3]] and decoder.dropped == 1


def test_intact_frames_with_bad_content_are_dropped():
    def raw(kind, seq, base, payload):
        header = b"AC\x01" + bytes([kind]) + seq.to_bytes(4, "big") + base.to_bytes(4, "big") \
            + len(payload).to_bytes(4, "big")
        head = header + zlib.crc32(header).to_bytes(4, "big")
        return head + payload + zlib.crc32(head + payload).to_bytes(4, "big")
    bad = [raw(9, 1, 0, b"{}"), raw(DATA, 1, 0, b"[1]"), raw(DATA, 1, 0, b"{nope"),
           raw(DATA, 1, 2, b"{}"), raw(ACK, 1, 0, b"{}"), raw(DATA, 1, 0, b"\xff\xfe"),
           raw(DATA, 1, 0, b"[" * 100000)]
    good = raw(DATA, 3, 1, b'{"a":1}')
    decoder = FrameDecoder()
    assert decoder.feed(b"".join(bad) + good) == [Frame(DATA, 3, 1, {"a": 1})]
    assert decoder.dropped == len(bad)


# ---------------------------------------------------------------- receiver

def test_receiver_delivers_once_in_order_and_acks_cumulatively():
    acks = []
    rx = Receiver(write=acks.append, next_seq=0)
    records = make_records(10)
    wire = [encode_frame(i, r) for i, r in enumerate(records)]
    order = [0, 1, 3, 4, 1, 0, 2, 6, 5, 5, 9, 7, 8, 9]
    delivered = []
    for seq in order:
        delivered += rx.feed(wire[seq])
    assert [f.seq for f in delivered] == list(range(10))
    assert [f.record for f in delivered] == records
    assert rx.duplicates == 4 and rx.lost == 0 and rx.next_seq == 10
    ack_seqs = [FrameDecoder().feed(a)[0].seq for a in acks]
    assert ack_seqs == [0, 1, 1, 1, 1, 1, 4, 4, 6, 6, 6, 7, 9, 9]


def test_receiver_skips_below_base_and_resumes_after_restart():
    acks = []
    rx = Receiver(write=acks.append, next_seq=0)
    records = make_records(8)
    first = rx.feed(encode_frame(0, records[0]) + encode_frame(2, records[2]))
    assert [f.seq for f in first] == [0]
    # the sender dropped 1..3 (2 had arrived): 5 says so with base 4
    assert [f.seq for f in rx.feed(encode_frame(5, records[5], base=4))] == [2]
    assert rx.lost == 2 and rx.next_seq == 4
    assert [f.seq for f in rx.feed(encode_frame(4, records[4], base=4))] == [4, 5]
    restarted = Receiver(write=acks.append, next_seq=rx.next_seq)  # host restart, position saved
    assert restarted.feed(encode_frame(5, records[5], 4)) == []     # resent: already saved
    assert FrameDecoder().feed(acks[-1])[0].seq == 5                # and acknowledged again
    fresh = Receiver(write=acks.append)  # no saved position: starts at the first base seen
    late = fresh.feed(encode_frame(7, records[7], 6) + encode_frame(6, records[6], 6))
    assert [f.seq for f in late] == [6, 7]
    far = Receiver(write=acks.append, next_seq=0)  # a skip costs nothing per lost seq
    assert [f.seq for f in far.feed(encode_frame(2 ** 32 - 1, {}, 2 ** 32 - 1))] == [2 ** 32 - 1]
    assert far.lost == 2 ** 32 - 1


def test_receiver_over_a_pyserial_link_and_failing_ack_writes():
    port = serial.serial_for_url("loop://", timeout=0.2)
    port.write(encode_frame(0, {"a": 1}) + encode_frame(1, {"a": 2}))  # the loop echoes
    rx = Receiver(port, next_seq=0)
    assert [f.record for f in rx.poll()] == [{"a": 1}, {"a": 2}]
    assert FrameDecoder().feed(port.read(64)) == [Frame(ACK, 1)]        # the ACK it wrote back
    port.close()

    def broken(_):
        raise OSError("unplugged")
    rx = Receiver(write=broken, next_seq=0)
    assert [f.seq for f in rx.feed(encode_frame(0, {}))] == [0] and rx.ack_errors == 1
    with pytest.raises(ProtocolError):
        rx.poll()


# ---------------------------------------------------------------- links

def test_send_never_waits_for_an_absent_host_which_comes_later(tmp_path):
    port = free_port()
    sender = ProfileSender(f"socket://127.0.0.1:{port}", tmp_path / "spool",
                           backoff=(0.05, 0.3))
    records = make_records(1000)
    start = time.perf_counter()
    for record in records:
        sender.send(record)
    assert time.perf_counter() - start < 2.0  # functional, not a benchmark: no waiting
    assert wait_until(lambda: sender.last_error is not None)
    assert not sender.connected and "127.0.0.1" in sender.last_error
    assert sender.pending == 1000
    host = Host(port)
    try:
        assert sender.flush(timeout=20)
        delivered = host.wait_for(1000, 5)
        assert [(f.seq, f.record) for f in delivered] == list(enumerate(records))
    finally:
        sender.close()
        host.stop()


def test_send_never_waits_for_a_host_that_stopped_reading(tmp_path):
    listener = listen(0)
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    sender = ProfileSender(f"socket://127.0.0.1:{listener.getsockname()[1]}", tmp_path / "s",
                           write_timeout=0.2)
    big = {"blob": "x" * 4000}
    start = time.perf_counter()
    for i in range(1000):  # 4 MB: far more than the socket buffers hold
        sender.send(dict(big, i=i))
    assert time.perf_counter() - start < 2.0
    assert wait_until(lambda: accepted and sender.connected)
    time.sleep(0.3)
    assert sender.pending == 1000
    sender.close()
    listener.close()


def test_pty_delivers_500_records_exactly_once_in_order(tmp_path):
    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        sender = ProfileSender(os.ttyname(slave), tmp_path / "spool", resend_after=0.5)
        records = make_records(500)

        def train():
            for record in records:
                sender.send(record)
                time.sleep(0.0005)
        trainer = threading.Thread(target=train)
        trainer.start()

        def read_master():
            ready, _, _ = select.select([master], [], [], 0.05)
            return os.read(master, 65536) if ready else b""
        rx = Receiver(read=read_master, write=lambda data: os.write(master, data), next_seq=0)
        delivered = []
        deadline = time.monotonic() + 30
        while len(delivered) < 500 and time.monotonic() < deadline:
            delivered += rx.poll()
        trainer.join()
        assert [(f.seq, f.record) for f in delivered] == list(enumerate(records))
        assert rx.duplicates == 0 and rx.decoder.dropped == 0
        while not sender.flush(timeout=0.05):  # the last ACKs
            rx.poll()
        assert sender.pending == 0
        sender.close()
    finally:
        os.close(master)
        os.close(slave)


def test_tcp_through_a_lossy_proxy_unplugged_and_a_host_restart(tmp_path):
    host = Host()
    proxy = LossyProxy(host.port, rate=1 / 4000, seed=5)
    sender = ProfileSender(f"socket://127.0.0.1:{proxy.port}", tmp_path / "spool",
                           resend_after=0.3, backoff=(0.05, 0.4))
    records = make_records(400)
    slowest = 0.0

    def train(batch, pause):
        nonlocal slowest
        for record in batch:
            start = time.perf_counter()
            sender.send(record)
            slowest = max(slowest, time.perf_counter() - start)
            time.sleep(pause)
    try:
        train(records[:100], 0.002)
        proxy.unplug()                      # 1.5 s without a cable; training goes on
        delivered_before = host.wait_for(0, 0)
        train(records[100:200], 0.015)
        assert len(host.wait_for(0, 0)) == len(delivered_before) <= 100
        assert not sender.connected
        proxy.plug()
        train(records[200:300], 0.002)
        host.restart()                      # a new Receiver, from the saved position
        train(records[300:], 0.002)
        assert sender.flush(timeout=40), (sender.pending, sender.last_error)
        delivered = host.wait_for(400, 5)
        assert [(f.seq, f.record) for f in delivered] == list(enumerate(records))
        assert slowest < 0.5
        assert proxy.flipped > 0 and proxy.lost > 0 and sender.resends > 0
    finally:
        sender.close()
        proxy.unplug()
        host.stop()


def test_a_reconnect_resends_what_the_dead_connection_swallowed(tmp_path):
    host = Host()
    # no resend timer in this test: only the reconnect can bring the records back
    sender = ProfileSender(f"socket://127.0.0.1:{host.port}", tmp_path / "spool",
                           resend_after=600, backoff=(0.05, 0.2))
    records = make_records(40)
    try:
        for record in records[:20]:
            sender.send(record)
        assert sender.flush(timeout=10)
        host.restart(down_seconds=0.5)  # the frames below go into the closed connection
        for record in records[20:]:
            sender.send(record)
        assert sender.flush(timeout=10)
        delivered = host.wait_for(40, 5)
        assert [(f.seq, f.record) for f in delivered] == list(enumerate(records))
    finally:
        sender.close()
        host.stop()


def accept_one(listener, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn, _ = listener.accept()
            conn.settimeout(0.05)
            return conn
        except OSError:  # socket.timeout
            continue
    raise AssertionError("the sender did not connect")


def recv(conn) -> bytes:
    try:
        return conn.recv(65536)
    except OSError:  # socket.timeout: nothing yet
        return b""


def test_a_fresh_host_gets_a_backlog_that_an_earlier_host_half_acknowledged(tmp_path):
    """Frames spooled while no host listened claim base 0; after a first host acknowledged
    0..19 and left, a monitor without a saved position (next_seq=None) starts at the base of
    the first frame it sees: it must be 20, not 0, or it waits forever for 0..19."""
    port = free_port()
    sender = ProfileSender(f"socket://127.0.0.1:{port}", tmp_path / "spool",
                           backoff=(0.05, 0.2), resend_after=0.3)
    records = make_records(50)
    try:
        for record in records:
            sender.send(record)
        first = listen(port)
        conn = accept_one(first)
        decoder, seen = FrameDecoder(), []
        assert wait_until(lambda: seen.extend(decoder.feed(recv(conn))) or seen)
        conn.sendall(encode_ack(19))
        assert wait_until(lambda: sender.pending == 30)
        conn.close()
        first.close()
        second = listen(port)
        conn = accept_one(second)
        rx = Receiver(write=conn.sendall)  # no saved position
        delivered = []

        assert wait_until(lambda: delivered.extend(rx.feed(recv(conn))) or len(delivered) >= 30,
                          timeout=20), (rx.next_seq, len(delivered))
        assert [(f.seq, f.record) for f in delivered] == list(enumerate(records))[20:]
        assert sender.flush(timeout=10) and rx.lost == 0
        conn.close()
        second.close()
    finally:
        sender.close()


def test_file_link_appends_fsynced_json_lines(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", spy)
    path = tmp_path / "new" / "profile.jsonl"
    records = make_records(50)
    with ProfileSender(f"file://{path}", tmp_path / "spool") as sender:
        for record in records:
            sender.send(record)
        assert sender.flush(timeout=10)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines == [json.dumps(r, sort_keys=True, separators=(",", ":")) for r in records]
    assert [json.loads(line) for line in lines] == records
    assert str(path) in synced
    with open(path, "ab") as f:
        f.write(b'{"step":4')  # a line torn by a power cut
    with ProfileSender(f"file://{path}", tmp_path / "spool") as sender:  # continues
        assert sender.pending == 0 and sender.next_seq == 50
        sender.send({"step": 50})
        assert sender.flush(timeout=10)
    assert path.read_text().splitlines()[-2:] == ['{"step":4', '{"step":50}']


def test_open_link_serial_urls():
    link = open_link("loop://")
    link.write(b"abc")
    assert link.read(timeout=0.5) == b"abc" and link.read(timeout=0.05) == b""
    link.close()
    with pytest.raises(ValueError):
        open_link("nosuchscheme://x")
    with pytest.raises(OSError):
        open_link(f"socket://127.0.0.1:{free_port()}")



def test_the_link_module_imports_without_pyserial():
    """pyserial is imported only to open a serial link: the core loads without it."""
    code = ("import sys; sys.modules['serial'] = None; from actcomp_edge.core import link; "
            "link.check_url('socket://h:1', board=True); "
            f"link.open_link('tcp://127.0.0.1:{free_port()}').close()")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                   env=dict(os.environ, PYTHONPATH=str(REPO)))

# ---------------------------------------------------------------- spool

KILLED_SENDER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from device_runner.transport import ProfileSender
from tests.link_helpers import make_records
sender = ProfileSender(sys.argv[2], sys.argv[3])
for record in make_records(int(sys.argv[4])):
    sender.send(record)
print("sent", flush=True)
time.sleep(60)
"""


def test_spool_survives_sigkill_and_a_torn_last_record(tmp_path):
    spool, n = tmp_path / "spool", 300
    unreachable = f"socket://127.0.0.1:{free_port()}"
    child = subprocess.Popen([sys.executable, "-c", KILLED_SENDER, str(REPO), unreachable,
                              str(spool), str(n)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "sent\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    records = make_records(n)

    with ProfileSender(unreachable, spool) as sender:
        assert sender.pending == n and sender.next_seq == n

    segments = sorted(spool.glob("segment-*.frames"))
    last_frame = len(encode_frame(n - 1, records[-1], 0))
    with open(segments[-1], "r+b") as f:  # a torn last record: half of it written
        f.truncate(os.path.getsize(segments[-1]) - last_frame // 2)
    with ProfileSender(unreachable, spool) as sender:
        assert sender.pending == n - 1 and sender.next_seq == n - 1
        extra = make_records(5, start=1000)
        assert [sender.send(r) for r in extra] == list(range(n - 1, n + 4))
        assert sender.pending == n + 4  # unreachable: nothing drains

    out = tmp_path / "out.jsonl"
    with ProfileSender(f"file://{out}", spool) as sender:  # drains from its start
        assert sender.flush(timeout=10)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == records[:-1] + extra


def test_spool_replaces_a_corrupt_middle_record_and_is_exclusive(tmp_path):
    spool = tmp_path / "spool"
    unreachable = f"socket://127.0.0.1:{free_port()}"
    records = make_records(10)
    with ProfileSender(unreachable, spool) as sender:
        with pytest.raises(ProtocolError):
            ProfileSender(unreachable, spool)  # one sender per spool
        for record in records:
            sender.send(record)
    (segment,) = spool.glob("segment-*.frames")
    data = bytearray(segment.read_bytes())
    offset = sum(len(encode_frame(i, r, 0)) for i, r in enumerate(records[:4]))
    data[offset + 30] ^= 0xFF  # inside record 4's payload
    segment.write_bytes(bytes(data))
    out = tmp_path / "out.jsonl"
    with ProfileSender(f"file://{out}", spool) as sender:
        assert sender.flush(timeout=10)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == records[:4] + [{"type": "spool_lost", "seq": 4}] + records[5:]


def test_spool_bound_drops_the_oldest_and_reports_it(tmp_path):
    spool = tmp_path / "spool"
    port = free_port()
    records = make_records(13)
    with ProfileSender(f"socket://127.0.0.1:{port}", spool, max_spool_records=5) as sender:
        for record in records[:12]:
            sender.send(record)
        assert sender.dropped == 8 and sender.pending == 5
    # restarted (the report is reloaded and extended), then the host appears
    with ProfileSender(f"socket://127.0.0.1:{port}", spool, max_spool_records=5,
                       backoff=(0.05, 0.2)) as sender:
        sender.send(records[12])
        assert sender.dropped == 1
        host = Host(port)
        try:
            assert sender.flush(timeout=10)
            delivered = host.wait_for(5, 5)
        finally:
            host.stop()
    report = {"type": "spool_overflow", "dropped": 9, "first_seq": 0, "last_seq": 8}
    assert [(f.seq, f.record) for f in delivered] == \
        [(8, report)] + [(i, records[i]) for i in range(9, 13)]
    assert sum(len(s.read_bytes()) for s in spool.glob("segment-*.frames")) < 1000  # acked: gone


def test_a_full_spool_stays_small_on_disk_while_the_link_is_down(tmp_path, monkeypatch):
    from device_runner import transport
    monkeypatch.setattr(transport.Spool, "SEGMENT_FRAMES", 8)
    spool = tmp_path / "spool"
    unreachable = f"socket://127.0.0.1:{free_port()}"
    records = make_records(300)
    with ProfileSender(unreachable, spool, max_spool_records=5) as sender:
        for record in records:
            sender.send(record)
        assert sender.dropped == 296
    segments = list(spool.glob("segment-*.frames"))
    assert len(segments) <= 3  # the dropped records' segments are deleted
    out = tmp_path / "out.jsonl"
    with ProfileSender(f"file://{out}", spool, max_spool_records=5) as sender:
        assert sender.flush(timeout=10)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == [{"type": "spool_overflow", "dropped": 296, "first_seq": 0,
                      "last_seq": 295}] + records[296:]


def test_spool_segments_rotate_and_acknowledged_ones_are_deleted(tmp_path, monkeypatch):
    from device_runner import transport
    monkeypatch.setattr(transport.Spool, "SEGMENT_FRAMES", 16)
    out, spool = tmp_path / "out.jsonl", tmp_path / "spool"
    with ProfileSender(f"file://{out}", spool) as sender:
        for record in make_records(200):
            sender.send(record)
        assert sender.flush(timeout=10)
    assert len(list(spool.glob("segment-*.frames"))) <= 2
    with ProfileSender(f"file://{out}", spool) as sender:
        assert sender.next_seq == 200 and sender.pending == 0
    assert len(out.read_text().splitlines()) == 200


def test_the_device_side_imports_neither_torch_nor_numpy():
    code = ("import sys; import device_runner.transport, actcomp_edge.core.protocol; "
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), check=True).stdout
    assert out.strip() == "[]"
