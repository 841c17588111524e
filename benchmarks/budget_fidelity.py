"""asi's activation-budget ranks against the paper's eps ranks at the same kept bytes: how
close each one's weight gradient is to the exact one (issue 27).

    .venv/bin/python benchmarks/budget_fidelity.py            # ~2 min on 2 cores

The real tiny-training MCUNet-5fps (``../shared``), its last N convs and a new classifier
(seed 0) fine-tuned, three artifacts made by the CLI from the same weights: vanilla (the
exact gradient), hosvd at eps 0.8, and asi with an activation budget. For each real batch
(the runner's normalisation and batch), through the runner itself (``Trainer.step`` at
lr 0):
1. hosvd at eps 0.8 gives its gradients and the bytes its Tucker pieces keep, K;
2. the budget's ranks are chosen on the same batch for K bytes (``rank_budget.allocate``,
   what ``--activation-budget`` does on the board) and asi's first step (the exact HOSVD at
   those ranks) gives its gradients;
3. each conv's weight-gradient cosine against vanilla's, and the cosine of all the convs'
   weight gradients together.
Medians (min-max) over the batches. Writes ``benchmarks/results/budget_fidelity.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.gradient_fidelity import DATASETS, MODEL, SHARED  # noqa: E402 (same batches)

RECIPES = {"vanilla": ["--method", "vanilla"], "hosvd-0.8": ["--method", "hosvd", "--eps", "0.8"],
           "asi-budget": ["--method", "asi", "--activation-budget", "1GiB"]}


def export(folder: Path, classes: int, layers: int, batch: int, recipe: list) -> None:
    subprocess.run([sys.executable, "-m", "actcomp_edge.host.cli", "export", "--model",
                    str(SHARED / "weights" / f"{MODEL}.json"), "--weights",
                    str(SHARED / "weights" / f"{MODEL}.npz"), "--num-classes", str(classes),
                    "--layers", str(layers), "--batch-size", str(batch), "--input-size", "128",
                    "--seed", "0", "-o", str(folder), *recipe],
                   check=True, capture_output=True, cwd=REPO)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[4])
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" /
                   "budget_fidelity")
    args = p.parse_args(argv)
    if not (SHARED / "weights" / f"{MODEL}.json").exists():
        print(f"budget_fidelity: needs the real weights in {SHARED / 'weights'}", file=sys.stderr)
        return 2
    from actcomp_edge.core import rank_budget
    from device_runner.data import load
    from device_runner.runtime import Trainer
    started, rows = time.perf_counter(), []
    work = Path(tempfile.mkdtemp(prefix="budget_fidelity_"))
    for layers in args.layers:
        for title, (file, classes, batch) in DATASETS.items():
            trainers = {}
            for label, recipe in RECIPES.items():
                export(work / f"{label}_{layers}_{classes}", classes, layers, batch, recipe)
                trainers[label] = Trainer(work / f"{label}_{layers}_{classes}",
                                          threads=args.threads)
            asi = trainers["asi-budget"]
            norm = asi.manifest.input
            data = load(SHARED / "data" / file, (128, 128))
            order = np.random.default_rng(0).permutation(len(data))
            shapes = {name: (batch, *layer.input_shape) for name, layer in asi.layers.items()}
            for b in range(args.batches):
                x, y = data.batch(order[b * batch:(b + 1) * batch], norm.mean, norm.std)
                exact = trainers["vanilla"].step(x, y, 0.0).grads
                eps = trainers["hosvd-0.8"].step(x, y, 0.0)
                budget = sum(eps.kept_bytes.values())
                ranks, _ = rank_budget.allocate(asi.layer_energies(x), shapes, budget)
                for tracker in asi.trackers.values():
                    tracker.restore({})  # every batch's first step: the HOSVD at the ranks
                asi.fix_ranks(ranks)
                chosen = asi.step(x, y, 0.0)
                convs = [k for k in exact if k.endswith("weight") and
                         not k.startswith("classifier")]
                for label, result in (("hosvd-0.8", eps), ("asi-budget", chosen)):
                    rows.append({"layers": layers, "dataset": title, "method": label, "batch": b,
                                 "kept_bytes": sum(result.kept_bytes.values()),
                                 "ranks": {k: list(v) for k, v in result.ranks.items()},
                                 "all": cosine(np.concatenate([result.grads[k].ravel()
                                                               for k in convs]),
                                               np.concatenate([exact[k].ravel() for k in convs])),
                                 **{k: cosine(result.grads[k], exact[k]) for k in convs}})
                print(f"N={layers} {title} batch {b}: {budget} bytes; cosine all convs: hosvd "
                      f"{rows[-2]['all']:.4f}, budget {rows[-1]['all']:.4f}", flush=True)
    write(args, argv, rows, time.perf_counter() - started)
    return 0


def write(args, argv, rows: list, seconds: float) -> None:
    command = ".venv/bin/python benchmarks/budget_fidelity.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    keys = [k for k in rows[0] if k not in ("layers", "dataset", "method", "batch", "ranks")]
    table = ["| N | dataset | what | hosvd 0.8 | budget ranks, same bytes |", "|---|---|---|---|---|"]
    for layers in args.layers:
        for title in DATASETS:
            sel = {m: [r for r in rows if (r["layers"], r["dataset"], r["method"]) ==
                       (layers, title, m)] for m in ("hosvd-0.8", "asi-budget")}
            for key in keys:
                cells = []
                for m in ("hosvd-0.8", "asi-budget"):
                    v = [r[key] for r in sel[m] if key in r]
                    cells.append(f"{np.median(v):.0f}" if key == "kept_bytes" else
                                 f"{np.median(v):.3f} ({min(v):.3f}-{max(v):.3f})")
                what = {"all": "cosine, all conv weights", "kept_bytes": "kept bytes"}.get(
                    key, f"cosine {key}")
                table.append(f"| {layers} | {title} | {what} | {cells[0]} | {cells[1]} |")
    result = {"date": date.today().isoformat(), "command": command.strip(), "seconds": seconds,
              "model": MODEL, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=1) + "\n")
    text = "\n".join([f"# Activation-budget ranks against eps ranks at equal bytes "
                      f"({result['date']})", "",
                      f"`{result['command']}` ({seconds:.0f} s). {MODEL}, a new classifier "
                      f"(seed 0), 128 px, {args.batches} real batches per dataset (ants/bees 16, "
                      f"CIFAR-10 32 images), the runner's step at lr 0. Median (min-max) over "
                      f"the batches of the weight-gradient cosine against vanilla's.", ""]
                     + table) + "\n"
    Path(f"{args.out}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
