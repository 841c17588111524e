"""`actcomp export`: model + weights -> training artifact folder. The parser and the checks
before any work import neither torch nor onnx (`actcomp plan` builds this parser too): the
functions that export import them."""
from __future__ import annotations

import sys
from pathlib import Path

from actcomp_edge.core.arch import ZOO
from actcomp_edge.core.cliutil import (add_rank_arguments, input_size, positive_int,
                                       refuse_unused_rank_flags, size_bytes)
from actcomp_edge.core.manifest import Manifest, folder_classes
from actcomp_edge.core.memory import Plan, plan_table
from actcomp_edge.core.methods import METHODS, RANKED


def add_export_parser(subparsers) -> None:
    """The `export` subcommand (--eps | --ranks, --rank-cap and --input-size as `plan` takes
    them; the host's main makes a single --rank-cap an int)."""
    e = subparsers.add_parser("export", help="build a training artifact for the device",
                              description="Turn a model (zoo name or spec .json) with "
                                          "optional .npz weights into a training artifact "
                                          "folder: ONNX training-step graphs whose fine-tuned "
                                          "convs keep only compressed activations, weights, "
                                          "optimizer state and manifest.json.")
    e.add_argument("--model", required=True,
                   help=f"zoo name ({', '.join(sorted(ZOO))}), an architecture spec .json "
                        "(the format of ../shared/weights/*.json), or FILE.py:FUNCTION where "
                        "FUNCTION() returns your torch.nn.Module (README: supported ops)")
    e.add_argument("--weights", help=".npz, .pth/.pt (tensors only) or .safetensors whose names "
                                     "match the model; without it the model is randomly "
                                     "initialised (--seed)")
    e.add_argument("--input-norm", choices=("half", "imagenet"), default="half",
                   help="FILE.py:FUNCTION models: the input normalisation the module expects "
                        "(half: mean = std = 0.5; imagenet: torchvision's; default half)")
    e.add_argument("--num-classes", type=positive_int,
                   help="classifier outputs; when it differs from the weights' classifier, the "
                        "classifier is re-initialised (default: the weights' / 1000)")
    e.add_argument("--classes", help="the class names: a text file with one a line, or an "
                                     "ImageFolder (its sub-folder names, sorted, as the runner "
                                     "reads them) (optional)")
    e.add_argument("--layers", type=positive_int, required=True,
                   help="fine-tune the last N Conv2d modules and the classifier")
    e.add_argument("--method", choices=list(METHODS), default="hosvd",
                   help="what the backward keeps of each fine-tuned conv input (default hosvd): "
                        "vanilla (all of it), hosvd (the paper: eps ranks recomputed every "
                        "step), asi (ranks fixed at the first step, factors followed by one "
                        "subspace iteration a step: the fast one), svd (mode-1), gf-r2 "
                        "(Gradient Filter)")
    add_rank_arguments(e, "; hosvd and svd recompute eps ranks every step (the paper's rule), "
                          "asi fixes them at the first step")
    e.add_argument("--activation-budget", type=size_bytes, metavar="SIZE",
                   help="asi: the bytes every fine-tuned layer's kept activations may take "
                        "together (e.g. 2MiB); the board chooses the ranks that fit on its "
                        "first batch (the most energy kept per byte), instead of --eps")
    e.add_argument("--batch-size", type=positive_int, default=32,
                   help="training batch size the memory prediction is made for (default 32; the "
                        "graphs accept any batch)")
    e.add_argument("--input-size", type=input_size,
                   help="training resolution, 128 or HxW (default: the model's own)")
    e.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                   help="update rule baked into the backward graph (default sgd)")
    e.add_argument("--momentum", type=float, default=0.0,
                   help="SGD momentum (default 0, the paper's recipe; the runner's default lr "
                        "is 0.05 x (1 - momentum))")
    e.add_argument("--weight-decay", type=float, default=0.0,
                   help="weight decay (SGD: L2 added to the gradient; AdamW: decoupled)")
    e.add_argument("--label-smoothing", type=float, default=0.0,
                   help="cross-entropy label smoothing in [0, 1) (default 0)")
    e.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    e.add_argument("-o", "--out", required=True,
                   help="artifact folder to create (an existing one is refused unless --force)")
    e.add_argument("--force", action="store_true",
                   help="replace the artifact in -o; anything else in the folder (its run/) is "
                        "kept")
    e.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    """Exit 0, 2 for an input refused (ValueError, reported by the host's main) or a file
    error, 130 on Ctrl-C (the half-written export is removed; -o is as it was)."""
    try:
        return report(run_export(args), args)
    except OSError as e:  # -o under /proc, a full disk, an unreadable --classes file
        where = f"{e.filename}: " if e.filename else ""
        print(f"actcomp: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"actcomp: interrupted: nothing was written to {args.out}", file=sys.stderr)
        return 130


def run_export(args) -> Manifest:
    """The artifact the flags describe, written to -o; returns its manifest. A refused
    folder, a recipe that would train wrongly and a missing --classes file are refused
    before any work."""
    from .artifact import check_out_dir  # onnx: only once an export runs
    check_out_dir(args.out, args.force)
    config = train_config(args)
    classes = class_names(Path(args.classes)) if args.classes else None
    num_classes = class_count(args.num_classes, classes)
    if ".py:" in args.model:
        return export_model_file(args, config, classes, num_classes)
    return export_zoo_model(args, config, classes, num_classes)


def train_config(args):
    """The TrainConfig the flags give, checked (TrainConfig.check); a method with ranks
    needs --eps or --ranks (asi: or --activation-budget)."""
    from .training_graph import TrainConfig  # onnx: only once an export runs
    row = METHODS[args.method]
    refuse_unused_rank_flags(args, RANKED)
    if row.ranks and args.eps is None and args.ranks is None and args.activation_budget is None:
        raise ValueError(f"--method {args.method} needs --eps (e.g. 0.8) or --ranks"
                         + (" or --activation-budget" if row.tracker else ""))
    config = TrainConfig(n_layers=args.layers, method=args.method, eps=args.eps,
                         ranks=tuple(args.ranks) if args.ranks else None,
                         rank_cap=args.rank_cap, optimizer=args.optimizer,
                         momentum=args.momentum, weight_decay=args.weight_decay,
                         label_smoothing=args.label_smoothing,
                         activation_budget=args.activation_budget)
    config.check()
    return config


def class_names(path: Path) -> list:
    """--classes: a text file's non-empty lines, or an ImageFolder's sub-folder names in the
    order the runner's data loader gives them labels (sorted)."""
    if path.is_dir():
        names = folder_classes(path)
        if not names:
            raise ValueError(f"--classes {path}: a folder without class sub-folders "
                             f"(expected {path}/<class>/<image>)")
        return names
    if not path.is_file():
        raise ValueError(f"--classes {path}: no such file (one class name a line) or "
                         f"ImageFolder")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def class_count(num_classes: int | None, classes: list | None) -> int | None:
    """--num-classes, else the number of --classes names (None: the model's own)."""
    if classes and num_classes and len(classes) != num_classes:
        raise ValueError(f"--classes lists {len(classes)} names but --num-classes is "
                         f"{num_classes}")
    return num_classes or (len(classes) if classes else None)


def export_zoo_model(args, config, classes, num_classes) -> Manifest:
    """--model NAME or SPEC.json: the zoo's architecture, its weights or a random
    initialisation (--seed), at --input-size or the spec's resolution."""
    import torch  # torch + onnx: only once an export runs

    from . import zoo
    from .artifact import export_artifact
    torch.manual_seed(args.seed)
    spec = zoo.load_spec(args.model, num_classes)
    if args.weights:
        model = zoo.build_from_name(args.model, num_classes, args.weights)
        if model.weights_note:
            print(f"note: {model.weights_note}")
    else:
        model = zoo.build_model(spec)
        print(f"warning: no --weights given: {spec.get('name')} is randomly initialised "
              f"(seed {args.seed})", file=sys.stderr)
    spec = model.spec
    size = args.input_size or (int(spec.get("input", {}).get("resolution", 224)),) * 2
    return export_artifact(spec, zoo.model_arrays(model, spec), args.out, config,
                           args.batch_size, size, classes, args.force)


def export_model_file(args, config, classes, num_classes) -> Manifest:
    """--model FILE.py:FUNCTION: the user's nn.Module through the torch frontend, at
    --input-size or 224."""
    import torch  # torch + onnx: only once an export runs

    from .module_export import ModuleOptions, export_module, load_model_file, load_state
    torch.manual_seed(args.seed)
    module = load_model_file(args.model)
    if args.weights:
        load_state(module, args.weights)
    else:
        print(f"warning: no --weights given: {args.model} keeps the weights FUNCTION() made",
              file=sys.stderr)
    options = ModuleOptions(input_size=args.input_size or (224, 224), batch_size=args.batch_size,
                            num_classes=num_classes, classes=classes, norm=args.input_norm,
                            seed=args.seed, name=model_file_name(args.model), force=args.force)
    return export_module(module, args.out, config, options)


def model_file_name(ref: str) -> str:
    """The artifact's model name for FILE.py:FUNCTION: the file's stem, and the function's
    name unless it is the usual build (my_net.py:build -> my_net; nets.py:small -> nets.small)."""
    path, _, function = ref.rpartition(":")
    stem = Path(path).stem
    return stem if function == "build" else f"{stem}.{function}"


def report(manifest: Manifest, args) -> int:
    """What was written: the dropout left out, the files, the predicted memory table."""
    if manifest.dropout_not_applied:
        print(f"note: {manifest.model}'s dropout (p={manifest.dropout_not_applied} before "
              f"the classifier) is not in the training graphs: it fine-tunes without it")
    print(f"wrote training artifact {args.out} ({len(manifest.files)} files, "
          f"{len(manifest.graphs.forward)} forward partitions)")
    print(plan_table(Plan.from_json(manifest.predicted_memory.to_json()), args.layers))
    return 0
