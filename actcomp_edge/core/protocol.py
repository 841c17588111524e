"""Record stream from board to host: frames on the wire, an incremental decoder, a receiver.

Stdlib only: imported by the device runner and by the host.

A frame, bytes on the wire (integers big-endian, unsigned)::

    offset  size  field
    0       2     magic b"AC"
    2       1     version (1)
    3       1     type: 1 = DATA, 2 = ACK
    4       4     seq: DATA: the record's sequence number; ACK: every seq <= this one is received
    8       4     base: DATA: the sender holds no record below this seq any more (all of them
                  acknowledged, or dropped and reported); base <= seq. ACK: 0
    12      4     length of the payload in bytes, at most MAX_PAYLOAD (1 MiB); ACK: 0
    16      4     header CRC: zlib.crc32 of bytes 0..15
    20      n     payload: one record, UTF-8 JSON, keys sorted, no spaces (NaN/Infinity as
                  Python's json writes them)
    20+n    4     frame CRC: zlib.crc32 of bytes 0..20+n-1 (header and payload)

The header CRC lets a decoder reject a corrupted length at once instead of waiting for up
to MAX_PAYLOAD bytes (90 s of a 115200-baud line) before the frame CRC can tell.

Delivery: the sender numbers records 0, 1, 2, ... and resends what is not acknowledged;
the receiver (`Receiver`) delivers each seq once, in order, and answers with cumulative
ACKs. A seq below a DATA frame's `base` will never come: the receiver skips it (`lost`).
"""
from __future__ import annotations

import json
import struct
import zlib
from typing import Callable, NamedTuple, Optional

MAGIC = b"AC"
VERSION = 1
DATA = 1
ACK = 2
MAX_PAYLOAD = 1 << 20                 # bytes
MAX_SEQ = (1 << 32) - 1
HEADER = struct.Struct(">2sBBIII")    # magic, version, type, seq, base, length
CRC = struct.Struct(">I")
HEADER_SIZE = HEADER.size + CRC.size  # 20 bytes
OVERHEAD = HEADER_SIZE + CRC.size     # 24 bytes per frame around the payload


class ProtocolError(ValueError):
    """A record or call the protocol cannot carry (never raised for bytes received)."""


class Frame(NamedTuple):
    kind: int                     # DATA or ACK
    seq: int
    base: int = 0
    record: Optional[dict] = None  # DATA only


def encode_record(record: dict) -> bytes:
    """The payload of `record`: UTF-8 JSON, keys sorted. numpy scalars and arrays become
    numbers and lists (anything with `.tolist()`)."""
    if not isinstance(record, dict):
        raise ProtocolError(f"a record is a dict, not {type(record).__name__}")
    try:
        text = json.dumps(record, sort_keys=True, separators=(",", ":"), default=_plain)
    except (TypeError, ValueError, RecursionError) as e:
        raise ProtocolError(f"record is not JSON-serialisable: {e}") from None
    payload = text.encode()
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"record is {len(payload)} bytes as JSON, above {MAX_PAYLOAD}")
    return payload


def _plain(value):
    if hasattr(value, "tolist"):  # numpy scalar or array, without importing numpy
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _frame(kind: int, seq: int, base: int, payload: bytes = b"") -> bytes:
    if not all(isinstance(n, int) for n in (seq, base)) or not 0 <= base <= seq <= MAX_SEQ:
        raise ProtocolError(f"seq {seq!r}, base {base!r}: need integers "
                            f"0 <= base <= seq <= {MAX_SEQ}")
    header = HEADER.pack(MAGIC, VERSION, kind, seq, base, len(payload))
    head = header + CRC.pack(zlib.crc32(header))
    return head + payload + CRC.pack(zlib.crc32(payload, zlib.crc32(head)))


def encode_frame(seq: int, record: dict, base: int = 0) -> bytes:
    """A DATA frame carrying `record` as number `seq`. `base`: the sender holds no record
    below it any more (0: no such claim)."""
    return _frame(DATA, seq, base, encode_record(record))


def encode_ack(seq: int) -> bytes:
    """An ACK frame: every record with a seq <= `seq` is received."""
    return _frame(ACK, seq, 0)


def with_base(frame: bytes, base: int) -> bytes:
    """The DATA frame `frame` (bytes as encoded) now claiming `base`, when that is higher:
    what the sender no longer holds has grown since the frame was first encoded."""
    _, _, kind, seq, old, length = HEADER.unpack_from(frame)
    if kind != DATA or base <= old:
        return frame
    return _frame(DATA, seq, min(base, seq), frame[HEADER_SIZE:HEADER_SIZE + length])


class FrameDecoder:
    """Incremental decoder: `feed(bytes)` returns the complete, valid frames so far.

    Resynchronises after anything: bytes are scanned for the magic, a frame counts only
    if both CRCs and its content check out. Never raises for any bytes received.

    A frame cut short (the link dropped mid-frame) is given up as soon as a complete frame
    starts inside the bytes it claims, instead of holding that frame back until the claimed
    length has arrived: a payload is JSON text, which never holds a raw frame.

    - `dropped`: frames (magic and version found) rejected: bad header CRC, length above
      MAX_PAYLOAD, bad frame CRC, cut short, unknown type, or a payload that is not a JSON
      object;
    - `skipped`: bytes discarded while looking for the next frame.
    Buffered bytes are bounded by one maximal frame plus the last chunk fed.
    """

    def __init__(self):
        self._buffer = bytearray()
        self._scanned = 0    # buffer[1:_scanned] was searched for frames inside the first...
        self._waiting = []   # ...and these offsets in it hold a header whose frame is incomplete
        self.dropped = 0
        self.skipped = 0

    def feed(self, data: bytes) -> list:
        """Frames completed by `data` (bytes, bytearray or memoryview), in stream order.
        Raises ProtocolError only when `data` is not bytes-like."""
        if isinstance(data, memoryview):
            try:
                data = data.tobytes()  # any shape or stride
            except ValueError:
                raise ProtocolError("feed() was given a released memoryview") from None
        elif not isinstance(data, (bytes, bytearray)):
            raise ProtocolError(f"feed() takes bytes, not {type(data).__name__}")
        buffer = self._buffer
        buffer += data
        frames = []
        while True:
            start = buffer.find(MAGIC)
            if start < 0:  # keep a trailing first byte of the magic
                keep = 1 if buffer.endswith(MAGIC[:1]) else 0
                self._discard(len(buffer) - keep)
                return frames
            self._discard(start)
            if len(buffer) > 2 and buffer[2] != VERSION:
                self._discard(1)
                continue
            if len(buffer) < HEADER_SIZE:
                return frames
            end = self._frame_end(0)
            if end is None:  # bad header CRC or length
                self._reject(1)
                continue
            if len(buffer) < end:
                if not self._cut_short():
                    return frames
                self._reject(1)
                continue
            if not self._frame_crc_ok(0, end):
                self._reject(1)
                continue
            _, _, kind, seq, base, _ = HEADER.unpack_from(buffer)
            frame = _parse(kind, seq, base, bytes(buffer[HEADER_SIZE:end - CRC.size]))
            if frame is None:  # intact, but not a frame this version knows
                self._reject(end)
                continue
            self._drop(end)
            frames.append(frame)

    def _frame_end(self, at: int) -> Optional[int]:
        """Where the frame whose header is at buffer[at:] ends, None if the header is bad."""
        _, _, _, _, _, length = HEADER.unpack_from(self._buffer, at)
        (header_crc,) = CRC.unpack_from(self._buffer, at + HEADER.size)
        if header_crc != _crc(self._buffer, at, at + HEADER.size) or length > MAX_PAYLOAD:
            return None
        return at + HEADER_SIZE + length + CRC.size

    def _frame_crc_ok(self, at: int, end: int) -> bool:
        (frame_crc,) = CRC.unpack_from(self._buffer, end - CRC.size)
        return frame_crc == _crc(self._buffer, at, end - CRC.size)

    def _cut_short(self) -> bool:
        """Whether a complete frame starts inside the incomplete one at the buffer's start.
        Each byte is searched once; headers whose frames are incomplete are looked at again."""
        buffer = self._buffer
        at = max(1, self._scanned)
        while (at := buffer.find(MAGIC + bytes([VERSION]), at)) >= 0:
            self._waiting.append(at)
            at += 1
        self._scanned = max(1, len(buffer) - 2)  # the last two bytes may start a magic
        found, waiting = False, []
        for at in self._waiting:
            end = self._frame_end(at) if len(buffer) - at >= HEADER_SIZE else len(buffer) + 1
            if end is not None and (end > len(buffer) or self._frame_crc_ok(at, end)):
                waiting.append(at)
                found = found or end <= len(buffer)
        self._waiting = waiting
        return found

    def _drop(self, n: int) -> None:
        del self._buffer[:n]
        self._scanned = max(0, self._scanned - n)
        if self._waiting:
            self._waiting = [at - n for at in self._waiting if at > n]

    def _discard(self, n: int) -> None:
        if n:
            self._drop(n)
            self.skipped += n

    def _reject(self, n: int) -> None:
        self.dropped += 1
        self._discard(n)


def _crc(buffer: bytearray, start: int, end: int) -> int:
    """zlib.crc32 of buffer[start:end] without a copy (the views are released before the
    buffer is resized)."""
    with memoryview(buffer) as view, view[start:end] as part:
        return zlib.crc32(part)


def _parse(kind: int, seq: int, base: int, payload: bytes) -> Optional[Frame]:
    if kind == ACK:
        return Frame(ACK, seq) if not payload and base == 0 else None
    if kind != DATA or base > seq:
        return None
    try:
        record = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return Frame(DATA, seq, base, record) if isinstance(record, dict) else None


class Receiver:
    """Host side: bytes in, each record out once and in order, cumulative ACKs back.

        rx = Receiver(port)                                   # pyserial-like: read(n), write(b)
        rx = Receiver(read=lambda: conn.recv(65536), write=conn.sendall)
        for frame in rx.poll():                               # or rx.feed(data)
            save(frame.seq, frame.record)

    `next_seq` is the next seq to deliver: pass the one after the last record saved when
    the host restarts (None: start at the `base` of the first frame received). Frames
    ahead of it (up to `window` seqs) wait for the gap to be filled by a resend;
    duplicates are dropped (`duplicates`); seqs below a frame's `base` are skipped
    (`lost`: the sender dropped them, and says so with a "spool_overflow" record).

    With `auto_ack` every feed() that received a DATA frame writes an ACK of the highest
    contiguous seq delivered, after the frames are handed over (a write that fails is
    only counted in `ack_errors`: the sender resends and the duplicate is acked again).
    For save-then-ack, pass auto_ack=False and call ack() after saving.
    """

    def __init__(self, link=None, *, read: Optional[Callable[[], bytes]] = None,
                 write: Optional[Callable[[bytes], object]] = None,
                 next_seq: Optional[int] = None, auto_ack: bool = True, window: int = 4096):
        if link is not None:
            read = read or (lambda: link.read(max(1, getattr(link, "in_waiting", 0) or 0)))
            write = write or link.write
        if write is None:
            raise ProtocolError("Receiver needs a link or a write callable for the ACKs")
        self._read, self._write = read, write
        self.next_seq = next_seq
        self.auto_ack = auto_ack
        self.window = window
        self.decoder = FrameDecoder()
        self.duplicates = 0
        self.lost = 0
        self.ack_errors = 0
        self._ahead = {}          # seq -> Frame received before the gap below it was filled
        self._ack_due = False

    def poll(self) -> list:
        """Read once from the link (as long as its read waits) and feed() what came."""
        if self._read is None:
            raise ProtocolError("Receiver was given no read callable: use feed(data)")
        return self.feed(self._read() or b"")

    def feed(self, data: bytes) -> list:
        """The DATA frames (seq, base, record) that `data` completes in order, each once."""
        delivered = []
        for frame in self.decoder.feed(data):
            if frame.kind != DATA:
                continue
            self._ack_due = True
            if self.next_seq is None:
                self.next_seq = frame.base
            if frame.base > self.next_seq:  # the sender dropped everything below base
                arrived = sorted(seq for seq in self._ahead if seq < frame.base)
                delivered += [self._ahead.pop(seq) for seq in arrived]
                self.lost += frame.base - self.next_seq - len(arrived)
                self.next_seq = frame.base
            if frame.seq < self.next_seq or frame.seq in self._ahead:
                self.duplicates += 1
            elif frame.seq < self.next_seq + self.window:
                self._ahead[frame.seq] = frame
            while self.next_seq in self._ahead:
                delivered.append(self._ahead.pop(self.next_seq))
                self.next_seq += 1
        if self.auto_ack:
            self.ack()
        return delivered

    def ack(self) -> None:
        """Write an ACK of the highest contiguous seq delivered, if a frame came since the
        last one."""
        if not self._ack_due or not self.next_seq:
            return
        self._ack_due = False
        try:
            self._write(encode_ack(self.next_seq - 1))
        except OSError:  # pyserial's SerialException is an OSError
            self.ack_errors += 1
