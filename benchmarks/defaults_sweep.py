"""Every shipped model at the default recipe: does any diverge?

    .venv/bin/python benchmarks/defaults_sweep.py [--epochs 1] [--models NAME ...]

For each built-in model (random weights, as `actcomp export` builds it without --weights; the
pretrained tiny-training MCUNet from ../shared as well, when present) and each method
(vanilla, HOSVD eps 0.8): `actcomp export --layers 4 --batch-size 16 --input-size 128
--num-classes 2`, then `actcomp-device train ART --data hymenoptera_train.npz --val-data
hymenoptera_val.npz --epochs E` with no recipe flag, each a fresh process. Reports the
first and last epoch's train loss, the final and best val accuracy, and the rollbacks of
the divergence guard. Writes benchmarks/results/defaults_sweep.{json,md}.
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

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ZOO = ["mcunet-in1", "mbv2-w0.35", "proxyless-w0.3", "mobilenet_v2", "resnet18", "resnet34"]
PRETRAINED = "tt_mcunet-5fps_int8dq"
METHODS = {"vanilla": [], "hosvd-0.8": ["--method", "hosvd", "--eps", "0.8"]}


def run(cmd: list, log: Path) -> None:
    with open(log, "w") as f:
        if subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT):
            sys.exit(f"failed: {' '.join(cmd)} (log {log})")


def epoch_losses(log: Path) -> list:
    return [float(line.split("train loss")[1].split(",")[0])
            for line in log.read_text().splitlines() if line.startswith("epoch ")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--models", nargs="+", default=ZOO + [PRETRAINED])
    args = p.parse_args(argv)
    data = SHARED / "data"
    if not (data / "hymenoptera_train.npz").exists():
        sys.exit(f"needs {data}/hymenoptera_train.npz (../shared next to the repository)")
    py, work, rows = sys.executable, Path(tempfile.mkdtemp(prefix="actcomp-sweep-")), []
    start = time.perf_counter()
    for model in args.models:
        source = ["--model", model]
        if model == PRETRAINED:
            weights = SHARED / "weights" / PRETRAINED
            source = ["--model", f"{weights}.json", "--weights", f"{weights}.npz"]
        for label, flags in METHODS.items():
            folder = work / f"{model}-{label}"
            folder.mkdir()
            run([py, "-m", "actcomp_edge.host.cli", "export", "--force", *source, *(flags or ["--method",
                 "vanilla"]), "--layers", "4", "--batch-size", "16", "--input-size", "128",
                 "--num-classes", "2", "-o", str(folder / "art")], folder / "export.log")
            run([py, "-m", "device_runner.cli", "train", str(folder / "art"), "--data",
                 str(data / "hymenoptera_train.npz"), "--val-data",
                 str(data / "hymenoptera_val.npz"), "--epochs", str(args.epochs),
                 "--summary", str(folder / "summary.json"), "--out", str(folder / "run")],
                folder / "train.log")
            s = json.loads((folder / "summary.json").read_text())
            losses = epoch_losses(folder / "train.log")
            rows.append({"model": model, "pretrained": model == PRETRAINED, "method": label,
                         "first_epoch_loss": losses[0], "last_epoch_loss": losses[-1],
                         "val_accuracy": s["final_val_accuracy"],
                         "best_val_accuracy": s["best_val_accuracy"],
                         "rollbacks": s["recipe"]["rollbacks"], "recipe": s["recipe"]})
            print(f"{model:<24} {label:<10} loss {losses[0]:.3f} -> {losses[-1]:.3f}, val "
                  f"{s['final_val_accuracy']:.4f}, rollbacks {s['recipe']['rollbacks']}",
                  flush=True)
    command = ".venv/bin/python benchmarks/defaults_sweep.py" + "".join(
        f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    out = REPO / "benchmarks" / "results" / "defaults_sweep"
    result = {"date": date.today().isoformat(), "command": command, "epochs": args.epochs,
              "minutes": (time.perf_counter() - start) / 60, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Every shipped model at the default recipe ({result['date']})", "",
             f"`{command}` ({result['minutes']:.1f} min): ants/bees, last 4 convs, batch 16, "
             f"128 px, {args.epochs} epoch(s), no recipe flag ({rows[0]['recipe']}).", "",
             "| model | weights | method | train loss, first → last epoch | val acc | best val "
             "acc | rollbacks |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {'pretrained' if r['pretrained'] else 'random'} | "
                     f"{r['method']} | {r['first_epoch_loss']:.3f} → {r['last_epoch_loss']:.3f} "
                     f"| {100 * r['val_accuracy']:.1f} | {100 * r['best_val_accuracy']:.1f} | "
                     f"{r['rollbacks']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
