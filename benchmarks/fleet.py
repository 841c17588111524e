"""A fleet against centralised training, through the CLIs users run:

    .venv/bin/python benchmarks/fleet.py [--seeds 0 1 2] [--rounds 3] [--nodes 3]

`actcomp export` (the pretrained tiny-training MCUNet from ../shared, last 4 convs, HOSVD
eps 0.8, batch 16, 128 px, 2 classes); then per seed, each a fresh process, side by side:
- `actcomp fleet local ART --data hymenoptera_train.npz --val-data hymenoptera_val.npz
  --nodes 3 --rounds 3 --partition dirichlet:0.5 --local-epochs 1 --seed S --threads 1`;
- `actcomp-device train ART --data hymenoptera_train.npz --val-data hymenoptera_val.npz
  --epochs ROUNDS x LOCAL_EPOCHS --seed S` (the same total epochs over all the data).
Reports the central val accuracy per round, the bytes per round, each node's memory, the
Flower processes' own memory, and the centralised run's accuracy, as medians and
mean +- std over seeds. Writes benchmarks/results/NAME.{json,md} (--name, default fleet).
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MIB = 2 ** 20
WEIGHTS = SHARED / "weights" / "tt_mcunet-5fps_int8dq"


def run(cmd: list, log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        if subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT):
            sys.exit(f"failed: {' '.join(map(str, cmd))} (log {log})")
    return time.perf_counter() - start


def entry_rss(module: str) -> int:
    """RSS (bytes) of a fresh process right after importing module (median of 3)."""
    code = (f"import {module}\nfrom device_runner import procmem\nprint(procmem.rss_bytes())")
    return int(statistics.median(int(subprocess.check_output(
        [sys.executable, "-c", code], cwd=REPO, text=True).split()[-1]) for _ in range(3)))


def spread(values: list) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {std:.4f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--partition", default="dirichlet:0.5")
    p.add_argument("--strategy", default="fedavg", choices=("fedavg", "fedprox", "fedadam"))
    p.add_argument("--strategy-flags", default="",
                   help="more `actcomp fleet local` flags, e.g. '--proximal-mu 0.1'")
    p.add_argument("--name", default="fleet", help="results file stem (default fleet)")
    args = p.parse_args(argv)
    data = SHARED / "data"
    if not (data / "hymenoptera_train.npz").exists() or not WEIGHTS.with_suffix(".npz").exists():
        sys.exit(f"needs {data}/hymenoptera_*.npz and {WEIGHTS}.npz (../shared)")
    py, work = sys.executable, Path(tempfile.mkdtemp(prefix="actcomp-fleet-bench-"))
    art = work / "art"
    run([py, "-m", "actcomp_edge.host.cli", "export",
         "--force", "--model", f"{WEIGHTS}.json", "--weights",
         f"{WEIGHTS}.npz", "--method", "hosvd", "--eps", "0.8", "--layers", "4",
         "--batch-size", "16", "--input-size", "128", "--num-classes", "2", "-o", str(art)],
        work / "export.log")
    train, val = str(data / "hymenoptera_train.npz"), str(data / "hymenoptera_val.npz")
    runs = []
    for seed in args.seeds:
        fleet_dir = work / f"fleet-{seed}"
        fleet_seconds = run([py, "-m", "actcomp_edge.host.cli", "fleet", "local", str(art), "--data",
                             train, "--val-data", val, "--nodes", str(args.nodes), "--rounds",
                             str(args.rounds), "--partition", args.partition,
                             "--local-epochs", str(args.local_epochs), "--seed", str(seed),
                             "--threads", "1", "--strategy", args.strategy,
                             *args.strategy_flags.split(), "--out", str(fleet_dir)],
                            work / f"fleet-{seed}.log")
        fleet = json.loads((fleet_dir / "summary.json").read_text())
        central_seconds = run([py, "-m", "device_runner.cli", "train", str(art), "--data", train,
                               "--val-data", val, "--epochs",
                               str(args.rounds * args.local_epochs), "--seed", str(seed),
                               "--out", str(work / f"central-{seed}"), "--summary",
                               str(work / f"central-{seed}.json")], work / f"central-{seed}.log")
        central = json.loads((work / f"central-{seed}.json").read_text())
        runs.append({"seed": seed, "fleet": fleet, "central": {
            k: central[k] for k in ("final_val_accuracy", "best_val_accuracy", "peak_rss_bytes",
                                    "baseline_rss_bytes", "working_set_bytes", "steps")},
            "fleet_seconds": fleet_seconds, "central_seconds": central_seconds})
        print(f"seed {seed}: fleet " + " ".join(f"r{r['round']} {r['val_accuracy']:.4f}"
                                                for r in fleet["rounds"])
              + f"; central {central['final_val_accuracy']:.4f}; shards {fleet['shard_sizes']} "
                f"{fleet['shard_label_counts']}", flush=True)
    runner_entry, client_entry = entry_rss("device_runner.train"), entry_rss("device_runner.fleet")
    final_fleet = [r["fleet"]["rounds"][-1]["val_accuracy"] for r in runs]
    final_central = [r["central"]["final_val_accuracy"] for r in runs]
    gaps = [c - f for f, c in zip(final_fleet, final_central)]
    nodes = [n for r in runs for n in r["fleet"]["nodes"]]
    result = {
        "date": str(date.today()), "command": ".venv/bin/python benchmarks/fleet.py " + shlex.join(
            sys.argv[1:] if argv is None else argv),
        "setup": {"model": WEIGHTS.name, "method": "hosvd", "eps": 0.8, "layers": 4,
                  "batch_size": 16, "input_size": 128, "nodes": args.nodes,
                  "rounds": args.rounds, "local_epochs": args.local_epochs,
                  "partition": args.partition, "strategy": args.strategy,
                  "strategy_flags": args.strategy_flags,
                  "flwr_version": runs[0]["fleet"]["flwr_version"]},
        "fleet_final_val_accuracy": final_fleet, "central_final_val_accuracy": final_central,
        "gap_central_minus_fleet": gaps,
        "import_rss_bytes": {"runner (device_runner.train)": runner_entry,
                             "runner + Flower ClientApp (device_runner.fleet)": client_entry},
        "runs": runs}
    client_median = statistics.median(n["client_entry_rss_bytes"] for n in nodes)
    flower_median = statistics.median(n["flower_processes_peak_rss_bytes"] for n in nodes)
    out = REPO / "benchmarks" / "results" / args.name
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    md = [f"# Fleet vs centralised ({result['date']})", "", f"`{result['command']}`", "",
          f"{WEIGHTS.name}, last 4 convs, HOSVD eps 0.8, batch 16, 128 px; {args.nodes} nodes, "
          f"{args.rounds} rounds of {args.local_epochs} local epoch(s), {args.partition}, "
          f"{args.strategy} {args.strategy_flags} "
          f"(flwr {result['setup']['flwr_version']}); centralised: "
          f"{args.rounds * args.local_epochs} epochs on all the data. Seeds {args.seeds}.", "",
          "| | " + " | ".join(f"round {r['round']}" for r in runs[0]["fleet"]["rounds"])
          + " | centralised |", "|---|" + "---|" * (len(runs[0]["fleet"]["rounds"]) + 1)]
    for r in runs:
        md.append(f"| seed {r['seed']} val accuracy | " + " | ".join(
            f"{x['val_accuracy']:.4f}" for x in r["fleet"]["rounds"])
            + f" | {r['central']['final_val_accuracy']:.4f} |")
    md += ["", f"Final central val accuracy: fleet {spread(final_fleet)} (median "
               f"{statistics.median(final_fleet):.4f}), centralised {spread(final_central)} "
               f"(median {statistics.median(final_central):.4f}); centralised - fleet "
               f"{spread(gaps)}.", "",
           "Bytes per round (weights to all nodes / back): " + ", ".join(
               f"{x['bytes_sent'] / MIB:.2f} / {x['bytes_received'] / MIB:.2f} MiB"
               for x in runs[0]["fleet"]["rounds"][1:]) + " (seed "
           f"{runs[0]['seed']}).", "",
           "| seed | node | images | peak RSS | working set | ClientApp at entry | SuperNode + "
           "SuperExec peak RSS |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        for n in r["fleet"]["nodes"]:
            md.append(f"| {r['seed']} | {n['node']} | {n['examples']} | "
                      f"{n['peak_rss_bytes'] / MIB:.1f} MiB | {n['working_set_bytes'] / MIB:.1f} "
                      f"MiB | {n['client_entry_rss_bytes'] / MIB:.1f} MiB | "
                      f"{n['flower_processes_peak_rss_bytes'] / MIB:.1f} MiB |")
    md += ["", f"Centralised runner: peak RSS median "
               f"{statistics.median(r['central']['peak_rss_bytes'] for r in runs) / MIB:.1f} "
               f"MiB, working set median "
               f"{statistics.median(r['central']['working_set_bytes'] for r in runs) / MIB:.1f} "
               f"MiB. Node peak RSS median "
               f"{statistics.median(n['peak_rss_bytes'] for n in nodes) / MIB:.1f} MiB.",
           "", f"Flower's own memory on a node: a fresh process importing the runner is "
               f"{runner_entry / MIB:.1f} MiB, with the ClientApp module "
               f"{client_entry / MIB:.1f} MiB; the ClientApp process Flower starts is "
               f"{client_median / MIB:.1f} MiB (median) before the runner loads; the SuperNode "
               f"and its SuperExec peak at {flower_median / MIB:.1f} MiB together (median, "
               f"RSS: shared pages counted in each).", "",
           f"Wall time per seed: fleet median "
           f"{statistics.median(r['fleet_seconds'] for r in runs):.0f} s, centralised median "
           f"{statistics.median(r['central_seconds'] for r in runs):.0f} s (2 cores shared by "
           f"the nodes)."]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
