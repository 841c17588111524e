"""Crash points for the fault-injection tests (stdlib only).

``crash_point(name)`` does nothing unless the environment variable ACTCOMP_CRASH_AT is
``"name:N"``: then the N-th time this process reaches ``name`` it kills itself with SIGKILL,
with no cleanup and no flush, as a pulled plug would (only the page cache survives). The
points, one line of code each where they are:

    step           a training step between its forward and its backward (Trainer.step)
    write_atomic   half-way through writing the temp file of an atomic write (checkpoints,
                   their index, weights, the inference model, the summary)
    checkpoint     a checkpoint file renamed into place, its index not rewritten yet
    spool          half-way through appending a frame to the profile spool
"""
from __future__ import annotations

import os
import signal

_TARGET = os.environ.get("ACTCOMP_CRASH_AT", "")
_NAME, _, _COUNT = _TARGET.partition(":")
_hits = 0


def crash_point(name: str) -> None:
    global _hits
    if name != _NAME:
        return
    _hits += 1
    if str(_hits) == _COUNT:
        os.kill(os.getpid(), signal.SIGKILL)
