"""Write a training artifact folder (see ``actcomp_edge.core.manifest``) from a spec and weights."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import onnx

from actcomp_edge.core import arch, rank_budget
from actcomp_edge.core.manifest import (FORMAT, FORMAT_VERSION, MANIFEST, MIN_ONNXRUNTIME,
                                   manifest_bytes, sha256_file)
from actcomp_edge.core.memory import plan
from actcomp_edge.core.methods import method as method_row
from actcomp_edge.core.npz import save_npz, write_atomic
from actcomp_edge.core.program import build_program, check_input_size, network_of

from .memory_plan import choose_micro_batches, concrete, rank_dims, step_plan
from .onnx_graph import IR_VERSION, OPSET
from .training_graph import (TrainConfig, backward_partitions, conv_layer, eval_graph,
                             forward_partitions, head_tensors, optimizer_state, overview_graph,
                             split_program, update_graph)


def save_model(model: onnx.ModelProto, path: Path) -> None:
    write_atomic(path, model.SerializeToString(deterministic=True))


def check_out_dir(out_dir, force: bool = False) -> Path:
    """The artifact folder -o names, refused (ValueError, one line) before any work when it
    is a file, or a folder with something in it and no --force."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"-o {out} is an existing file, not a folder: choose another -o")
    if out.is_dir() and any(out.iterdir()) and not force:
        what = "an artifact" if (out / MANIFEST).exists() else "a folder that is not empty"
        kept = " and its run/" if (out / "run").exists() else ""
        raise ValueError(f"-o {out} is {what}: choose a new -o, or pass --force to replace "
                         f"the artifact's files (anything else in it{kept} is kept)")
    return out


def staging_dir(out: Path) -> Path:
    """A fresh empty folder beside out that the export writes into, then publishes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    return stage


def publish(stage: Path, out: Path) -> None:
    """Move a finished export from stage into out. A new out: one rename. An existing one
    (--force): its old manifest goes first (a crash in between leaves a folder the runner
    refuses, never a mix it would train), then the files the old manifest listed, then each
    new file by rename, the manifest last; nothing else in out (run/) is touched."""
    if not out.exists():
        os.replace(stage, out)
        return
    old = out / MANIFEST
    listed = []
    if old.is_file():
        try:
            listed = list(json.loads(old.read_text()).get("files", {}))
        except (ValueError, OSError, AttributeError):
            listed = []
        old.unlink()
    for name in listed:
        if "/" not in name and (out / name).is_file():
            (out / name).unlink()
    for path in sorted(stage.iterdir(), key=lambda p: p.name == MANIFEST):
        os.replace(path, out / path.name)
    stage.rmdir()


def export_artifact(spec: dict, arrays: dict, out_dir, config: TrainConfig, batch_size: int,
                    input_size, classes=None, force: bool = False) -> dict:
    """A built-in architecture (spec) and its weights -> artifact (export_program)."""
    hw = check_input_size(spec, input_size)
    norm = (spec.get("input") or {}).get("normalize") or arch.HALF_NORM
    dropout = float((spec.get("classifier") or {}).get("dropout") or 0.0)
    return export_program(build_program(spec, arrays, hw), out_dir, config, batch_size, classes,
                          norm, dropout, force)


def export_program(program, out_dir, config: TrainConfig, batch_size: int, classes=None,
                   norm=arch.HALF_NORM, dropout: float = 0.0, force: bool = False) -> dict:
    """Build every graph of the program, its weights and the manifest, then publish them into
    out_dir (check_out_dir, publish); returns the manifest. norm: the input's {"mean", "std"};
    dropout: the p the graphs leave out. Nothing is written when the config or the folder is
    refused; an interrupted export leaves out_dir as it was."""
    out = check_out_dir(out_dir, force)
    config.check()
    row = method_row(config.method)
    split = split_program(program, config.n_layers)
    if row.square_only:
        for op in split.trainable_convs:
            conv = conv_layer(program, op)
            if not conv.square:
                raise ValueError(f"{row.name} needs square kernels, strides and paddings and "
                                 f"dilation 1: {op.name} has kernel {conv.kernel}, stride "
                                 f"{conv.stride}, padding {conv.padding}, dilation "
                                 f"{conv.dilation} (use another --method or fewer --layers)")
    if config.activation_budget is not None:  # the smallest budget: rank 1 everywhere
        need = rank_budget.minimum_bytes({op.name: (batch_size,) + tuple(
            program.shapes[op.inputs[0]]) for op in split.trainable_convs})
        if config.activation_budget < need:
            raise ValueError(f"--activation-budget {config.activation_budget / 2 ** 20:.3g} MiB "
                             f"is below rank 1 in every mode of the {len(split.trainable_convs)} "
                             f"fine-tuned convs ({need / 2 ** 20:.3g} MiB at batch {batch_size})")
    stage = staging_dir(out)
    try:
        manifest = write_artifact(program, stage, config, batch_size, classes, norm, dropout,
                                  split)
        publish(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return manifest


def write_artifact(program, out: Path, config: TrainConfig, batch_size: int, classes, norm,
                   dropout: float, split) -> dict:
    """Every file of the artifact into the (empty) folder out; returns the manifest."""
    hw = tuple(program.shapes["image"][1:])
    row = method_row(config.method)
    files = {}
    forward, schedule, models = [], [], {}
    partitions = forward_partitions(split, config)
    # masks (and max-pool argmaxes, saved activations, factors, a squeeze-excitation Linear's
    # input) made between fine-tuned conv i and the next belong to conv i (full accounting);
    # the head's to the classifier
    head = head_tensors(program)
    linear_inputs = {op.inputs[0] for op in program.ops if op.kind == "linear"} - head
    masks = [[t for t in outputs if (t.endswith(("/mask_bits", "/act_saved", "/argmax"))
                                     or "/factor_" in t) and t.rpartition("/")[0] not in head
              or t in linear_inputs]
             for _, _, outputs in partitions[1:]]
    for p, (g, _, _) in enumerate(partitions):
        if p >= 1:  # the input of fine-tuned conv p is ready: the device decomposes it
            schedule.append({"compress": split.trainable_convs[p - 1].name})
        if not g.nodes:  # every conv fine-tuned: no frozen prefix
            continue
        name = f"forward_{p}.onnx"
        models[name] = g.model()
        save_model(models[name], out / name)
        forward.append(name)
        schedule.append({"run": name})
    backward = []
    for p, g in backward_partitions(split, config):
        name = f"backward_{p}.onnx"
        models[name] = g.model()
        save_model(models[name], out / name)
        backward.append((name, g))
        schedule.append({"run": name})
    update = update_graph(split, config)
    models["update.onnx"] = update.model()
    save_model(models["update.onnx"], out / "update.onnx")
    schedule.append({"run": "update.onnx"})
    backward.append(("update.onnx", update))
    graphs = {"forward": forward, "backward": [name for name, _ in backward],
              "evaluate": "evaluate.onnx", "inference": "inference.onnx",
              "overview": "overview.onnx"}
    overview = overview_graph([g for g, _, _ in partitions], split, [g for _, g in backward],
                              config).model(check=False)
    overview = onnx.shape_inference.infer_shapes(overview)  # a shape on every edge (Netron)
    onnx.checker.check_model(overview, full_check=True)
    save_model(overview, out / graphs["overview"])
    save_model(eval_graph(program, split.trainable_params).model(), out / graphs["evaluate"])
    save_model(eval_graph(program, split.trainable_params, frozen_all=True).model(),
               out / graphs["inference"])
    save_npz(out / "weights.npz", {p: program.params[p] for p in split.trainable_params})
    save_npz(out / "optimizer.npz", optimizer_state(split, config))

    net = network_of(program)  # the memory model of the program the graphs are made from
    # an activation budget's ranks are chosen on the board: planned at their bound (eps 1)
    sizing_eps = 1.0 if config.activation_budget is not None else config.eps
    memory = plan(net, config.n_layers, config.method, batch_size, hw, eps=sizing_eps,
                  ranks=config.ranks, rank_cap=config.rank_cap).to_json()
    for name in forward + graphs["backward"] + [graphs["evaluate"], graphs["inference"],
                           graphs["overview"], "weights.npz", "optimizer.npz"]:
        files[name] = sha256_file(out / name)
    num_classes = program.num_classes
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": program.name,
        "input": {"height": hw[0], "width": hw[1], "channels": 3, "layout": "NCHW",
                  "pixel_scale": "pixel / 255", "mean": list(norm["mean"]),
                  "std": list(norm["std"])},
        "num_classes": num_classes,
        "classes": list(classes) if classes else [str(i) for i in range(num_classes)],
        "batch_size": batch_size,
        # the graphs have no dropout: recorded so that the runner says it trains without it
        **({"dropout_not_applied": dropout} if dropout else {}),
        "train": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "trainable_layers": [
            {"name": op.name, "input": op.inputs[0], "input_shape": list(program.shapes[op.inputs[0]]),
             "output_shape": list(program.shapes[op.output]), "kernel": op.attrs["kernel"],
             "stride": op.attrs["stride"], "padding": op.attrs["padding"],
             "groups": op.attrs["groups"],
             **({"dilation": op.attrs["dilation"]} if op.attrs.get("dilation", 1) != 1 else {}),
             "kept": [f"{op.name}/kept/{piece}" for piece in row.pieces],
             "masks": layer_masks}
            for op, layer_masks in zip(split.trainable_convs, masks)],
        "trainable_params": split.trainable_params,
        "graphs": graphs,
        "schedule": schedule,
        "opset": OPSET, "ir_version": IR_VERSION, "min_onnxruntime": MIN_ONNXRUNTIME,
        "predicted_memory": memory,
        "files": files,
    }
    layers = manifest["trainable_layers"]
    dims, chosen = rank_dims(layers, config.method, batch_size, config.ranks, config.rank_cap)
    graphs = {name: concrete(model, dims) for name, model in models.items()}
    if config.micro_batch is None:
        schedule = choose_micro_batches(graphs, schedule, batch_size)
    else:
        schedule = [dict(item, micro_batch=config.micro_batch)
                    if item.get("run", "").startswith("backward_") else item for item in schedule]
    manifest["schedule"] = schedule
    manifest["memory_plan"] = step_plan(models, graphs, dims, chosen, schedule, layers,
                                        config.method, batch_size, memory["rank_basis"])
    write_atomic(out / MANIFEST, manifest_bytes(manifest))
    return manifest
