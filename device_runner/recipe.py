"""The fine-tuning recipe: the default lr, gradient-norm clipping, FedProx's term, a divergence
guard (the lr schedules: actcomp_edge.core.schedules)."""
from __future__ import annotations

import math

import numpy as np

DEFAULT_CLIP_NORM = 2.0
# SGD's step is lr / (1 - momentum) in the long run: the default lr keeps that step at
# BASE_LR (the paper's lr 0.05 at momentum 0), whatever momentum the artifact was exported with
BASE_LR = 0.05
ADAMW_LR = 1e-3


def default_lr(optimizer: str, momentum: float | None) -> float:
    """The default learning rate for an artifact's optimizer (sgd, adamw) and momentum."""
    if optimizer == "adamw":
        return ADAMW_LR
    return BASE_LR * (1.0 - float(momentum or 0.0))


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
