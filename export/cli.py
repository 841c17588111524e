"""`actcomp export`: model + weights -> training artifact folder."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from actcomp_edge.core.manifest import folder_classes
from actcomp_edge.core.memory import LayerPlan, Plan, plan_table
from actcomp_edge.core.methods import METHODS

from . import zoo
from .artifact import check_out_dir, export_artifact
from .training_graph import TrainConfig


def plan_from_manifest(manifest: dict) -> Plan:
    m = manifest["predicted_memory"]
    result = Plan(m["model"], m["method"], m["batch_size"], tuple(m["input_size"]), m["eps"],
                  m["rank_basis"])
    result.layers = [LayerPlan(**dict(layer, input_shape=tuple(layer["input_shape"])))
                     for layer in m["layers"]]
    return result


def train_config(args) -> TrainConfig:
    """The recipe the flags give, checked (TrainConfig.check)."""
    config = TrainConfig(n_layers=args.layers, method=args.method, eps=args.eps,
                         ranks=tuple(args.ranks) if args.ranks else None,
                         rank_cap=args.rank_cap, optimizer=args.optimizer,
                         momentum=args.momentum, weight_decay=args.weight_decay,
                         label_smoothing=args.label_smoothing,
                         activation_budget=args.activation_budget)
    config.check()
    return config


def run_export(args) -> int:
    # before any work: a refused folder, a recipe that would train wrongly, a missing file
    check_out_dir(args.out, args.force)
    if METHODS[args.method].ranks and args.eps is None and args.ranks is None and \
            args.activation_budget is None:
        raise ValueError(f"--method {args.method} needs --eps (e.g. 0.8) or --ranks"
                         + (" or --activation-budget" if METHODS[args.method].tracker else ""))
    config = train_config(args)
    classes = None
    if args.classes:
        classes = class_names(Path(args.classes))
        if args.num_classes and len(classes) != args.num_classes:
            raise ValueError(f"--classes lists {len(classes)} names but --num-classes is "
                             f"{args.num_classes}")
        args.num_classes = args.num_classes or len(classes)
    if ".py:" in args.model:
        return export_model_file(args, classes)
    torch.manual_seed(args.seed)
    spec = zoo.load_spec(args.model, args.num_classes)
    if args.weights:
        model = zoo.build_from_name(args.model, args.num_classes, args.weights)
        if model.weights_note:
            print(f"note: {model.weights_note}")
    else:
        model = zoo.build_model(spec)
        print(f"warning: no --weights given: {spec.get('name')} is randomly initialised "
              f"(seed {args.seed})", file=sys.stderr)
    spec = model.spec
    size = args.input_size or (int(spec.get("input", {}).get("resolution", 224)),) * 2
    arrays = zoo.model_arrays(model, spec)
    manifest = export_artifact(spec, arrays, args.out, config, args.batch_size, size, classes,
                               args.force)
    return report(manifest, args)


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


def export_model_file(args, classes) -> int:
    """--model FILE.py:FUNCTION: the user's nn.Module through the torch frontend."""
    from .module_export import export_module, load_model_file, load_state
    torch.manual_seed(args.seed)
    module = load_model_file(args.model)
    if args.weights:
        load_state(module, args.weights)
    else:
        print(f"warning: no --weights given: {args.model} keeps the weights FUNCTION() made",
              file=sys.stderr)
    manifest = export_module(
        module, args.out, input_size=args.input_size or (224, 224), batch_size=args.batch_size,
        layers=args.layers, method=args.method, eps=args.eps, ranks=args.ranks,
        rank_cap=args.rank_cap, num_classes=args.num_classes, classes=classes,
        optimizer=args.optimizer, momentum=args.momentum, weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing, activation_budget=args.activation_budget,
        norm=args.input_norm, seed=args.seed, name=model_file_name(args.model),
        force=args.force)
    return report(manifest, args)


def model_file_name(ref: str) -> str:
    """The artifact's model name for FILE.py:FUNCTION: the file's stem, and the function's
    name unless it is the usual build (my_net.py:build -> my_net; nets.py:small -> nets.small)."""
    path, _, function = ref.rpartition(":")
    stem = Path(path).stem
    return stem if function == "build" else f"{stem}.{function}"


def report(manifest: dict, args) -> int:
    if manifest.get("dropout_not_applied"):
        print(f"note: {manifest['model']}'s dropout (p={manifest['dropout_not_applied']} before "
              f"the classifier) is not in the training graphs: it fine-tunes without it")
    print(f"wrote training artifact {args.out} ({len(manifest['files'])} files, "
          f"{len(manifest['graphs']['forward'])} forward partitions)")
    print(plan_table(plan_from_manifest(manifest), args.layers))
    return 0
