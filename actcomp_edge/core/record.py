"""The profile record of one training step: what the runner streams to the host after a step
(`protocol` frames it, or a file:// report writes it as one JSON line) and what the host's
report reads back.

Its JSON object is the fields by name plus ``"type": "step"``. Stdlib only.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

TYPE = "step"


def _is(value, kind) -> bool:
    """value is of JSON type kind (a bool is no number)."""
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


@dataclass
class StepRecord:
    """One applied step. Bytes in bytes, times in seconds; per-layer fields map the
    fine-tuned conv's name to its value. The fields after ``ranks`` may be missing from a
    record read back (another sender's or an older runner's): None then."""
    step: int                   # applied steps so far, this one included
    loss: float
    step_seconds: float         # the step's wall time
    rss_bytes: int              # the process's RSS after the step
    peak_rss_bytes: int         # its peak RSS so far
    baseline_rss_bytes: int     # its RSS before the first step
    kept_bytes: dict            # layer -> bytes kept for backward (the paper's accounting)
    kept_bytes_total: int       # their sum
    kept_full_bytes: int        # everything the backward took: kept pieces, masks, features
    ranks: dict                 # layer -> rank per mode (K1..K4), or None (no decomposition)
    epoch: int | None = None    # 1-based
    lr: float | None = None
    grad_norm: float | None = None             # global L2 norm, before clipping
    kept_full_bytes_per_layer: dict | None = None  # layer (and "classifier") -> bytes
    eps: float | None = None                   # None: the method has no eps ranks
    method: str | None = None
    working_set_bytes: int | None = None       # peak RSS minus the baseline
    predicted_working_set_bytes: int | None = None  # the memory plan's, at this batch (eps
    #                                                 ranks: the largest the steps saw so far)
    budget_bytes: int | None = None            # None: no budget
    budget_exceeded: bool | None = None
    budget_action: dict | None = None          # what the budget check did (train.check_budget)
    seconds_split: dict | None = None          # runtime.SPLIT_PARTS -> seconds of this step

    def to_json(self) -> dict:
        """The record as a JSON object (a dict of plain values)."""
        return {"type": TYPE, **{f.name: getattr(self, f.name) for f in fields(self)}}

    @classmethod
    def from_json(cls, record: dict) -> StepRecord:
        """The step record of a JSON object; ValueError when it is none (another type, a
        field up to ``ranks`` missing, or any field of the wrong type)."""
        if not isinstance(record, dict) or record.get("type") != TYPE:
            raise ValueError("not a step record")
        for name, kind in {**REQUIRED, **OPTIONAL}.items():
            value = record.get(name)
            if not (_is(value, kind) or name in OPTIONAL and value is None):
                raise ValueError(f"step record: bad {name}: {value!r}")
        if not all(_is(v, int) for v in record["kept_bytes"].values()):
            raise ValueError("step record: kept_bytes values must be integers")
        if not all(v is None or (isinstance(v, list) and all(_is(k, int) for k in v))
                   for v in record["ranks"].values()):
            raise ValueError("step record: ranks must be lists of integers or null")
        return cls(**{f.name: record.get(f.name) for f in fields(cls)})


# the fields every step record has, and their JSON types
REQUIRED = {"step": int, "loss": (int, float), "step_seconds": (int, float), "rss_bytes": int,
            "peak_rss_bytes": int, "baseline_rss_bytes": int, "kept_bytes": dict,
            "kept_bytes_total": int, "kept_full_bytes": int, "ranks": dict}
# the fields a record may lack (or hold null), and their JSON types
OPTIONAL = {"epoch": int, "lr": (int, float), "grad_norm": (int, float),
            "kept_full_bytes_per_layer": dict, "eps": (int, float), "method": str,
            "working_set_bytes": int, "predicted_working_set_bytes": int, "budget_bytes": int,
            "budget_exceeded": bool, "budget_action": dict, "seconds_split": dict}
