"""Process memory on the board: RSS and its peak (Linux /proc; bytes)."""
from __future__ import annotations

import os
import resource
import sys
import types


def _status_field(name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Current resident set size."""
    value = _status_field("VmRSS")
    return value if value is not None else peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size since start or since the last reset_peak() (VmHWM)."""
    value = _status_field("VmHWM")
    if value is not None:
        return value
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def import_numpy_random() -> None:
    """Import numpy.random without OpenSSL: its bit generator takes ``secrets.randbits`` to
    seed a generator made without a seed (the runner seeds every one), and ``secrets`` loads
    OpenSSL's libcrypto through hashlib (3.5 MiB of RSS). A stand-in from os.urandom serves
    the import and is removed after it: a later ``import secrets`` is the real one."""
    if "numpy.random" in sys.modules or "secrets" in sys.modules:
        return
    stand_in = types.ModuleType("secrets")
    stand_in.randbits = lambda k: int.from_bytes(os.urandom((k + 7) // 8), "little") >> (-k % 8)
    sys.modules["secrets"] = stand_in
    try:
        import numpy.random  # noqa: F401
    finally:
        del sys.modules["secrets"]
