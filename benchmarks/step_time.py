"""Training-step time as users run it: `actcomp-device train` (a fresh process a job) for
vanilla, HOSVD eps, ASI and GF-R2 against PyTorch eager vanilla, N=4 and N=42, and against
one batch of the same network's inference on onnxruntime (the artifact's inference.onnx).

    .venv/bin/python benchmarks/step_time.py [--layers 4,42] [--repeats 3] [--steps 8]
        [--threads 2] [--work out/step_time] [--results benchmarks/results]

mcunet-in1 with its real weights and ants/bees images (../shared), batch 32, 128 px, SGD
momentum 0.9, frozen BN. Jobs run round-robin, --repeats rounds, the order rotated every
round; a job's figure is its median step (the CLI summary's median_step_seconds), reported
as the median over rounds with min-max, and ratios (to PyTorch eager, to runner vanilla,
to one inference batch) as the median of the per-round ratios with their min-max. The
runner picks its kernels (`--kernels auto`: the NCHWc variants on x86-64); the summary says
which. A diagnostic in-process run of each artifact adds the time split (prefix / forward /
decomposition / backward / update) and onnxruntime's per-op-type profile (the profiler
inflates small ops). Writes step_time.{json,md} to --results.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="4,42", help="N values, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="steps a job (one epoch at 8)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="out/step_time", help="artifacts and runs")
    parser.add_argument("--results", default="benchmarks/results")
    args = parser.parse_args()
    import onnxruntime
    # deep_finetune imports this module's torch helpers for its jobs: imported here
    from benchmarks.deep_finetune import (BIN, METHODS as METHODS_ARGS, MODEL, call,
                                          runner_job, torch_job)
    layers = [int(n) for n in args.layers.split(",")]
    work = (REPO / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
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
    jobs = [(0, INFERENCE)] + [(n, m) for n in layers for m in (TORCH,) + METHODS]
    seconds = collections.defaultdict(list)  # (n, job) -> median step seconds per round
    for rep in range(args.repeats):
        shift = rep % len(jobs)
        for n, job in jobs[shift:] + jobs[:shift]:
            if job == INFERENCE:  # the whole net: the same for every N
                s = inference_job(arts[layers[0], "vanilla"], args.threads)
            elif job == TORCH:
                s = torch_job(n, BATCH, SIZE, args.steps, args.threads)
            else:
                s = runner_job(arts[n, job], work / f"run-n{n}-{job}", BATCH, args.steps,
                               args.threads)
            seconds[n, job].append(s["median_step_seconds"])
            print(f"[{time.time() - started:6.0f} s] round {rep + 1} N={n or '-'} {job}: "
                  f"{s['median_step_seconds'] * 1e3:.0f} ms", flush=True)
    profiles = {}
    for (n, method), art in arts.items():
        profiles[n, method] = profile_job(art, args.steps, args.threads)
        print(f"[{time.time() - started:6.0f} s] profiled N={n} {method}", flush=True)
    inference = seconds[0, INFERENCE]
    rows = [{"layers": "-", "job": INFERENCE, "step_ms": spread([1e3 * v for v in inference])}]
    for n in layers:
        for job in (TORCH,) + METHODS:
            own = seconds[n, job]
            row = {"layers": n, "job": job, "step_ms": spread([1e3 * v for v in own]),
                   "over_torch": spread([a / b for a, b in zip(own, seconds[n, TORCH])]),
                   "over_inference": spread([a / b for a, b in zip(own, inference)])}
            if job != TORCH:
                row["over_vanilla"] = spread([a / b for a, b in zip(own, seconds[n, "vanilla"])])
                row["profile"] = profiles[n, job]
            rows.append(row)
    runtime = time.time() - started
    meta = {"date": str(date.today()), "machine": f"{platform.machine()}, "
            f"{os.cpu_count()} cores", "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "batch": BATCH, "input_size": SIZE,
            "threads": args.threads, "steps": args.steps, "repeats": args.repeats,
            "runtime_seconds": runtime,
            "command": ".venv/bin/python benchmarks/step_time.py"
                       + (f" --repeats {args.repeats}" if args.repeats != 3 else "")}
    write_results("step_time", {"meta": meta, "rows": rows}, markdown(meta, rows),
                  REPO / args.results)


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
        cells = [fmt(r[k], digits=2) if k in r else "-"
                 for k in ("over_torch", "over_vanilla", "over_inference")]
        out.append(f"| {r['layers']} | {r['job']} | {fmt(r['step_ms'])} | " + " | ".join(cells)
                   + " |")
    out += ["", "In-process diagnostic (one run each, ms a step): the split and the ten "
            "costliest onnxruntime op types (forward_* / backward_* / update graphs).", ""]
    for r in rows:
        if "profile" not in r:
            continue
        split = ", ".join(f"{k} {v:.0f}" for k, v in r["profile"]["split_ms"].items())
        ops = ", ".join(f"{k} {v:.1f}" for k, v in r["profile"]["per_op_ms"].items())
        out.append(f"- N={r['layers']} {r['job']}: {split}. Ops: {ops}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
