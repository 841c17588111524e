"""Safe, deterministic, atomic .npz files (no pickles; byte-identical for equal arrays)."""
from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np

from .faults import crash_point

FIXED_DATE = (1980, 1, 1, 0, 0, 0)  # zip entries carry no wall-clock time: same arrays -> same bytes


class NpzError(ValueError):
    """A weights/state file that cannot be read safely."""


def write_atomic(path, data: bytes) -> None:
    """Write bytes so that a crash leaves either the old file or the new one: temp file in the
    same directory, fsync, rename, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            view, half = memoryview(data), len(data) // 2
            f.write(view[:half])
            f.flush()
            crash_point("write_atomic")  # fault-injection tests: a kill mid-write
            f.write(view[half:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # name the file meant, not the temp file
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def npz_bytes(arrays: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            entry = io.BytesIO()
            array = np.asarray(arrays[name])  # (np.ascontiguousarray would make 0-d arrays 1-d)
            if not array.flags.c_contiguous:
                array = array.copy(order="C")
            np.lib.format.write_array(entry, array, allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=FIXED_DATE)
            info.external_attr = 0o644 << 16
            zf.writestr(info, entry.getvalue())
    return buffer.getvalue()


def save_npz(path, arrays: dict) -> None:
    """Deterministic and atomic np.savez equivalent."""
    write_atomic(path, npz_bytes(arrays))


def load_npz(path) -> dict:
    """name -> array; refuses pickled objects; one-line NpzError for a bad file."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise NpzError(f"cannot read {path}: {e}") from None
