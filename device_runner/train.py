"""The fine-tuning loop on the board: data order, evaluation, checkpoints, budget, profiles."""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from actcomp_edge.core import memplan, rank_budget, schedules
from actcomp_edge.core.manifest import Manifest, sha256_file
from actcomp_edge.core.npz import save_npz, write_atomic
from actcomp_edge.core.record import StepRecord

from . import checkpoint, procmem, recipe
from .data import Dataset
from .runtime import SPLIT_PARTS, MemoryBudgetError, Trainer

MAX_ROLLBACKS = 3  # divergences rolled back (lr halved each time) before training stops


class BudgetError(ValueError):
    """The training working set cannot fit the memory budget."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stays NaN)."""


@dataclass
class Options:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    schedule: str = schedules.DEFAULT_SCHEDULE
    clip_norm: float | None = recipe.DEFAULT_CLIP_NORM   # None or 0: no clipping
    augment: bool = True
    cache_prefix: bool = False  # keep the frozen prefix's outputs of every image (no augment)
    seed: int = 0
    max_steps: int | None = None
    checkpoint_every: int = 50
    budget_bytes: int | None = None
    resume: bool = False
    report_every: int = 1
    proximal_mu: float = 0.0   # FedProx: mu/2 ‖w - w_start‖² added to the loss (0: off)
    # (i, n): this run is part i (0-based) of n equal runs along one lr schedule (a fleet's
    # round i + 1 of n); (0, 1): the schedule spans this run
    schedule_part: tuple = (0, 1)


def evaluate(trainer: Trainer, data: Dataset, batch_size: int,
             buffer: np.ndarray | None = None) -> float:
    """Top-1 accuracy on data, in batches of the training step, written into ``buffer`` (the
    training loop's batch memory) when given. Trainer.evaluate runs the step's forward
    partitions, so evaluating does not outgrow the step's memory."""
    norm = trainer.manifest.input
    correct = 0
    for start in range(0, len(data), batch_size):
        idx = np.arange(start, min(start + batch_size, len(data)))
        x, y = data.batch(idx, norm.mean, norm.std, out=buffer)
        correct += int((trainer.evaluate(x).argmax(axis=1) == y).sum())
    return correct / max(1, len(data))


def dry_run(trainer: Trainer, data: Dataset, batch_size: int) -> tuple:
    """(peak RSS growth, bytes kept for backward, ranks: layer -> rank per mode or None) of
    one training step on a real batch; the training state is restored afterwards."""
    norm = trainer.manifest.input
    saved = {k: np.array(v, copy=True) for k, v in trainer.state_arrays().items()}
    x, y = data.batch(np.arange(min(batch_size, len(data))), norm.mean, norm.std)
    base = procmem.rss_bytes()
    procmem.reset_peak()
    result = trainer.step(x, y, lr=0.0)
    grown = procmem.peak_rss_bytes() - base
    trainer.load_state_arrays(saved)
    return max(0, grown), result.kept_full_bytes, result.ranks


def calibrate_ranks(trainer: Trainer, data: Dataset, batch_size: int, budget: int,
                    log=print) -> dict:
    """The ranks (layer -> one per mode) that fit ``budget`` bytes of kept activations: the
    eps rule at the largest eps that fits, on the first batch_size training images
    (rank_budget.allocate), fixed on the trainer's trackers from the first step on."""
    norm = trainer.manifest.input
    x, _ = data.batch(np.arange(batch_size), norm.mean, norm.std,
                      out=trainer.image_buffer(batch_size))
    shapes = {name: (batch_size,) + tuple(layer.input_shape)
              for name, layer in trainer.layers.items()}
    ranks, eps = rank_budget.allocate(trainer.layer_energies(x), shapes, budget)
    trainer.fix_ranks(ranks)
    kept = sum(rank_budget.tucker_bytes(shapes[name], r) for name, r in ranks.items())
    log(f"activation budget {budget / 2 ** 20:.2f} MiB: the eps rule at eps {eps:.4f} on the "
        f"first {batch_size} training images keeps {kept / 2 ** 20:.2f} MiB; "
        + ", ".join(f"{name} {tuple(r)}" for name, r in ranks.items()))
    return ranks


def planned_working_set(manifest: Manifest, batch_size: int) -> int:
    """The memory plan's working set (bytes) at batch_size (at_batch)."""
    return at_batch(manifest.memory_plan, manifest.memory_plan.working_set_bytes, batch_size)


def at_batch(plan, working_set: int, batch_size: int) -> int:
    """A working set of the plan (bytes at plan.batch_size) at batch_size: every term but
    the sessions' grows with the batch (the pool is planned for the batch the step runs)."""
    sessions = plan.extra.get("session_bytes", 0)
    return math.ceil((working_set - sessions) * batch_size / plan.batch_size) + sessions


def seen_working_set(trainer: Trainer, ranks: dict, batch_size: int) -> int | None:
    """The memory plan's working set (bytes) at batch_size with each layer's ranks at
    ``ranks`` (the largest per mode a run saw) instead of their bound; None where the plan
    has no data-dependent ranks or the artifact no rank model."""
    plan = trainer.manifest.memory_plan
    at_plan_batch = memplan.working_set_at(plan, trainer.schedule, trainer.layers, trainer.row,
                                           ranks, trainer.last_use)
    return None if at_plan_batch is None else at_batch(plan, at_plan_batch, batch_size)


def check_plan(manifest: Manifest, batch_size: int, budget: int) -> None:
    """Refuse (BudgetError) before any work a budget the memory plan cannot meet, with the
    numbers and the batch that would fit. Data-dependent (eps) ranks are planned at their
    bound: a plan above the budget is then left to the dry run and rank caps."""
    mib = 2 ** 20
    predicted = planned_working_set(manifest, batch_size)
    plan = manifest.memory_plan
    if predicted <= budget or plan.rank_basis == "bound":
        return
    per_sample = predicted / batch_size
    fits = int(budget // per_sample)
    hint = (f"--batch-size {fits} would need about {fits * per_sample / mib:.1f} MiB"
            if fits >= 1 else "even batch 1 does not fit")
    raise BudgetError(f"budget {budget / mib:.1f} MiB is too small: the memory plan needs "
                      f"{predicted / mib:.1f} MiB at batch {batch_size} (pool, arena, numpy, "
                      f"sessions; peak at {plan.peak_at}); {hint}, or export with fewer --layers "
                      f"or a compressing --method")


def check_budget(trainer: Trainer, data: Dataset, batch_size: int, budget: int,
                 log=print) -> dict:
    """Measure a dry-run step (after check_plan: the check that the plan holds); refuse
    (BudgetError) with what would fit when it cannot fit;
    otherwise derive per-layer rank caps (set on the trainer) and return what was done."""
    mib = 2 ** 20
    planned = planned_working_set(trainer.manifest, batch_size)
    log(f"budget: the memory plan predicts a working set of {planned / mib:.1f} MiB at "
        f"batch {batch_size} ({trainer.manifest.memory_plan.rank_basis} ranks)")
    predicted = trainer.manifest.predicted_memory
    scale = batch_size / predicted.batch_size  # every kept term grows with the batch
    log(f"budget: predicted kept for backward at batch {batch_size}: about "
        f"{predicted.full_bytes * scale / mib:.1f} MiB ({predicted.rank_basis} ranks); "
        f"measuring a dry-run step")
    try:
        need, kept, ranks = dry_run(trainer, data, batch_size)
    except MemoryBudgetError:
        raise BudgetError(f"budget {budget / mib:.1f} MiB is too small: a dry-run step of batch "
                          f"{batch_size} could not allocate within it; give a larger --budget, "
                          f"a smaller --batch-size, or export with fewer --layers") from None
    if need > budget:
        per_sample = need / batch_size
        fits = int(budget // per_sample) if per_sample else batch_size
        hint = (f"--batch-size {fits} would need about {fits * per_sample / mib:.1f} MiB"
                if fits >= 1 else "even batch 1 does not fit")
        raise BudgetError(f"budget {budget / mib:.1f} MiB is too small: one training step needs "
                          f"{need / mib:.1f} MiB ({(need - budget) / mib:.1f} MiB over); {hint}, "
                          f"or export with fewer --layers, a lower --eps or a --rank-cap")
    # what is not activations (weights, gradients, workspace) is what the dry run measured
    # beyond the kept activations; the rest of the budget may go to activations
    allowance = budget - (need - kept)
    trainer.rank_caps = rank_caps_for_budget(trainer, batch_size, allowance)
    seen = (seen_working_set(trainer, ranks, batch_size)  # eps ranks: planned above at
            if trainer.manifest.memory_plan.rank_basis == "bound" else None)  # their bound
    log(f"budget: one step needs {need / mib:.1f} MiB of the {budget / mib:.1f} MiB budget"
        + (f" (the memory plan at its ranks: {seen / mib:.1f} MiB)" if seen is not None else "")
        + (f"; rank caps of {min(trainer.rank_caps.values())}.."
           f"{max(trainer.rank_caps.values())} on {len(trainer.rank_caps)} of "
           f"{len(trainer.layers)} layers (the summary lists them) keep the worst-case "
           f"activations within {allowance / mib:.1f} MiB" if trainer.rank_caps else ""))
    return {"dry_run_bytes": need, "planned_bytes": planned,
            "activation_allowance_bytes": allowance,
            "rank_caps": trainer.rank_caps}


def rank_caps_for_budget(trainer: Trainer, batch_size: int, allowance: int) -> dict:
    """Per-layer rank cap (one value for every mode) so that even a batch whose eps ranks
    come out high keeps at most ``allowance`` bytes of activations in all: each layer gets a
    share proportional to its uncompressed input, and the largest cap whose worst case fits."""
    from actcomp_edge.core.decomposition import full_rank_bound
    row = trainer.row
    if row.ranks is None or allowance <= 0:
        return {}
    shapes = {name: (batch_size,) + tuple(layer.input_shape)
              for name, layer in trainer.layers.items()}
    total = sum(math.prod(s) for s in shapes.values())  # exact ints, no int64 overflow
    caps = {}
    for name, shape in shapes.items():
        share = allowance * math.prod(shape) / total

        def kept(cap):
            return 4 * row.kept_floats(shape, row.ranks(shape, None, cap), 1)
        top = max(full_rank_bound(shape))
        if kept(top) <= share:
            continue  # even full rank fits: no cap needed
        lo, hi = 1, top
        while lo < hi:  # largest cap with kept(cap) <= share (kept grows with cap)
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if kept(mid) <= share else (lo, mid - 1)
        caps[name] = lo
    return caps


class PrefixCache:
    """The frozen prefix's outputs of every training image, (images, ...) per output, filled
    the first time each batch passes: exact later, as the prefix's weights never change and
    the images do not without augmentation. Its pages are touched when made, so the cache
    belongs to the baseline, not to the steps' working set."""

    def __init__(self, trainer: Trainer, images: int, batch: int):
        shapes = {n: (trainer.output_shape(n, 1)[1:], trainer.outputs[n][1])
                  for n in trainer.io[trainer.prefix][1]}
        self.arrays = {n: np.zeros((images, *shape), dtype) for n, (shape, dtype) in shapes.items()}
        self.batch = {n: np.zeros((batch, *shape), dtype) for n, (shape, dtype) in shapes.items()}
        for a in self.arrays.values():
            a.fill(0)
        self.filled = np.zeros(images, bool)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def outputs(self, trainer: Trainer, idx: np.ndarray, images: np.ndarray) -> dict:
        """The prefix's outputs for images[i] = data[idx[i]], in the cache's batch buffers:
        the prefix runs on a batch the first time one of its images is missing."""
        if not self.filled[idx].all():
            for n, value in trainer.prefix_outputs(images).items():
                self.arrays[n][idx] = value
            self.filled[idx] = True
        return {n: np.take(a, idx, axis=0, out=self.batch[n][:len(idx)])
                for n, a in self.arrays.items()}


class Progress:
    """One line per step on a terminal (overwritten), every 10th step otherwise."""

    def __init__(self, total: int, stream=sys.stdout):
        self.total, self.stream, self.tty = total, stream, stream.isatty()

    def update(self, step: int, text: str) -> None:
        width = 24
        filled = int(width * step / max(1, self.total))
        line = f"[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} {text}"
        if self.tty:
            self.stream.write("\r" + line)
            self.stream.flush()
        elif step % 10 == 0 or step == self.total:
            print(line, file=self.stream, flush=True)

    def done(self) -> None:
        if self.tty:
            self.stream.write("\n")


@dataclass
class RunState:
    """Where the run is: the data order, the applied steps, the recipe's state. Checkpointed
    with the arrays (as JSON), and held in memory as the rollback point."""
    epoch: int = 0                  # epochs finished
    next_batch: int = 0             # the next batch of the epoch's order
    step: int = 0                   # steps applied
    lr_scale: float = 1.0           # halved by each rollback
    rollbacks: int = 0
    best_val_accuracy: float | None = None
    best_epoch: int | None = None   # 1-based, the epoch of best_val_accuracy
    epoch_loss_sum: float = 0.0     # over the epoch's applied steps
    epoch_steps: int = 0            # the epoch's applied steps
    guard: dict | None = None       # the DivergenceGuard's state

    def copy(self) -> RunState:
        """A deep copy, as a checkpoint gives it back (through JSON)."""
        return RunState(**json.loads(json.dumps(asdict(self))))


@dataclass
class StepMeasures:
    """What the applied steps measured, for the summary. Bytes in bytes, times in seconds."""
    baseline: int                   # RSS before the first step
    budget: int | None              # what the working set may grow over the baseline
    seconds: list = field(default_factory=list)    # per step, its wall time
    splits: list = field(default_factory=list)     # per step, SPLIT_PARTS -> seconds
    violations: int = 0             # steps whose working set exceeded the budget
    peak: int = 0                   # peak RSS over the steps (not evaluation or writing)
    process_peak: int = 0           # peak RSS before the last restart_peak, of everything
    kept_peak: dict = field(default_factory=lambda: {"paper": 0, "full": 0})
    rank_sums: dict = field(default_factory=dict)  # layer -> ranks per mode summed over steps
    rank_max: dict = field(default_factory=dict)   # layer -> the largest rank per mode seen
    rank_steps: dict = field(default_factory=dict)  # layer -> the steps summed in rank_sums

    def exceeded(self, peak: int) -> bool:
        return self.budget is not None and peak - self.baseline > self.budget

    def restart_peak(self) -> None:
        """After work between steps (an epoch's evaluation and writes): its peak goes into
        process_peak, and the next steps' peak RSS starts from the RSS now."""
        self.process_peak = max(self.process_peak, procmem.peak_rss_bytes())
        procmem.reset_peak()

    def process_peak_now(self) -> int:
        """Peak RSS of the whole run so far, evaluation and writes included."""
        return max(self.process_peak, procmem.peak_rss_bytes())

    def add(self, result, seconds: float, peak: int) -> None:
        """Count an applied step (a StepResult) of ``seconds``, with the peak RSS after it."""
        self.seconds.append(seconds)
        self.splits.append(result.seconds)
        self.peak = max(self.peak, peak)
        self.violations += int(self.exceeded(peak))
        for layer, ranks in result.ranks.items():
            if ranks:
                self.rank_sums[layer] = self.rank_sums.get(layer, 0) + np.asarray(ranks, float)
                self.rank_steps[layer] = self.rank_steps.get(layer, 0) + 1
                self.rank_max[layer] = tuple(
                    max(int(a), int(b)) for a, b in zip(self.rank_max.get(layer, ranks), ranks))
        self.kept_peak["paper"] = max(self.kept_peak["paper"], sum(result.kept_bytes.values()))
        self.kept_peak["full"] = max(self.kept_peak["full"], result.kept_full_bytes)

    def summary(self) -> dict:
        """The summary's fields of the steps' times, memory and ranks."""
        return {
            "median_step_seconds": float(np.median(self.seconds)) if self.seconds else None,
            # where a step's time goes: the median of each part over the steps
            "step_split_seconds": {
                part: float(np.median([split.get(part, 0.0) for split in self.splits]))
                for part in SPLIT_PARTS} if self.splits else None,
            "baseline_rss_bytes": self.baseline, "working_set_bytes": self.peak - self.baseline,
            "budget_bytes": self.budget, "budget_violations": self.violations,
            "kept_bytes_peak": self.kept_peak,
            "mean_ranks": {layer: [round(float(r), 2) for r in summed / self.rank_steps[layer]]
                           for layer, summed in self.rank_sums.items()},
            "max_ranks": {layer: list(ranks) for layer, ranks in self.rank_max.items()}}


def output_classes(trainer: Trainer, train_set: Dataset) -> list:
    """The names the inference model reports: the data's (an ImageFolder's folders) where
    the artifact has only the default "0", "1", ... (data.load checked that they agree)."""
    default = [str(i) for i in range(trainer.manifest.num_classes)]
    classes = default if trainer.manifest.classes is None else trainer.manifest.classes
    if classes == default and train_set.names_given and len(train_set.classes) == len(default):
        return list(train_set.classes)
    return classes


class TrainingRun:
    """One fit(): what the run is given and derives once, where it is (RunState), what its
    steps measured (StepMeasures), and each part of the loop as a method."""

    def __init__(self, trainer: Trainer, train_set: Dataset, val_set: Dataset | None, out: Path,
                 options: Options, sender=None, log=print, budget_action: dict | None = None):
        self.trainer, self.train_set, self.val_set = trainer, train_set, val_set
        self.out, self.options, self.sender, self.log = out, options, sender, log
        self.budget_action = budget_action
        # FedProx's anchor: the weights this run starts from (before any resume)
        self.proximal = ((options.proximal_mu, {k: np.array(v, copy=True)
                                                for k, v in trainer.params.items()})
                         if options.proximal_mu else None)
        self.ckpt_dir = out / "checkpoints"
        self.batch = min(options.batch_size, len(train_set))
        self.steps_per_epoch = math.ceil(len(train_set) / self.batch)
        self.total = options.epochs * self.steps_per_epoch
        if options.max_steps:
            self.total = min(self.total, options.max_steps)
        self.schedule = schedules.parse_schedule(options.schedule)
        # what a checkpoint must match to be resumed: the same data order
        self.identity = {"artifact": sha256_file(trainer.folder / "manifest.json"),
                         "data_size": len(train_set), "batch_size": self.batch,
                         "seed": options.seed}
        self.state = RunState()
        self.guard = recipe.DivergenceGuard(trainer.manifest.num_classes)
        self.classes = output_classes(trainer, train_set)
        # the memory plan's working set: eps ranks at their bound (the guarantee), then at
        # the largest ranks the run's steps saw (the prediction)
        self.bound = self.predicted = planned_working_set(trainer.manifest, self.batch)
        self.predicted_ranks = ("bound" if trainer.manifest.memory_plan.rank_basis == "bound"
                                else None)  # else exact or fixed ranks: nothing to re-plan
        self.planned_at = None  # the ranks self.predicted was last planned at
        self.val_accuracy = None     # the last evaluation's
        self.last_epoch_loss = None  # the mean training loss of the last epoch
        self.started = 0             # epochs started (the summary's "epochs")
        # set by prepare(): the batch memory, the PrefixCache, the rollback point
        # (arrays, RunState), the StepMeasures and the Progress line
        self.batch_buffer = self.cache = self.snapshot = self.measures = self.progress = None

    def resume(self) -> None:
        """Continue from the newest good checkpoint, if any; TrainingError when it was made
        for another data order."""
        found = checkpoint.load_latest(self.ckpt_dir, log=checkpoint.warn)
        if found is None:
            self.log("no checkpoint to resume from: starting from the artifact's weights")
            return
        meta, arrays = found
        changed = [k for k, v in self.identity.items() if meta.get(k) != v]
        if changed:
            raise TrainingError(f"checkpoint in {self.ckpt_dir} was made with a different "
                                f"{', '.join(changed)}: cannot resume with the same data order")
        self.trainer.load_state_arrays(arrays)
        self.state = RunState(**{f.name: meta[f.name] for f in fields(RunState) if f.name in meta})
        if self.state.guard:
            self.guard.restore(self.state.guard)
        self.log(f"resumed from step {self.state.step} (epoch {self.state.epoch + 1}, batch "
                 f"{self.state.next_batch + 1})")

    def prepare(self) -> None:
        """What the whole run holds (the batch memory, the prefix cache, the rollback
        point), then the baseline RSS; then the ranks of an activation budget."""
        trainer = self.trainer
        # one batch of memory for every step, the image's place in the step's pool: a new
        # array per step fragments the heap (measured +6-13 MiB at batch 32, 128 px), and the
        # pool gives the place to later tensors of the step once the image is read (36.8 MiB
        # at batch 64, 224 px); its pages are touched, and counted, in the first step
        self.batch_buffer = trainer.image_buffer(self.batch)
        if self.options.cache_prefix and trainer.prefix is not None:
            self.cache = PrefixCache(trainer, len(self.train_set), self.batch)
            self.log(f"caching the frozen prefix's outputs of {len(self.train_set)} images: "
                     f"{self.cache.nbytes / 2 ** 20:.1f} MiB")
        # the rollback point, a copy of the trainable state: held for the whole run, like
        # the weights, so it belongs to the baseline and not to the steps' working set
        self.take_snapshot()
        # the libraries every run's steps use are loaded before the baseline: numpy's random
        # module orders each epoch (2.2-2.5 MiB of RSS with OpenSSL, benchmarks/scripts/
        # memory_ab.sh; the memory plan cannot see it)
        procmem.import_numpy_random()
        baseline = procmem.rss_bytes()
        procmem.reset_peak()
        self.measures = StepMeasures(baseline, self.options.budget_bytes, peak=baseline)
        activation_budget = trainer.manifest.train.activation_budget
        if activation_budget and not any(t.state() for t in trainer.trackers.values()):
            # after the baseline: its memory is the run's; a resumed run keeps its ranks
            calibrate_ranks(trainer, self.train_set, self.batch, activation_budget, self.log)
        self.progress = Progress(self.total)
        self.started = self.state.epoch

    def save_checkpoint(self) -> None:
        self.state.guard = self.guard.state()
        checkpoint.save(self.ckpt_dir, self.state.step, dict(self.identity, **asdict(self.state)),
                        self.trainer.state_arrays())

    def take_snapshot(self) -> None:
        """The rollback point: a copy of the arrays and of where the run is."""
        self.state.guard = self.guard.state()
        self.snapshot = ({k: np.array(v, copy=True)
                          for k, v in self.trainer.state_arrays().items()}, self.state.copy())

    def mark_good(self) -> None:
        """Checkpoint the state, and make it the rollback point."""
        self.save_checkpoint()
        self.take_snapshot()

    def save_results(self, prefix: str) -> None:
        """out/<prefix>weights.npz and out/<prefix>inference.onnx."""
        self.out.mkdir(parents=True, exist_ok=True)
        save_npz(self.out / f"{prefix}weights.npz", self.trainer.params)
        write_atomic(self.out / f"{prefix}inference.onnx",
                     self.trainer.inference_model(self.classes))

    def run(self) -> None:
        """Train epoch by epoch until options.epochs or the total steps."""
        while self.state.epoch < self.options.epochs and self.state.step < self.total:
            epoch = self.state.epoch
            self.started = max(self.started, epoch + 1)
            if self.run_epoch(epoch):
                continue  # rolled back: the state says where to go on
            if self.state.next_batch >= self.steps_per_epoch:
                self.end_epoch(epoch)
        self.progress.done()

    def run_epoch(self, epoch: int) -> bool:
        """Train the epoch's remaining batches; True when training diverged (rolled back)."""
        order = np.random.default_rng(self.options.seed + epoch).permutation(len(self.train_set))
        while self.state.next_batch < self.steps_per_epoch and self.state.step < self.total:
            result, lr, seconds, labels = self.train_batch(epoch, order)
            diverged = self.guard.observe(result.loss if result.applied else math.nan)
            if result.applied:
                self.count_step(epoch, result, lr, seconds, labels)
            else:
                self.log(f"step {self.state.step + 1}: loss {result.loss} is not finite: step "
                         f"rejected, weights kept")
            if diverged:
                self.roll_back(result)
                return True
            every = self.options.checkpoint_every
            if every and self.state.step % every == 0 and result.applied and self.guard.healthy:
                self.mark_good()
            del result  # its gradients and logits: not held through the next step
        return False

    def train_batch(self, epoch: int, order: np.ndarray) -> tuple:
        """One step on the epoch's next batch: (StepResult, lr, wall seconds, labels (B,))."""
        options, b = self.options, self.state.next_batch
        idx = order[b * self.batch:(b + 1) * self.batch]
        # the crops of batch b of epoch e are the same in every run (and after --resume)
        rng = np.random.default_rng([options.seed, epoch, b]) if options.augment else None
        norm = self.trainer.manifest.input
        x, y = self.train_set.batch(idx, norm.mean, norm.std, out=self.batch_buffer,
                                    augment=rng)
        part, parts = options.schedule_part
        lr = self.state.lr_scale * schedules.learning_rate(
            self.schedule, options.lr, part * self.total + self.state.step, parts * self.total,
            self.steps_per_epoch)
        start = time.perf_counter()
        prefix = self.cache.outputs(self.trainer, idx, x) if self.cache is not None else None
        result = self.trainer.step(x, y, lr, options.clip_norm, prefix_out=prefix,
                                   proximal=self.proximal)
        seconds = time.perf_counter() - start
        self.state.next_batch += 1
        return result, lr, seconds, y

    def count_step(self, epoch: int, result, lr: float, seconds: float,
                   labels: np.ndarray) -> None:
        """An applied step: the run's state, the measures, its profile record, the progress."""
        state = self.state
        state.step += 1
        state.epoch_loss_sum += result.loss
        state.epoch_steps += 1
        rss, peak = procmem.rss_bytes(), procmem.peak_rss_bytes()  # /proc once a step
        self.measures.add(result, seconds, peak)
        if self.predicted_ranks and self.measures.rank_max != self.planned_at:
            seen = seen_working_set(self.trainer, self.measures.rank_max, self.batch)
            if seen is not None:
                self.predicted, self.predicted_ranks = seen, "seen"
            self.planned_at = dict(self.measures.rank_max)
        over = self.measures.exceeded(peak)
        if self.sender is not None and (state.step % self.options.report_every == 0 or over):
            self.sender.send(self.step_record(epoch, result, lr, seconds, rss, peak).to_json())
        accuracy = float((result.logits.argmax(axis=1) == labels).mean())
        self.progress.update(state.step, f"loss {result.loss:.4f} acc {accuracy:.2f} "
                                         f"lr {lr:.2g} {seconds * 1e3:.0f} ms/step "
                                         f"rss {rss / 2 ** 20:.0f} MiB")

    def step_record(self, epoch: int, result, lr: float, seconds: float, rss: int,
                    peak: int) -> StepRecord:
        """The profile record of the step just counted (RSS and peak RSS in bytes)."""
        trainer, measures = self.trainer, self.measures
        return StepRecord(
            step=self.state.step, epoch=epoch + 1, loss=result.loss, lr=lr,
            grad_norm=result.grad_norm, step_seconds=seconds, rss_bytes=rss,
            peak_rss_bytes=peak, baseline_rss_bytes=measures.baseline,
            kept_bytes=result.kept_bytes, kept_bytes_total=sum(result.kept_bytes.values()),
            kept_full_bytes=result.kept_full_bytes,
            kept_full_bytes_per_layer=result.kept_full_per_layer,
            ranks={k: list(v) if v else None for k, v in result.ranks.items()},
            eps=trainer.eps if trainer.row.ranks else None, method=trainer.method,
            working_set_bytes=peak - measures.baseline,
            predicted_working_set_bytes=self.predicted, budget_bytes=measures.budget,
            budget_exceeded=measures.exceeded(peak), budget_action=self.budget_action,
            seconds_split=result.seconds)

    def roll_back(self, result) -> None:
        """Diverged: back to the rollback point at half the lr (keeping the best weights'
        record), or TrainingError after MAX_ROLLBACKS."""
        self.progress.done()
        state, guard = self.state, self.guard
        reason = ("non-finite loss" if not result.applied else
                  f"loss {result.loss:.3g} above {guard.threshold():.3g}")
        if state.rollbacks >= MAX_ROLLBACKS:
            raise TrainingError(
                f"training diverged ({reason} for {guard.patience} steps) after "
                f"{state.rollbacks} rollbacks: stopping (lower --lr?); the last good state is "
                f"checkpointed" + (f", the best weights (epoch {state.best_epoch}) are in "
                                   f"{self.out / 'best_weights.npz'}" if state.best_epoch else ""))
        arrays, saved = self.snapshot  # replaced by a fresh snapshot below: no copy
        self.trainer.load_state_arrays(arrays)
        self.state = replace(saved.copy(), rollbacks=state.rollbacks + 1,
                             lr_scale=state.lr_scale / 2,
                             best_val_accuracy=state.best_val_accuracy,  # on disk: kept
                             best_epoch=state.best_epoch)
        guard.restore(self.state.guard)
        self.log(f"step {state.step}: diverged ({reason} for {guard.patience} steps): rolled "
                 f"back to step {self.state.step}, lr x{self.state.lr_scale:g} (rollback "
                 f"{self.state.rollbacks} of {MAX_ROLLBACKS})")
        self.mark_good()

    def validate(self) -> None:
        """The accuracy on the validation set, if there is one."""
        if self.val_set is not None:
            self.val_accuracy = evaluate(self.trainer, self.val_set, self.batch,
                                         self.batch_buffer)

    def keep_best(self, epoch: int) -> None:
        """A new best validation accuracy (after 1-based ``epoch``): the best_ results."""
        state = self.state
        if self.val_set is not None and (state.best_val_accuracy is None
                                         or self.val_accuracy > state.best_val_accuracy):
            state.best_val_accuracy, state.best_epoch = self.val_accuracy, epoch
            self.save_results("best_")

    def end_epoch(self, epoch: int) -> None:
        """The epoch's evaluation, log line and record, best results and checkpoint; then
        the next epoch starts."""
        self.progress.done()
        state = self.state
        self.validate()
        self.last_epoch_loss = state.epoch_loss_sum / max(1, state.epoch_steps)
        self.log(f"epoch {epoch + 1}/{self.options.epochs}: train loss "
                 f"{self.last_epoch_loss:.4f}" + (f", val accuracy {self.val_accuracy:.4f}"
                                                   if self.val_set is not None else ""))
        if self.sender is not None:
            self.sender.send({"type": "epoch", "epoch": epoch + 1, "step": state.step,
                              "val_accuracy": self.val_accuracy})
        self.keep_best(epoch + 1)
        state.epoch, state.next_batch, state.epoch_loss_sum, state.epoch_steps = \
            epoch + 1, 0, 0.0, 0
        if self.guard.healthy:
            self.mark_good()
        self.measures.restart_peak()  # the evaluation and writes above are not a step

    def finish(self) -> None:
        """After the last step: the last epoch's loss so far, an evaluation if none since the
        last step, the last checkpoint and the final results."""
        state = self.state
        if state.epoch_steps:  # stopped inside an epoch (--max-steps): its mean so far
            self.last_epoch_loss = state.epoch_loss_sum / state.epoch_steps
        if self.val_accuracy is None or state.next_batch:  # not evaluated since the last step
            self.validate()
            self.keep_best(self.started)
        self.save_checkpoint()
        self.save_results("")

    def summary(self) -> dict:
        """The run's summary (the runner's --summary, a fleet round's)."""
        state, trainer, out = self.state, self.trainer, self.out
        train = trainer.manifest.train
        predicted = trainer.manifest.predicted_memory
        return {
            "steps": state.step, "epochs": self.started, "final_train_loss": self.last_epoch_loss,
            "final_val_accuracy": self.val_accuracy,
            "best_val_accuracy": state.best_val_accuracy, "best_epoch": state.best_epoch,
            "recipe": {"lr": self.options.lr, "schedule": self.options.schedule,
                       "clip_grad_norm": self.options.clip_norm, "augment": self.options.augment,
                       "cache_prefix": self.cache is not None, "optimizer": train.optimizer,
                       "momentum": train.momentum, "lr_scale": state.lr_scale,
                       "rollbacks": state.rollbacks, "proximal_mu": self.options.proximal_mu},
            **self.measures.summary(), "threads": trainer.threads, "kernels": trainer.kernels,
            "peak_rss_bytes": self.measures.process_peak_now(),
            "predicted_working_set_bytes": self.predicted,
            # eps ranks: the prediction at the largest ranks the steps saw ("seen"), and the
            # plan at their bound (what check_plan guarantees)
            "predicted_ranks": self.predicted_ranks, "bound_working_set_bytes": self.bound,
            "activation_budget_bytes": train.activation_budget,
            # asi: the ranks each layer kept from its first step on
            "fixed_ranks": {layer: [t.k1] + [u.shape[1] for u in t.factors]
                            for layer, t in trainer.trackers.items()
                            if getattr(t, "factors", None) is not None},
            "predicted_kept_bytes": {"paper": predicted.paper_bytes,
                                     "full": predicted.full_bytes},
            "outputs": {"weights": str(out / "weights.npz"),
                        "inference": str(out / "inference.onnx"),
                        **({"best_weights": str(out / "best_weights.npz"),
                            "best_inference": str(out / "best_inference.onnx")}
                           if self.val_set is not None else {})}}


def fit(trainer: Trainer, train_set: Dataset, val_set: Dataset | None, out_dir,
        options: Options, sender=None, log=print, budget_action: dict | None = None) -> dict:
    """Train; returns the summary. Checkpoints go to out_dir/checkpoints, results to out_dir:
    weights.npz + inference.onnx (final), best_weights.npz + best_inference.onnx (best val).
    val_set None: no evaluation (and no best weights). sender: where the profile records
    go (a transport.ProfileSender), None: nowhere."""
    run = TrainingRun(trainer, train_set, val_set, Path(out_dir), options, sender, log,
                      budget_action)
    if options.resume:
        run.resume()
    run.prepare()
    run.run()
    run.finish()
    summary = run.summary()
    if sender is not None:
        sender.send(dict(summary, type="summary"))
    return summary


def write_summary(path, summary: dict) -> None:
    write_atomic(Path(path), (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode())
