"""Learning-rate schedules: their names on the command line, and the lr at each step.

Every learning rate is a function of the step t (0-based, applied steps) and the run's total
steps T, so a resumed run continues on exactly the same curve. Shared by the runner and the
host tools (which check a fleet's --schedule before starting any process)."""
from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine", "warmup-cosine[:W]", "step:EPOCHS:GAMMA")
DEFAULT_SCHEDULE = "cosine"


def parse_schedule(spec: str) -> tuple:
    """'cosine' -> ('cosine',); 'warmup-cosine:50' -> ('warmup-cosine', 50);
    'step:2:0.1' -> ('step', 2, 0.1). ValueError (one line) otherwise."""
    name, *args = spec.split(":")
    try:
        if name in ("constant", "cosine") and not args:
            return (name,)
        if name == "warmup-cosine" and len(args) <= 1:
            warmup = int(args[0]) if args else None  # None: 5 % of the steps
            if warmup is not None and warmup < 1:
                raise ValueError
            return (name, warmup)
        if name == "step" and len(args) == 2:
            every, gamma = int(args[0]), float(args[1])
            if every < 1 or not 0 < gamma <= 1:
                raise ValueError
            return (name, every, gamma)
    except ValueError:
        pass
    raise ValueError(f"unknown schedule {spec!r}: expected one of {', '.join(SCHEDULES)} "
                     f"(W steps >= 1, EPOCHS >= 1, 0 < GAMMA <= 1)")


def learning_rate(schedule: tuple, base: float, t: int, total: int, steps_per_epoch: int) -> float:
    """The lr of step t of total (t = 0 .. total-1)."""
    name = schedule[0]
    if name == "constant":
        return base
    if name == "cosine":  # torch's CosineAnnealingLR, T_max = total, eta_min = 0
        return base * (1 + math.cos(math.pi * t / total)) / 2
    if name == "warmup-cosine":  # linear warm-up over W steps, then cosine over the rest
        warmup = schedule[1] or max(1, round(0.05 * total))
        if t < warmup:
            return base * (t + 1) / warmup
        return base * (1 + math.cos(math.pi * (t - warmup) / max(1, total - warmup))) / 2
    _, every, gamma = schedule  # step: times gamma every EPOCHS epochs (torch's StepLR)
    return base * gamma ** ((t // steps_per_epoch) // every)
