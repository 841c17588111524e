"""Whole-process peak RSS of a fine-tuning job: device runner vs PyTorch eager vs onnxruntime-training.

    .venv/bin/python benchmarks/whole_process_memory.py [--model mcunet-in1] [--layers 4]
        [--batch-size 32] [--input-size 128] [--eps 0.8] [--steps 10] [--threads 2]

Every job runs in a fresh process, one after the other, on ants/bees images from ../shared
(the real tiny-training weights; exits with a message when ../shared is absent):
(a) the device runner's CLI (`python -m device_runner.cli train ART ...`) on artifacts exported
    for vanilla, HOSVD eps, ASI eps and Gradient Filter R2 (SGD momentum 0.9);
(b) PyTorch eager vanilla (same layers, frozen BN, SGD momentum);
(c) onnxruntime-training 1.19.2 vanilla in .venv-ort-training (benchmarks/scripts/
    ort_training_peak.py: generate_artifacts from the artifact's evaluate.onnx, Module +
    Optimizer (its SGD has no momentum)), as shipped (its Python package imports torch) and,
    as a diagnostic, with the torch import blocked;
(d) diagnostics: the runner with glibc's default heap behaviour (its start-up call
    device_runner.procmem.return_freed_memory, mallopt(M_MMAP_THRESHOLD, 128 KiB), switched
    off from outside; on a runner without that call: MALLOC_MMAP_THRESHOLD_ set instead), which
    shows how much of the working set is freed memory the allocator would keep resident.
Peak RSS is VmHWM from the baseline on (each job resets it just before its first step; the
baseline, RSS at that point, holds interpreter, libraries, model and data). The runner's
peak is the one after its last training step (from its --report stream); its whole CLI run
(final evaluation, checkpoint, inference model) is shown too.

The runner's peak is set against two predictions: the manifest one (baseline + the artifact's
predicted full bytes kept for backward, scaled to the batch + weights + gradients + optimizer
state: the step's grad/, new/ and new/state/ outputs) and a live-set one that adds what the
manifest leaves out, the transient forward workspace: the largest set of live activations
while the frozen prefix runs (liveness over the exported program, elementwise ops in place).
Writes benchmarks/results/whole_process_memory.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date, datetime
from math import prod
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

REAL = {"mcunet-in1": "tt_mcunet-5fps_int8dq", "mbv2-w0.35": "tt_mbv2-w0.35_int8dq",
        "proxyless-w0.3": "tt_proxyless-w0.3_int8dq"}
MIB = 2 ** 20
MMAP_THRESHOLD = 131072  # glibc's initial value; fixing it stops the dynamic raise


TORCH_JOB = r"""
import json, sys, numpy as np, torch, torch.nn.functional as F
sys.path.insert(0, {repo!r})
from benchmarks.step_time import load_model, load_images, plain_torch
from device_runner import procmem
torch.set_num_threads(2)
model, _ = load_model({model!r})
images, labels, _ = load_images({batch}, {size}, model.spec)
step = plain_torch(model, {layers})
x, y = torch.from_numpy(images), torch.from_numpy(labels)
baseline = procmem.rss_bytes()
procmem.reset_peak()
for _ in range({steps}):
    step(x, y)
print(json.dumps({{"peak_rss_bytes": procmem.peak_rss_bytes(), "baseline_rss_bytes": baseline}}))
"""

def run(cmd, env=None, what="") -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, **(env or {})))
    if proc.returncode:
        raise SystemExit(f"{what or cmd[0]} failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")
    return proc


def last_json_line(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON line in output: {text[-500:]}")


def prefix_live_bytes(spec: dict, arrays: dict, hw: tuple, n_layers: int, batch: int) -> dict:
    """Largest live set of activations while the frozen prefix (forward_0) runs, image included.

    Ops run in order; an op's output is allocated while its inputs are alive; an input is
    freed after its last use in the prefix unless a later partition reads it; elementwise ops
    (BN affine, clip, add) write in place into their first input when it dies there (onnxruntime
    fuses Conv + clip and reuses buffers of may-in-place kernels)."""
    from actcomp_edge.core.program import build_program
    from export.training_graph import split_program
    program = build_program(spec, arrays, hw)
    split = split_program(program, n_layers)
    ops = [program.ops[i] for i in split.partitions[0]]
    later = {t for part in split.partitions[1:] for i in part for t in program.ops[i].inputs}
    last = {}
    for i, op in enumerate(ops):
        for t in op.inputs:
            last[t] = i

    def nbytes(t):
        return batch * prod(program.shapes[t]) * 4
    alive = {"image": nbytes("image")}
    peak, where = sum(alive.values()), "image"
    for i, op in enumerate(ops):
        ins = [t for t in op.inputs if t in alive]
        inplace = (op.kind in ("affine", "clip", "add") and ins and last.get(ins[0]) == i
                   and ins[0] not in later)
        current = sum(alive.values()) + (0 if inplace else nbytes(op.output))
        if current > peak:
            peak, where = current, f"{op.name} ({op.kind})"
        alive[op.output] = alive.pop(ins[0]) if inplace else nbytes(op.output)
        for t in ins:
            if t in alive and t != op.output and last.get(t) == i and t not in later:
                del alive[t]
    return {"bytes": int(peak), "at": where, "image_bytes": nbytes("image")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mcunet-in1", choices=list(REAL))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--eps", type=float, default=0.8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of every job (round-robin); medians and min-max reported")
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--ort-training-python",
                        default=str(REPO / ".venv-ort-training" / "bin" / "python"))
    parser.add_argument("--no-diagnostics", action="store_true",
                        help="skip the glibc-default-heap and torch-blocked rows")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    shared = Path(args.shared)
    weights = shared / "weights" / REAL[args.model]
    needed = [weights.with_suffix(".json"), weights.with_suffix(".npz"),
              shared / "data" / "hymenoptera_train.npz", shared / "data" / "hymenoptera_val.npz"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise SystemExit(f"whole_process_memory: the real weights and images are not here "
                         f"({missing[0]} missing). This benchmark needs ../shared (see its "
                         f"README); nothing was measured.")
    started = time.perf_counter()
    py = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="wpm-"))
    # ants/bees train + val (397 images): with the runner's 10 % hold-out, one epoch is more
    # than --steps batches, so the runner evaluates only after the last step
    with np.load(shared / "data" / "hymenoptera_train.npz", allow_pickle=False) as a, \
            np.load(shared / "data" / "hymenoptera_val.npz", allow_pickle=False) as b:
        images = np.concatenate([a["images"], b["images"]])
        labels = np.concatenate([a["labels"], b["labels"]]).astype(np.int64)
        classes = a["classes"]
    if images.shape[1:3] != (args.input_size, args.input_size):
        raise SystemExit(f"ants/bees images are {images.shape[1]} px; this study runs at their "
                         f"size (--input-size {images.shape[1]})")
    data = tmp / "antsbees.npz"
    np.savez(data, images=images, labels=labels, classes=classes)
    if 0.9 * len(images) < args.steps * args.batch_size:
        raise SystemExit(f"{len(images)} images are too few for {args.steps} steps of "
                         f"{args.batch_size} in one epoch")
    model_args = ["--model", str(weights.with_suffix(".json")),
                  "--weights", str(weights.with_suffix(".npz"))]
    methods = [("vanilla", None), ("hosvd", args.eps), ("asi", args.eps),
               ("gf-r2", None)]
    arts = {}

    def progress(text):
        print(f"[{time.perf_counter() - started:5.0f} s] {text}", flush=True)

    for method, eps in methods:
        art = tmp / method
        run([py, "-m", "actcomp_edge.host.cli", "export", "--force", *model_args, "--num-classes", "2",
             "--layers", str(args.layers), "--method", method,
             *(["--eps", str(eps)] if eps is not None else []),
             "--batch-size", str(args.batch_size), "--input-size", str(args.input_size),
             "-o", str(art)], what=f"export {method}")
        arts[method] = art

    def runner_job(method, eps, key, env=None, launcher=None):
        out = tmp / f"run-{len(os.listdir(tmp))}"
        summary, report = out / "summary.json", out / "profile.jsonl"
        out.mkdir(parents=True)
        run([py, *(launcher or ["-m", "device_runner.cli"]), "train", str(arts[method]),
             "--data", str(data),
             "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
             "--lr", "0.001", "--threads", str(args.threads), "--checkpoint-every", "100000",
             "--out", str(out), "--summary", str(summary), "--report", f"file://{report}"],
            env=env, what=f"runner {key}")
        s = json.loads(summary.read_text())
        steps = [json.loads(line) for line in report.read_text().splitlines() if line.strip()]
        steps = [r for r in steps if r.get("type") == "step"]
        if len(steps) != args.steps:
            raise SystemExit(f"runner {key}: {len(steps)} step records, expected {args.steps}")
        return {"peak_rss_bytes": steps[-1]["peak_rss_bytes"],
                "baseline_rss_bytes": s["baseline_rss_bytes"],
                "cli_run_peak_rss_bytes": s["peak_rss_bytes"],
                "peak_rss_after_each_step": [r["peak_rss_bytes"] for r in steps],
                "kept_bytes_peak": s["kept_bytes_peak"],
                "predicted_kept_bytes": s["predicted_kept_bytes"],
                "median_step_seconds": s["median_step_seconds"],
                "ranks_last_step": steps[-1]["ranks"]}

    jobs = []  # (key, kind, info, function returning one measurement)
    for method, eps in methods:
        key = f"runner {method}" + (f" eps {eps}" if eps else "")
        jobs.append((key, "runner", {"method": method, "eps": eps, "env": {}},
                     lambda m=method, e=eps, k=key: runner_job(m, e, k)))

    # (b) PyTorch eager vanilla
    torch_job = TORCH_JOB.format(repo=str(REPO), model=args.model, batch=args.batch_size,
                                 size=args.input_size, layers=args.layers, steps=args.steps)
    jobs.append(("torch eager vanilla", "torch", {},
                 lambda: last_json_line(run([py, "-c", torch_job], what="torch eager").stdout)))

    # (c) onnxruntime-training vanilla
    ort_py = Path(args.ort_training_python)
    script = REPO / "benchmarks" / "scripts" / "ort_training_peak.py"
    ort_note = None
    probe = subprocess.run([str(ort_py), "-c", "import onnxruntime.training, onnx; "
                            "print(onnxruntime.__version__)"], capture_output=True, text=True) \
        if ort_py.exists() else None
    if probe is None or probe.returncode:
        ort_note = (f"onnxruntime-training not available at {ort_py} "
                    f"({'missing' if probe is None else probe.stderr.strip().splitlines()[-1]}); "
                    f"`make compat-envs` builds it (x86_64 only)")
        print("skipping onnxruntime-training: " + ort_note, flush=True)
    else:
        workdir = tmp / "ort-training"
        run([str(ort_py), str(script), "build", str(arts["vanilla"]), str(workdir)],
            what="onnxruntime-training generate_artifacts")
        variants = [("ort-training vanilla", [])]
        if not args.no_diagnostics:
            variants.append(("ort-training vanilla, torch import blocked (diagnostic)",
                             ["--no-torch"]))
        for key, extra in variants:
            cmd = [str(ort_py), str(script), "train", str(workdir), str(data), "--batch-size",
                   str(args.batch_size), "--steps", str(args.steps), "--threads",
                   str(args.threads), *extra]
            jobs.append((key, "ort-training", {},
                         lambda c=cmd, k=key: last_json_line(run(c, what=k).stdout)))

    # (d) diagnostics: glibc keeps freed heap memory resident; fixing the mmap threshold
    # makes large blocks go back to the OS when freed
    from device_runner import procmem
    returns_memory = hasattr(procmem, "return_freed_memory")
    diagnostic = ("glibc default heap (diagnostic)" if returns_memory else
                  f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} (diagnostic)")
    if not args.no_diagnostics:
        env = {} if returns_memory else {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
        launcher = (["-c", "import sys, device_runner.procmem as p; "
                     "p.return_freed_memory = lambda: False; "
                     "from device_runner.cli import main; sys.exit(main(sys.argv[1:]))"]
                    if returns_memory else None)
        for method, eps in (("vanilla", None), ("hosvd", args.eps)):
            key = f"runner {method}" + (f" eps {eps}" if eps else "") + ", " + diagnostic
            jobs.append((key, "runner", {"method": method, "eps": eps, "env": env,
                                         "diagnostic": diagnostic},
                         lambda m=method, e=eps, k=key: runner_job(m, e, k, env, launcher)))

    runs = {key: [] for key, _, _, _ in jobs}
    for rep in range(args.repeats):  # round-robin: machine noise hits every job alike
        for key, _, _, job in jobs:
            t0 = time.perf_counter()
            m = job()
            m["seconds"] = time.perf_counter() - t0
            runs[key].append(m)
            progress(f"round {rep + 1}/{args.repeats} {key}: peak "
                     f"{m['peak_rss_bytes'] / MIB:.1f} MiB, baseline "
                     f"{m['baseline_rss_bytes'] / MIB:.1f} MiB ({m['seconds']:.0f} s)")
    rows = {}
    for key, kind, info, _ in jobs:
        ms = runs[key]
        peaks = [m["peak_rss_bytes"] for m in ms]
        row = dict(info, kind=kind, runs=ms,
                   peak_rss_bytes=int(np.median(peaks)), peak_min=min(peaks),
                   peak_max=max(peaks),
                   baseline_rss_bytes=int(np.median([m["baseline_rss_bytes"] for m in ms])))
        working = [m["peak_rss_bytes"] - m["baseline_rss_bytes"] for m in ms]
        row["working_set_bytes"] = int(np.median(working))
        row["working_min"], row["working_max"] = min(working), max(working)
        if kind == "runner":
            row["cli_run_peak_rss_bytes"] = int(np.median([m["cli_run_peak_rss_bytes"]
                                                           for m in ms]))
            row["kept_bytes_peak"] = ms[-1]["kept_bytes_peak"]
        rows[key] = row

    # ----- predictions for the runner rows
    from export import zoo
    model = zoo.build_from_name(str(weights.with_suffix(".json")), 2, weights.with_suffix(".npz"))
    arrays = zoo.model_arrays(model, model.spec)
    hw = (args.input_size, args.input_size)
    live = prefix_live_bytes(model.spec, arrays, hw, args.layers, args.batch_size)
    for key, row in rows.items():
        if row["kind"] != "runner":
            continue
        manifest = json.loads((arts[row["method"]] / "manifest.json").read_text())
        mem = manifest["predicted_memory"]
        scale = args.batch_size / mem["batch_size"]
        with np.load(arts[row["method"]] / "weights.npz", allow_pickle=False) as w:
            trainable = int(sum(w[k].nbytes for k in w.files))
        kept = int(mem["full_bytes"] * scale)
        step_out = 3 * trainable  # grad/, new/ params, new/state/ (SGD momentum: one buffer)
        base = row["baseline_rss_bytes"]
        manifest_pred = base + kept + step_out
        backward_phase = live["image_bytes"] + kept + step_out
        live_pred = base + max(live["bytes"], backward_phase, 2 * live["image_bytes"])
        measured = row["peak_rss_bytes"]
        row["prediction"] = {
            "kept_full_bytes_predicted": kept, "rank_basis": mem["rank_basis"],
            "kept_full_bytes_measured_peak": row["kept_bytes_peak"]["full"],
            "weights_grads_state_bytes": step_out,
            "prefix_live_bytes": live["bytes"], "prefix_live_at": live["at"],
            "manifest_bytes": manifest_pred,
            "manifest_error": (manifest_pred - measured) / measured,
            "live_set_bytes": live_pred, "live_set_error": (live_pred - measured) / measured}

    # ----- Markdown
    torch_peak = rows["torch eager vanilla"]["peak_rss_bytes"]
    today = date.today().isoformat()
    command = (".venv/bin/python benchmarks/whole_process_memory.py " + " ".join(sys.argv[1:])
               ).strip()
    lines = [f"Whole-process peak RSS, {args.model} ({REAL[args.model]}, pretrained) last "
             f"{args.layers} convs + classifier, batch {args.batch_size}, {args.input_size} px, "
             f"ants/bees images, {args.steps} steps, {args.threads} threads, each job a fresh "
             f"process ({today}, {platform.machine()})", "",
             f"Command: `{command}`", "",
             "Peak = VmHWM from the baseline on (reset just before the first step); baseline = "
             "RSS at that point (interpreter, libraries, model, data); working set = peak − "
             "baseline. Runner rows: peak after the last step; *CLI run* adds its final "
             "evaluation, checkpoint and inference-model write.", "",
             f"Median of {args.repeats} runs per job (round-robin), min-max in brackets.", "",
             "| job | peak RSS MiB | baseline MiB | working set MiB | peak / torch eager | "
             "CLI run peak MiB | kept for backward (full) MiB |",
             "|---|---|---|---|---|---|---|"]
    for key, r in rows.items():
        cli = f"{r['cli_run_peak_rss_bytes'] / MIB:.1f}" if "cli_run_peak_rss_bytes" in r else "—"
        kept = (f"{r['kept_bytes_peak']['full'] / MIB:.2f}" if "kept_bytes_peak" in r else "—")
        lines.append(f"| {key} | {r['peak_rss_bytes'] / MIB:.1f} ({r['peak_min'] / MIB:.1f}-"
                     f"{r['peak_max'] / MIB:.1f}) | {r['baseline_rss_bytes'] / MIB:.1f} | "
                     f"{r['working_set_bytes'] / MIB:.1f} ({r['working_min'] / MIB:.1f}-"
                     f"{r['working_max'] / MIB:.1f}) | "
                     f"{r['peak_rss_bytes'] / torch_peak:.2f} | {cli} | {kept} |")
    if ort_note:
        lines.append(f"| ort-training vanilla | skipped: {ort_note} | | | | | |")
    lines += ["", "The runner's peak against its own prediction (MiB; error = (prediction − "
              "measured) / measured):", "",
              "| runner job | measured peak | manifest prediction | error | live-set prediction "
              "| error |", "|---|---|---|---|---|---|"]
    for key, r in rows.items():
        p = r.get("prediction")
        if p:
            lines.append(f"| {key} | {r['peak_rss_bytes'] / MIB:.1f} | "
                         f"{p['manifest_bytes'] / MIB:.1f} | {100 * p['manifest_error']:+.0f} % | "
                         f"{p['live_set_bytes'] / MIB:.1f} | {100 * p['live_set_error']:+.0f} % |")
    first = next(r["prediction"] for r in rows.values() if r.get("prediction"))
    lines += ["", f"Manifest prediction = baseline + predicted full bytes kept for backward "
              f"(the manifest's, at batch {args.batch_size}; HOSVD's is the worst-case full-rank "
              f"bound) + weights, gradients and optimizer state of the trainable layers "
              f"({first['weights_grads_state_bytes'] / MIB:.2f} MiB). Live-set prediction = "
              f"baseline + the larger of that step-end set (plus the image batch) and the "
              f"frozen prefix's largest live activations, "
              f"{first['prefix_live_bytes'] / MIB:.1f} MiB at {first['prefix_live_at']} "
              f"(image batch included), which the manifest leaves out.", ""]
    # targets
    hosvd_key = f"runner hosvd eps {args.eps}"
    hosvd = rows[hosvd_key]
    ratio = hosvd["peak_rss_bytes"] / torch_peak
    lines += ["Targets (issue 6, study 4):", "",
              f"- runner HOSVD peak < half of PyTorch eager vanilla's: "
              f"{'met' if ratio < 0.5 else 'missed'} ({hosvd['peak_rss_bytes'] / MIB:.1f} vs "
              f"{torch_peak / MIB:.1f} MiB, ratio {ratio:.2f}).",
              f"- prediction within 10 % of the measured peak (runner HOSVD): manifest "
              f"prediction {'met' if abs(hosvd['prediction']['manifest_error']) <= 0.1 else 'missed'}"
              f" ({100 * hosvd['prediction']['manifest_error']:+.0f} %), live-set prediction "
              f"{'met' if abs(hosvd['prediction']['live_set_error']) <= 0.1 else 'missed'} "
              f"({100 * hosvd['prediction']['live_set_error']:+.0f} %)."]
    # what the numbers say, from the numbers
    van = rows["runner vanilla"]
    reading = [
        "", "Reading:", "",
        f"- Compression does not show in the runner's peak: HOSVD keeps "
        f"{hosvd['kept_bytes_peak']['full'] / MIB:.2f} MiB for backward against vanilla's "
        f"{van['kept_bytes_peak']['full'] / MIB:.2f} MiB, yet their working sets are "
        f"{hosvd['working_set_bytes'] / MIB:.1f} and {van['working_set_bytes'] / MIB:.1f} MiB. "
        f"At this size the step's peak is set by the frozen prefix's forward activations "
        f"({first['prefix_live_bytes'] / MIB:.1f} MiB live at most, image batch included) and "
        f"the decomposition's numpy temporaries, not by what is kept for backward.",
        f"- The HOSVD-vs-PyTorch target is met by the baselines: PyTorch's process starts at "
        f"{rows['torch eager vanilla']['baseline_rss_bytes'] / MIB:.0f} MiB (torch itself), the "
        f"runner's at {hosvd['baseline_rss_bytes'] / MIB:.0f} MiB; the runner's vanilla job "
        f"meets it too (ratio {van['peak_rss_bytes'] / torch_peak:.2f})."]
    if "ort-training vanilla" in rows:
        ortt = rows["ort-training vanilla"]
        reading.append(
            f"- onnxruntime-training's own working set ({ortt['working_set_bytes'] / MIB:.1f} MiB, "
            f"default arena) is "
            f"{'smaller' if ortt['working_set_bytes'] < hosvd['working_set_bytes'] else 'larger'}"
            f" than the runner's HOSVD one; its whole process is larger "
            f"because its Python package imports torch (baseline "
            f"{ortt['baseline_rss_bytes'] / MIB:.0f} MiB"
            + (f"; {rows['ort-training vanilla, torch import blocked (diagnostic)']['baseline_rss_bytes'] / MIB:.0f} MiB with that import blocked"
               if "ort-training vanilla, torch import blocked (diagnostic)" in rows else "")
            + ").")
    diag = [k for k in rows if k.endswith(diagnostic) and "hosvd" in k]
    if diag and returns_memory:
        dh = rows[diag[-1]]
        reading.append(
            f"- The runner hands freed activation buffers back to the OS (at start-up "
            f"device_runner.procmem.return_freed_memory sets glibc's mmap threshold to "
            f"{MMAP_THRESHOLD // 1024} KiB). With glibc's default instead, whose threshold "
            f"rises after the first large free so later buffers come from a heap that stays "
            f"resident, the HOSVD working set is {dh['working_set_bytes'] / MIB:.1f} MiB "
            f"(vs {hosvd['working_set_bytes'] / MIB:.1f}) and the live-set prediction is off by "
            f"{100 * dh['prediction']['live_set_error']:+.0f} % (vs "
            f"{100 * hosvd['prediction']['live_set_error']:+.0f} %).")
    elif diag:
        dh = rows[diag[-1]]
        reading.append(
            f"- With glibc's mmap threshold fixed at {MMAP_THRESHOLD // 1024} KiB "
            f"(MALLOC_MMAP_THRESHOLD_, or mallopt(M_MMAP_THRESHOLD) at start-up), freed "
            f"activation buffers go back to the OS: the runner's HOSVD working set drops from "
            f"{hosvd['working_set_bytes'] / MIB:.1f} to {dh['working_set_bytes'] / MIB:.1f} MiB "
            f"and the live-set prediction comes within "
            f"{100 * abs(dh['prediction']['live_set_error']):.0f} % of the measured peak.")
    lines += reading
    elapsed = time.perf_counter() - started
    lines += ["", f"Runtime {elapsed / 60:.1f} min (finished "
                  f"{datetime.now().strftime('%Y-%m-%d %H:%M')})."]
    result = {"date": today, "machine": platform.machine(), "command": command,
              "args": vars(args), "rows": rows, "prefix_live": live,
              "onnxruntime_training": ort_note or "measured", "seconds": elapsed}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "whole_process_memory.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "whole_process_memory.md").write_text("\n".join(lines) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
