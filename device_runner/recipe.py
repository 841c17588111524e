"""The fine-tuning recipe: learning-rate schedules, gradient-norm clipping, a divergence guard.

Every learning rate is a function of the step t (0-based, applied steps) and the run's total
steps T, so a resumed run continues on exactly the same curve."""
from __future__ import annotations

import math

import numpy as np

SCHEDULES = ("constant", "cosine", "warmup-cosine[:W]", "step:EPOCHS:GAMMA")
DEFAULT_SCHEDULE = "cosine"
DEFAULT_CLIP_NORM = 2.0
# SGD's step is lr / (1 - momentum) in the long run: the default lr keeps that step at
# BASE_LR (the paper's lr 0.05 at momentum 0), whatever momentum the artifact was exported with
BASE_LR = 0.05
ADAMW_LR = 1e-3


def default_lr(train: dict) -> float:
    """The default learning rate for a manifest's ``train`` section."""
    if train.get("optimizer") == "adamw":
        return ADAMW_LR
    return BASE_LR * (1.0 - float(train.get("momentum") or 0.0))


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


def global_norm(grads: dict) -> float:
    """‖g‖: the L2 norm of all the gradients together."""
    return math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))


def add_proximal(grads: dict, params: dict, anchor: dict, mu: float) -> None:
    """FedProx (Li et al. 2020): the local loss gains mu/2 ‖w - w_round‖², so every gradient
    gains mu (w - w_round); w_round (anchor): the weights the round started from. In place."""
    for name, g in grads.items():
        term = np.float32(mu) * (params[name] - anchor[name])
        if g.flags.writeable:
            np.add(g, term, out=g)
        else:
            grads[name] = g + term


def clip_grad_norm(grads: dict, max_norm: float) -> float:
    """Scale every gradient in place by min(1, max_norm / (‖g‖ + 1e-6)), ‖g‖ the global L2
    norm over all of them (torch.nn.utils.clip_grad_norm_); returns ‖g‖ before clipping."""
    norm = global_norm(grads)
    coefficient = max_norm / (norm + 1e-6)
    if coefficient < 1.0:
        for name, g in grads.items():
            if g.flags.writeable:
                np.multiply(g, np.float32(coefficient), out=g)
            else:
                grads[name] = g * np.float32(coefficient)
    return norm


class DivergenceGuard:
    """Divergence: a non-finite loss, or a loss above max(2 floor, floor + ln C) for
    ``patience`` steps in a row; floor is the lowest bias-corrected EMA (beta) of the loss
    so far, C the number of classes (ln C: the loss of a uniform guess)."""

    def __init__(self, num_classes: int, patience: int = 5, beta: float = 0.9):
        self.margin = math.log(max(2, num_classes))
        self.patience, self.beta = patience, beta
        self.ema, self.seen, self.floor, self.above = 0.0, 0, math.inf, 0

    def threshold(self) -> float:
        return max(2 * self.floor, self.floor + self.margin)

    def observe(self, loss: float) -> bool:
        """Count one step's loss; True when training has diverged."""
        if not math.isfinite(loss):
            self.above += 1
            return self.above >= self.patience
        self.above = self.above + 1 if loss > self.threshold() else 0
        self.seen += 1
        self.ema = self.beta * self.ema + (1 - self.beta) * loss
        self.floor = min(self.floor, self.ema / (1 - self.beta ** self.seen))
        return self.above >= self.patience

    @property
    def healthy(self) -> bool:
        return self.above == 0

    def state(self) -> dict:
        floor = self.floor if math.isfinite(self.floor) else None  # JSON has no inf
        return {"ema": self.ema, "seen": self.seen, "floor": floor, "above": self.above}

    def restore(self, state: dict) -> None:
        self.ema, self.seen = float(state["ema"]), int(state["seen"])
        floor = state["floor"]
        self.floor = math.inf if floor is None else float(floor)
        self.above = int(state["above"])
