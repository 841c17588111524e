"""Process memory on the board: RSS and its peak (Linux /proc; bytes)."""
from __future__ import annotations

import resource
import sys


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


def parse_size(text: str) -> int:
    """'48MiB', '512MB', '1.5GiB', '1000000' -> bytes."""
    units = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10,
             "MIB": 2 ** 20, "GIB": 2 ** 30, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}
    s = str(text).strip().upper().replace(" ", "")
    number = s.rstrip("KMGIB")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise ValueError(f"cannot read memory size {text!r} (examples: 48MiB, 512MB, 2GiB)")
    return int(value * units[unit])
