"""Study 2 (issue 6): compression must not cost accuracy.

    .venv/bin/python benchmarks/accuracy.py            # full study (~15-25 min on 2 cores)
    .venv/bin/python benchmarks/accuracy.py --quick    # CI-sized smoke run (~1 min)

Fine-tunes the last N convs (+ classifier) of the real tiny-training MCUNet
(``../shared/weights/tt_mcunet-5fps_int8dq``) through the real pipeline, one subprocess per
stage, exactly as a user would:

    python -m actcomp_edge.cli export --model SPEC.json --weights W.npz --num-classes K
        --layers N --method M [--eps E] --batch-size B --input-size 128 --seed 0 -o ART
    python -m device_runner.cli train ART --data TRAIN.npz --val-data VAL.npz --epochs E
        --batch-size B --lr LR --seed 0 --threads T --summary S.json --out RUN

for N in {2, 4} and the methods vanilla, HOSVD eps 0.8 / 0.9, SVD eps 0.8, Gradient
Filter R2 -- same seed, data order, optimizer, learning rate and epochs for all -- on
(a) ants/bees (``hymenoptera_train/_val``, 128 px, 2 classes) and (b) a seeded, class-balanced
subset of the CIFAR-10 training subset, evaluated on the full 2,000-image test subset (32 px,
resized to 128 px bilinearly by the runner). Validation accuracy is reported next to the
linear-probe figures of ``../shared/weights/verification_results.json``, with the difference
to vanilla in points; the fine-tuned ``inference.onnx`` of every run is re-evaluated here on
the validation set to get per-image predictions, so each method is also compared with vanilla
image by image (exact McNemar test on the images where exactly one of the two is right).

Writes ``benchmarks/results/accuracy.{json,md}`` (full mode; ``--quick`` writes to its work
folder unless ``--out`` is given). Needs ``../shared`` (real weights and images): without it
the study exits with a message (status 2) instead of measuring something else.

Numpy's BLAS runs single-threaded in the runner subprocesses by default
(``OPENBLAS_NUM_THREADS=1``, ``--blas-threads``): on this 2-core machine, when other jobs
load it, multi-threaded OpenBLAS spin-waits and the per-step HOSVD (numpy eigendecompositions)
became 10-30x slower; onnxruntime keeps ``--threads`` (default 2). Recorded in the results.
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
import tempfile
import time
from datetime import date, datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

MODEL = "tt_mcunet-5fps_int8dq"
METHODS = {  # label -> (export --method, --eps)
    "vanilla": ("vanilla", None),
    "hosvd-0.8": ("hosvd", 0.8),
    "hosvd-0.9": ("hosvd", 0.9),
    "svd-0.8": ("svd", 0.8),
    "gf-r2": ("gf-r2", None),
}
DATASETS = {
    "hymenoptera": {"title": "ants/bees", "train": "hymenoptera_train.npz",
                    "val": "hymenoptera_val.npz", "classes": 2,
                    "probe_key": "linear_probe_hymenoptera"},
    "cifar10": {"title": "CIFAR-10 subset (32 px -> 128 px)", "train": "cifar10_subset_train.npz",
                "val": "cifar10_subset_test.npz", "classes": 10,
                "probe_key": "linear_probe_cifar10_subset"},
}


def log(msg: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {msg}", flush=True)


def shared_paths() -> dict:
    """The real weights and data, or a clear exit when ../shared is absent."""
    need = {"spec": SHARED / "weights" / f"{MODEL}.json",
            "weights": SHARED / "weights" / f"{MODEL}.npz",
            "verification": SHARED / "weights" / "verification_results.json"}
    for info in DATASETS.values():
        need[info["train"]] = SHARED / "data" / info["train"]
        need[info["val"]] = SHARED / "data" / info["val"]
    missing = [str(p) for p in need.values() if not p.exists()]
    if missing:
        sys.exit(f"accuracy study: the real weights and images are not available "
                 f"(missing {', '.join(missing)}); this study needs ../shared next to the "
                 f"repository (see README) and measures nothing without it")
    return need


def cifar_subset(src: Path, dst: Path, per_class: int, seed: int) -> int:
    """A seeded, class-balanced subset of the CIFAR-10 training subset as the runner's .npz
    (uint8 images (N, 32, 32, 3), int64 labels, classes); returns its size."""
    with np.load(src, allow_pickle=False) as d:
        images, labels, classes = d["images"], d["labels"].astype(np.int64), d["classes"]
    rng = np.random.default_rng(seed)
    idx = np.sort(np.concatenate([
        rng.choice(np.flatnonzero(labels == c), min(per_class, int((labels == c).sum())),
                   replace=False)
        for c in range(int(labels.max()) + 1)]))
    np.savez(dst, images=np.ascontiguousarray(images[idx], dtype=np.uint8), labels=labels[idx],
             classes=classes)
    return len(idx)


def subprocess_env(blas_threads: int) -> dict:
    env = dict(os.environ)
    if blas_threads > 0:
        for key in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
            env[key] = str(blas_threads)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"]
                                     if env.get("PYTHONPATH") else "")
    return env


def run_logged(cmd: list, log_path: Path, env: dict, echo=None) -> float:
    """Run cmd (cwd = repo), tee its output to log_path, echo the lines echo() accepts;
    returns wall seconds; raises with the log's tail on failure."""
    start = time.perf_counter()
    with open(log_path, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            f.write(line)
            if echo is not None and echo(line):
                print("      " + line.rstrip(), flush=True)
        rc = proc.wait()
    if rc != 0:
        tail = "".join(log_path.read_text().splitlines(True)[-15:])
        raise RuntimeError(f"command failed (exit {rc}): {' '.join(cmd)}\n{tail}")
    return time.perf_counter() - start


def epoch_curve(log_path: Path) -> list:
    """[(epoch, train loss, val accuracy)] from the runner's epoch lines."""
    out = []
    for line in log_path.read_text().splitlines():
        if line.startswith("epoch ") and "val accuracy" in line:
            head, rest = line.split(":", 1)
            loss = float(rest.split("train loss")[1].split(",")[0])
            acc = float(rest.split("val accuracy")[1])
            out.append((int(head.split()[1].split("/")[0]), loss, acc))
    return out


def predictions(run_dir: Path, val_path: Path, threads: int, batch: int = 64) -> tuple:
    """Per-image predictions of the fine-tuned inference.onnx on the validation set (the
    runner's own resize and normalisation); returns (predictions, labels)."""
    import onnxruntime as ort

    from device_runner import data as data_module
    manifest = json.loads((run_dir.parent / "artifact" / "manifest.json").read_text())
    norm = manifest["input"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(run_dir / "inference.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    data = data_module.load(val_path, (norm["height"], norm["width"]), manifest["num_classes"])
    preds = []
    for start in range(0, len(data), batch):
        x, _ = data.batch(np.arange(start, min(start + batch, len(data))), norm["mean"],
                          norm["std"])
        preds.append(session.run(None, {"image": x})[0].argmax(axis=1))
    return np.concatenate(preds), data.labels


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: b, c = images only one of the two classifies right."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def probe_figures(verification: Path) -> dict:
    v = json.loads(verification.read_text())[MODEL]
    return {name: {"acc": v[info["probe_key"]]["acc"],
                   "train_images": v[info["probe_key"]]["train"],
                   "eval_images": v[info["probe_key"]].get("val", v[info["probe_key"]].get("test")),
                   "source": f"verification_results.json {MODEL}.{info['probe_key']}"}
            for name, info in DATASETS.items()}


def run_study(args, paths: dict, work: Path) -> dict:
    env = subprocess_env(args.blas_threads)
    py = sys.executable
    data_dir = work / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    data = {}
    for name in args.datasets:
        info = DATASETS[name]
        train, val = paths[info["train"]], paths[info["val"]]
        note = f"all of {info['train']}"
        if name == "cifar10":
            train = data_dir / f"cifar10_train_{args.cifar_per_class}pc.npz"
            n = cifar_subset(paths[info["train"]], train, args.cifar_per_class, args.seed)
            note = (f"{n} images of {info['train']} ({args.cifar_per_class} per class, "
                    f"numpy default_rng({args.seed}))")
        with np.load(train, allow_pickle=False) as d:
            n_train = len(d["labels"])
        with np.load(val, allow_pickle=False) as d:
            n_val = len(d["labels"])
        data[name] = {"train": train, "val": val, "train_images": n_train, "val_images": n_val,
                      "train_note": note, "val_note": f"all of {info['val']}",
                      "epochs": args.epochs[name]}

    jobs = [(d, n, m) for d in args.datasets for n in args.layers for m in args.methods]
    runs = []
    study_start = time.perf_counter()
    for i, (dname, layers, label) in enumerate(jobs, 1):
        method, eps = METHODS[label]
        d = data[dname]
        tag = f"{dname}_N{layers}_{label}"
        folder = work / tag
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        art, run_dir, summary_path = folder / "artifact", folder / "run", folder / "summary.json"
        elapsed = time.perf_counter() - study_start
        eta = "" if i == 1 else f", about {elapsed / (i - 1) * (len(jobs) - i + 1) / 60:.1f} min left"
        log(f"[{i}/{len(jobs)}] {DATASETS[dname]['title']}, N={layers}, {label}: export + "
            f"train {d['epochs']} epoch(s) on {d['train_images']} images{eta}")
        export_cmd = [py, "-m", "actcomp_edge.cli", "export", "--model", str(paths["spec"]),
                      "--weights", str(paths["weights"]),
                      "--num-classes", str(DATASETS[dname]["classes"]),
                      "--layers", str(layers), "--method", method]
        if eps is not None:
            export_cmd += ["--eps", str(eps)]
        export_cmd += ["--batch-size", str(args.batch_size), "--input-size", "128",
                       "--optimizer", "sgd", "--momentum", str(args.momentum),
                       "--weight-decay", str(args.weight_decay), "--seed", str(args.seed),
                       "-o", str(art)]
        export_seconds = run_logged(export_cmd, folder / "export.log", env)
        train_cmd = [py, "-m", "device_runner.cli", "train", str(art), "--data", str(d["train"]),
                     "--val-data", str(d["val"]), "--epochs", str(d["epochs"]),
                     "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                     "--seed", str(args.seed), "--threads", str(args.threads),
                     "--summary", str(summary_path), "--out", str(run_dir)]
        if args.max_steps:
            train_cmd += ["--max-steps", str(args.max_steps)]
        train_seconds = run_logged(train_cmd, folder / "train.log", env,
                                   echo=lambda line: line.startswith(("epoch ", "done:")))
        summary = json.loads(summary_path.read_text())
        preds, labels = predictions(run_dir, d["val"], args.threads)
        recomputed = float((preds == labels).mean())
        if abs(recomputed - summary["final_val_accuracy"]) > 1.5 / len(labels):
            raise RuntimeError(f"{tag}: inference.onnx gives accuracy {recomputed:.4f} but the "
                               f"runner reported {summary['final_val_accuracy']:.4f}")
        with np.load(art / "weights.npz", allow_pickle=False) as a, \
                np.load(run_dir / "weights.npz", allow_pickle=False) as b:
            change = {k: float(np.linalg.norm(b[k] - a[k]) / max(np.linalg.norm(a[k]), 1e-12))
                      for k in a.files if k in b.files and k.endswith("weight")}
        conv_change = max((v for k, v in change.items() if not k.startswith("classifier")),
                          default=0.0)
        runs.append({
            "dataset": dname, "layers": layers, "method": label, "export_method": method,
            "eps": eps, "val_accuracy": summary["final_val_accuracy"],
            "val_accuracy_recomputed": recomputed, "final_train_loss": summary["final_train_loss"],
            "epoch_curve": [{"epoch": e, "train_loss": lo, "val_accuracy": a}
                            for e, lo, a in epoch_curve(folder / "train.log")],
            "steps": summary["steps"], "median_step_seconds": summary["median_step_seconds"],
            "kept_bytes_peak": summary["kept_bytes_peak"],
            "predicted_kept_bytes_worst_case": summary["predicted_kept_bytes"],
            "peak_rss_bytes": summary["peak_rss_bytes"],
            "export_seconds": round(export_seconds, 2), "train_seconds": round(train_seconds, 2),
            "export_command": " ".join(shorten(c) for c in export_cmd),
            "train_command": " ".join(shorten(c) for c in train_cmd),
            "relative_weight_change": change, "max_conv_relative_weight_change": conv_change,
            "_pred": preds, "_labels": labels})
        log(f"      -> val accuracy {100 * summary['final_val_accuracy']:.2f} %, median step "
            f"{1e3 * summary['median_step_seconds']:.0f} ms, {summary['steps']} steps, "
            f"{export_seconds:.0f} s export + {train_seconds:.0f} s train")
    return {"data": data, "runs": runs, "seconds": time.perf_counter() - study_start}


def shorten(arg: str) -> str:
    """Paths relative to the repository or to ../shared, for readable commands."""
    for base, name in ((SHARED, "../shared"), (REPO, ".")):
        try:
            rel = Path(arg).resolve().relative_to(base.resolve())
            return f"{name}/{rel}"
        except (ValueError, OSError):
            pass
    if arg == sys.executable:
        return ".venv/bin/python"
    return arg


def compare(runs: list, probes: dict) -> list:
    """Rows: accuracy, difference to vanilla (same dataset and N), paired McNemar, probe."""
    rows = []
    for r in runs:
        base = next(v for v in runs if v["dataset"] == r["dataset"] and v["layers"] == r["layers"]
                    and v["method"] == "vanilla") if any(
            v["dataset"] == r["dataset"] and v["layers"] == r["layers"] and v["method"] == "vanilla"
            for v in runs) else None
        n = len(r["_labels"])
        row = {k: v for k, v in r.items() if not k.startswith("_")}
        acc = r["val_accuracy"]
        row["val_images"] = n
        row["val_accuracy_stderr"] = math.sqrt(max(acc * (1 - acc), 1e-12) / n)
        probe = probes[r["dataset"]]["acc"]
        row["probe_accuracy"] = probe
        row["minus_probe_points"] = 100 * (acc - probe)
        row["beats_probe"] = bool(acc > probe)
        if base is not None:
            right, base_right = r["_pred"] == r["_labels"], base["_pred"] == base["_labels"]
            b = int((right & ~base_right).sum())   # only this method right
            c = int((~right & base_right).sum())   # only vanilla right
            row["minus_vanilla_points"] = 100 * (acc - base["val_accuracy"])
            row["vs_vanilla"] = {"only_method_right": b, "only_vanilla_right": c,
                                 "prediction_agreement": float((r["_pred"] == base["_pred"]).mean()),
                                 "mcnemar_p": mcnemar_exact(b, c)}
        if r["median_step_seconds"] and base is not None and base["median_step_seconds"]:
            row["step_time_vs_vanilla"] = r["median_step_seconds"] / base["median_step_seconds"]
        rows.append(row)
    return rows


def fmt_pts(x):
    return "-" if x is None else f"{x:+.1f}"


def markdown(result: dict) -> str:
    cfg, rows, probes = result["config"], result["rows"], result["probes"]
    mib = 2 ** 20
    lines = ["# Accuracy: fine-tuning through the pipeline (export -> device runner)", "",
             f"Date {result['date']}; command `{result['command']}`; total runtime "
             f"{result['total_seconds'] / 60:.1f} min ({result['machine']}).", "",
             f"Model `{MODEL}` (real tiny-training weights, ImageNet-pretrained, 128 px). "
             f"Fine-tuned: last N convs + a new classifier (seed {cfg['seed']}). "
             f"Optimizer SGD, momentum {cfg['momentum']}, weight decay {cfg['weight_decay']}, "
             f"constant lr {cfg['lr']}, batch {cfg['batch_size']}, no augmentation; the same "
             f"seed, data order, schedule and epochs for every method. onnxruntime "
             f"{cfg['threads']} threads, numpy BLAS {cfg['blas_threads'] or 'default'} thread(s)"
             + (" (OPENBLAS_NUM_THREADS=1 in the runner: with its default two threads, while "
                "other jobs loaded this 2-core machine, the numpy HOSVD of a step took 1-5 s "
                "instead of 0.15 s: OpenBLAS threads spin-wait for a busy core)."
                if cfg["blas_threads"] == 1 else ".")
             + (f" **Quick mode** (--max-steps {cfg['max_steps']}): a smoke run, not a result."
                if cfg.get("max_steps") else ""), ""]
    for dname, d in result["data"].items():
        lines.append(f"- {DATASETS[dname]['title']}: train = {d['train_note']}, "
                     f"{d['epochs']} epoch(s); validation = {d['val_note']} "
                     f"({d['val_images']} images: one image = {100 / d['val_images']:.2f} points).")
    lines.append("")
    for dname in result["data"]:
        probe = probes[dname]
        lines += [f"## {DATASETS[dname]['title']}", "",
                  f"Linear probe (frozen features + logistic regression on "
                  f"{probe['train_images']} training images, `{probe['source']}`): "
                  f"**{100 * probe['acc']:.2f} %**.", "",
                  "| N | method | val acc % (± s.e.) | − vanilla (points) | only-method / "
                  "only-vanilla right (McNemar p) | − probe (points) | beats probe | "
                  "final train loss | val acc per epoch % | median step ms (× vanilla) | "
                  "kept for backward, peak (paper) | conv weights moved (max ‖Δw‖/‖w‖) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["dataset"] == dname):
            vs = r.get("vs_vanilla")
            paired = ("-" if vs is None or r["method"] == "vanilla" else
                      f"{vs['only_method_right']} / {vs['only_vanilla_right']} "
                      f"(p={vs['mcnemar_p']:.2f})")
            curve = " → ".join(f"{100 * e['val_accuracy']:.1f}" for e in r["epoch_curve"]) or "-"
            step = (f"{1e3 * r['median_step_seconds']:.0f}"
                    + (f" ({r['step_time_vs_vanilla']:.2f}×)" if "step_time_vs_vanilla" in r
                       else ""))
            kept = r["kept_bytes_peak"]["paper"]
            kept_s = f"{kept / mib:.2f} MiB" if kept >= mib / 10 else f"{kept / 1024:.1f} KiB"
            lines.append(
                f"| {r['layers']} | {r['method']} | {100 * r['val_accuracy']:.2f} "
                f"(± {100 * r['val_accuracy_stderr']:.1f}) | "
                f"{'-' if r['method'] == 'vanilla' else fmt_pts(r.get('minus_vanilla_points'))} | "
                f"{paired} | {fmt_pts(r['minus_probe_points'])} | "
                f"{'yes' if r['beats_probe'] else 'no'} | {r['final_train_loss']:.3f} | "
                f"{curve} | {step} | {kept_s} | "
                f"{100 * r['max_conv_relative_weight_change']:.2f} % |")
        lines.append("")
    lines += ["## Reading", ""] + [f"- {s}" for s in result["findings"]] + [""]
    lines += ["Columns: *− vanilla*: the method's accuracy minus vanilla's at the same N, in "
              "points; *only-method / only-vanilla right*: validation images that exactly one of "
              "the two classifies correctly (the paired comparison; the exact McNemar p-value "
              "says whether the difference could be noise); *s.e.*: binomial standard error "
              "sqrt(p(1-p)/n); *median step*: the runner's summary (`median_step_seconds`, "
              "pure training step, this machine was shared with other jobs, so only the ratios "
              "within one table mean much); *kept for backward*: peak bytes of the compressed "
              "activations of the fine-tuned convs over the run (the runner's paper "
              "accounting); *conv weights moved*: the largest relative change of a fine-tuned "
              "conv's weight between the export and the end of training (the classifier is new, "
              "so it is left out). Per-run export/train commands, epoch curves, logs' timings: "
              "`accuracy.json`.", ""]
    return "\n".join(lines)


def findings(rows: list, probes: dict, data: dict, lr_note: str | None, lr: float) -> list:
    out = []
    for dname in data:
        rs = [r for r in rows if r["dataset"] == dname]
        title = DATASETS[dname]["title"]
        probe = 100 * probes[dname]["acc"]
        comp = [r for r in rs if r["method"] != "vanilla" and "minus_vanilla_points" in r]
        hos = [r for r in comp if r["method"].startswith("hosvd")]
        if hos:
            worst = min(hos, key=lambda r: r["minus_vanilla_points"])
            within = all(abs(r["minus_vanilla_points"]) <= 1.0 for r in hos)
            sig = [r for r in hos if r["vs_vanilla"]["mcnemar_p"] < 0.05]
            out.append(
                f"{title}: HOSVD − vanilla ranges "
                f"{min(r['minus_vanilla_points'] for r in hos):+.1f} to "
                f"{max(r['minus_vanilla_points'] for r in hos):+.1f} points "
                f"({'all within' if within else 'not all within'} one point; worst "
                f"{worst['method']} N={worst['layers']}); "
                + (f"{len(sig)} of {len(hos)} differences are significant in the paired test "
                   f"(McNemar p < 0.05)." if sig else
                   f"none of the {len(hos)} differences is significant in the paired test "
                   f"(McNemar p ≥ 0.05)."))
        others = [r for r in comp if not r["method"].startswith("hosvd")]
        if others:
            out.append(f"{title}: other methods − vanilla: " + ", ".join(
                f"{r['method']} N={r['layers']} {r['minus_vanilla_points']:+.1f}"
                for r in others) + " points.")
        beat = [r for r in rs if r["beats_probe"]]
        best = max(rs, key=lambda r: r["val_accuracy"])
        text = (f"{title}: {len(beat)} of {len(rs)} fine-tuned runs beat the linear probe "
                f"({probe:.2f} %); best {100 * best['val_accuracy']:.2f} % ({best['method']}, "
                f"N={best['layers']}).")
        if len(beat) < len(rs):
            d = data[dname]
            text += (f" The probe is a logistic regression fitted to convergence on the frozen "
                     f"features of {probes[dname]['train_images']} training images; the "
                     f"fine-tuning here sees {d['train_images']} images for {d['epochs']} "
                     f"epoch(s) ({rs[0]['steps']} SGD steps) at a constant lr {lr}, without "
                     f"augmentation, to stay within the CPU budget.")
        out.append(text)
    moved = {n: [r["max_conv_relative_weight_change"] for r in rows if r["layers"] == n]
             for n in sorted({r["layers"] for r in rows})}
    if moved:
        out.append(
            "The fine-tuned convs move little: the largest relative change of a conv weight is "
            + ", ".join(f"{100 * min(v):.2f}-{100 * max(v):.2f} % at N={n}"
                        for n, v in moved.items())
            + " over the runs, while the new classifier is learned from scratch. At an lr the "
            "classifier "
            "tolerates, the accuracies here are mostly the classifier's, so this comparison can "
            "show that compressed conv gradients do no harm at this budget, not that they "
            "help as much as exact ones; a separate (larger) lr for the convs, or a "
            "classifier warm-up, would test that harder (the runner has one --lr).")
    if lr_note:
        out.append(lr_note + f" The study uses lr {lr} for every method and dataset.")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: ants/bees, N=2, vanilla and hosvd-0.8, a few steps")
    p.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    p.add_argument("--layers", nargs="+", type=int, default=[2, 4])
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--epochs-hymenoptera", type=int, default=5)
    p.add_argument("--epochs-cifar10", type=int, default=2)
    p.add_argument("--cifar-per-class", type=int, default=200,
                   help="CIFAR-10 training images per class (default 200: 2,000 images)")
    p.add_argument("--lr", type=float, default=0.001)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="onnxruntime threads")
    p.add_argument("--blas-threads", type=int, default=1,
                   help="numpy BLAS threads in the runner (0: leave the environment alone)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep artifacts, runs and logs")
    p.add_argument("--out", type=Path, default=None,
                   help="output prefix (default benchmarks/results/accuracy; quick: in --work)")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="only re-write the Markdown (and findings) of an existing result .json")
    args = p.parse_args(argv)
    if args.render:
        result = json.loads(args.render.read_text())
        pilot = result.get("lr_pilot")
        result["findings"] = findings(result["rows"], result["probes"], result["data"],
                                      pilot.get("conclusion") if pilot else None,
                                      result["config"]["lr"])
        args.render.write_text(json.dumps(result, indent=1) + "\n")
        args.render.with_suffix(".md").write_text(markdown(result))
        print(markdown(result))
        return 0
    if args.quick:
        args.datasets, args.layers, args.methods = ["hymenoptera"], [2], ["vanilla", "hosvd-0.8"]
        args.epochs_hymenoptera = 1
        args.max_steps = args.max_steps or 3
    args.epochs = {"hymenoptera": args.epochs_hymenoptera, "cifar10": args.epochs_cifar10}
    command = ".venv/bin/python benchmarks/accuracy.py" + (
        " " + " ".join(sys.argv[1:] if argv is None else argv) if (argv or sys.argv[1:]) else "")

    paths = shared_paths()
    probes = probe_figures(paths["verification"])
    work = args.work or Path(tempfile.mkdtemp(prefix="actcomp-accuracy-"))
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or (work / "accuracy_quick" if args.quick
                       else REPO / "benchmarks" / "results" / "accuracy")
    log(f"accuracy study ({'quick' if args.quick else 'full'}): {len(args.datasets)} dataset(s) "
        f"x N in {args.layers} x {len(args.methods)} methods; work folder {work}")
    t0 = time.perf_counter()
    try:
        study = run_study(args, paths, work)
    finally:
        if not args.keep and args.work is None and not args.quick:
            shutil.rmtree(work, ignore_errors=True)
    rows = compare(study["runs"], probes)
    pilot_path = REPO / "benchmarks" / "scripts" / "accuracy_lr_pilot.json"
    lr_note = None
    if pilot_path.exists() and not args.quick:
        pilot = json.loads(pilot_path.read_text())
        lr_note = pilot.get("conclusion")
    import onnxruntime
    result = {
        "study": "issue 6, study 2: accuracy", "date": date.today().isoformat(),
        "command": command, "total_seconds": time.perf_counter() - t0,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average at the end "
                   f"{os.getloadavg()[0]:.1f}; numpy {np.__version__}, onnxruntime "
                   f"{onnxruntime.__version__}",
        "model": MODEL,
        "config": {"lr": args.lr, "momentum": args.momentum, "weight_decay": args.weight_decay,
                   "optimizer": "sgd", "batch_size": args.batch_size, "seed": args.seed,
                   "input_size": 128, "threads": args.threads, "blas_threads": args.blas_threads,
                   "max_steps": args.max_steps, "layers": args.layers, "methods": args.methods,
                   "method_flags": {m: {"method": METHODS[m][0], "eps": METHODS[m][1]}
                                    for m in args.methods}},
        "data": {k: {kk: (shorten(str(vv)) if isinstance(vv, Path) else vv)
                     for kk, vv in v.items()} for k, v in study["data"].items()},
        "probes": probes, "rows": rows,
        "lr_pilot": json.loads(pilot_path.read_text()) if pilot_path.exists() else None}
    result["findings"] = findings(rows, probes, study["data"], lr_note, args.lr)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    Path(f"{out}.md").write_text(md)
    print()
    print(md)
    log(f"wrote {out}.json and {out}.md in {result['total_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
