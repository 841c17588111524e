"""vanilla, the paper's HOSVD and asi side by side as users run them: step time, the steps'
working set, its prediction and the process's peak RSS, each job a fresh `actcomp-device
train` process.

    .venv/bin/python benchmarks/method_compare.py [--layers 4,42] [--repeats 2]

mcunet-in1 with the tiny-training weights, ants/bees (../shared), batch 32, 128 px,
2 threads, 8 steps (one epoch), eps 0.8; the jobs round-robin, --repeats rounds; each figure
the median over rounds (min-max). Writes method_compare.{json,md} to benchmarks/results.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import spread, write_results  # noqa: E402
from benchmarks.deep_finetune import BIN, METHODS, MODEL, call, runner_job  # noqa: E402

JOBS = ("vanilla", "hosvd", "asi")
MIB = 2 ** 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="4,42")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", default="out/method_compare")
    args = parser.parse_args()
    work = (REPO / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    runs = {}
    for n in (int(v) for v in args.layers.split(",")):
        arts = {}
        for method in JOBS:
            arts[method] = work / f"art-n{n}-{method}"
            call([str(BIN / "actcomp"), "export", "--force", *MODEL, "--layers", str(n),
                  "--method", method, *METHODS[method], "--batch-size", "32",
                  "--input-size", "128", "-o", str(arts[method])])
        for rep in range(args.repeats):
            for method in JOBS[rep % len(JOBS):] + JOBS[:rep % len(JOBS)]:
                s = runner_job(arts[method], work / f"run-n{n}-{method}", 32, 8, 2)
                runs.setdefault((n, method), []).append({
                    "step_ms": 1e3 * s["median_step_seconds"],
                    "working_set_mib": s["working_set_bytes"] / MIB,
                    "predicted_mib": s["predicted_working_set_bytes"] / MIB,
                    "peak_rss_mib": s["peak_rss_bytes"] / MIB})
                print(f"[{time.time() - started:5.0f} s] N={n} {method}: "
                      f"{json.dumps(runs[n, method][-1])}", flush=True)
    rows = [{"layers": n, "method": method, **{k: spread([r[k] for r in rs]) for k in rs[0]}}
            for (n, method), rs in runs.items()]
    meta = {"date": str(date.today()), "repeats": args.repeats,
            "command": f".venv/bin/python benchmarks/method_compare.py --layers {args.layers} "
                       f"--repeats {args.repeats}",
            "runtime_seconds": time.time() - started}
    lines = ["# vanilla, HOSVD and asi as users run them (mcunet-5fps, ants/bees)", "",
             f"{meta['date']}; batch 32, 128 px, 2 threads, eps 0.8, 8 steps a job, "
             f"{args.repeats} rounds: median (min-max).", "", f"Command: `{meta['command']}`",
             "", "| N | method | step ms | steps' working set MiB | predicted MiB | "
             "peak RSS MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[k]['median']:.1f} ({r[k]['min']:.1f}-{r[k]['max']:.1f})"
                 for k in ("step_ms", "working_set_mib", "predicted_mib", "peak_rss_mib")]
        lines.append(f"| {r['layers']} | {r['method']} | " + " | ".join(cells) + " |")
    write_results("method_compare", {"meta": meta, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
