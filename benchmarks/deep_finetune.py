"""Deep fine-tuning: memory and step time vs the number of fine-tuned convs, through the CLIs.

    .venv/bin/python benchmarks/deep_finetune.py [--layers 4,12,24,42] [--only METHOD[,METHOD]]
        [--skip-224] [--steps 6] [--repeats 1] [--work out/deep_finetune]
        [--results benchmarks/results]

mcunet-in1 with its real weights (../shared), ants/bees images. Grid: N (--layers) x
{vanilla, gf-r2, svd, hosvd, asi} (eps 0.8) at batch 32, 128 px, plus N=42 at
batch 64, 224 px for vanilla and hosvd. Each artifact is exported once (`actcomp export`);
every job is a fresh process: `actcomp-device train` (its --summary), and per configuration a
PyTorch eager vanilla job (benchmarks.step_time.plain_torch: frozen BN, SGD momentum 0.9).
Jobs of one configuration run back to back; --repeats R goes round-robin (medians, min-max).
Peak RSS is VmHWM after a reset just before the first step; working set = peak - baseline
(bytes in the JSON, MiB in the table). Writes deep_finetune.{json,md,png} to --results.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.whole_process_memory import MIB, last_json_line  # noqa: E402

BIN = REPO / ".venv" / "bin"
SHARED = "../shared"  # relative to the repo root, as users type it
MODEL = ["--model", f"{SHARED}/weights/tt_mcunet-5fps_int8dq.json",
         "--weights", f"{SHARED}/weights/tt_mcunet-5fps_int8dq.npz", "--num-classes", "2"]
TRAIN, VAL = f"{SHARED}/data/hymenoptera_train.npz", f"{SHARED}/data/hymenoptera_val.npz"
EPS = 0.8
METHODS = {"vanilla": [], "gf-r2": [], "svd": ["--eps", str(EPS)],
           "hosvd": ["--eps", str(EPS)], "asi": ["--eps", str(EPS)]}
BIG = (42, 64, 224)  # (N, batch, px) of the large configuration
BIG_METHODS = ("vanilla", "hosvd")
TORCH = "torch eager vanilla"

# benchmarks.whole_process_memory.TORCH_JOB, plus the time of every step
TORCH_JOB = r"""
import json, sys, time, numpy as np, torch
sys.path.insert(0, {repo!r})
from benchmarks.step_time import load_model, load_images, plain_torch
from device_runner import procmem
torch.set_num_threads({threads})
model, _ = load_model("mcunet-in1")
images, labels, _ = load_images({batch}, {size}, model.spec)
step = plain_torch(model, {layers})
x, y = torch.from_numpy(images), torch.from_numpy(labels)
baseline = procmem.rss_bytes()
procmem.reset_peak()
seconds = []
for _ in range({steps}):
    t0 = time.perf_counter()
    step(x, y)
    seconds.append(time.perf_counter() - t0)
print(json.dumps({{"peak_rss_bytes": procmem.peak_rss_bytes(), "baseline_rss_bytes": baseline,
                  "median_step_seconds": float(np.median(seconds)), "steps": len(seconds)}}))
"""


class JobFailed(Exception):
    pass


def call(cmd: list, timeout: float = 3600, cwd=None) -> str:
    """Run cmd from the repo root (or cwd); its stdout, or JobFailed with the stderr tail."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd or REPO,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise JobFailed(f"timed out after {timeout:.0f} s") from None
    if proc.returncode:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-12:])
        raise JobFailed(f"exit {proc.returncode}:\n{tail}")
    return proc.stdout


def predicted_ws(summary: dict, manifest: dict, batch: int) -> tuple:
    """(bytes, source): the summary's prediction, else the manifest memory plan's at batch."""
    if summary.get("predicted_working_set_bytes") is not None:
        return summary["predicted_working_set_bytes"], "summary"
    plan = manifest.get("memory_plan") or {}
    if plan.get("working_set_bytes") is None:
        return None, None
    return math.ceil(plan["working_set_bytes"] * batch / plan.get("batch_size", batch)), "manifest"


def runner_job(art: Path, run_dir: Path, batch: int, steps: int, threads: int,
               runner=None, cwd=None) -> dict:
    """One `actcomp-device train` process; figures from its --summary (bytes, seconds).
    runner: the command before the artifact (default this checkout's `actcomp-device train`)."""
    runner = runner or [str(BIN / "actcomp-device"), "train"]
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    with np.load(REPO / TRAIN, allow_pickle=False) as d:
        n_train = len(d["labels"])
    steps = min(steps, math.ceil(n_train / batch))  # one epoch: no evaluation between steps
    epochs = 1
    summary = run_dir / "summary.json"
    call(runner + [str(art), "--data", TRAIN, "--val-data", VAL,
                   "--max-steps", str(steps), "--batch-size", str(batch), "--lr", "0.001",
                   "--threads", str(threads), "--out", str(run_dir), "--summary", str(summary)],
         cwd=cwd)
    s = json.loads(summary.read_text())
    manifest = json.loads((art / "manifest.json").read_text())
    pred, source = predicted_ws(s, manifest, batch)
    return {"peak_rss_bytes": s["peak_rss_bytes"], "baseline_rss_bytes": s["baseline_rss_bytes"],
            # the baseline runner's summary has no working_set_bytes: its peak includes the
            # final evaluation and writes
            "working_set_bytes": s.get("working_set_bytes",
                                       s["peak_rss_bytes"] - s["baseline_rss_bytes"]),
            "median_step_seconds": s["median_step_seconds"], "steps": s.get("steps"),
            "epochs": epochs, "predicted_working_set_bytes": pred, "predicted_from": source,
            "memory_plan": manifest.get("memory_plan")}


BASELINE_COMMIT = "592406e"  # the runner before the memory plan (single backward, 1-byte masks)
BASELINE = f"runner {BASELINE_COMMIT}, glibc default heap"
# its CLI set glibc's 128 KiB mmap threshold at start-up; switched off here, so this is the
# speed the issue compares against (the threshold alone doubled its step)
BASELINE_TRAIN = ("import sys; sys.path.insert(0, {tree!r}); import device_runner.procmem as p; "
                  "p.return_freed_memory = lambda: False; from device_runner.cli import main; "
                  "sys.exit(main(['train'] + sys.argv[1:]))")


def baseline_art(work: Path, n: int, batch: int, size: int, method: str) -> tuple:
    """(artifact, runner command, tree) of the baseline commit (a git worktree in work)."""
    tree = work / f"tree-{BASELINE_COMMIT}"
    if not tree.exists():
        call(["git", "worktree", "add", "--detach", "-f", str(tree), BASELINE_COMMIT])
    art = work / f"art-{BASELINE_COMMIT}-n{n}-b{batch}-{size}-{method}"
    if not (art / "manifest.json").exists():
        shutil.rmtree(art, ignore_errors=True)
        model = [str((REPO / a).resolve()) if a.startswith(SHARED) else a for a in MODEL]
        call([str(BIN / "python"), "-m", "actcomp_edge.host.cli", "export",  # (no --force then)
              *model, "--layers",
              str(n), "--method", method, *METHODS[method], "--batch-size", str(batch),
              "--input-size", str(size), "-o", str(art)], cwd=tree)
    return art, [str(BIN / "python"), "-c", BASELINE_TRAIN.format(tree=str(tree))]


def torch_job(n: int, batch: int, size: int, steps: int, threads: int) -> dict:
    """PyTorch eager vanilla in a fresh process (bytes, seconds)."""
    code = TORCH_JOB.format(repo=str(REPO), threads=threads, batch=batch, size=size, layers=n,
                            steps=steps)
    m = last_json_line(call([str(BIN / "python"), "-c", code]))
    m["working_set_bytes"] = m["peak_rss_bytes"] - m["baseline_rss_bytes"]
    return m


def summarise(runs: list) -> dict:
    """Medians and min-max over the successful runs of one job."""
    row = {}
    for k in ("peak_rss_bytes", "baseline_rss_bytes", "working_set_bytes",
              "median_step_seconds", "predicted_working_set_bytes"):
        vals = [r[k] for r in runs if r.get(k) is not None]
        if vals:
            row[k] = float(np.median(vals))
            row[k + "_range"] = [min(vals), max(vals)]
    for k in ("predicted_from", "memory_plan", "steps", "epochs"):
        if runs and k in runs[-1]:
            row[k] = runs[-1][k]
    return row


def fmt(row: dict, key: str, scale: float, digits: int = 1, ranges: bool = False) -> str:
    if row.get(key) is None:
        return "-"
    text = f"{row[key] / scale:.{digits}f}"
    lo, hi = row[key + "_range"]
    return text + (f" ({lo / scale:.{digits}f}-{hi / scale:.{digits}f})" if ranges and lo != hi
                   else "")


def targets(rows: dict) -> list:
    """The issue's targets: (text, met or None when not run)."""
    def get(n, b, s, method, key="working_set_bytes"):
        return rows.get((n, b, s, method), {}).get(key)
    out = []
    peak = get(*BIG, "hosvd", "peak_rss_bytes")
    out.append(("N=42 batch 64 224 px HOSVD runner peak RSS <= 300 MiB",
                None if peak is None else peak <= 300 * MIB,
                "not run" if peak is None else f"{peak / MIB:.1f} MiB (steps only: "
                f"{(get(*BIG, 'hosvd', 'baseline_rss_bytes') + get(*BIG, 'hosvd')) / MIB:.1f})"))
    for n, limit, text in ((4, None, "HOSVD working set < vanilla's at N=4"),
                           (42, 0.30, "HOSVD working set <= 0.30x vanilla's at N=42")):
        h, v = get(n, 32, 128, "hosvd"), get(n, 32, 128, "vanilla")
        if h is None or v is None or v <= 0:
            out.append((f"batch 32/128: {text}", None, "not run"))
            continue
        met = h < v if limit is None else h <= limit * v
        out.append((f"batch 32/128: {text}", met, f"{h / MIB:.1f} vs {v / MIB:.1f} MiB, "
                                                  f"ratio {h / v:.2f}"))
    errs, missing = [], []
    for (n, b, s, method), r in rows.items():
        if n in (4, 42) and method in ("vanilla", "hosvd") and b == 32:
            p, w = r.get("predicted_working_set_bytes"), r.get("working_set_bytes")
            if p is None or not w:
                missing.append(f"N={n} b{b}/{s} {method}")
            else:
                errs.append((f"N={n} b{b}/{s} {method}", 100 * (p - w) / w))
    detail = ", ".join(f"{k} {e:+.1f} %" for k, e in errs)
    detail += ("; " if detail and missing else "") + (
        f"no prediction or measurement: {', '.join(missing)}" if missing else "")
    now, before = (get(42, 32, 128, m, "median_step_seconds")
                   for m in ("vanilla", f"{BASELINE}: vanilla"))
    out.append(("vanilla step, N=42 batch 32/128, no slower than the baseline runner without the "
                "mmap threshold", None if not (now and before) else now <= before,
                "not run" if not (now and before) else
                f"{now * 1e3:.0f} vs {before * 1e3:.0f} ms, ratio {now / before:.2f}"))
    out.append(("predicted working set within +-5 % of measured (vanilla, HOSVD; N=4, N=42)",
                None if not errs or missing else all(abs(e) <= 5 for _, e in errs),
                detail or "not run"))
    return out


def baselines(n: int, batch: int, size: int, methods: list) -> list:
    """The baseline runner's jobs of a configuration: vanilla and HOSVD at N=4 and N=42, 32/128."""
    if (batch, size) != (32, 128) or n not in (4, 42):
        return []
    return [f"{BASELINE}: {m}" for m in ("vanilla", "hosvd") if m in methods]


def plot(rows: dict, layers: list, methods: list, path: Path) -> None:
    """2x2 panels vs N at batch 32/128 (MiB, ms, ratio)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    panels = [("peak RSS (MiB)", "peak_rss_bytes", MIB), ("working set (MiB)",
              "working_set_bytes", MIB), ("median step (ms)", "median_step_seconds", 1e-3),
              ("working set / vanilla runner's", "ws_ratio", 1)]
    for i, name in enumerate(methods + [TORCH]):
        color = "black" if name == TORCH else f"C{i}"
        for ax, (title, key, scale) in zip(axes.flat, panels):
            pts = [(n, rows[(n, 32, 128, name)].get(key)) for n in layers
                   if (n, 32, 128, name) in rows]
            pts = [(n, v / scale) for n, v in pts if v is not None]
            if pts and not (name == TORCH and key == "ws_ratio"):
                ax.plot(*zip(*pts), "o-", color=color, label=name)
            if key == "working_set_bytes":
                pred = [(n, rows[(n, 32, 128, name)].get("predicted_working_set_bytes"))
                        for n in layers if (n, 32, 128, name) in rows]
                pred = [(n, v / MIB) for n, v in pred if v is not None]
                if pred:
                    ax.plot(*zip(*pred), "x--", color=color, alpha=0.7)
            ax.set_title(title)
    axes[1, 1].axhline(0.30, color="grey", ls=":", lw=1)
    for ax in axes.flat:
        ax.set_xticks(layers)
    for ax in axes[1]:
        ax.set_xlabel("fine-tuned convs N")
    axes[0, 1].text(0.02, 0.95, "dashed: predicted", transform=axes[0, 1].transAxes, va="top")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("mcunet-in1 deep fine-tuning, batch 32, 128 px (actcomp-device train)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="4,12,24,42", help="N values, comma-separated")
    parser.add_argument("--only", default=",".join(METHODS),
                        help="runner methods, comma-separated (torch eager always runs)")
    parser.add_argument("--skip-224", action="store_true", help="leave out N=42 batch 64 224 px")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="out/deep_finetune", help="artifacts and runs")
    parser.add_argument("--results", default="benchmarks/results")
    args = parser.parse_args()
    layers = [int(n) for n in args.layers.split(",")]
    methods = [m for m in METHODS if m in args.only.split(",")]
    unknown = set(args.only.split(",")) - set(METHODS)
    if unknown or not methods:
        parser.error(f"--only: unknown method(s) {sorted(unknown)}; choose from {list(METHODS)}")
    if not (REPO / SHARED).is_dir():
        print(f"deep_finetune: {(REPO / SHARED).resolve()} is absent (real weights and images "
              f"needed); nothing measured", file=sys.stderr)
        sys.exit(2)
    work, results = REPO / args.work, REPO / args.results
    command = ".venv/bin/python benchmarks/deep_finetune.py " + " ".join(sys.argv[1:])
    configs = {(n, 32, 128): methods for n in layers}
    if not args.skip_224 and BIG[0] in layers and any(m in methods for m in BIG_METHODS):
        configs[BIG] = [m for m in methods if m in BIG_METHODS]
    started = time.perf_counter()
    arts, runs, failures = {}, {}, {}

    def progress(job, text):
        print(f"[{time.perf_counter() - started:6.0f} s] {job}: {text}", flush=True)

    for rep in range(args.repeats):
        for (n, b, s), config_methods in configs.items():
            for method in config_methods + [TORCH] + baselines(n, b, s, config_methods):
                key, job = (n, b, s, method), f"N={n} b{b} {s}px {method}"
                if args.repeats > 1:
                    job += f" (round {rep + 1}/{args.repeats})"
                try:
                    if method == TORCH:
                        m = torch_job(n, b, s, args.steps, args.threads)
                    elif method.startswith(BASELINE):
                        base_method = method.split(": ")[1]
                        art, runner = baseline_art(work, n, b, s, base_method)
                        m = runner_job(art, work / f"run-base-n{n}-b{b}-{s}-{base_method}-r{rep}",
                                       b, args.steps, args.threads, runner=runner)
                    else:
                        art = work / f"art-n{n}-b{b}-{s}-{method}"
                        if key not in arts:  # export once
                            arts[key] = None
                            shutil.rmtree(art, ignore_errors=True)
                            call([str(BIN / "actcomp"), "export",
                                  "--force", *MODEL, "--layers", str(n),
                                  "--method", method, *METHODS[method], "--batch-size", str(b),
                                  "--input-size", str(s), "-o", str(art)])
                            arts[key] = art
                        if arts[key] is None:
                            raise JobFailed("its export failed in round 1")
                        m = runner_job(art, work / f"run-n{n}-b{b}-{s}-{method}-r{rep}", b,
                                       args.steps, args.threads)
                except (JobFailed, OSError, KeyError, ValueError) as e:
                    failures.setdefault(key, []).append(str(e))
                    progress(job, f"FAILED {e}")
                    continue
                runs.setdefault(key, []).append(m)
                progress(job, f"peak {m['peak_rss_bytes'] / MIB:.1f} MiB, ws "
                              f"{m['working_set_bytes'] / MIB:.1f} MiB, step "
                              f"{m['median_step_seconds'] * 1e3:.0f} ms")

    rows = {}
    for (n, b, s), config_methods in configs.items():
        for method in config_methods + [TORCH] + baselines(n, b, s, config_methods):
            key = (n, b, s, method)
            rows[key] = dict(summarise(runs.get(key, [])), failures=failures.get(key, []))
        torch_step = rows[(n, b, s, TORCH)].get("median_step_seconds")
        vanilla_ws = rows.get((n, b, s, "vanilla"), {}).get("working_set_bytes")
        for method in config_methods + [TORCH] + baselines(n, b, s, config_methods):
            r = rows[(n, b, s, method)]
            if r.get("median_step_seconds") and torch_step:
                r["step_ratio_torch"] = r["median_step_seconds"] / torch_step
            if r.get("working_set_bytes") is not None and vanilla_ws:
                r["ws_ratio"] = r["working_set_bytes"] / vanilla_ws
            if r.get("predicted_working_set_bytes") and r.get("working_set_bytes"):
                r["prediction_error"] = (r["predicted_working_set_bytes"]
                                         / r["working_set_bytes"] - 1)

    ranges = args.repeats > 1
    lines = ["# Deep fine-tuning: mcunet-in1 (tt_mcunet-5fps_int8dq, pretrained), ants/bees", "",
             f"{date.today().isoformat()}, {platform.machine()}, {os.cpu_count()} cores; "
             f"{args.steps} steps, lr 0.001, {args.threads} threads, eps {EPS}; every job a "
             f"fresh process; {args.repeats} round(s), median"
             + (" (min-max)" if ranges else "") + ".", "",
             f"Command: `{command.strip()}`", "",
             "Runner: `.venv/bin/actcomp-device train` (its --summary). Peak RSS = VmHWM from "
             "the reset just before the first step to the end of the CLI run (final evaluation "
             "and writes included); working set = peak over the training steps - baseline "
             "(RSS at that reset). Predicted = the memory plan's working set (summary, else "
             "manifest memory_plan scaled to the batch); error = predicted / measured - 1. "
             "Torch eager: benchmarks.step_time.plain_torch, peak over its steps."
             + (" At batch 64 the runner needs --epochs 2 for the steps (244 training images: "
                "one epoch is 4 steps, the last of 52 images), so an epoch-end evaluation falls "
                "between steps." if BIG in configs and args.steps > 4 else ""), "",
             "| N | batch | px | job | peak RSS MiB | baseline MiB | working set MiB | "
             "predicted WS MiB | pred. error | step ms | step / torch | WS / vanilla |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (n, b, s, method), r in rows.items():
        if r.get("working_set_bytes") is None:
            lines.append(f"| {n} | {b} | {s} | {method} | failed | | | | | | | |")
            continue
        err, st, wr = (r.get(k) for k in ("prediction_error", "step_ratio_torch", "ws_ratio"))
        lines.append(
            f"| {n} | {b} | {s} | {method} | {fmt(r, 'peak_rss_bytes', MIB, 1, ranges)} | "
            f"{fmt(r, 'baseline_rss_bytes', MIB)} | {fmt(r, 'working_set_bytes', MIB, 1, ranges)}"
            f" | {fmt(r, 'predicted_working_set_bytes', MIB)} | "
            f"{'-' if err is None else f'{100 * err:+.1f} %'} | "
            f"{fmt(r, 'median_step_seconds', 1e-3, 0, ranges)} | "
            f"{'-' if st is None else f'{st:.2f}'} | {'-' if wr is None else f'{wr:.2f}'} |")
    checks = targets(rows)
    lines += ["", "Targets:", ""]
    lines += [f"- {text}: {'not evaluated' if met is None else 'met' if met else 'missed'} "
              f"({detail})" for text, met, detail in checks]
    failed = {k: v for k, v in failures.items() if v}
    if failed:
        lines += ["", "Failed runs: " + "; ".join(f"N={k[0]} b{k[1]} {k[2]}px {k[3]} "
                                                  f"({len(v)})" for k, v in failed.items())]
    elapsed = time.perf_counter() - started
    lines += ["", f"Runtime {elapsed / 60:.1f} min."]

    results.mkdir(parents=True, exist_ok=True)
    payload = {"date": date.today().isoformat(), "machine": platform.machine(),
               "cores": os.cpu_count(), "command": command.strip(), "args": vars(args),
               "seconds": elapsed,
               "rows": [dict(n=k[0], batch=k[1], input_size=k[2], job=k[3], **r,
                             runs=runs.get(k, [])) for k, r in rows.items()],
               "targets": [{"target": t, "met": m, "detail": d} for t, m, d in checks]}
    (results / "deep_finetune.json").write_text(json.dumps(payload, indent=1) + "\n")
    (results / "deep_finetune.md").write_text("\n".join(lines) + "\n")
    plot(rows, layers, methods, results / "deep_finetune.png")
    print("\n".join(lines))
    print(f"wrote {results}/deep_finetune.{{json,md,png}}")


if __name__ == "__main__":
    main()
