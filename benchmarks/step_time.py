"""Training-step time as users run it: `actcomp-device train` (a fresh process a job) for
vanilla, HOSVD eps, ASI and GF-R2 against PyTorch eager vanilla and ExecuTorch's training
runtime, N=4 and N=42, and against one batch of the same network's inference on onnxruntime
(the artifact's inference.onnx).

    .venv/bin/python benchmarks/step_time.py [--layers 4,42] [--repeats 3] [--steps 8]
        [--executorch-steps 3] [--no-executorch] [--threads 2] [--work out/step_time]
        [--results benchmarks/results]

mcunet-in1 with its real weights and ants/bees images (../shared), batch 32, 128 px, SGD
momentum 0.9, frozen BN. Jobs run round-robin, --repeats rounds, the order rotated every
round; a job's figure is its median step (the CLI summary's median_step_seconds), reported
as the median over rounds with min-max, and ratios (to PyTorch eager, to runner vanilla,
to one inference batch) as the median of the per-round ratios with their min-max. The
runner picks its kernels (`--kernels auto`: the NCHWc variants on x86-64); the summary says
which. A diagnostic in-process run of each artifact adds the time split (prefix / forward /
decomposition / backward / update) and onnxruntime's per-op-type profile (the profiler
inflates small ops). ExecuTorch (executorch 1.5.1, the peer a PyTorch user picks for
on-device training) runs from its own venv, .venv-executorch, installed on first use (about a
minute; a failed install: its rows say skipped and why); its steps take seconds, so its jobs
run --executorch-steps steps after a warm-up. Writes step_time.{json,md} to --results.
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import platform
import shutil
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from benchmarks import spread, write_results  # noqa: E402
from export import zoo  # noqa: E402

REAL = {"mcunet-in1": "tt_mcunet-5fps_int8dq", "mbv2-w0.35": "tt_mbv2-w0.35_int8dq",
        "proxyless-w0.3": "tt_proxyless-w0.3_int8dq"}


def load_model(name: str):
    real = REAL.get(name)
    if real and (SHARED / "weights" / f"{real}.json").exists():
        spec_path = SHARED / "weights" / f"{real}.json"
        model = zoo.build_from_name(str(spec_path), 2, SHARED / "weights" / f"{real}.npz")
        return model, f"{real} (pretrained, ../shared)"
    torch.manual_seed(0)
    return zoo.build_model(zoo.load_spec(name, 2)), "random init"


def load_images(batch: int, size: int, spec: dict):
    path = SHARED / "data" / "hymenoptera_train.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as d:
            images, labels = d["images"][:batch], d["labels"][:batch]
        return zoo.preprocess(images, spec, size).numpy(), labels.astype(np.int64), "ants/bees"
    rng = np.random.default_rng(0)
    low = rng.standard_normal((batch, 3, size // 16 + 1, size // 16 + 1))
    x = np.kron(low, np.ones((1, 1, 16, 16)))[:, :, :size, :size].astype(np.float32)
    return x, rng.integers(0, 2, batch).astype(np.int64), "synthetic"


def trainable(model, n_layers):
    """A copy of model with only its last n_layers convs (and the classifier after them)
    trainable, frozen BN (eval mode) and no dropout."""
    ref = copy.deepcopy(model)
    convs = [m for m in ref.modules() if isinstance(m, torch.nn.Conv2d)]
    for p in ref.parameters():
        p.requires_grad_(False)
    first = convs[-n_layers]
    chosen = convs[-n_layers:]
    seen = False
    for m in ref.modules():
        seen = seen or m is first
        if (m in chosen) or (seen and isinstance(m, torch.nn.Linear)):
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)
    for m in ref.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return ref.eval()  # frozen BN


def plain_torch(model, n_layers):
    """PyTorch eager with nn.Conv2d (no reference wrappers): the fair vanilla baseline."""
    ref = trainable(model, n_layers)
    opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.001,
                          momentum=0.9)

    def step(images, labels):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ref(images), labels).backward()
        opt.step()
    return step


METHODS = ("vanilla", "hosvd", "asi", "gf-r2")
TORCH = "torch eager vanilla"
INFERENCE = "onnxruntime inference"  # the artifact's inference.onnx, one batch
INFERENCE_JOB = r"""
import json, time
import numpy as np, onnxruntime as ort
options = ort.SessionOptions()
options.intra_op_num_threads = {threads}
session = ort.InferenceSession({model!r}, options, providers=["CPUExecutionProvider"])
images = np.random.default_rng(0).standard_normal(({batch}, 3, {size}, {size}), np.float32)
name = session.get_inputs()[0].name
times = []
for i in range(23):
    start = time.perf_counter()
    session.run(None, {{name: images}})
    if i >= 3:
        times.append(time.perf_counter() - start)
print(json.dumps({{"median_step_seconds": float(np.median(times))}}))
"""


def inference_job(art: Path, threads: int) -> dict:
    """One batch of the whole network's inference.onnx (weights baked in) in a fresh
    process: the median of 20 runs after 3 warm-ups."""
    from benchmarks.deep_finetune import call
    code = INFERENCE_JOB.format(model=str(art / "inference.onnx"), threads=threads,
                                batch=BATCH, size=SIZE)
    return json.loads(call([sys.executable, "-c", code]).strip().splitlines()[-1])
BATCH, SIZE = 32, 128


def profile_job(art: Path, steps: int, threads: int) -> dict:
    """In-process diagnostic (a fresh process): the step's time split and onnxruntime's
    per-op-type kernel time, ms a step, over ``steps`` steps after one warm-up."""
    from benchmarks.deep_finetune import TRAIN, call
    code = PROFILE_JOB.format(repo=str(REPO), art=str(art), batch=BATCH, steps=steps,
                              threads=threads, train=str(REPO / TRAIN))
    return json.loads(call([sys.executable, "-c", code]).strip().splitlines()[-1])


PROFILE_JOB = r"""
import collections, json, sys, tempfile, time
sys.path.insert(0, {repo!r})
import numpy as np
from device_runner import data
from device_runner.runtime import Trainer
folder = tempfile.mkdtemp()
trainer = Trainer({art!r}, threads={threads}, profile_prefix=folder + "/")
size = trainer.manifest.input.height
images = data.load({train!r}, (size, size))
split = collections.Counter()
for step in range({steps} + 1):
    x, y = images.batch(np.arange(step * {batch}, (step + 1) * {batch}) % len(images),
                        [0.5] * 3, [0.5] * 3)
    result = trainer.step(x, y, 0.0)
    if step:
        split.update({{k: v * 1e3 / {steps} for k, v in result.seconds.items()}})
per_op = collections.Counter()
for path in trainer.end_profiling():
    graph = path.rsplit("/", 1)[-1].split("_")[0]  # forward / backward / update
    for event in json.load(open(path)):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[graph + " " + event["args"]["op_name"]] += event["dur"] / 1e3 / ({steps} + 1)
print(json.dumps({{"split_ms": dict(split), "per_op_ms": dict(per_op.most_common(10))}}))
"""


EXECUTORCH = "executorch training"
EXECUTORCH_VENV = REPO / ".venv-executorch"
EXECUTORCH_PINS = ("executorch==1.5.1", "torch==2.13.0")  # 2.13.0: the CPU wheel, not CUDA's
# its portable kernels: lowered with the stock XnnpackPartitioner, N=4 ran (1.6 s a step) but
# its second loss was its first's and its third NaN (measured 2026-12-07, not looked into)
EXECUTORCH_JOB = r"""
import json, sys, time, numpy as np, torch, torch.nn.functional as F
sys.path.insert(0, {repo!r})
from benchmarks.step_time import load_model, load_images, trainable
from device_runner import procmem
from executorch.exir import to_edge
from executorch.extension.training import (
    _load_for_executorch_for_training_from_buffer, get_sgd_optimizer)
from torch.export.experimental import _export_forward_backward
torch.set_num_threads({threads})  # torch's own work here: the export and the eager check


class WithLoss(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, y):
        return F.cross_entropy(self.net(x), y)


torch.manual_seed(0)  # the 2-class classifier's fresh init
model, _ = load_model("mcunet-in1")
images, labels, _ = load_images({batch}, {size}, model.spec)
# contiguous NCHW: the portable kernels refuse mixed dim orders (the array is NHWC in memory)
x, y = torch.from_numpy(images).contiguous(), torch.from_numpy(labels)
program = _export_forward_backward(torch.export.export(
    WithLoss(trainable(model, {layers})), (x, y), strict=True))  # frozen: requires_grad False
buffer = to_edge(program).to_executorch().buffer  # kept: the module reads it in place
module = _load_for_executorch_for_training_from_buffer(buffer)
baseline = procmem.rss_bytes()
procmem.reset_peak()
losses, seconds, cpu = [], [], 0.0
for step in range({steps} + 1):  # the first: warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    loss = module.forward_backward("forward", (x, y))[0]
    if step == 0:
        sgd = get_sgd_optimizer(module.named_parameters(), 0.001, 0.9, 0, 0, False)
    sgd.step(module.named_gradients())
    if step:
        seconds.append(time.perf_counter() - t0)
        cpu += time.process_time() - c0
    losses.append(float(loss))
peak = procmem.peak_rss_bytes()
eager = trainable(model, {layers})
opt = torch.optim.SGD([p for p in eager.parameters() if p.requires_grad], lr=0.001, momentum=0.9)
eager_losses = []
for _ in range(2):
    opt.zero_grad()
    loss = F.cross_entropy(eager(x), y)
    loss.backward()
    opt.step()
    eager_losses.append(float(loss))
print(json.dumps({{"median_step_seconds": float(np.median(seconds)), "steps": len(seconds),
                  "cpu_over_wall": cpu / sum(seconds), "peak_rss_bytes": peak,
                  "baseline_rss_bytes": baseline, "trained": len(module.named_gradients()),
                  "losses": losses[:2], "eager_losses": eager_losses}}))
"""


def executorch_python() -> tuple:
    """(python, facts) of ExecuTorch's venv beside this checkout, installed on first use;
    python None and facts["skipped"] the reason when the install fails."""
    from benchmarks.deep_finetune import JobFailed, call
    python, stamp = EXECUTORCH_VENV / "bin" / "python", EXECUTORCH_VENV / ".installed"
    facts = {"packages": list(EXECUTORCH_PINS), "venv": str(EXECUTORCH_VENV)}
    if stamp.exists():
        return python, facts
    print(f"installing {' '.join(EXECUTORCH_PINS)} into {EXECUTORCH_VENV}", flush=True)
    started = time.time()
    try:
        if not python.exists():
            call([sys.executable, "-m", "venv", str(EXECUTORCH_VENV)])
        call([str(python), "-m", "pip", "install", "-q", *EXECUTORCH_PINS], timeout=1800)
    except (JobFailed, OSError) as e:
        why = "\n".join(line for line in str(e).splitlines() if not line.startswith("WARNING"))
        print(f"ExecuTorch skipped: its install failed: {why}", flush=True)
        return None, dict(facts, skipped=f"install failed: {why}")
    stamp.touch()
    return python, dict(facts, install_seconds=time.time() - started)


def executorch_job(python: Path, n: int, steps: int, threads: int) -> dict:
    """ExecuTorch's training runtime in a fresh process of its venv: torch.export, the joint
    forward-backward graph, to_edge, to_executorch, then TrainingModule.forward_backward and
    its SGD; the median of ``steps`` steps after one warm-up, its first two losses beside
    PyTorch eager's (the same process, after the timed steps)."""
    from benchmarks.deep_finetune import call
    from benchmarks.whole_process_memory import last_json_line
    code = EXECUTORCH_JOB.format(repo=str(REPO), threads=threads, batch=BATCH, size=SIZE,
                                 layers=n, steps=steps)
    m = last_json_line(call([str(python), "-c", code]))
    m["loss_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(m["losses"], m["eager_losses"]))
    return m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="4,42", help="N values, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="steps a job (one epoch at 8)")
    parser.add_argument("--executorch-steps", type=int, default=3,
                        help="ExecuTorch's steps a job, after one warm-up (seconds each)")
    parser.add_argument("--no-executorch", action="store_true",
                        help="leave out ExecuTorch (its venv is installed on first use)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="out/step_time", help="artifacts and runs")
    parser.add_argument("--results", default="benchmarks/results")
    args = parser.parse_args()
    import onnxruntime
    layers = [int(n) for n in args.layers.split(",")]
    started = time.time()
    arts = export_all(layers, (REPO / args.work).resolve())
    jobs = [(0, INFERENCE)] + [(n, m) for n in layers for m in (TORCH,) + METHODS]
    python, executorch, dropped = None, None, {}
    if not args.no_executorch:
        python, executorch = executorch_python()
        if python:
            jobs += [(n, EXECUTORCH) for n in layers]
        else:
            dropped = {(n, EXECUTORCH): executorch["skipped"] for n in layers}
    runs = measure(jobs, layers, arts, args, python, dropped, started)
    profiles = {}
    for (n, method), art in arts.items():
        profiles[n, method] = profile_job(art, args.steps, args.threads)
        print(f"[{time.time() - started:6.0f} s] profiled N={n} {method}", flush=True)
    rows = table(layers, runs, profiles, dropped)
    meta = {"date": str(date.today()), "machine": f"{platform.machine()}, "
            f"{os.cpu_count()} cores", "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "batch": BATCH, "input_size": SIZE,
            "threads": args.threads, "steps": args.steps, "repeats": args.repeats,
            "runtime_seconds": time.time() - started,
            "command": ".venv/bin/python benchmarks/step_time.py"
                       + (f" --repeats {args.repeats}" if args.repeats != 3 else "")}
    if executorch:
        meta["executorch"] = executorch_facts(executorch, runs, args.executorch_steps)
    write_results("step_time", {"meta": meta, "rows": rows}, markdown(meta, rows),
                  REPO / args.results)


def export_all(layers: list, work: Path) -> dict:
    """`actcomp export` of every (N, method): (n, method) -> the artifact's folder."""
    # deep_finetune imports this module's torch helpers for its jobs: imported here
    from benchmarks.deep_finetune import BIN, METHODS as METHODS_ARGS, MODEL, call
    work.mkdir(parents=True, exist_ok=True)
    arts = {}
    for n in layers:
        for method in METHODS:
            art = work / f"art-n{n}-{method}"
            shutil.rmtree(art, ignore_errors=True)
            call([str(BIN / "actcomp"), "export",
                  "--force", *MODEL, "--layers", str(n), "--method", method,
                  *METHODS_ARGS[method], "--batch-size", str(BATCH), "--input-size", str(SIZE),
                  "-o", str(art)])
            arts[n, method] = art
    return arts


def measure(jobs: list, layers: list, arts: dict, args, python, dropped: dict,
            started: float) -> dict:
    """The jobs round-robin, --repeats rounds, the order rotated every round: (n, job) -> each
    round's figures. An ExecuTorch job that fails leaves the rounds (dropped: why)."""
    from benchmarks.deep_finetune import JobFailed, runner_job, torch_job
    runs = collections.defaultdict(list)
    for rep in range(args.repeats):
        shift = rep % len(jobs)
        for n, job in jobs[shift:] + jobs[:shift]:
            if (n, job) in dropped:
                continue
            if job == INFERENCE:  # the whole net: the same for every N
                s = inference_job(arts[layers[0], "vanilla"], args.threads)
            elif job == TORCH:
                s = torch_job(n, BATCH, SIZE, args.steps, args.threads)
            elif job == EXECUTORCH:
                try:
                    s = executorch_job(python, n, args.executorch_steps, args.threads)
                except (JobFailed, ValueError, KeyError) as e:
                    dropped[n, job] = f"failed in round {rep + 1}: {e}"
                    print(f"N={n} {job}: {dropped[n, job]}", flush=True)
                    continue
            else:
                s = runner_job(arts[n, job], REPO / args.work / f"run-n{n}-{job}", BATCH,
                               args.steps, args.threads)
            runs[n, job].append(s)
            print(f"[{time.time() - started:6.0f} s] round {rep + 1} N={n or '-'} {job}: "
                  f"{s['median_step_seconds'] * 1e3:.0f} ms", flush=True)
    return runs


def table(layers: list, runs: dict, profiles: dict, dropped: dict) -> list:
    """The result rows: each job's step (ms) and its ratios, per round, as spreads."""
    def seconds(n, job):
        return [r["median_step_seconds"] for r in runs.get((n, job), [])]
    inference = seconds(0, INFERENCE)
    rows = [{"layers": "-", "job": INFERENCE, "step_ms": spread([1e3 * v for v in inference])}]
    for n in layers:
        for job in (TORCH,) + METHODS + (EXECUTORCH,):
            own = seconds(n, job)
            if not own:
                if (n, job) in dropped:
                    rows.append({"layers": n, "job": job, "skipped": dropped[n, job]})
                continue
            row = {"layers": n, "job": job, "step_ms": spread([1e3 * v for v in own]),
                   "over_torch": spread([a / b for a, b in zip(own, seconds(n, TORCH))]),
                   "over_inference": spread([a / b for a, b in zip(own, inference)])}
            if job in METHODS:
                row["over_vanilla"] = spread([a / b for a, b in zip(own, seconds(n, "vanilla"))])
                row["profile"] = profiles[n, job]
            elif job == EXECUTORCH:
                row["runs"] = runs[n, job]
                if (n, job) in dropped:
                    row["failed"] = dropped[n, job]
            rows.append(row)
    return rows


def executorch_facts(facts: dict, runs: dict, steps: int) -> dict:
    """The install's facts and what every ExecuTorch job measured beside its step: its first
    two losses against PyTorch eager's, its CPU time over wall time (1: one thread)."""
    done = [r for (_, job), rs in runs.items() if job == EXECUTORCH for r in rs]
    if not done:
        return facts
    cpu = [r["cpu_over_wall"] for r in done]
    return dict(facts, steps=steps, loss_max_rel_diff=max(r["loss_rel_diff"] for r in done),
                cpu_over_wall=[min(cpu), max(cpu)])


def fmt(s: dict, scale: float = 1.0, digits: int = 0) -> str:
    return (f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f}-"
            f"{s['max'] * scale:.{digits}f})")


def markdown(meta: dict, rows: list) -> str:
    out = ["# Step time: mcunet-in1 (tt_mcunet-5fps_int8dq, pretrained), ants/bees", "",
           f"{meta['date']}, {meta['machine']}, onnxruntime {meta['onnxruntime']}, torch "
           f"{meta['torch']}; batch {meta['batch']}, {meta['input_size']} px, "
           f"{meta['threads']} threads; every job a fresh process ({meta['steps']} steps, its "
           f"median step), {meta['repeats']} rounds round-robin: median (min-max) over rounds.",
           "", f"Command: `{meta['command']}` ({meta['runtime_seconds'] / 60:.1f} min)", "",
           "| N | job | step ms | / PyTorch eager | / runner vanilla | / inference batch |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            out.append(f"| {r['layers']} | {r['job']} | skipped: {oneline(r['skipped'])} | - | - "
                       "| - |")
            continue
        cells = [fmt(r[k], digits=2) if k in r else "-"
                 for k in ("over_torch", "over_vanilla", "over_inference")]
        out.append(f"| {r['layers']} | {r['job']} | {fmt(r['step_ms'])} | " + " | ".join(cells)
                   + " |")
    if "executorch" in meta:
        out += ["", executorch_note(meta["executorch"])]
    out += [f"- N={r['layers']} {r['job']}: {len(r['runs'])} round(s), then "
            f"{oneline(r['failed'])}" for r in rows if "failed" in r]
    out += ["", "In-process diagnostic (one run each, ms a step): the split and the ten "
            "costliest onnxruntime op types (forward_* / backward_* / update graphs).", ""]
    for r in rows:
        if "profile" not in r:
            continue
        split = ", ".join(f"{k} {v:.0f}" for k, v in r["profile"]["split_ms"].items())
        ops = ", ".join(f"{k} {v:.1f}" for k, v in r["profile"]["per_op_ms"].items())
        out.append(f"- N={r['layers']} {r['job']}: {split}. Ops: {ops}")
    return "\n".join(out) + "\n"


def oneline(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]


def executorch_note(et: dict) -> str:
    """The markdown's paragraph on the ExecuTorch jobs."""
    text = f"ExecuTorch: {', '.join(et['packages'])} in {Path(et['venv']).name}" + (
        f" (installed by this run in {et['install_seconds']:.0f} s)" if "install_seconds" in et
        else "")
    if "skipped" in et:
        return text + f"; skipped: {oneline(et['skipped'])}"
    if "steps" not in et:
        return text + "; no job completed."
    lo, hi = et["cpu_over_wall"]
    return text + ("; torch.export, the joint forward-backward graph (_export_forward_backward)"
                   ", to_edge, to_executorch; trained through its TrainingModule's "
                   "forward_backward and its SGD (lr 0.001, momentum 0.9), only the fine-tuned "
                   f"parameters with gradients; {et['steps']} steps a job after one warm-up. "
                   f"CPU time / wall time over its steps {lo:.2f}-{hi:.2f} (one thread: its "
                   "portable kernels); its first two losses against PyTorch eager's (same "
                   f"process, same images): at most {et['loss_max_rel_diff']:.1e} apart, "
                   "relative.")


if __name__ == "__main__":
    main()
