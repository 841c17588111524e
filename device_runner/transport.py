"""Board side of the profile stream: `ProfileSender`, which spools records on disk and
streams them to the host over `actcomp_edge.core.link`'s `open_link(url)`.

    sender = ProfileSender("socket://192.168.1.10:7777", "out/spool")
    sender.send({"type": "step", "step": 3, "peak_bytes": 123456})   # never waits for the link
    sender.flush(timeout=10.0)                                      # True: all acknowledged
    sender.close()

URLs: pyserial's ("/dev/ttyUSB0", "/dev/ttyGS0" (USB gadget), "socket://host:port",
"loop://", "rfc2217://host:port", ...) and "file://PATH" (each record appended to PATH as
one JSON line and fsynced; a file acknowledges on write).

Frames and delivery are `actcomp_edge.core.protocol`'s. numpy/pyserial/stdlib only, never torch.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Optional

from actcomp_edge.core.faults import crash_point
from actcomp_edge.core.link import check_url as check_link_url, open_link
from actcomp_edge.core.protocol import (ACK, DATA, FrameDecoder, ProtocolError, encode_ack,
                                        encode_frame, with_base)

WRITE_CHUNK = 4096  # bytes per link write: 0.36 s at 115200 baud, within the write timeout


def check_url(url: str) -> None:
    """ValueError (one line) for a --report URL that cannot work, before any training."""
    try:
        check_link_url(url, board=True)
    except ValueError as e:
        raise ValueError(f"--report {url}: {e}") from None


class Spool:
    """Append-only segment files of frames (the wire format) in a folder.

    A DATA frame holds a record (a later frame with the same seq replaces it); an ACK frame
    n says every seq <= n is done, and a DATA frame's base says the same for the seqs below
    it. A torn or corrupt frame fails its CRC and is skipped on load. A segment is deleted
    once all its records are done; the newest one stays, so numbering continues.
    Not thread-safe: the caller locks.
    """

    SEGMENT_FRAMES = 1024

    def __init__(self, folder):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.closed = False
        self._segments = []  # [path, highest record seq in it], oldest first
        self._fd = None      # the newest segment, open for appending
        self._frames = 0     # frames in the newest segment
        self._retired = []   # fds of full segments: fsync, then close
        self._dirty = False  # records written since the last take_sync()
        self._created = False  # a segment file created since the last take_sync()

    def load(self) -> list:
        """The valid frames of every segment, in writing order."""
        frames = []
        for path in sorted(self.folder.glob(f"segment-{'[0-9]' * 8}.frames")):
            decoded = FrameDecoder().feed(path.read_bytes())
            frames += decoded
            self._segments.append([path, max((f.seq for f in decoded if f.kind == DATA),
                                             default=-1)])
        return frames

    def append(self, frame: bytes, seq: Optional[int] = None) -> None:
        """Write one frame (`seq`: the record's, for a DATA frame) to the newest segment,
        started afresh after a load: nothing is ever appended to a torn tail."""
        if self.closed:
            raise OSError("the spool is closed")
        if self._fd is None or self._frames >= self.SEGMENT_FRAMES:
            self._start_segment()
        half = len(frame) // 2
        _write_all(self._fd, memoryview(frame)[:half])
        crash_point("spool")  # fault-injection tests: a kill with a torn frame on disk
        _write_all(self._fd, memoryview(frame)[half:])
        self._frames += 1
        if seq is not None:
            self._dirty = True
            self._segments[-1][1] = max(self._segments[-1][1], seq)

    def _start_segment(self) -> None:
        last = self._segments[-1][0].name if self._segments else "segment-00000000.frames"
        path = self.folder / f"segment-{int(last[8:16]) + 1:08d}.frames"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if self._fd is not None:
            self._retired.append(self._fd)
        self._fd, self._frames, self._created = fd, 0, True
        self._segments.append([path, -1])

    def remove_done(self, head: int) -> None:
        """Delete the older segments whose records all have a seq below `head`."""
        while len(self._segments) > 1 and self._segments[0][1] < head:
            self._segments.pop(0)[0].unlink()

    def take_sync(self):
        """(fds to fsync, fds to close after that) for what was written since the last
        call: the newest segment, full ones, the folder if a segment was created."""
        if self.closed or not (self._dirty or self._retired or self._created):
            return [], []
        done = self._retired + ([os.open(self.folder, os.O_RDONLY)] if self._created else [])
        self._retired, self._dirty, self._created = [], False, False
        return done + [self._fd], done

    def close(self) -> None:
        """fsync and close everything."""
        fds, done = self.take_sync()
        self.closed = True
        try:
            for fd in fds:
                os.fsync(fd)
        finally:
            for fd in done + ([self._fd] if self._fd is not None else []):
                os.close(fd)
            self._fd = None


class ProfileSender:
    """Streams records to the host; `send()` never waits for the link or the disk.

    send() numbers the record (0, 1, 2, ... continuing across restarts) and appends its
    frame to the spool in `spool_dir` (written at once: survives a kill of the process; a
    frame torn by a kill mid-write is skipped on reload and its seq used again). A
    background thread fsyncs the spool, then writes the frames to the link (at most
    `window` unacknowledged), reads the host's cumulative ACKs and forgets what they
    cover. Unacknowledged records are resent after a reconnect or when no ACK came for
    `resend_after` seconds; a failed link is reopened with exponential backoff
    (`backoff` = (first, longest) delay in seconds). Link errors never reach the caller:
    the last one is in `last_error`. `link_options` go to open_link (baudrate,
    write_timeout: it must let the largest record through, about 11 KB/s at 115200 baud).
    The thread waits at most `poll` seconds for ACKs or new records. Unacknowledged
    frames are held in memory too (about max_spool_records x record size).

    At most `max_spool_records` (>= 2) are kept: when full, the oldest are dropped and
    `dropped` counts them. The oldest kept entry then becomes the report
    {"type": "spool_overflow", "dropped": K, "first_seq": a, "last_seq": b}: the records
    with seqs a..b (K of them) were dropped unacknowledged and this report took seq b.
    Successive reports may overlap (a later one extends an earlier one it replaced); their
    union is what was lost. Records missing from a damaged spool on restart are replaced
    by {"type": "spool_lost", "seq": n}.
    """

    def __init__(self, url: str, spool_dir, max_spool_records: int = 10000, *,
                 resend_after: float = 2.0, backoff=(0.1, 5.0), window: int = 128,
                 poll: float = 0.05, **link_options):
        if max_spool_records < 2:
            raise ProtocolError("max_spool_records must be at least 2")
        self.url = url
        self.max_spool_records = max_spool_records
        self.resend_after = resend_after
        self.backoff = backoff
        self.window = window
        self.poll = poll
        self.link_options = link_options
        self.dropped = 0        # records dropped from a full spool before acknowledgement
        self.resends = 0        # times the unacknowledged records were sent again
        self.connected = False
        self.last_error: Optional[str] = None
        self._lock = threading.Condition()
        self._wake = threading.Event()
        self._closed = False
        self._lock_file = _lock_folder(Path(spool_dir))
        self._spool = Spool(spool_dir)
        self._reload()
        self._thread = threading.Thread(target=self._run, name="ProfileSender", daemon=True)
        self._thread.start()

    # ---- caller's side

    def send(self, record: dict) -> int:
        """Spool `record` and queue it for the host; returns its seq. Raises ProtocolError
        only for a record that cannot be encoded, or after close()."""
        with self._lock:
            if self._closed:
                raise ProtocolError("send() after close()")
            seq = self._next_seq
            excess = len(self._pending) + 1 - self.max_spool_records
            frame = encode_frame(seq, record, self._head + max(excess, 0))
            for _ in range(excess):
                self._drop_oldest()
            self._pending[seq] = frame
            self._next_seq = seq + 1
            self._append_to_spool(frame, seq)
            if excess > 0:
                self._remove_done()
        self._wake.set()
        return seq

    @property
    def pending(self) -> int:
        """Records not acknowledged yet."""
        return len(self._pending)

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until every record sent is acknowledged (at most `timeout` seconds);
        returns whether it is."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._pending:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(left)
            return True

    def close(self, timeout: float = 2.0) -> None:
        """Stop the background thread (waiting at most `timeout` s); unacknowledged
        records stay in the spool for the next ProfileSender."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake.set()
        self._thread.join(timeout)
        with self._lock:
            try:
                self._spool.close()
            except OSError as e:
                self.last_error = f"spool: {e}"
            self._lock_file.close()

    def __enter__(self) -> "ProfileSender":
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- spool

    def _reload(self) -> None:
        """Unacknowledged records of an earlier run; numbering continues after its last."""
        records, head, last = {}, 0, -1
        for frame in self._spool.load():
            if frame.kind == DATA:
                records[frame.seq] = frame.record
                head = max(head, frame.base)
            else:
                head = max(head, frame.seq + 1)
            last = max(last, frame.seq)
        self._head, self._next_seq = head, last + 1
        self._pending = {}  # seq -> frame, for every seq in range(self._head, self._next_seq)
        self._report = None  # the spool_overflow record at self._head, if any
        for seq in range(head, last + 1):
            record = records.get(seq)
            if record is None:  # a corrupt frame in the middle of the spool
                record = {"type": "spool_lost", "seq": seq}
                self._pending[seq] = encode_frame(seq, record, head)
                self._append_to_spool(self._pending[seq], seq)
            else:
                self._pending[seq] = encode_frame(seq, record, head)
        first = records.get(head)
        if first is not None and first.get("type") == "spool_overflow":
            self._report = first
        if head:  # a marker in a fresh segment, so that older ones can all go
            self._append_to_spool(encode_ack(head - 1), None)
            self._remove_done()
        self._send_from = head             # next seq to write to the link
        self._synced = self._next_seq      # seqs below are fsynced: they may go to the link
        self._progress_at = time.monotonic()

    def _drop_oldest(self) -> None:
        """The two oldest entries become one spool_overflow report with the newer seq."""
        first, second = self._head, self._head + 1
        start = self._report["first_seq"] if self._report else first
        self.dropped += 1 if self._report else 2
        self._report = {"type": "spool_overflow", "dropped": second - start + 1,
                        "first_seq": start, "last_seq": second}
        del self._pending[first]
        self._pending[second] = frame = encode_frame(second, self._report, second)
        self._head = second
        self._send_from = max(self._send_from, second)
        self._append_to_spool(frame, second)

    def _append_to_spool(self, frame: bytes, seq: Optional[int]) -> None:
        try:
            self._spool.append(frame, seq)
        except OSError as e:  # disk full, ...: the record is still sent from memory
            self.last_error = f"spool: {e}"

    def _remove_done(self) -> None:
        try:
            self._spool.remove_done(self._head)
        except OSError as e:
            self.last_error = f"spool: {e}"

    def _sync(self) -> None:
        """fsync what send() wrote; only then may it go to the link."""
        with self._lock:
            end = self._next_seq
            try:
                fds, done = self._spool.take_sync()
            except OSError as e:  # the folder is gone: send from memory all the same
                fds = done = []
                self.last_error = f"spool: {e}"
        try:
            for fd in fds:
                os.fsync(fd)
        except OSError as e:
            self.last_error = f"spool: {e}"
        finally:
            for fd in done:
                os.close(fd)
        with self._lock:
            self._synced = max(self._synced, end)

    # ---- background thread

    def _run(self) -> None:
        link, delay, retry_at = None, self.backoff[0], 0.0
        while not self._closed:
            self._sync()
            if link is None:
                if time.monotonic() < retry_at:
                    self._idle(retry_at - time.monotonic())
                    continue
                try:
                    link = open_link(self.url, **self.link_options)
                except Exception as e:  # never into the caller: retry later
                    self.last_error = f"open {self.url}: {e}"
                    retry_at, delay = time.monotonic() + delay, min(2 * delay, self.backoff[1])
                    continue
                decoder, delay, self.connected = FrameDecoder(), self.backoff[0], True
                with self._lock:
                    self._send_from, self._progress_at = self._head, time.monotonic()
            try:
                if not self._exchange(link, decoder):
                    self._idle(self.poll)
            except Exception as e:
                self.last_error = f"link {self.url}: {e}"
                _close_quietly(link)
                link, self.connected = None, False
                retry_at, delay = time.monotonic() + delay, min(2 * delay, self.backoff[1])
        if link is not None:
            _close_quietly(link)
        self.connected = False

    def _idle(self, seconds: float) -> None:
        self._wake.wait(min(seconds, self.poll))
        self._wake.clear()

    def _exchange(self, link, decoder) -> bool:
        """Write what is due, read ACKs; False when there was nothing to do."""
        with self._lock:
            start = max(self._send_from, self._head)
            stop = min(self._synced, self._head + self.window)
            # with today's base: a receiver that starts afresh must not wait for records
            # acknowledged to an earlier host since these frames were spooled
            frames = [with_base(self._pending[seq], self._head) for seq in range(start, stop)]
            in_flight = start > self._head
        if frames:
            for chunk in _chunks(frames, WRITE_CHUNK):  # write_timeout bounds each write
                link.write(chunk)
            with self._lock:
                self._send_from = max(self._send_from, stop)
                if not in_flight:
                    self._progress_at = time.monotonic()
        elif not in_flight:
            return False
        acks = [f.seq for f in decoder.feed(link.read(self.poll)) if f.kind == ACK]
        with self._lock:
            if acks:
                self._acknowledged(max(acks))
            if (self._send_from > self._head
                    and time.monotonic() - self._progress_at > self.resend_after):
                self._send_from, self._progress_at = self._head, time.monotonic()
                self.resends += 1
        return True

    def _acknowledged(self, seq: int) -> None:
        """The host has every record up to `seq` (caller holds the lock)."""
        if not self._head <= seq < self._next_seq:
            return  # old news, or an ACK for records this sender never had
        for done in range(self._head, seq + 1):
            del self._pending[done]
        self._head = seq + 1
        self._send_from = max(self._send_from, self._head)
        self._progress_at = time.monotonic()
        if self._report is not None and self._report["last_seq"] <= seq:
            self._report = None
        self._append_to_spool(encode_ack(seq), None)
        self._remove_done()
        self._lock.notify_all()


def _lock_folder(folder: Path):
    """An exclusive lock on `folder`/lock (one sender per spool), held while the file is open."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / "lock", "a")
    try:
        import fcntl
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # not POSIX: no lock
        pass
    except OSError:
        handle.close()
        raise ProtocolError(f"{folder} is in use by another ProfileSender") from None
    return handle


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


def _chunks(frames: list, size: int):
    """The frames joined into pieces of at most `size` bytes (or one frame, if larger)."""
    piece = []
    length = 0
    for frame in frames:
        if piece and length + len(frame) > size:
            yield b"".join(piece)
            piece, length = [], 0
        piece.append(frame)
        length += len(frame)
    if piece:
        yield b"".join(piece)


def _close_quietly(link) -> None:
    try:
        link.close()
    except Exception:
        pass
