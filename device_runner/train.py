"""The fine-tuning loop on the board: data order, evaluation, checkpoints, budget, profiles."""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actcomp_edge.manifest import sha256_file
from actcomp_edge.npz import save_npz, write_atomic

from . import checkpoint, procmem
from .data import Dataset
from .runtime import MemoryBudgetError, Trainer

MAX_REJECTED_IN_A_ROW = 5


class BudgetError(ValueError):
    """The training working set cannot fit the memory budget."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stays NaN)."""


@dataclass
class Options:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    seed: int = 0
    max_steps: int | None = None
    checkpoint_every: int = 50
    budget_bytes: int | None = None
    resume: bool = False
    report_every: int = 1


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
        + (f"; rank caps {trainer.rank_caps} keep the worst-case activations within "
           f"{allowance / mib:.1f} MiB" if trainer.rank_caps else ""))
    return {"dry_run_bytes": need, "planned_bytes": planned,
            "activation_allowance_bytes": allowance,
            "rank_caps": trainer.rank_caps}


def rank_caps_for_budget(trainer: Trainer, batch_size: int, allowance: int) -> dict:
    """Per-layer rank cap (one value for every mode) so that even a batch whose eps ranks
    come out high keeps at most ``allowance`` bytes of activations in all: each layer gets a
    share proportional to its uncompressed input, and the largest cap whose worst case fits."""
    from actcomp_edge.decomposition import full_rank_bound
    from actcomp_edge.memory import hosvd_floats, svd_floats
    if trainer.method not in ("hosvd", "hosvd-tracked", "svd") or allowance <= 0:
        return {}
    shapes = {name: (batch_size,) + tuple(layer["input_shape"])
              for name, layer in trainer.layers.items()}
    total = sum(math.prod(s) for s in shapes.values())  # exact ints, no int64 overflow
    caps = {}
    for name, shape in shapes.items():
        share = allowance * math.prod(shape) / total

        def kept(cap):
            if trainer.method == "svd":
                return 4 * svd_floats(shape, min(cap, shape[0]))
            return 4 * hosvd_floats(shape, [min(b, cap) for b in full_rank_bound(shape)])
        top = max(full_rank_bound(shape))
        if kept(top) <= share:
            continue  # even full rank fits: no cap needed
        lo, hi = 1, top
        while lo < hi:  # largest cap with kept(cap) <= share (kept grows with cap)
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if kept(mid) <= share else (lo, mid - 1)
        caps[name] = lo
    return caps


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


def fit(trainer: Trainer, train_set: Dataset, val_set: Dataset, out_dir, options: Options,
        sender=None, log=print, budget_action: dict | None = None) -> dict:
    """Train; returns the summary. Checkpoints go to out_dir/checkpoints, results to out_dir."""
    out = Path(out_dir)
    ckpt_dir = out / "checkpoints"
    norm = trainer.manifest["input"]
    batch = min(options.batch_size, len(train_set))
    steps_per_epoch = math.ceil(len(train_set) / batch)
    total = options.epochs * steps_per_epoch
    if options.max_steps:
        total = min(total, options.max_steps)
    identity = {"artifact": sha256_file(trainer.folder / "manifest.json"),
                "data_size": len(train_set), "batch_size": batch, "seed": options.seed}
    epoch, next_batch, step = 0, 0, 0
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
            epoch, next_batch, step = meta["epoch"], meta["next_batch"], meta["step"]
            log(f"resumed from step {step} (epoch {epoch + 1}, batch {next_batch + 1})")

    def save_checkpoint():
        checkpoint.save(ckpt_dir, step, dict(identity, epoch=epoch, next_batch=next_batch,
                                             step=step), trainer.state_arrays())

    # one batch of memory for every step: a new array per step fragments the heap (measured
    # +6-13 MiB at batch 32, 128 px); its pages are touched, and counted, in the first step
    batch_buffer = np.empty((batch, 3, norm["height"], norm["width"]), np.float32)
    baseline = procmem.rss_bytes()
    procmem.reset_peak()
    progress = Progress(total)
    step_seconds, losses, violations, rejected = [], [], 0, 0
    train_peak = baseline  # peak RSS over the training steps (not evaluation or writing)
    predicted = planned_working_set(trainer.manifest, batch)
    kept_peak = {"paper": 0, "full": 0}
    val_accuracy = None
    while epoch < options.epochs and step < total:
        order = np.random.default_rng(options.seed + epoch).permutation(len(train_set))
        while next_batch < steps_per_epoch and step < total:
            idx = order[next_batch * batch:(next_batch + 1) * batch]
            x, y = train_set.batch(idx, norm["mean"], norm["std"], out=batch_buffer)
            start = time.perf_counter()
            result = trainer.step(x, y, options.lr)
            seconds = time.perf_counter() - start
            if not result.applied:
                rejected += 1
                log(f"step {step + 1}: loss {result.loss} is not finite: step rejected, "
                    f"weights kept")
                if rejected >= MAX_REJECTED_IN_A_ROW:
                    save_checkpoint()
                    raise TrainingError(f"{rejected} steps in a row gave a non-finite loss: "
                                        f"stopping (lower --lr?); last good state checkpointed")
                next_batch += 1
                continue
            rejected = 0
            step += 1
            next_batch += 1
            step_seconds.append(seconds)
            losses.append(result.loss)
            rss, peak = procmem.rss_bytes(), procmem.peak_rss_bytes()  # /proc read once a step
            working = peak - baseline
            train_peak = max(train_peak, peak)
            over = options.budget_bytes is not None and working > options.budget_bytes
            violations += int(over)
            kept = sum(result.kept_bytes.values())
            kept_peak["paper"] = max(kept_peak["paper"], kept)
            kept_peak["full"] = max(kept_peak["full"], result.kept_full_bytes)
            record = {"type": "step", "step": step, "epoch": epoch + 1, "loss": result.loss,
                      "step_seconds": seconds, "rss_bytes": rss,
                      "peak_rss_bytes": peak, "baseline_rss_bytes": baseline,
                      "kept_bytes": result.kept_bytes, "kept_bytes_total": kept,
                      "kept_full_bytes": result.kept_full_bytes,
                      "kept_full_bytes_per_layer": result.kept_full_per_layer,
                      "ranks": {k: list(v) if v else None for k, v in result.ranks.items()},
                      "eps": trainer.eps if trainer.method in ("hosvd", "hosvd-tracked", "svd")
                      else None, "method": trainer.method,
                      "working_set_bytes": working, "predicted_working_set_bytes": predicted,
                      "budget_bytes": options.budget_bytes, "budget_exceeded": over,
                      "budget_action": budget_action,
                      "seconds_split": result.seconds}
            if sender is not None and (step % options.report_every == 0 or over):
                sender.send(record)
            accuracy = float((result.logits.argmax(axis=1) == y).mean())
            progress.update(step, f"loss {result.loss:.4f} acc {accuracy:.2f} "
                                  f"{seconds * 1e3:.0f} ms/step "
                                  f"rss {rss / 2 ** 20:.0f} MiB")
            if options.checkpoint_every and step % options.checkpoint_every == 0:
                save_checkpoint()
        if next_batch >= steps_per_epoch:  # epoch finished
            progress.done()
            val_accuracy = evaluate(trainer, val_set, batch, batch_buffer)
            log(f"epoch {epoch + 1}/{options.epochs}: train loss {np.mean(losses[-steps_per_epoch:]):.4f}"
                f", val accuracy {val_accuracy:.4f}")
            if sender is not None:
                sender.send({"type": "epoch", "epoch": epoch + 1, "step": step,
                             "val_accuracy": val_accuracy})
            epoch, next_batch = epoch + 1, 0
            save_checkpoint()
    progress.done()
    if val_accuracy is None:
        val_accuracy = evaluate(trainer, val_set, batch, batch_buffer)
    save_checkpoint()
    out.mkdir(parents=True, exist_ok=True)
    save_npz(out / "weights.npz", trainer.params)
    write_atomic(out / "inference.onnx", trainer.inference_model())
    summary = {"steps": step, "epochs": epoch, "final_train_loss": losses[-1] if losses else None,
               "final_val_accuracy": val_accuracy,
               "median_step_seconds": float(np.median(step_seconds)) if step_seconds else None,
               "threads": trainer.threads,
               "peak_rss_bytes": procmem.peak_rss_bytes(), "baseline_rss_bytes": baseline,
               "working_set_bytes": train_peak - baseline,
               "predicted_working_set_bytes": predicted,
               "budget_bytes": options.budget_bytes, "budget_violations": violations,
               "kept_bytes_peak": kept_peak,
               "predicted_kept_bytes": {
                   "paper": trainer.manifest["predicted_memory"]["paper_bytes"],
                   "full": trainer.manifest["predicted_memory"]["full_bytes"]},
               "outputs": {"weights": str(out / "weights.npz"),
                           "inference": str(out / "inference.onnx")}}
    if sender is not None:
        sender.send(dict(summary, type="summary"))
    return summary


def write_summary(path, summary: dict) -> None:
    write_atomic(Path(path), (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode())
