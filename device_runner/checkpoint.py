"""Checkpoints that survive power loss and bit rot.

A checkpoint is ``ckpt-<step>.npz`` (trainable params ``param/*``, optimizer state
``state/*``, tracked HOSVD factors ``tracker/*`` and a ``meta`` JSON string), written
atomically (temp file, fsync, rename); then ``checkpoints.json`` (the index: file, step,
SHA-256, newest last) is rewritten atomically. Loading walks the index from the newest
entry and takes the first file whose SHA-256 matches, saying why it skipped any other.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from actcomp_edge.manifest import sha256_file
from actcomp_edge.npz import NpzError, load_npz, npz_bytes, write_atomic

INDEX = "checkpoints.json"
KEEP = 3


def save(folder, step: int, meta: dict, arrays: dict) -> Path:
    """Write ckpt-<step>.npz and add it to the index (keeping the last KEEP)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ckpt-{step:08d}.npz"
    payload = dict(arrays)
    payload["meta"] = np.array(json.dumps(dict(meta, step=step), sort_keys=True))
    write_atomic(path, npz_bytes(payload))
    entries = [e for e in _index(folder) if e["file"] != path.name]
    entries.append({"file": path.name, "step": step, "sha256": sha256_file(path)})
    for old in entries[:-KEEP]:
        (folder / old["file"]).unlink(missing_ok=True)
    write_atomic(folder / INDEX, (json.dumps(entries[-KEEP:], indent=1) + "\n").encode())
    return path


def _index(folder: Path) -> list:
    try:
        entries = json.loads((folder / INDEX).read_text())
        return [e for e in entries if isinstance(e, dict) and {"file", "step", "sha256"} <= set(e)]
    except (OSError, ValueError):
        return []


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
