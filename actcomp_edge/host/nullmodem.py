"""A serial cable on one machine: two pseudo-terminals whose masters are relayed both ways.

    with NullModem() as (board_port, host_port):
        # actcomp-device train ... --report <board_port>
        # actcomp monitor <host_port> ...

Used by `make demo` and the tests to stand in for a USB-serial cable (Linux/macOS).
"""
from __future__ import annotations

import os
import select
import threading
import tty


class NullModem:
    def __init__(self):
        self.pairs = [os.openpty(), os.openpty()]
        for master, slave in self.pairs:
            tty.setraw(master)
            tty.setraw(slave)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._relay, daemon=True)

    @property
    def ports(self) -> tuple:
        return tuple(os.ttyname(slave) for _, slave in self.pairs)

    def _relay(self) -> None:
        (a, _), (b, _) = self.pairs
        other = {a: b, b: a}
        while not self.stop.is_set():
            ready, _, _ = select.select([a, b], [], [], 0.1)
            for fd in ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    continue
                if data:
                    os.write(other[fd], data)

    def __enter__(self) -> tuple:
        self.thread.start()
        return self.ports

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(2)
        for master, slave in self.pairs:  # slaves stay open until here: no hang-up between runs
            os.close(master)
            os.close(slave)


def main() -> None:
    """`python -m actcomp_edge.host.nullmodem`: print the two ports and relay until Ctrl-C."""
    import time
    with NullModem() as (board_port, host_port):
        print(f"board side: {board_port}   host side: {host_port}   (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
