"""`actcomp-device`: the board's command line (numpy + onnxruntime + pyserial; never torch)."""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from actcomp_edge.core import names, schedules
from actcomp_edge.core.cliutil import (Parser, non_negative_float, positive_float, positive_int,
                                  size_bytes)
from actcomp_edge.core.manifest import ArtifactError
from actcomp_edge.core.npz import NpzError

from . import data as data_module
from . import procmem, recipe
from .checkpoint import CheckpointError
from .runtime import KERNELS, MemoryBudgetError
from .session import Session, input_size, load_trainer
from .train import BudgetError, Options, TrainingError, evaluate, write_summary


def check_train_args(args) -> None:
    """Refuse (ValueError) arguments that cannot work, before any work."""
    if args.report:  # a link that cannot work is refused before any work
        from .transport import check_url
        check_url(args.report)
    schedules.parse_schedule(args.schedule)
    if args.cache_prefix and not args.no_augment:
        raise ValueError("--cache-prefix needs --no-augment: augmented crops differ every epoch")
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")


def load_sets(args, session: Session) -> tuple:
    """(training set, validation set): --data and --val-data, or a seeded split of --data;
    what could not be read or was stretched is said on stderr."""
    # images decoded at load time are spooled to disk beside the artifact, not held in memory
    data = session.load_data(args.data, spool_dir=args.artifact)
    if data.skipped:
        shown = "; ".join(f"{path}: {why}" for path, why in data.skipped[:SKIPPED_SHOWN])
        more = len(data.skipped) - SKIPPED_SHOWN
        print(f"skipped {len(data.skipped)} unreadable or non-image files ({shown}"
              + (f"; and {more} more" if more > 0 else "") + ")", file=sys.stderr)
    if data.stretched:
        h, w = input_size(session.trainer)
        print(f"note: {len(data.stretched)} images were resized to {w}x{h} with their aspect "
              f"ratio changed more than {data_module.STRETCH_NOTED:g}x (the whole image, no "
              f"crop), e.g. {data.stretched[0]}", file=sys.stderr)
    if args.val_data:
        return data, session.load_data(args.val_data, spool_dir=args.artifact)
    if len(data) < 2:
        raise data_module.DataError("need at least 2 images to hold some out for validation")
    return data.split(args.val_fraction, args.seed)


def train_options(args, session: Session) -> Options:
    """The run's Options from the arguments, the artifact's recipe where none is given."""
    train = session.trainer.manifest.train
    return Options(epochs=args.epochs, batch_size=session.batch_size,
                   lr=args.lr or recipe.default_lr(train.optimizer, train.momentum),
                   seed=args.seed, schedule=args.schedule, clip_norm=args.clip_grad_norm or None,
                   augment=not args.no_augment, cache_prefix=args.cache_prefix,
                   max_steps=args.max_steps, checkpoint_every=args.checkpoint_every,
                   budget_bytes=args.budget, resume=args.resume, report_every=args.report_every)


def print_plan(session: Session, train_set, val_set, options: Options) -> None:
    """What is fine-tuned, on how many images, with which recipe."""
    m = session.trainer.manifest
    print(f"{m.model}: {len(m.trainable_layers)} fine-tuned convs, method "
          f"{m.train.method}; {len(train_set)} training / {len(val_set)} validation images, "
          f"batch {options.batch_size}")
    print(f"recipe: {m.train.optimizer}"
          + (f" momentum {m.train.momentum}" if m.train.optimizer == "sgd" else "")
          + f", lr {options.lr:g} {options.schedule}, clip grad norm {options.clip_norm or 'off'}"
          + ", augment " + ("crop+flip" if options.augment else "off"))
    if m.dropout_not_applied:
        print(f"note: the model's dropout (p={m.dropout_not_applied} before the classifier) "
              f"is not applied: the artifact's graphs have none")
    if options.cache_prefix and session.trainer.prefix is None:
        print("note: every conv is fine-tuned (no frozen prefix): --cache-prefix keeps nothing")


def print_result(summary: dict, rank_basis: str) -> None:
    """The measured working set against the memory plan's (of ``rank_basis`` ranks), and
    where the final and best weights are."""
    mib = 2 ** 20
    basis = (f"the ranks the steps saw; at their bound "
             f"{summary['bound_working_set_bytes'] / mib:.1f} MiB"
             if summary.get("predicted_ranks") == "seen" else f"{rank_basis} ranks")
    print(f"working set: predicted {summary['predicted_working_set_bytes'] / mib:.1f} MiB "
          f"(memory plan, {basis}), measured {summary['working_set_bytes'] / mib:.1f} MiB")
    print(f"done: {summary['steps']} steps, val accuracy {summary['final_val_accuracy']:.4f}; "
          f"weights {summary['outputs']['weights']}, inference model "
          f"{summary['outputs']['inference']}")
    print(f"best: val accuracy {summary['best_val_accuracy']:.4f} after epoch "
          f"{summary['best_epoch']}; {summary['outputs']['best_weights']}, "
          f"{summary['outputs']['best_inference']}")


def cmd_train(args) -> int:
    check_train_args(args)
    procmem.import_numpy_random()  # before anything draws a random number (a data split)
    # a budget the plan cannot meet is refused before the data loads
    session = Session.open(args.artifact, args.batch_size, args.budget, args.threads,
                           kernels=args.kernels)
    train_set, val_set = load_sets(args, session)
    options = train_options(args, session)
    print_plan(session, train_set, val_set, options)
    summary = session.train(train_set, val_set, args.out, options, args.report,
                            Path(args.out) / "spool", args.report_timeout)
    if args.summary:
        write_summary(args.summary, summary)
    print_result(summary, session.trainer.manifest.memory_plan.rank_basis)
    if args.budget is not None and summary["budget_violations"]:
        print(f"budget exceeded on {summary['budget_violations']} steps", file=sys.stderr)
        return 4
    return 0


def cmd_eval(args) -> int:
    trainer = load_trainer(args.artifact, args.threads)
    if args.weights:
        from actcomp_edge.core.npz import load_npz
        arrays = names.checkpoint_arrays(load_npz(args.weights), trainer.state)
        trainer.load_state_arrays({**arrays, "step_count": trainer.step_count})
    data = data_module.load(args.data, input_size(trainer), trainer.manifest.num_classes,
                            trainer.manifest.classes)
    accuracy = evaluate(trainer, data, args.batch_size)
    if args.write_inference:  # the evaluated weights as a stand-alone inference model
        from actcomp_edge.core.npz import write_atomic
        write_atomic(Path(args.write_inference), trainer.inference_model())
    print(json.dumps({"images": len(data), "accuracy": accuracy, "skipped": len(data.skipped)}))
    return 0


def prediction_model(path: Path) -> Path:
    """RUN/ (its inference.onnx) or a .onnx file; DataError (one line) otherwise."""
    model = path / "inference.onnx" if path.is_dir() else path
    if not model.is_file():
        raise data_module.DataError(f"{path}: no inference model (give a run folder with "
                                    f"inference.onnx, or the .onnx file)")
    return model


def image_files(specs: list) -> list:
    """Image paths from files, folders (every image below) and glob patterns, in order."""
    import glob
    files = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.suffix.lower()
                           in data_module.IMAGE_SUFFIXES)
        elif path.exists():
            found = [path]
        else:
            found = [Path(f) for f in sorted(glob.glob(spec))]
        if not found:
            raise data_module.DataError(f"{spec}: no such image, folder or pattern")
        files += found
    return files


def cmd_predict(args) -> int:
    """Each image's class name and softmax score, from a trained inference model alone (its
    metadata_props say the classes, the input size and the normalisation)."""
    import numpy as np
    import onnxruntime as ort
    from PIL import Image, UnidentifiedImageError
    model = prediction_model(Path(args.run))
    files = image_files(args.images)
    options = ort.SessionOptions()
    if args.threads:
        options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    if "classes" not in meta:
        raise data_module.DataError(f"{model} has no class names in its metadata (made before "
                                    f"they were written: train again or use actcomp-device eval)")
    classes = json.loads(meta["classes"])
    size = tuple(json.loads(meta["input_size"]))
    norm = json.loads(meta["normalization"])
    failed = 0
    for file in files:
        try:
            with Image.open(file) as im:
                rgb = np.asarray(im.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError) as e:
            print(f"{file}: unreadable: {str(e).splitlines()[0]}", file=sys.stderr)
            failed += 1
            continue
        x = data_module.Dataset(data_module.resize(rgb, size)[None], np.zeros(1, np.int64),
                                classes).batch([0], norm["mean"], norm["std"])[0]
        logits = session.run(None, {meta["input_name"]: x})[0][0]
        p = np.exp(logits - logits.max())
        p /= p.sum()
        best = int(np.argmax(p))
        print(f"{file}: {classes[best]} {p[best]:.3f}")
    return 2 if failed else 0


def cmd_info(args) -> int:
    from importlib.metadata import PackageNotFoundError, version
    from actcomp_edge.core.manifest import load_manifest
    try:  # the installed onnxruntime, without importing it
        runtime = version("onnxruntime")
    except PackageNotFoundError:
        runtime = None
    m = load_manifest(args.artifact, runtime)
    mem = m.predicted_memory
    mib = 2 ** 20
    print(f"{m.model} training artifact (format {m.format_version}, opset {m.opset}, "
          f"needs onnxruntime >= {m.min_onnxruntime})")
    print(f"input {m.input.height}x{m.input.width}, {m.num_classes} classes, "
          f"batch {m.batch_size}")
    print(f"fine-tuned: {', '.join(layer.name for layer in m.trainable_layers)} + classifier")
    print(f"method {m.train.method}, eps {m.train.eps}, ranks {m.train.ranks}, "
          f"optimizer {m.train.optimizer}")
    print(f"kept for backward (predicted, {mem.rank_basis}): paper {mem.paper_bytes / mib:.2f}"
          f" MiB, full {mem.full_bytes / mib:.2f} MiB")
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        print(f"this board: {total / mib:.0f} MiB RAM, {avail / mib:.0f} MiB free; the kept "
              f"activations use {100 * mem.full_bytes / max(1, avail):.2f} % of the free memory "
              f"(run `actcomp-device train --budget ...` for a measured check)")
    except (ValueError, OSError, AttributeError):
        pass
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="actcomp-device", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_train(sub)
    add_eval(sub)
    add_predict(sub)
    i = sub.add_parser("info", help="what an artifact is, its predicted memory, this board")
    i.add_argument("artifact")
    i.set_defaults(func=cmd_info)
    return parser


def add_train(sub) -> None:
    t = sub.add_parser("train", help="fine-tune an artifact on local images",
                       description="Verify the artifact, load the data, fine-tune, evaluate each "
                                   "epoch, checkpoint, and write the fine-tuned weights and an "
                                   "inference ONNX model.")
    t.add_argument("artifact", help="training artifact folder (from `actcomp export`)")
    t.add_argument("--data", required=True,
                   help="ImageFolder-style directory (one sub-folder per class) or .npz "
                        "(uint8 images (N,H,W,3) + labels)")
    t.add_argument("--val-data", help="held-out set (default: a seeded split of --data)")
    t.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of --data held out when --val-data is not given (default 0.1)")
    t.add_argument("--epochs", type=positive_int, default=1, help="epochs (default 1)")
    t.add_argument("--max-steps", type=positive_int, help="stop after K steps")
    t.add_argument("--batch-size", type=positive_int, help="default: the artifact's")
    t.add_argument("--lr", type=positive_float,
                   help=f"peak learning rate (default: SGD {recipe.BASE_LR} x (1 - the artifact's "
                        f"momentum), AdamW {recipe.ADAMW_LR})")
    t.add_argument("--schedule", default=schedules.DEFAULT_SCHEDULE,
                   help=f"learning-rate schedule over the run's steps: "
                        f"{', '.join(schedules.SCHEDULES)} (default {schedules.DEFAULT_SCHEDULE})")
    t.add_argument("--clip-grad-norm", type=non_negative_float, default=recipe.DEFAULT_CLIP_NORM,
                   help=f"clip the gradients' global L2 norm to this (default "
                        f"{recipe.DEFAULT_CLIP_NORM}; 0: off)")
    t.add_argument("--no-augment", action="store_true",
                   help="no random resized crop + horizontal flip of the training images")
    t.add_argument("--cache-prefix", action="store_true",
                   help="keep the frozen prefix's outputs of every training image after its "
                        "first pass (needs --no-augment; costs RAM, printed): later epochs skip "
                        "the prefix")
    t.add_argument("--seed", type=int, default=0, help="data order and split seed (default 0)")
    t.add_argument("--threads", type=positive_int,
                   help="threads of onnxruntime and of numpy's BLAS, which take turns (default: "
                        "the --profile's cores, else all cores)")
    t.add_argument("--kernels", choices=KERNELS, default=KERNELS[0],
                   help="auto: the artifact's graphs on onnxruntime's NCHWc kernels where this "
                        "onnxruntime passes their probe (x86-64), else the portable ones "
                        "(default auto; the summary's 'kernels' says which ran)")
    t.add_argument("--budget", type=size_bytes,
                   help="memory budget for the training working set, e.g. 48MiB: checked by a "
                        "dry-run step before training, violations counted per step")
    t.add_argument("--profile", help="device profile (.toml, or a name in profiles/): its "
                                     "budget and cores are the defaults of --budget, --threads")
    t.add_argument("--report", help="where to stream memory profiles: /dev/ttyUSB0, "
                                    "socket://host:port, loop://, file://path.jsonl")
    t.add_argument("--report-every", type=positive_int, default=1,
                   help="send a profile record every K steps (always on a budget violation)")
    t.add_argument("--report-timeout", type=float, default=10.0,
                   help="seconds to wait at the end for the host to acknowledge (default 10)")
    t.add_argument("--checkpoint-every", type=positive_int, default=50,
                   help="checkpoint every K steps, and at every epoch end (default 50)")
    t.add_argument("--resume", action="store_true",
                   help="continue from the last good checkpoint in --out, same data order")
    t.add_argument("--out", help="output folder (default: ARTIFACT/run)")
    t.add_argument("--summary", help="write a JSON summary here at the end")
    t.set_defaults(func=cmd_train)


def add_eval(sub) -> None:
    e = sub.add_parser("eval", help="accuracy of an artifact (or trained weights) on images")
    e.add_argument("artifact")
    e.add_argument("--data", required=True, help="ImageFolder directory or .npz")
    e.add_argument("--weights", help="trained weights.npz (default: the artifact's)")
    e.add_argument("--batch-size", type=positive_int, default=32)
    e.add_argument("--threads", type=positive_int)
    e.add_argument("--write-inference", metavar="MODEL.onnx",
                   help="also write the inference ONNX model with these weights (e.g. a "
                        "fleet's global_weights.npz)")
    e.set_defaults(func=cmd_eval)


def add_predict(sub) -> None:
    r = sub.add_parser("predict", help="classify images with a trained run's inference model",
                       description="Print each image's class name and score (softmax) from "
                                   "RUN/inference.onnx alone: its metadata say the classes, "
                                   "the input size and the normalisation (README: Deploy).")
    r.add_argument("run", metavar="RUN", help="a run folder (its inference.onnx) or a .onnx")
    r.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files, folders (every image below them) or glob patterns")
    r.add_argument("--threads", type=positive_int)
    r.set_defaults(func=cmd_predict)


SKIPPED_SHOWN = 5  # unreadable files named on the console (the rest counted)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "profile", None):
        from actcomp_edge.core.profiles import ProfileError, load_profile
        try:
            profile = load_profile(args.profile)
        except ProfileError as e:
            print(f"actcomp-device: error: {e}", file=sys.stderr)
            return 2
        if args.budget is None:
            args.budget = profile.budget_bytes
        if args.threads is None:
            args.threads = profile.cores
            here = os.cpu_count() or profile.cores
            print(f"note: --threads {profile.cores} from profile {profile.name}"
                  + (f" (this machine has {here} cores: give --threads {here} to match it)"
                     if here < profile.cores else ""), file=sys.stderr)
    if getattr(args, "out", "unset") is None:
        args.out = str(Path(args.artifact) / "run")
    try:
        return args.func(args)
    except MemoryBudgetError as e:
        print(f"actcomp-device: error: {e}; the last checkpoint is intact (--resume with a "
              f"larger --budget or a smaller --batch-size)", file=sys.stderr)
        return 3
    except BudgetError as e:
        print(f"actcomp-device: error: {e}", file=sys.stderr)
        return 3
    except (ArtifactError, NpzError, data_module.DataError, TrainingError, ValueError) as e:
        print(f"actcomp-device: error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"actcomp-device: error: {e}; free some space and --resume", file=sys.stderr)
        return 5
    except OSError as e:  # e.g. the disk filled up while writing the results
        where = f"{e.filename}: " if e.filename else ""
        hint = ("; the checkpoints are intact (free some space and --resume)"
                if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG) else "")
        print(f"actcomp-device: error: {where}{e.strerror or e}{hint}", file=sys.stderr)
        return 5
    except KeyboardInterrupt:
        print("actcomp-device: interrupted (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
