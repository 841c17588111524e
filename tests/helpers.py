"""Helpers of every kind of test: where the repository and ../shared are, `actcomp` as a
subprocess, the checks that an error was said in one line, and relative errors.

The helpers of one subject live beside it: device_helpers.py (the runner and its artifact),
export_helpers.py (zoo models, exports and torch's reference step), link_helpers.py
(records, TCP hosts, a lossy proxy); edge_models.py holds model definitions."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
# one thread everywhere: bit-identical steps between runs
ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
           PYTHONPATH=str(REPO))
ACTCOMP = [sys.executable, "-m", "actcomp_edge.host.cli"]


def require_shared(*parts: str) -> Path:
    """Path inside ../shared, or skip the test with the reason (a fresh clone has no ../shared)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: real weights/data/oracles live in ../shared next to the "
                    f"repository (present in CI, not in a fresh clone)")
    return path


def actcomp(*argv, timeout=900, env=None) -> subprocess.CompletedProcess:
    """`actcomp ARGV` in a subprocess (text output captured)."""
    return subprocess.run([*ACTCOMP, *map(str, argv)], capture_output=True, text=True,
                          env=env or ENV, timeout=timeout)


def write_profile(path: Path, values: dict, **changes) -> Path:
    """A device profile (TOML) at `path`: `values` with `changes` (a None value leaves the
    key out)."""
    values = {k: v for k, v in dict(values, **changes).items() if v is not None}
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return path


# ---------------------------------------------------------------- errors said in one line

def assert_one_line(message: str) -> None:
    """An error's message (an exception's str) is one non-empty line."""
    text = str(message)
    assert text and "\n" not in text and "\r" not in text, repr(text)


def assert_one_line_error(proc, *messages: str, code: int = 2) -> str:
    """A command exited with `code` and its stderr is one line holding every one of
    `messages`, no traceback; returns that line."""
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and all(m in lines[0] for m in messages), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def assert_error_among_progress(proc, *messages: str, code: int = 2) -> str:
    """A command exited with `code`, and of its stderr (which may hold progress and warnings)
    exactly one line says "error" and holds every one of `messages`, no traceback; returns
    that line."""
    assert proc.returncode == code, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and all(m in errors[0] for m in messages), proc.stderr
    assert "Traceback" not in proc.stderr
    return errors[0]


# ---------------------------------------------------------------- relative errors

def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def rel_l2_error(got, want) -> float:
    """||got - want|| / ||want||, Frobenius norms (absolute when want == 0); numpy arrays or
    torch tensors."""
    got, want = _numpy(got), _numpy(want)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def rel_max_error(got, want) -> float:
    """max |got - want| / max |want|, the largest deviation against the largest value."""
    got, want = _numpy(got), _numpy(want)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))
