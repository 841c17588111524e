"""The profile stream's link, named by a URL, for both of its ends: the board sends on it,
`actcomp monitor` receives on it. `check_url` says in one line why a URL cannot work,
`open_link` opens it:

    /dev/ttyACM0, /dev/ttyGS0      a serial port (pyserial)
    socket://HOST:PORT             connect to a listener (pyserial)
    loop://, rfc2217://HOST:PORT   pyserial's other URLs (`serial.serial_for_url`)
    tcp://HOST:PORT                listen, one peer at a time (the monitor; a board connects)
    file://PATH                    JSON lines: the board appends (the monitor follows the file)

A link has write(bytes), read(timeout) -> bytes and close(). pyserial is imported only to
open a serial link, so the core stays importable without it.
"""
from __future__ import annotations

import os
import select
import socket
import time
from pathlib import Path

from .protocol import Receiver, encode_record

PYSERIAL_SCHEMES = ("socket", "loop", "rfc2217", "spy", "alt", "hwgrep", "cp2110")


def split_url(url: str) -> tuple:
    """(scheme, the rest); the scheme of a serial device path is ""."""
    scheme, sep, rest = url.partition("://")
    return (scheme, rest) if sep else ("", url)


def host_port(rest: str) -> tuple:
    """(host, port) of HOST:PORT (pyserial's /path and ?options ignored); port None unless
    it is in 1..65535."""
    host, _, port = rest.split("/")[0].split("?")[0].rpartition(":")
    return host, int(port) if port.isdigit() and 0 < int(port) < 65536 else None


def check_url(url: str, *, board: bool) -> None:
    """ValueError, one line naming the fix (the caller names the URL), for a URL no link can
    be opened on: an unknown scheme, no HOST:PORT, a file:// that names no file. The board
    connects (tcp:// is refused) and opens its link later, in the background (a serial port
    must exist now); the monitor listens on tcp:// and opens at once (opening says why not)."""
    scheme, rest = split_url(url)
    if not scheme:
        if board and not Path(url).exists():
            raise ValueError("no such serial port (or give socket://HOST:PORT, loop://, "
                             "file://PATH)")
    elif scheme == "file":
        if not rest or Path(rest).is_dir():
            raise ValueError("expected file://PATH of a .jsonl file")
    elif scheme == "tcp":
        if board:
            raise ValueError("tcp:// is not a pyserial URL, use socket://HOST:PORT")
        if host_port(rest)[1] is None:
            raise ValueError("expected tcp://HOST:PORT with a port in 1..65535 "
                             "(e.g. tcp://0.0.0.0:7777)")
    elif scheme not in PYSERIAL_SCHEMES:
        raise ValueError(f"unknown scheme {scheme}:// (expected /dev/..., socket://HOST:PORT, "
                         f"loop://, rfc2217://HOST:PORT" + ("" if board else ", tcp://HOST:PORT")
                         + " or file://PATH)")
    elif scheme in ("socket", "rfc2217") and not all(host_port(rest)):  # a host and a port
        raise ValueError(f"expected {scheme}://HOST:PORT")


def open_link(url: str, *, baudrate: int = 115200, write_timeout: float = 1.0):
    """An open link for `url` (see check_url) with write(bytes), read(timeout) -> bytes and
    close().

    write() waits at most `write_timeout` seconds on a serial link (else raises); read()
    returns what arrived within `timeout` seconds (b"" if nothing). Failures raise OSError
    (pyserial's SerialException is one) or ValueError for a URL pyserial does not know."""
    scheme, rest = split_url(url)
    if scheme == "file":
        return FileLink(rest)
    if scheme == "tcp":
        host, port = host_port(rest)
        return TcpListener(host or "0.0.0.0", port)
    import serial  # only serial links need pyserial
    return SerialLink(serial.serial_for_url(url, baudrate=baudrate, timeout=0,
                                            write_timeout=write_timeout))


class SerialLink:
    """A pyserial port (serial device, pty, socket://, loop://)."""

    def __init__(self, port):
        self.port = port

    def write(self, data: bytes) -> None:
        self.port.write(data)

    def read(self, timeout: float = 0.0) -> bytes:
        self._timeout(timeout)
        data = self.port.read(1)
        if data:  # then everything already there, without waiting
            self._timeout(0)
            data += self.port.read(1 << 16)
        return data

    def _timeout(self, seconds: float) -> None:
        if self.port.timeout != seconds:
            self.port.timeout = seconds

    def close(self) -> None:
        self.port.close()


class TcpListener:
    """tcp://HOST:PORT: listens; one peer at a time, accepted again after it leaves. What is
    written while no peer is connected is dropped (the sender resends what is unacknowledged)."""

    def __init__(self, host: str, port: int):
        self.server = socket.create_server((host, port), reuse_port=False)
        self.server.setblocking(False)
        self.peer = None

    def read(self, timeout: float = 0.0) -> bytes:
        if self.peer is None:
            ready, _, _ = select.select([self.server], [], [], timeout)
            if ready:
                self.peer, _ = self.server.accept()
            return b""
        ready, _, _ = select.select([self.peer], [], [], timeout)
        if not ready:
            return b""
        try:
            data = self.peer.recv(65536)
        except OSError:
            data = b""
        if not data:  # the peer went away: wait for it to reconnect
            self.peer.close()
            self.peer = None
        return data

    def write(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.sendall(data)

    def close(self) -> None:
        if self.peer is not None:
            self.peer.close()
        self.server.close()


class FileLink:
    """file://PATH: the records of the frames written are appended to PATH as JSON lines
    (keys sorted), fsynced, then acknowledged: read() returns the ACK frames."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")
        if self._file.tell() and not _ends_with_newline(self.path):
            self._file.write(b"\n")  # a line torn by a crash stays alone on its line
        self._acks = bytearray()
        self._receiver = Receiver(write=self._acks.extend, auto_ack=False)

    def write(self, data: bytes) -> None:
        frames = self._receiver.feed(data)
        if frames:
            self._file.write(b"".join(encode_record(f.record) + b"\n" for f in frames))
            self._file.flush()
            os.fsync(self._file.fileno())
        self._receiver.ack()

    def read(self, timeout: float = 0.0) -> bytes:
        if not self._acks:
            time.sleep(timeout)
        data = bytes(self._acks)
        self._acks.clear()
        return data

    def close(self) -> None:
        self._file.close()


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"
