"""Checkpoints that survive power loss and bit rot.

A checkpoint is ``ckpt-<step>.npz`` (trainable params ``param/*``, optimizer state
``state/*``, the factors of a stateful method (asi) ``tracker/*`` and a ``meta`` JSON
string), written atomically (temp file, fsync, rename); then ``checkpoints.json`` (the
index: file, step, SHA-256, newest last, the last KEEP) is rewritten atomically, and only
then are the files it no longer lists (and temp files a crash left) deleted. At every
instant the index lists only complete files with their right SHA-256. A failed write (disk full) raises CheckpointError
and leaves the older checkpoints intact. Loading walks the index from the newest entry and
takes the first file whose SHA-256 matches, saying why it skipped any other.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from actcomp_edge.core.faults import crash_point
from actcomp_edge.core.manifest import sha256, sha256_file
from actcomp_edge.core.npz import NpzError, load_npz, npz_bytes, write_atomic

INDEX = "checkpoints.json"
KEEP = 3


class CheckpointError(OSError):
    """A checkpoint could not be written (disk full, read-only, ...); the older ones are intact."""


def save(folder, step: int, meta: dict, arrays: dict) -> Path:
    """Write ckpt-<step>.npz and add it to the index (keeping the last KEEP). A failed write
    raises CheckpointError and leaves the index and every checkpoint it lists as they were."""
    folder = Path(folder)
    path = folder / f"ckpt-{step:08d}.npz"
    payload = dict(arrays)
    payload["meta"] = np.array(json.dumps(dict(meta, step=step), sort_keys=True))
    data = npz_bytes(payload)
    digest = sha256(data).hexdigest()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        entries = _index(folder)
        if any(e["file"] == path.name for e in entries):
            if {"file": path.name, "step": step, "sha256": digest} in entries:
                return path  # this very checkpoint is already there
            entries = [e for e in entries if e["file"] != path.name]
            _write_index(folder, entries)  # never list a file while it is replaced
        write_atomic(path, data)
        crash_point("checkpoint")  # fault-injection tests: renamed, not yet in the index
        entries = _write_index(folder, entries + [{"file": path.name, "step": step,
                                                   "sha256": digest}])
    except OSError as e:
        newest = _index(folder)
        if not any(entry["file"] == path.name for entry in newest):
            path.unlink(missing_ok=True)  # give the space back
        kept = f"step {newest[-1]['step']} is the newest intact one" if newest else "none yet"
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e} "
                              f"(checkpoints: {kept})") from None
    _remove_unlisted(folder, entries)
    return path


def _write_index(folder: Path, entries: list) -> list:
    """Write the last KEEP entries as the index; returns them."""
    entries = entries[-KEEP:]
    write_atomic(folder / INDEX, (json.dumps(entries, indent=1) + "\n").encode())
    return entries


def _remove_unlisted(folder: Path, entries: list) -> None:
    """Delete checkpoints the index (entries) no longer lists and temp files a crash left."""
    listed = {e["file"] for e in entries} | {INDEX}
    for file in folder.iterdir():
        stale = file.name.startswith(".") and ".tmp-" in file.name
        if stale or (file.name.startswith("ckpt-") and file.name not in listed):
            file.unlink(missing_ok=True)


def _index(folder: Path) -> list:
    """The index's well-formed entries, oldest first ([] when it is missing or unreadable)."""
    try:
        entries = json.loads((folder / INDEX).read_text())
    except (OSError, ValueError):
        return []
    kinds = {"file": str, "step": int, "sha256": str}
    return [e for e in entries if isinstance(e, dict)
            and all(isinstance(e.get(k), kind) for k, kind in kinds.items())] \
        if isinstance(entries, list) else []


def load_latest(folder, log=print) -> tuple | None:
    """(meta, arrays) of the newest checkpoint that passes its SHA-256, or None."""
    folder = Path(folder)
    for entry in reversed(_index(folder)):
        path = folder / Path(entry["file"]).name
        if not path.is_file():
            log(f"checkpoint {path.name} is missing: using an older one")
            continue
        if sha256_file(path) != entry["sha256"]:
            log(f"checkpoint {path.name} fails its SHA-256 check (corrupted): using an older one")
            continue
        try:
            arrays = load_npz(path)
            meta = json.loads(str(arrays.pop("meta")))
        except (NpzError, KeyError, ValueError) as e:
            log(f"checkpoint {path.name} cannot be read ({e}): using an older one")
            continue
        return meta, arrays
    return None


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
