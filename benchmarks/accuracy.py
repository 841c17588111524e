"""Accuracy study (issue 13): the runner's default recipe, and compression against vanilla.

    .venv/bin/python benchmarks/accuracy.py            # full study (~35 min on 2 cores)
    .venv/bin/python benchmarks/accuracy.py --quick    # CI-sized smoke run (~1 min)

Fine-tunes the last N convs (+ a new classifier) of the real tiny-training MCUNet
(``../shared/weights/tt_mcunet-5fps_int8dq``) through the real pipeline, one subprocess per
stage, exactly as a user would, at the exporter's and the runner's defaults (SGD momentum 0,
lr 0.05 cosine, gradient norm clipped at 2, crop + flip augmentation):

    python -m actcomp_edge.host.cli export --model SPEC.json --weights W.npz --num-classes K
        --layers N --method M [--eps E] --batch-size B --input-size 128 --seed S -o ART
    python -m device_runner.cli train ART --data TRAIN.npz --val-data VAL.npz --epochs E
        --batch-size B --seed S --threads T --summary S.json --out RUN

on (a) ants/bees (``hymenoptera_train/_val``, 128 px, 2 classes): N in {2, 4} for vanilla,
HOSVD eps 0.8 / 0.9, SVD eps 0.8, Gradient Filter R2 and ASI (ranks fixed by eps 0.8 at the
first step), plus every conv for vanilla, HOSVD 0.8 and ASI 0.8; (b) all 10,000 images of the
CIFAR-10 training subset, evaluated on the 2,000-image test subset (32 px, resized to 128 px by
the runner): N=4, vanilla, HOSVD 0.8 and ASI 0.8. Every job
runs for each seed (default 0 1 2: the classifier's initialisation, the data order and the
augmentation); the tables give mean ± std over seeds of the final and the best-epoch
validation accuracy next to the linear probe of ``../shared/weights/verification_results.json``,
the difference to vanilla (per seed, then mean ± std) and how far the conv weights moved. The
fine-tuned ``inference.onnx`` of every run is re-evaluated here to check the runner's figure
and to compare each method with vanilla image by image (exact McNemar test, in the JSON).

Writes ``benchmarks/results/accuracy.{json,md}`` (full mode; ``--quick`` writes to its work
folder unless ``--out`` is given). Needs ``../shared`` (real weights and images): without it
the study exits with a message (status 2) instead of measuring something else.

Numpy's BLAS runs single-threaded in the runner subprocesses by default
(``OPENBLAS_NUM_THREADS=1``, ``--blas-threads``); onnxruntime keeps ``--threads`` (default 2).
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
    "asi-0.8": ("asi", 0.8),
    "asi-0.9": ("asi", 0.9),
}
DATASETS = {
    "hymenoptera": {"title": "ants/bees", "train": "hymenoptera_train.npz",
                    "val": "hymenoptera_val.npz", "classes": 2,
                    "probe_key": "linear_probe_hymenoptera", "batch": 16},
    "cifar10": {"title": "CIFAR-10 subset (32 px -> 128 px)", "train": "cifar10_subset_train.npz",
                "val": "cifar10_subset_test.npz", "classes": 10,
                "probe_key": "linear_probe_cifar10_subset", "batch": 32},
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


def dataset_files(args, paths: dict, data_dir: Path) -> dict:
    data = {}
    for name in args.datasets:
        info = DATASETS[name]
        train, val = paths[info["train"]], paths[info["val"]]
        note = f"all of {info['train']}"
        if name == "cifar10" and args.cifar_per_class:
            train = data_dir / f"cifar10_train_{args.cifar_per_class}pc.npz"
            n = cifar_subset(paths[info["train"]], train, args.cifar_per_class, 0)
            note = (f"{n} images of {info['train']} ({args.cifar_per_class} per class, "
                    f"numpy default_rng(0))")
        with np.load(train, allow_pickle=False) as d:
            n_train = len(d["labels"])
        with np.load(val, allow_pickle=False) as d:
            n_val = len(d["labels"])
        data[name] = {"train": train, "val": val, "train_images": n_train, "val_images": n_val,
                      "train_note": note, "val_note": f"all of {info['val']}",
                      "epochs": args.epochs[name]}
    return data


def job_list(args, all_convs: int) -> list:
    """(dataset, N, method, seed) of every run, seeds innermost (a job's seeds side by side)."""
    plan = {"hymenoptera": [(n, m) for n in args.layers for m in args.methods]
                           + [(all_convs, m) for m in args.all_layers_methods],
            "cifar10": [(n, m) for n in args.cifar_layers for m in args.cifar_methods]}
    return [(d, n, m, seed) for d in args.datasets for n, m in plan[d] for seed in args.seeds]


def run_study(args, paths: dict, work: Path) -> dict:
    from actcomp_edge.core import arch, program
    env = subprocess_env(args.blas_threads)
    py = sys.executable
    data_dir = work / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    data = dataset_files(args, paths, data_dir)
    all_convs = len(program.conv_layers(arch.load_spec(str(paths["spec"])), 128))
    jobs = job_list(args, all_convs)
    runs = []
    study_start = time.perf_counter()
    for i, (dname, layers, label, seed) in enumerate(jobs, 1):
        method, eps = METHODS[label]
        d = data[dname]
        tag = f"{dname}_N{layers}_{label}_seed{seed}"
        folder = work / tag
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        art, run_dir, summary_path = folder / "artifact", folder / "run", folder / "summary.json"
        elapsed = time.perf_counter() - study_start
        eta = "" if i == 1 else f", about {elapsed / (i - 1) * (len(jobs) - i + 1) / 60:.1f} min left"
        log(f"[{i}/{len(jobs)}] {DATASETS[dname]['title']}, N={layers}, {label}, seed {seed}: "
            f"export + train {d['epochs']} epoch(s) on {d['train_images']} images{eta}")
        export_cmd = [py, "-m", "actcomp_edge.host.cli", "export",
                      "--force", "--model", str(paths["spec"]),
                      "--weights", str(paths["weights"]),
                      "--num-classes", str(DATASETS[dname]["classes"]),
                      "--layers", str(layers), "--method", method]
        if eps is not None:
            export_cmd += ["--eps", str(eps)]
        batch = args.batch_size or DATASETS[dname]["batch"]
        export_cmd += ["--batch-size", str(batch), "--input-size", "128",
                       "--seed", str(seed), "-o", str(art)]
        export_seconds = run_logged(export_cmd, folder / "export.log", env)
        train_cmd = [py, "-m", "device_runner.cli", "train", str(art), "--data", str(d["train"]),
                     "--val-data", str(d["val"]), "--epochs", str(d["epochs"]),
                     "--seed", str(seed), "--threads", str(args.threads),
                     "--summary", str(summary_path), "--out", str(run_dir)]
        if args.max_steps:
            train_cmd += ["--max-steps", str(args.max_steps)]
        train_seconds = run_logged(train_cmd, folder / "train.log", env,
                                   echo=lambda line: line.startswith(("epoch ", "done:", "step ")))
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
            "dataset": dname, "layers": layers, "method": label, "seed": seed,
            "export_method": method, "eps": eps,
            "val_accuracy": summary["final_val_accuracy"],
            "best_val_accuracy": summary["best_val_accuracy"], "best_epoch": summary["best_epoch"],
            "val_accuracy_recomputed": recomputed, "final_train_loss": summary["final_train_loss"],
            "recipe": summary["recipe"],
            "epoch_curve": [{"epoch": e, "train_loss": lo, "val_accuracy": a}
                            for e, lo, a in epoch_curve(folder / "train.log")],
            "batch_size": batch, "steps": summary["steps"], "median_step_seconds": summary["median_step_seconds"],
            "kept_bytes_peak": summary["kept_bytes_peak"],
            "peak_rss_bytes": summary["peak_rss_bytes"],
            "export_seconds": round(export_seconds, 2), "train_seconds": round(train_seconds, 2),
            "export_command": " ".join(shorten(c) for c in export_cmd),
            "train_command": " ".join(shorten(c) for c in train_cmd),
            "relative_weight_change": change, "max_conv_relative_weight_change": conv_change,
            "_pred": preds, "_labels": labels})
        log(f"      -> val accuracy {100 * summary['final_val_accuracy']:.2f} % (best "
            f"{100 * summary['best_val_accuracy']:.2f} % after epoch {summary['best_epoch']}), "
            f"median step {1e3 * summary['median_step_seconds']:.0f} ms, {summary['steps']} "
            f"steps, {export_seconds:.0f} s export + {train_seconds:.0f} s train")
    return {"data": data, "runs": runs, "seconds": time.perf_counter() - study_start}


def shorten(arg: str) -> str:
    """Paths relative to the repository or to ../shared, for readable commands; a flag, a
    value or a module name unchanged."""
    if arg == sys.executable:
        return ".venv/bin/python"
    if not Path(arg).is_absolute() and not Path(arg).exists():
        return arg
    for base, name in ((SHARED, "../shared"), (REPO, ".")):
        try:
            rel = Path(arg).resolve().relative_to(base.resolve())
            return f"{name}/{rel}"
        except (ValueError, OSError):
            pass
    return arg


def compare(runs: list, probes: dict) -> list:
    """Per run: accuracy, difference to vanilla (same dataset, N and seed), paired McNemar."""
    rows = []
    for r in runs:
        base = next((v for v in runs if (v["dataset"], v["layers"], v["seed"], v["method"]) ==
                     (r["dataset"], r["layers"], r["seed"], "vanilla")), None)
        row = {k: v for k, v in r.items() if not k.startswith("_")}
        acc = r["val_accuracy"]
        row["val_images"] = len(r["_labels"])
        row["minus_probe_points"] = 100 * (acc - probes[r["dataset"]]["acc"])
        if base is not None:
            right, base_right = r["_pred"] == r["_labels"], base["_pred"] == base["_labels"]
            b = int((right & ~base_right).sum())   # only this method right
            c = int((~right & base_right).sum())   # only vanilla right
            row["minus_vanilla_points"] = 100 * (acc - base["val_accuracy"])
            row["vs_vanilla"] = {"only_method_right": b, "only_vanilla_right": c,
                                 "mcnemar_p": mcnemar_exact(b, c)}
            if r["median_step_seconds"] and base["median_step_seconds"]:
                row["step_time_vs_vanilla"] = r["median_step_seconds"] / base["median_step_seconds"]
        rows.append(row)
    return rows


def mean_std(values) -> tuple:
    v = np.asarray([x for x in values if x is not None], np.float64)
    if not len(v):
        return None, None
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def aggregate(rows: list, probes: dict) -> list:
    """One entry per (dataset, N, method): mean ± std over its seeds."""
    groups = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["layers"], r["method"]), []).append(r)
    out = []
    for (dname, layers, method), rs in groups.items():
        probe = probes[dname]["acc"]
        entry = {"dataset": dname, "layers": layers, "method": method,
                 "seeds": [r["seed"] for r in rs]}
        for key in ("val_accuracy", "best_val_accuracy", "minus_vanilla_points",
                    "max_conv_relative_weight_change", "median_step_seconds",
                    "step_time_vs_vanilla"):
            entry[key] = mean_std(r.get(key) for r in rs)
        entry["beats_probe"] = sum(r["val_accuracy"] > probe for r in rs)
        entry["kept_paper_bytes_peak"] = max(r["kept_bytes_peak"]["paper"] for r in rs)
        entry["rollbacks"] = sum(r["recipe"]["rollbacks"] for r in rs)
        entry["epochs"] = max(len(r["epoch_curve"]) for r in rs)
        out.append(entry)
    return out


def fmt_ms(pair, scale=100.0, digits=1, signed=False):
    mean, std = pair
    if mean is None:
        return "-"
    sign = "+" if signed else ""
    return f"{scale * mean:{sign}.{digits}f} ± {scale * std:.{digits}f}"


def markdown(result: dict) -> str:
    cfg, probes = result["config"], result["probes"]
    mib = 2 ** 20
    recipe = result["rows"][0]["recipe"] if result["rows"] else {}
    lines = ["# Accuracy: fine-tuning through the pipeline at the default recipe", "",
             f"Date {result['date']}; command `{result['command']}`; total runtime "
             f"{result['total_seconds'] / 60:.1f} min ({result['machine']}).", "",
             f"Model `{MODEL}` (real tiny-training weights, ImageNet-pretrained, 128 px). "
             f"Fine-tuned: last N convs + a new classifier. The exporter's and runner's "
             f"defaults, no recipe flag: {recipe.get('optimizer')} momentum "
             f"{recipe.get('momentum')}, lr {recipe.get('lr')} {recipe.get('schedule')} over the "
             f"run, gradient norm clipped at {recipe.get('clip_grad_norm')}, augmentation "
             f"{'crop + flip' if recipe.get('augment') else 'off'}, batch "
             f"{cfg['batch_size'] or '16 (ants/bees), 32 (CIFAR-10)'}. "
             f"Seeds {cfg['seeds']} (classifier init, data order, augmentation); mean ± std "
             f"over them. onnxruntime {cfg['threads']} threads, numpy BLAS "
             f"{cfg['blas_threads'] or 'default'} thread(s)."
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
                  "| N | method | val acc % (final) | val acc % (best epoch) | − vanilla "
                  "(points) | beats probe (seeds) | conv weights moved (max ‖Δw‖/‖w‖, %) | "
                  "median step ms | × vanilla | kept for backward, peak (paper) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for a in (a for a in result["aggregate"] if a["dataset"] == dname):
            kept = a["kept_paper_bytes_peak"]
            kept_s = f"{kept / mib:.2f} MiB" if kept >= mib / 10 else f"{kept / 1024:.1f} KiB"
            lines.append(
                f"| {a['layers']} | {a['method']} | {fmt_ms(a['val_accuracy'])} | "
                f"{fmt_ms(a['best_val_accuracy'])} | "
                f"{'-' if a['method'] == 'vanilla' else fmt_ms(a['minus_vanilla_points'], 1.0, 1, True)} | "
                f"{a['beats_probe']}/{len(a['seeds'])} | "
                f"{fmt_ms(a['max_conv_relative_weight_change'], 100.0, 2)} | "
                f"{fmt_ms(a['median_step_seconds'], 1e3, 0)} | "
                f"{'-' if a['method'] == 'vanilla' else fmt_ms(a['step_time_vs_vanilla'], 1.0, 2)} | "
                f"{kept_s} |")
        lines.append("")
    lines += ["## Reading", ""] + [f"- {s}" for s in result["findings"]] + [""]
    lines += ["Columns: *final*: after the last epoch; *best epoch*: the runner's "
              "`best_weights.npz` (the epoch with the best validation accuracy); *− vanilla*: "
              "the method's final accuracy minus vanilla's at the same N and seed, in points, "
              "then mean ± std; *conv weights moved*: the largest relative change of a fine-tuned "
              "conv's weight between the export and the end (the classifier is new, so it is "
              "left out); *median step*: the runner's `median_step_seconds` (the ratios within "
              "one table are the meaningful part); *kept for backward*: peak bytes of the "
              "compressed activations of the fine-tuned convs (paper accounting). Per-run "
              "commands, epoch curves, McNemar tests against vanilla: `accuracy.json`.", ""]
    return "\n".join(lines)


def findings(aggregate: list, probes: dict, data: dict) -> list:
    out = []
    for dname in data:
        rs = [a for a in aggregate if a["dataset"] == dname]
        title = DATASETS[dname]["title"]
        probe = 100 * probes[dname]["acc"]
        hos = [a for a in rs if a["method"] == "hosvd-0.8" and a["minus_vanilla_points"][0]
               is not None]
        for a in hos:
            mean, std = a["minus_vanilla_points"]
            out.append(f"{title}, N={a['layers']}: HOSVD 0.8 − vanilla = {mean:+.1f} ± {std:.1f} "
                       f"points ({'within' if abs(mean) <= 1.0 else 'not within'} one point).")
        beat = [a for a in rs if a["beats_probe"] == len(a["seeds"])]
        best = max(rs, key=lambda a: a["val_accuracy"][0])
        out.append(f"{title}: {len(beat)} of {len(rs)} configurations beat the linear probe "
                   f"({probe:.2f} %) on every seed; best {fmt_ms(best['val_accuracy'])} % "
                   f"({best['method']}, N={best['layers']}).")
        rolled = sum(a["rollbacks"] for a in rs)
        out.append(f"{title}: {rolled} divergence rollback(s) over all runs at the defaults.")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: ants/bees, N=2, vanilla and hosvd-0.8, one seed, 3 steps")
    p.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    p.add_argument("--layers", nargs="+", type=int, default=[2, 4], help="ants/bees N")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                   help="ants/bees methods at each --layers")
    p.add_argument("--all-layers-methods", nargs="*", choices=list(METHODS),
                   default=["vanilla", "hosvd-0.8", "asi-0.8"],
                   help="ants/bees methods with every conv")
    p.add_argument("--cifar-layers", nargs="+", type=int, default=[4])
    p.add_argument("--cifar-methods", nargs="+", choices=list(METHODS),
                   default=["vanilla", "hosvd-0.8", "asi-0.8"])
    p.add_argument("--epochs-hymenoptera", type=int, default=3)
    p.add_argument("--epochs-cifar10", type=int, default=4)
    p.add_argument("--cifar-per-class", type=int, default=0,
                   help="CIFAR-10 training images per class (default 0: all 10,000)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="export batch, the runner's (default: 16 ants/bees, 32 CIFAR-10)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
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
        result["aggregate"] = aggregate(result["rows"], result["probes"])
        result["findings"] = findings(result["aggregate"], result["probes"], result["data"])
        args.render.write_text(json.dumps(result, indent=1) + "\n")
        args.render.with_suffix(".md").write_text(markdown(result))
        print(markdown(result))
        return 0
    if args.quick:
        args.datasets, args.layers, args.methods = ["hymenoptera"], [2], ["vanilla", "hosvd-0.8"]
        args.all_layers_methods, args.seeds = [], [0]
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
    log(f"accuracy study ({'quick' if args.quick else 'full'}): datasets {args.datasets}, "
        f"seeds {args.seeds}; work folder {work}")
    t0 = time.perf_counter()
    try:
        study = run_study(args, paths, work)
    finally:
        if not args.keep and args.work is None and not args.quick:
            shutil.rmtree(work, ignore_errors=True)
    rows = compare(study["runs"], probes)
    import onnxruntime
    result = {
        "study": "issue 13: accuracy at the default recipe", "date": date.today().isoformat(),
        "command": command, "total_seconds": time.perf_counter() - t0,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average at the end "
                   f"{os.getloadavg()[0]:.1f}; numpy {np.__version__}, onnxruntime "
                   f"{onnxruntime.__version__}",
        "model": MODEL,
        "config": {"batch_size": args.batch_size, "seeds": args.seeds, "input_size": 128,
                   "threads": args.threads, "blas_threads": args.blas_threads,
                   "max_steps": args.max_steps, "layers": args.layers, "methods": args.methods,
                   "all_layers_methods": args.all_layers_methods,
                   "cifar_layers": args.cifar_layers, "cifar_methods": args.cifar_methods,
                   "method_flags": {m: {"method": METHODS[m][0], "eps": METHODS[m][1]}
                                    for m in METHODS}},
        "data": {k: {kk: (shorten(str(vv)) if isinstance(vv, Path) else vv)
                     for kk, vv in v.items()} for k, v in study["data"].items()},
        "probes": probes, "rows": rows}
    result["aggregate"] = aggregate(rows, probes)
    result["findings"] = findings(result["aggregate"], probes, study["data"])
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
