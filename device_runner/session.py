"""One training session on the board: what `actcomp-device train` and a fleet round share.

    session = Session.open(artifact, batch_size, budget, threads)  # budget vs. the plan
    train_set = session.load_data(path, spool_dir=artifact)
    summary = session.train(train_set, val_set, out, options, report, spool_dir)

What differs stays with the caller: the command line's arguments and messages, a fleet
round's global weights, round folders and node config.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import data as data_module
from .data import Dataset
from .runtime import KERNELS, Trainer, arena_for_budget
from .train import Options, check_budget, check_plan, fit


def load_trainer(artifact, threads: int | None = None, budget: int | None = None,
                 kernels: str = KERNELS[0]) -> Trainer:
    """The artifact's trainer on ``threads`` (None: all cores), its onnxruntime arena capped
    for a memory budget (bytes; None: no cap), on ``kernels`` (runtime.KERNELS)."""
    return Trainer(artifact, threads=threads, arena_bytes=arena_for_budget(budget),
                   kernels=kernels)


def input_size(trainer: Trainer) -> tuple:
    """(height, width) of the artifact's images, in pixels."""
    return (trainer.manifest.input.height, trainer.manifest.input.width)


@dataclass
class Session:
    """An artifact's trainer, loaded for a batch size and a memory budget."""
    trainer: Trainer
    batch_size: int         # images per step (cut to the training set's size by fit)
    budget: int | None      # bytes the training working set may grow; None: no budget
    log: Callable[[str], None] = print  # where the progress messages go

    @classmethod
    def open(cls, artifact, batch_size: int | None, budget: int | None,
             threads: int | None, log=print, kernels: str = KERNELS[0]) -> Session:
        """The artifact's trainer at batch_size (None: the artifact's batch); BudgetError,
        before any data loads, when its memory plan cannot meet the budget."""
        trainer = load_trainer(artifact, threads, budget, kernels)
        batch_size = batch_size or trainer.manifest.batch_size
        if budget is not None:
            check_plan(trainer.manifest, batch_size, budget)
        return cls(trainer, batch_size, budget, log)

    def load_data(self, path, spool_dir) -> Dataset:
        """The images at path (ImageFolder directory or .npz) at the artifact's input size,
        labelled by its classes; images decoded at load time are spooled to disk in
        spool_dir, not held in memory."""
        m = self.trainer.manifest
        return data_module.load(path, input_size(self.trainer), m.num_classes, m.classes,
                                spool_dir=spool_dir)

    def train(self, train_set: Dataset, val_set: Dataset | None, out, options: Options,
              report: str | None = None, spool_dir=None, report_timeout: float = 10.0) -> dict:
        """Check the budget on a dry-run step (BudgetError when a step cannot fit it), then
        fit into out (train.fit), streaming the profile records to the report URL (None:
        none) through spool_dir; returns the summary."""
        budget_action = None
        if self.budget is not None:
            budget_action = check_budget(self.trainer, train_set,
                                         min(options.batch_size, len(train_set)), self.budget,
                                         log=self.log)
        sender = None
        if report:
            from .transport import ProfileSender
            sender = ProfileSender(report, spool_dir)
        try:
            return fit(self.trainer, train_set, val_set, out, options, sender=sender,
                       log=self.log, budget_action=budget_action)
        finally:
            if sender is not None:
                if not sender.flush(timeout=report_timeout):
                    print(f"warning: not every profile record was acknowledged; they stay in "
                          f"{Path(spool_dir)} and are re-sent by the next run", file=sys.stderr)
                sender.close()
