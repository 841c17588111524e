"""Learning-rate pilot for benchmarks/accuracy.py (run once, before the study).

    .venv/bin/python benchmarks/scripts/accuracy_lr_pilot.py [--lrs 0.01 0.003 0.001]

Vanilla fine-tuning of the last 4 convs + classifier (the least stable setting: the most
trainable convs) through export -> device runner, with the study's optimizer, batch, epochs
and training data, but validated on images held out of the TRAINING data only (ants/bees:
a seeded 20 % split of hymenoptera_train; CIFAR-10: 1,000 training-subset images disjoint from
the study's 2,000), never on the study's validation/test sets. The chosen lr is the
largest whose held-out accuracy is within noise of the best and whose training does not
diverge. Writes benchmarks/scripts/accuracy_lr_pilot.json, which accuracy.py quotes.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from benchmarks import accuracy as study  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lrs", nargs="+", type=float, default=[0.01, 0.003, 0.001])
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()
    paths = study.shared_paths()
    work = Path(tempfile.mkdtemp(prefix="actcomp-lr-pilot-"))
    env = study.subprocess_env(1)
    py = sys.executable
    # the study's CIFAR training subset, and 1,000 other training images to validate on
    cifar_train = work / "cifar_train.npz"
    study.cifar_subset(paths["cifar10_subset_train.npz"], cifar_train, 200, 0)
    with np.load(paths["cifar10_subset_train.npz"], allow_pickle=False) as d:
        images, labels, classes = d["images"], d["labels"].astype(np.int64), d["classes"]
    with np.load(cifar_train, allow_pickle=False) as d:
        used = {im.tobytes() for im in d["images"]}
    rest = np.array([i for i in range(len(labels)) if images[i].tobytes() not in used])
    held = np.sort(np.random.default_rng(1).choice(rest, 1000, replace=False))
    cifar_held = work / "cifar_heldout.npz"
    np.savez(cifar_held, images=images[held], labels=labels[held], classes=classes)
    setups = {
        "hymenoptera": {"classes": 2, "epochs": 5,
                        "data": ["--data", str(paths["hymenoptera_train.npz"]),
                                 "--val-fraction", "0.2"],
                        "note": "80 % of hymenoptera_train (195 images), validated on the other "
                                "20 % (49 images)"},
        "cifar10": {"classes": 10, "epochs": 2,
                    "data": ["--data", str(cifar_train), "--val-data", str(cifar_held)],
                    "note": "the study's 2,000 CIFAR training images, validated on 1,000 other "
                            "training-subset images"},
    }
    results = []
    for name, s in setups.items():
        art = work / f"art_{name}"
        study.run_logged([py, "-m", "actcomp_edge.cli", "export", "--model", str(paths["spec"]),
                          "--weights", str(paths["weights"]), "--num-classes", str(s["classes"]),
                          "--layers", str(args.layers), "--method", "vanilla", "--batch-size",
                          "32", "--input-size", "128", "--seed", "0", "-o", str(art)],
                         work / f"export_{name}.log", env)
        for lr in args.lrs:
            study.log(f"{name}: vanilla N={args.layers}, lr {lr}, {s['epochs']} epochs")
            log = work / f"train_{name}_{lr}.log"
            study.run_logged([py, "-m", "device_runner.cli", "train", str(art)] + s["data"]
                             + ["--epochs", str(s["epochs"]), "--batch-size", "32", "--lr",
                                str(lr), "--seed", "0", "--threads", "2", "--out",
                                str(work / f"run_{name}_{lr}")],
                             log, env, echo=lambda line: line.startswith("epoch "))
            curve = study.epoch_curve(log)
            results.append({"dataset": name, "lr": lr, "layers": args.layers,
                            "epochs": s["epochs"], "setup": s["note"],
                            "curve": [{"epoch": e, "train_loss": lo, "heldout_accuracy": a}
                                      for e, lo, a in curve]})
    shutil.rmtree(work, ignore_errors=True)
    out = {"date": date.today().isoformat(),
           "command": ".venv/bin/python benchmarks/scripts/accuracy_lr_pilot.py "
                      + " ".join(sys.argv[1:]),
           "optimizer": "sgd momentum 0.9, no weight decay, constant lr, batch 32, seed 0",
           "results": results}
    parts = []
    for name in setups:
        rs = [r for r in results if r["dataset"] == name]
        parts.append(f"{name}: " + ", ".join(
            f"lr {r['lr']} {100 * r['curve'][-1]['heldout_accuracy']:.1f} %"
            + (" (train loss rose from epoch to epoch: unstable)"
               if any(b["train_loss"] > 1.5 * a["train_loss"]
                      for a, b in zip(r["curve"], r["curve"][1:])) else "")
            for r in rs))
    out["conclusion"] = (f"Learning-rate pilot (`{out['command'].strip()}`, vanilla N={args.layers}, "
                         f"validated on held-out training images, final held-out accuracy): "
                         + "; ".join(parts) + ".")
    for r in results:
        c = r["curve"]
        print(f"{r['dataset']:12s} lr {r['lr']:<6} held-out acc per epoch "
              + " ".join(f"{100 * e['heldout_accuracy']:.1f}" for e in c)
              + "  train loss " + " ".join(f"{e['train_loss']:.2f}" for e in c))
    (HERE / "accuracy_lr_pilot.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {HERE / 'accuracy_lr_pilot.json'}")
    print(out["conclusion"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
