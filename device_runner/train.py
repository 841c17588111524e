"""The fine-tuning loop on the board: data order, evaluation, checkpoints, budget, profiles."""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actcomp_edge.core import rank_budget, schedules
from actcomp_edge.core.manifest import sha256_file
from actcomp_edge.core.npz import save_npz, write_atomic

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
    norm = trainer.manifest["input"]
    correct = 0
    for start in range(0, len(data), batch_size):
        idx = np.arange(start, min(start + batch_size, len(data)))
        x, y = data.batch(idx, norm["mean"], norm["std"], out=buffer)
        correct += int((trainer.evaluate(x).argmax(axis=1) == y).sum())
    return correct / max(1, len(data))


def dry_run(trainer: Trainer, data: Dataset, batch_size: int) -> tuple:
    """(peak RSS growth, bytes kept for backward) of one training step on a real batch;
    the training state is restored afterwards."""
    norm = trainer.manifest["input"]
    saved = {k: np.array(v, copy=True) for k, v in trainer.state_arrays().items()}
    x, y = data.batch(np.arange(min(batch_size, len(data))), norm["mean"], norm["std"])
    base = procmem.rss_bytes()
    procmem.reset_peak()
    result = trainer.step(x, y, lr=0.0)
    grown = procmem.peak_rss_bytes() - base
    trainer.load_state_arrays(saved)
    return max(0, grown), result.kept_full_bytes


def calibrate_ranks(trainer: Trainer, data: Dataset, batch_size: int, budget: int,
                    log=print) -> dict:
    """The ranks (layer -> one per mode) that fit ``budget`` bytes of kept activations: the
    eps rule at the largest eps that fits, on the first batch_size training images
    (rank_budget.allocate), fixed on the trainer's trackers from the first step on."""
    norm = trainer.manifest["input"]
    x, _ = data.batch(np.arange(batch_size), norm["mean"], norm["std"],
                      out=trainer.image_buffer(batch_size))
    shapes = {name: (batch_size,) + tuple(layer["input_shape"])
              for name, layer in trainer.layers.items()}
    ranks, eps = rank_budget.allocate(trainer.layer_energies(x), shapes, budget)
    trainer.fix_ranks(ranks)
    kept = sum(rank_budget.tucker_bytes(shapes[name], r) for name, r in ranks.items())
    log(f"activation budget {budget / 2 ** 20:.2f} MiB: the eps rule at eps {eps:.4f} on the "
        f"first {batch_size} training images keeps {kept / 2 ** 20:.2f} MiB; "
        + ", ".join(f"{name} {tuple(r)}" for name, r in ranks.items()))
    return ranks


def planned_working_set(manifest: dict, batch_size: int) -> int:
    """The memory plan's working set (bytes) at batch_size: every term of the plan grows
    with the batch (the pool is planned for the batch the step runs), so it scales."""
    plan = manifest["memory_plan"]
    return math.ceil(plan["working_set_bytes"] * batch_size / plan["batch_size"])


def check_plan(manifest: dict, batch_size: int, budget: int) -> None:
    """Refuse (BudgetError) before any work a budget the memory plan cannot meet, with the
    numbers and the batch that would fit. Data-dependent (eps) ranks are planned at their
    bound: a plan above the budget is then left to the dry run and rank caps."""
    mib = 2 ** 20
    predicted = planned_working_set(manifest, batch_size)
    plan = manifest["memory_plan"]
    if predicted <= budget or plan["rank_basis"] == "bound":
        return
    per_sample = predicted / batch_size
    fits = int(budget // per_sample)
    hint = (f"--batch-size {fits} would need about {fits * per_sample / mib:.1f} MiB"
            if fits >= 1 else "even batch 1 does not fit")
    raise BudgetError(f"budget {budget / mib:.1f} MiB is too small: the memory plan needs "
                      f"{predicted / mib:.1f} MiB at batch {batch_size} (pool, arena, numpy; "
                      f"peak at {plan['peak_at']}); {hint}, or export with fewer --layers "
                      f"or a compressing --method")


def check_budget(trainer: Trainer, data: Dataset, batch_size: int, budget: int,
                 log=print) -> dict:
    """Measure a dry-run step (after check_plan: the check that the plan holds); refuse
    (BudgetError) with what would fit when it cannot fit;
    otherwise derive per-layer rank caps (set on the trainer) and return what was done."""
    mib = 2 ** 20
    planned = planned_working_set(trainer.manifest, batch_size)
    log(f"budget: the memory plan predicts a working set of {planned / mib:.1f} MiB at "
        f"batch {batch_size} ({trainer.manifest['memory_plan']['rank_basis']} ranks)")
    predicted = trainer.manifest["predicted_memory"]
    scale = batch_size / predicted["batch_size"]  # every kept term grows with the batch
    log(f"budget: predicted kept for backward at batch {batch_size}: about "
        f"{predicted['full_bytes'] * scale / mib:.1f} MiB ({predicted['rank_basis']} ranks); "
        f"measuring a dry-run step")
    try:
        need, kept = dry_run(trainer, data, batch_size)
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
    log(f"budget: one step needs {need / mib:.1f} MiB of the {budget / mib:.1f} MiB budget"
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
    shapes = {name: (batch_size,) + tuple(layer["input_shape"])
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


def fit(trainer: Trainer, train_set: Dataset, val_set: Dataset | None, out_dir,
        options: Options, sender=None, log=print, budget_action: dict | None = None) -> dict:
    """Train; returns the summary. Checkpoints go to out_dir/checkpoints, results to out_dir:
    weights.npz + inference.onnx (final), best_weights.npz + best_inference.onnx (best val).
    val_set None: no evaluation (and no best weights)."""
    out = Path(out_dir)
    # FedProx's anchor: the weights this run starts from (before any resume)
    proximal = ((options.proximal_mu, {k: np.array(v, copy=True)
                                       for k, v in trainer.params.items()})
                if options.proximal_mu else None)
    ckpt_dir = out / "checkpoints"
    norm = trainer.manifest["input"]
    batch = min(options.batch_size, len(train_set))
    steps_per_epoch = math.ceil(len(train_set) / batch)
    total = options.epochs * steps_per_epoch
    if options.max_steps:
        total = min(total, options.max_steps)
    schedule = schedules.parse_schedule(options.schedule)
    identity = {"artifact": sha256_file(trainer.folder / "manifest.json"),
                "data_size": len(train_set), "batch_size": batch, "seed": options.seed}
    # where the run is: the data order (epoch, next_batch), the applied steps, the recipe's
    # state; checkpointed with the arrays, and held in memory as the rollback point
    run = {"epoch": 0, "next_batch": 0, "step": 0, "lr_scale": 1.0, "rollbacks": 0,
           "best_val_accuracy": None, "best_epoch": None, "epoch_loss_sum": 0.0,
           "epoch_steps": 0, "guard": None}
    guard = recipe.DivergenceGuard(trainer.manifest["num_classes"])
    if options.resume:
        found = checkpoint.load_latest(ckpt_dir, log=checkpoint.warn)
        if found is None:
            log("no checkpoint to resume from: starting from the artifact's weights")
        else:
            meta, arrays = found
            changed = [k for k, v in identity.items() if meta.get(k) != v]
            if changed:
                raise TrainingError(f"checkpoint in {ckpt_dir} was made with a different "
                                    f"{', '.join(changed)}: cannot resume with the same data order")
            trainer.load_state_arrays(arrays)
            run.update({k: meta[k] for k in run if k in meta})
            if run["guard"]:
                guard.restore(run["guard"])
            log(f"resumed from step {run['step']} (epoch {run['epoch'] + 1}, batch "
                f"{run['next_batch'] + 1})")

    def save_checkpoint():
        run["guard"] = guard.state()
        checkpoint.save(ckpt_dir, run["step"], dict(identity, **run), trainer.state_arrays())

    def take_snapshot():  # the rollback point: a copy of the arrays and of where the run is
        run["guard"] = guard.state()
        return ({k: np.array(v, copy=True) for k, v in trainer.state_arrays().items()},
                json.loads(json.dumps(run)))

    def save_results(prefix: str):
        out.mkdir(parents=True, exist_ok=True)
        save_npz(out / f"{prefix}weights.npz", trainer.params)
        write_atomic(out / f"{prefix}inference.onnx", trainer.inference_model(classes))

    # the names the inference model reports: the data's (an ImageFolder's folders) where the
    # artifact has only the default "0", "1", ... (data.load checked that they agree)
    default = [str(i) for i in range(trainer.manifest["num_classes"])]
    classes = (list(train_set.classes) if trainer.manifest.get("classes", default) == default
               and train_set.names_given and len(train_set.classes) == len(default)
               else trainer.manifest.get("classes", default))

    # one batch of memory for every step, the image's place in the step's pool: a new array
    # per step fragments the heap (measured +6-13 MiB at batch 32, 128 px), and the pool
    # gives the place to later tensors of the step once the image is read (36.8 MiB at batch
    # 64, 224 px); its pages are touched, and counted, in the first step
    batch_buffer = trainer.image_buffer(batch)
    cache = None
    if options.cache_prefix and trainer.prefix is not None:
        cache = PrefixCache(trainer, len(train_set), batch)
        log(f"caching the frozen prefix's outputs of {len(train_set)} images: "
            f"{cache.nbytes / 2 ** 20:.1f} MiB")
    # the rollback point, a copy of the trainable state: held for the whole run, like the
    # weights, so it belongs to the baseline and not to the steps' working set
    snapshot = take_snapshot()
    if options.augment:  # the crops' library is loaded before the baseline, not in a step
        import PIL.Image  # noqa: F401
    baseline = procmem.rss_bytes()
    procmem.reset_peak()
    activation_budget = trainer.manifest["train"].get("activation_budget")
    if activation_budget and not any(t.state() for t in trainer.trackers.values()):
        # after the baseline: its memory is the run's; a resumed run keeps its factors' ranks
        calibrate_ranks(trainer, train_set, batch, activation_budget, log)
    progress = Progress(total)
    step_seconds, step_splits, violations = [], [], 0
    train_peak = baseline  # peak RSS over the training steps (not evaluation or writing)
    predicted = planned_working_set(trainer.manifest, batch)
    kept_peak = {"paper": 0, "full": 0}
    val_accuracy, last_epoch_loss, started = None, None, run["epoch"]
    rank_sums, rank_steps = {}, {}  # per layer: the ranks per mode summed over applied steps
    while run["epoch"] < options.epochs and run["step"] < total:
        epoch = run["epoch"]
        started = max(started, epoch + 1)
        order = np.random.default_rng(options.seed + epoch).permutation(len(train_set))
        diverged = False
        while run["next_batch"] < steps_per_epoch and run["step"] < total:
            b, step = run["next_batch"], run["step"]
            idx = order[b * batch:(b + 1) * batch]
            # the crops of batch b of epoch e are the same in every run (and after --resume)
            rng = np.random.default_rng([options.seed, epoch, b]) if options.augment else None
            x, y = train_set.batch(idx, norm["mean"], norm["std"], out=batch_buffer, augment=rng)
            part, parts = options.schedule_part
            lr = run["lr_scale"] * schedules.learning_rate(
                schedule, options.lr, part * total + step, parts * total, steps_per_epoch)
            start = time.perf_counter()
            prefix = cache.outputs(trainer, idx, x) if cache is not None else None
            result = trainer.step(x, y, lr, options.clip_norm, prefix_out=prefix,
                                  proximal=proximal)
            seconds = time.perf_counter() - start
            run["next_batch"] += 1
            diverged = guard.observe(result.loss if result.applied else math.nan)
            if not result.applied:
                log(f"step {step + 1}: loss {result.loss} is not finite: step rejected, "
                    f"weights kept")
            else:
                step = run["step"] = step + 1
                step_seconds.append(seconds)
                step_splits.append(result.seconds)
                run["epoch_loss_sum"] += result.loss
                run["epoch_steps"] += 1
                rss, peak = procmem.rss_bytes(), procmem.peak_rss_bytes()  # /proc once a step
                working = peak - baseline
                train_peak = max(train_peak, peak)
                over = options.budget_bytes is not None and working > options.budget_bytes
                violations += int(over)
                kept = sum(result.kept_bytes.values())
                for layer, ranks in result.ranks.items():
                    if ranks:
                        rank_sums[layer] = rank_sums.get(layer, 0) + np.asarray(ranks, float)
                        rank_steps[layer] = rank_steps.get(layer, 0) + 1
                kept_peak["paper"] = max(kept_peak["paper"], kept)
                kept_peak["full"] = max(kept_peak["full"], result.kept_full_bytes)
                if sender is not None and (step % options.report_every == 0 or over):
                    sender.send({
                        "type": "step", "step": step, "epoch": epoch + 1, "loss": result.loss,
                        "lr": lr, "grad_norm": result.grad_norm,
                        "step_seconds": seconds, "rss_bytes": rss,
                        "peak_rss_bytes": peak, "baseline_rss_bytes": baseline,
                        "kept_bytes": result.kept_bytes, "kept_bytes_total": kept,
                        "kept_full_bytes": result.kept_full_bytes,
                        "kept_full_bytes_per_layer": result.kept_full_per_layer,
                        "ranks": {k: list(v) if v else None for k, v in result.ranks.items()},
                        "eps": trainer.eps if trainer.row.ranks else None,
                        "method": trainer.method,
                        "working_set_bytes": working, "predicted_working_set_bytes": predicted,
                        "budget_bytes": options.budget_bytes, "budget_exceeded": over,
                        "budget_action": budget_action,
                        "seconds_split": result.seconds})
                accuracy = float((result.logits.argmax(axis=1) == y).mean())
                progress.update(step, f"loss {result.loss:.4f} acc {accuracy:.2f} lr {lr:.2g} "
                                      f"{seconds * 1e3:.0f} ms/step "
                                      f"rss {rss / 2 ** 20:.0f} MiB")
            if diverged:
                progress.done()
                reason = ("non-finite loss" if not result.applied else
                          f"loss {result.loss:.3g} above {guard.threshold():.3g}")
                if run["rollbacks"] >= MAX_ROLLBACKS:
                    raise TrainingError(
                        f"training diverged ({reason} for {guard.patience} steps) after "
                        f"{run['rollbacks']} rollbacks: stopping (lower --lr?); the last good "
                        f"state is checkpointed" + (
                            f", the best weights (epoch {run['best_epoch']}) are in "
                            f"{out / 'best_weights.npz'}" if run["best_epoch"] else ""))
                arrays, saved = snapshot  # replaced by a fresh snapshot below: no copy
                trainer.load_state_arrays(arrays)
                rollbacks, scale = run["rollbacks"] + 1, run["lr_scale"] / 2
                best = {k: run[k] for k in ("best_val_accuracy", "best_epoch")}  # on disk: kept
                run.clear()
                run.update(json.loads(json.dumps(saved)), rollbacks=rollbacks, lr_scale=scale,
                           **best)
                guard.restore(run["guard"])
                log(f"step {step}: diverged ({reason} for {guard.patience} steps): rolled back "
                    f"to step {run['step']}, lr x{scale:g} (rollback {rollbacks} of "
                    f"{MAX_ROLLBACKS})")
                save_checkpoint()
                snapshot = take_snapshot()
                break
            if options.checkpoint_every and step % options.checkpoint_every == 0 and \
                    result.applied and guard.healthy:
                save_checkpoint()
                snapshot = take_snapshot()
        if diverged:
            continue
        if run["next_batch"] >= steps_per_epoch:  # epoch finished
            progress.done()
            val_accuracy = (evaluate(trainer, val_set, batch, batch_buffer)
                            if val_set is not None else None)
            last_epoch_loss = run["epoch_loss_sum"] / max(1, run["epoch_steps"])
            log(f"epoch {epoch + 1}/{options.epochs}: train loss {last_epoch_loss:.4f}"
                + (f", val accuracy {val_accuracy:.4f}" if val_set is not None else ""))
            if sender is not None:
                sender.send({"type": "epoch", "epoch": epoch + 1, "step": run["step"],
                             "val_accuracy": val_accuracy})
            if val_set is not None and (run["best_val_accuracy"] is None
                                        or val_accuracy > run["best_val_accuracy"]):
                run["best_val_accuracy"], run["best_epoch"] = val_accuracy, epoch + 1
                save_results("best_")
            run.update(epoch=epoch + 1, next_batch=0, epoch_loss_sum=0.0, epoch_steps=0)
            if guard.healthy:
                save_checkpoint()
                snapshot = take_snapshot()
    progress.done()
    if run["epoch_steps"]:  # stopped inside an epoch (--max-steps): its mean so far
        last_epoch_loss = run["epoch_loss_sum"] / run["epoch_steps"]
    # not evaluated since the last step
    if val_set is not None and (val_accuracy is None or run["next_batch"]):
        val_accuracy = evaluate(trainer, val_set, batch, batch_buffer)
        if run["best_val_accuracy"] is None or val_accuracy > run["best_val_accuracy"]:
            run["best_val_accuracy"], run["best_epoch"] = val_accuracy, started
            save_results("best_")
    save_checkpoint()
    save_results("")
    summary = {"steps": run["step"], "epochs": started, "final_train_loss": last_epoch_loss,
               "final_val_accuracy": val_accuracy,
               "best_val_accuracy": run["best_val_accuracy"], "best_epoch": run["best_epoch"],
               "recipe": {"lr": options.lr, "schedule": options.schedule,
                          "clip_grad_norm": options.clip_norm, "augment": options.augment,
                          "cache_prefix": cache is not None,
                          "optimizer": trainer.manifest["train"]["optimizer"],
                          "momentum": trainer.manifest["train"].get("momentum"),
                          "lr_scale": run["lr_scale"], "rollbacks": run["rollbacks"],
                          "proximal_mu": options.proximal_mu},
               "median_step_seconds": float(np.median(step_seconds)) if step_seconds else None,
               # where a step's time goes: the median of each part over the steps
               "step_split_seconds": {part: float(np.median([s.get(part, 0.0)
                                                             for s in step_splits]))
                                      for part in SPLIT_PARTS} if step_splits else None,
               "threads": trainer.threads,
               "peak_rss_bytes": procmem.peak_rss_bytes(), "baseline_rss_bytes": baseline,
               "working_set_bytes": train_peak - baseline,
               "predicted_working_set_bytes": predicted,
               "budget_bytes": options.budget_bytes, "budget_violations": violations,
               "kept_bytes_peak": kept_peak,
               "mean_ranks": {layer: [round(float(r), 2) for r in summed / rank_steps[layer]]
                              for layer, summed in rank_sums.items()},
               "activation_budget_bytes": activation_budget,
               # asi: the ranks each layer kept from its first step on
               "fixed_ranks": {layer: [t.k1] + [u.shape[1] for u in t.factors]
                               for layer, t in trainer.trackers.items()
                               if getattr(t, "factors", None) is not None},
               "predicted_kept_bytes": {
                   "paper": trainer.manifest["predicted_memory"]["paper_bytes"],
                   "full": trainer.manifest["predicted_memory"]["full_bytes"]},
               "outputs": {"weights": str(out / "weights.npz"),
                           "inference": str(out / "inference.onnx"),
                           **({"best_weights": str(out / "best_weights.npz"),
                               "best_inference": str(out / "best_inference.onnx")}
                              if val_set is not None else {})}}
    if sender is not None:
        sender.send(dict(summary, type="summary"))
    return summary


def write_summary(path, summary: dict) -> None:
    write_atomic(Path(path), (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode())
