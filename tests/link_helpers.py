"""Helpers for the link tests (test_protocol.py, test_link_faults.py): records like a
runner's, a TCP host with a Receiver that survives restarts, and a proxy that damages,
drops, duplicates and replays what goes through it and can be unplugged."""
import random
import socket
import threading
import time
import zlib

from actcomp_edge.core.protocol import HEADER_SIZE, MAGIC, MAX_PAYLOAD, OVERHEAD, Receiver


def make_records(n, start=0):
    """Records like a runner's: numbers, text (some non-ASCII), nesting."""
    return [{"type": "step", "step": i, "loss": 1.0 / (i + 1), "peak_bytes": 1000 * i,
             "layer": ["conv", "dw-conv", "ré-lu", "AC\x01 ACK"][i % 4],
             "ranks": [i % 7, 3, 3, 2], "note": "x" * (i % 37)} for i in range(start, start + n)]


class Host:
    """A host on a TCP port, one connection at a time, a Receiver per connection whose
    position survives host restarts (as a monitor that saves its records).

    Totals over every Receiver so far: `lost` (seqs skipped below a frame's base),
    `duplicates`, `corrupt` (frames the decoder rejected); `connections` accepted."""

    def __init__(self, port=0):
        self.port, self.delivered, self.next_seq = port, [], 0
        self.lock = threading.Lock()
        self.receivers = []
        self.start()

    def start(self):
        self.listener = listen(self.port)
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(0.05)
            rx = Receiver(write=conn.sendall, next_seq=self.next_seq)
            with self.lock:
                self.receivers.append(rx)
            with conn:
                while not self.stopping.is_set():
                    try:
                        data = conn.recv(65536)
                    except socket.timeout:
                        continue
                    except OSError:
                        break
                    if not data:
                        break
                    with self.lock:  # the counters are read under the lock
                        frames = rx.feed(data)
                        self.delivered += frames
                        self.next_seq = rx.next_seq

    @property
    def lost(self):
        with self.lock:
            return sum(rx.lost for rx in self.receivers)

    @property
    def duplicates(self):
        with self.lock:
            return sum(rx.duplicates for rx in self.receivers)

    @property
    def corrupt(self):
        with self.lock:
            return sum(rx.decoder.dropped for rx in self.receivers)

    @property
    def connections(self):
        with self.lock:
            return len(self.receivers)

    def stop(self):
        self.stopping.set()
        self.listener.close()
        self.thread.join(5)

    def restart(self, down_seconds=0.5):
        self.stop()
        time.sleep(down_seconds)
        self.start()

    def wait_for(self, n, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.delivered) >= n:
                    return list(self.delivered)
            time.sleep(0.02)
        with self.lock:
            return list(self.delivered)


def listen(port):
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4)
    listener.settimeout(0.05)
    return listener


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LossyProxy:
    """device -> proxy -> host over TCP; flips and drops bytes at random in both directions;
    unplug() cuts every connection and refuses new ones until plug().

    `rate`: probability per byte of dropping it, and the same of flipping one of its bits
    (`lost`, `flipped` count them). With `duplicate` or `replay` (probabilities per
    frame, both directions) the proxy also cuts the stream into frames: a frame is sent
    twice, or a chunk of the older stream in that direction (1 to 4 of the last
    `history` frames, from this or an earlier connection, sometimes cut mid-frame at
    either end) is sent again before it. Duplicates and replays then go through the byte
    faults too. `back`: other values of rate, duplicate, replay for the way back to the
    device (a dict), e.g. higher ones for ACKs, which are few and short. counts(): every
    fault so far, counts("up") / counts("down"): to the host / back to the device. Every
    connection and direction draws from its own random.Random, seeded from `seed`."""

    def __init__(self, target_port, rate, seed=0, *, duplicate=0.0, replay=0.0, history=256,
                 back=None):
        self.target_port, self.rate, self.seed = target_port, rate, seed
        self.history = history
        up = {"rate": rate, "duplicate": duplicate, "replay": replay}
        self.rates = {"up": up, "down": dict(up, **(back or {}))}
        self.port, self.flipped, self.lost = 0, 0, 0
        self.faults = {way: dict.fromkeys(["bytes_flipped", "bytes_dropped", "frames_duplicated",
                                           "chunks_replayed", "frames_replayed"], 0)
                       for way in ("up", "down")}
        self.sent = {"up": [], "down": []}  # per direction: the last `history` frames
        self.conns = []
        self.plug()

    def counts(self, way=None):
        """The faults injected so far: "up" (to the host), "down" (to the device), or both."""
        ways = [way] if way else list(self.faults)
        return {key: sum(self.faults[w][key] for w in ways) for key in self.faults["up"]}

    def plug(self):
        self.listener = listen(self.port)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def unplug(self):
        self.listener.close()
        for conn in self.conns:
            cut(conn)

    def _accept(self, listener):
        while True:
            try:
                device, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                host = socket.create_connection(("127.0.0.1", self.target_port), timeout=1)
            except OSError:
                device.close()
                continue
            self.conns += [device, host]
            self.seed += 1
            for src, dst, seed, way in [(device, host, self.seed, "up"),
                                        (host, device, -self.seed, "down")]:
                threading.Thread(target=self._pump, args=(src, dst, random.Random(seed), way),
                                 daemon=True).start()

    def _pump(self, src, dst, rng, way):
        src.settimeout(None)
        framing = self.rates[way]["duplicate"] or self.rates[way]["replay"]
        pending = bytearray()  # framing: the start of a frame not complete yet
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if framing:
                    pending += data
                    data = self._frame_faults(pending, rng, way)
                dst.sendall(self._byte_faults(data, rng, way))
        except OSError:
            pass
        cut(src)
        cut(dst)

    def _frame_faults(self, pending, rng, way):
        """The complete frames at the start of `pending` (removed from it), some of them
        duplicated and some preceded by a replayed older chunk."""
        out, history, faults = bytearray(), self.sent[way], self.faults[way]
        replay, duplicate = self.rates[way]["replay"], self.rates[way]["duplicate"]
        while len(pending) >= HEADER_SIZE:
            length = int.from_bytes(pending[12:16], "big")
            if (pending[:2] != MAGIC or length > MAX_PAYLOAD
                    or zlib.crc32(pending[:HEADER_SIZE - 4]) != int.from_bytes(
                        pending[HEADER_SIZE - 4:HEADER_SIZE], "big")):
                skip = pending.find(MAGIC, 1)  # not a frame (after a torn write): pass it on
                skip = len(pending) if skip < 0 else skip
                out += pending[:skip]
                del pending[:skip]
                continue
            end = length + OVERHEAD
            if len(pending) < end:
                break
            frame = bytes(pending[:end])
            del pending[:end]
            if history and rng.random() < replay:
                start = rng.randrange(len(history))
                frames = history[start:start + rng.randint(1, 4)]
                chunk = b"".join(frames)
                if rng.random() < 0.5:  # cut mid-frame at either end
                    chunk = chunk[rng.randrange(len(chunk) // 2):]
                    chunk = chunk[:len(chunk) - rng.randrange(len(chunk) // 2 + 1)]
                faults["chunks_replayed"] += 1
                faults["frames_replayed"] += len(frames)
                out += chunk
            out += frame
            if rng.random() < duplicate:
                faults["frames_duplicated"] += 1
                out += frame
            history.append(frame)
            if len(history) > self.history:
                del history[0]
        return bytes(out)

    def _byte_faults(self, data, rng, way):
        out, faults, rate = bytearray(), self.faults[way], self.rates[way]["rate"]
        for byte in data:
            roll = rng.random()
            if roll < rate:
                self.lost += 1
                faults["bytes_dropped"] += 1
                continue
            if roll < 2 * rate:
                self.flipped += 1
                faults["bytes_flipped"] += 1
                byte ^= 1 << rng.randrange(8)
            out.append(byte)
        return out


def cut(conn):
    """Close a socket so that both ends and a thread blocked in recv() on it notice."""
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()
