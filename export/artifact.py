"""Write a training artifact folder (see ``actcomp_edge.core.manifest``) from a spec and weights."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from actcomp_edge.core import arch, names, rank_budget
from actcomp_edge.core.arch import ConvLayer
from actcomp_edge.core.manifest import (MANIFEST, MIN_ONNXRUNTIME, Compress, Graphs, Input,
                                        Layer, Manifest, PredictedMemory, Run, Train,
                                        manifest_bytes, sha256_file)
from actcomp_edge.core.memory import plan
from actcomp_edge.core.methods import conv_weight_grad, method as method_row
from actcomp_edge.core.npz import save_npz, write_atomic
from actcomp_edge.core.program import build_program, check_input_size, network_of

from .memory_plan import choose_micro_batches, concrete, rank_dims, step_plan
from .onnx_graph import IR_VERSION, OPSET, Graph
from .training_graph import (TrainConfig, backward_partitions, conv_layer, crossings,
                             eval_graph, forward_partitions, head_tensors, input_masks,
                             optimizer_state, overview_graph, split_program, update_graph)


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
                    input_size, classes=None, force: bool = False) -> Manifest:
    """A built-in architecture (spec) and its weights -> artifact (export_program)."""
    hw = check_input_size(spec, input_size)
    norm = (spec.get("input") or {}).get("normalize") or arch.HALF_NORM
    dropout = float((spec.get("classifier") or {}).get("dropout") or 0.0)
    return export_program(build_program(spec, arrays, hw), out_dir, config, batch_size, classes,
                          norm, dropout, force)


def export_program(program, out_dir, config: TrainConfig, batch_size: int, classes=None,
                   norm=arch.HALF_NORM, dropout: float = 0.0, force: bool = False) -> Manifest:
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


GRAPH_FILES = {"evaluate": "evaluate.onnx", "inference": "inference.onnx",
               "overview": "overview.onnx"}


@dataclass
class StepGraphs:
    """The executable graphs of one training step, as written into the artifact."""
    forward: list      # forward_<p>.onnx of the partitions with nodes, in order
    backward: dict     # file name -> Graph: backward_<p>.onnx in execution order, update.onnx
    schedule: list     # the device's step in order: manifest.Compress and Run
    models: dict       # file name -> onnx.ModelProto, of every graph above
    nchwc: dict = field(default_factory=dict)  # manifest.Graphs.nchwc: variants and probe


def write_artifact(program, out: Path, config: TrainConfig, batch_size: int, classes, norm,
                   dropout: float, split) -> Manifest:
    """Every file of the artifact into the (empty) folder out; returns the manifest."""
    partitions = forward_partitions(split, config)
    step = write_step_graphs(out, split, config, partitions)
    write_overview(out, split, config, partitions, step)
    write_eval_graphs(out, program, split)
    save_npz(out / "weights.npz", {p: program.params[p] for p in split.trainable_params})
    save_npz(out / "optimizer.npz", optimizer_state(split, config))
    files = file_hashes(out, step.forward + list(step.backward) + list(GRAPH_FILES.values())
                        + ["weights.npz", "optimizer.npz"] + nchwc_files(step.nchwc))
    layers = trainable_layers(split, config.method, partitions)
    manifest = build_manifest(split, config, batch_size, classes, norm, dropout, layers, step,
                              files)
    write_atomic(out / MANIFEST, manifest_bytes(manifest.to_json()))
    return manifest


def write_step_graphs(out: Path, split, config: TrainConfig, partitions: list) -> StepGraphs:
    """forward_<p>.onnx, backward_<p>.onnx and update.onnx into out, and the schedule that
    runs them: the device compresses fine-tuned conv p's input before forward_p."""
    step = StepGraphs(forward=[], backward={}, schedule=[], models={})

    def write(name: str, g) -> str:
        step.models[name] = g.model()
        save_model(step.models[name], out / name)
        step.schedule.append(Run(name))
        return name

    for p, (g, _, _) in enumerate(partitions):
        if p >= 1:  # the input of fine-tuned conv p is ready: the device decomposes it
            step.schedule.append(Compress(split.trainable_convs[p - 1].name))
        if g.nodes:  # none when every conv is fine-tuned: no frozen prefix
            step.forward.append(write(f"forward_{p}.onnx", g))
    for p, g in backward_partitions(split, config):
        step.backward[write(f"backward_{p}.onnx", g)] = g
    update = update_graph(split, config)
    step.backward[write("update.onnx", update)] = update
    step.nchwc = write_nchwc_variants(out, split, config, step.models)
    return step


def write_nchwc_variants(out: Path, split, config: TrainConfig, models: dict) -> dict:
    """<graph>.nchwc.onnx of every forward and backward graph that has a form on
    onnxruntime's NCHWc kernels, and the probe the runner checks them with first
    (nchwc_probe.onnx and its x, dy and expected dW in nchwc_probe.npz); the variants'
    models go into models. Returns manifest.Graphs.nchwc ({} when no graph has one)."""
    variants = {}
    forward = [(f"forward_{p}", g) for p, (g, _, _) in
               enumerate(forward_partitions(split, config, nchwc=True))]
    backward = [(f"backward_{p}", g) for p, g in backward_partitions(split, config, nchwc=True)]
    for stem, g in forward + backward:
        if g.uses_nchwc:
            name = variants[f"{stem}.onnx"] = f"{stem}.nchwc.onnx"
            models[name] = g.model()
            save_model(models[name], out / name)
    if not variants:
        return {}
    probe, data = nchwc_probe()
    save_model(probe, out / NCHWC_PROBE[0])
    save_npz(out / NCHWC_PROBE[1], data)
    return {"variants": variants, "probe": NCHWC_PROBE[0], "probe_data": NCHWC_PROBE[1]}


NCHWC_PROBE = ("nchwc_probe.onnx", "nchwc_probe.npz")


def nchwc_files(nchwc: dict) -> list:
    """The files manifest.Graphs.nchwc names."""
    return (list(nchwc["variants"].values()) + [nchwc["probe"], nchwc["probe_data"]]
            if nchwc else [])


def nchwc_probe() -> tuple:
    """(graph, arrays): the depthwise weight gradient on NCHWc kernels (3x3, stride 2,
    16 channels, 2 images of 7x7) and its x, dy and dW computed tap by tap in float64."""
    conv = ConvLayer("probe", 16, 16, 3, 2, 1, 16, (7, 7), (4, 4))
    g = Graph("nchwc_probe", nchwc=True)
    g.input("x", np.float32, ["batch", 16, 7, 7])
    g.input("dy", np.float32, ["batch", 16, 4, 4])
    g.output(conv_weight_grad(g, "probe", "x", "dy", conv), np.float32, [16, 1, 3, 3])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 7, 7)).astype(np.float32)
    dy = rng.standard_normal((2, 16, 4, 4)).astype(np.float32)
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    dw = np.array([[np.einsum("nchw,nchw->c", padded[:, :, i:i + 8:2, j:j + 8:2], dy)
                    for j in range(3)] for i in range(3)]).transpose(2, 0, 1)
    return g.model(), {"x": x, "dy": dy, "dw": dw.reshape(16, 1, 3, 3).astype(np.float32)}


def write_overview(out: Path, split, config: TrainConfig, partitions: list,
                   step: StepGraphs) -> None:
    """overview.onnx: the whole step as one graph for people (overview_graph), a shape on
    every edge (Netron)."""
    overview = overview_graph([g for g, _, _ in partitions], split, list(step.backward.values()),
                              config).model(check=False)
    overview = onnx.shape_inference.infer_shapes(overview)
    onnx.checker.check_model(overview, full_check=True)
    save_model(overview, out / GRAPH_FILES["overview"])


def write_eval_graphs(out: Path, program, split) -> None:
    """evaluate.onnx (the trainable params as inputs) and inference.onnx (every param
    frozen)."""
    save_model(eval_graph(program, split.trainable_params).model(), out / GRAPH_FILES["evaluate"])
    save_model(eval_graph(program, split.trainable_params, frozen_all=True).model(),
               out / GRAPH_FILES["inference"])


def file_hashes(out: Path, names: list) -> dict:
    """File name -> SHA-256 hex digest of out/name."""
    return {name: sha256_file(out / name) for name in names}


def layer_masks(program, partitions: list) -> list:
    """The tensors each fine-tuned conv's forward partition keeps beside the conv's own
    pieces: masks, max-pool argmaxes, saved activations, multiply factors and a
    squeeze-excitation Linear's input, made between fine-tuned conv i and the next, belong to
    conv i (full accounting); the head's belong to the classifier. Names as the runner holds
    them (a mask as its bits: ``names.stored``)."""
    head = head_tensors(program)
    linear_inputs = {op.inputs[0] for op in program.ops if op.kind == "linear"} - head
    return [[names.stored(t) for t in outputs if (names.is_saved(t) and names.source_of(t)
                                                  not in head) or t in linear_inputs]
            for _, _, outputs in partitions[1:]]


def input_mask(masks: dict, conv_name: str) -> dict | None:
    """The manifest's Layer.input_mask of a fine-tuned conv (training_graph.input_masks)."""
    if conv_name not in masks:
        return None
    y, lo, hi = masks[conv_name]
    return {"bits": names.mask_bits(y), "above": float(lo),
            **({"below": float(hi)} if hi is not None else {})}


def trainable_layers(split, method: str, partitions: list) -> list:
    """The manifest's trainable_layers: each fine-tuned conv's shapes (C, H, W), geometry,
    kept pieces, masks (the ones the runner packs at a decomposition with the layer whose
    partition makes their tensor, as the memory tables count them) and input_mask."""
    shapes = split.program.shapes
    pieces = method_row(method).pieces
    made_by_runner = input_masks(split, method)
    held = layer_masks(split.program, partitions)
    produced_in, _ = crossings(split)
    for y, _, _ in made_by_runner.values():  # with the layer whose partition makes y
        held[produced_in[y] - 1].append(names.mask_bits(y))
    layers = []
    for op, masks in zip(split.trainable_convs, held):
        mask = input_mask(made_by_runner, op.name)
        layers.append(Layer(
            op.name, op.inputs[0], list(shapes[op.inputs[0]]), op.attrs["stride"],
            [names.kept(op.name, piece) for piece in pieces], masks, mask, extra={
                "output_shape": list(shapes[op.output]), "kernel": op.attrs["kernel"],
                "padding": op.attrs["padding"], "groups": op.attrs["groups"],
                **({"dilation": op.attrs["dilation"]} if op.attrs.get("dilation", 1) != 1
                   else {})}))
    return layers


def predicted_memory(program, config: TrainConfig, batch_size: int) -> PredictedMemory:
    """The memory model's plan (core.memory) of the program the graphs are made from. An
    activation budget's ranks are chosen on the board: planned at their bound (eps 1)."""
    sizing_eps = 1.0 if config.activation_budget is not None else config.eps
    return PredictedMemory.from_json(plan(
        network_of(program), config.n_layers, config.method, batch_size,
        tuple(program.shapes["image"][1:]), eps=sizing_eps, ranks=config.ranks,
        rank_cap=config.rank_cap).to_json())


def planned_schedule(step: StepGraphs, layers: list, config: TrainConfig, batch_size: int,
                     rank_basis: str) -> tuple:
    """(schedule, memory plan): the step's schedule with each backward run's micro batch
    (--micro-batch, else the largest the plan allows) and the step's predicted working set
    (memory_plan.step_plan)."""
    dims, chosen = rank_dims(layers, config.method, batch_size, config.ranks, config.rank_cap)
    graphs = {name: concrete(model, dims) for name, model in step.models.items()}
    variants = step.nchwc.get("variants", {})
    if config.micro_batch is None:
        schedule = choose_micro_batches(graphs, step.schedule, batch_size, variants)
    else:
        schedule = [Run(item.graph, config.micro_batch)
                    if isinstance(item, Run) and item.graph.startswith("backward_") else item
                    for item in step.schedule]
    return schedule, step_plan(step.models, graphs, dims, chosen, schedule, layers,
                               config.method, batch_size, rank_basis, variants)


def build_manifest(split, config: TrainConfig, batch_size: int, classes, norm, dropout: float,
                   layers: list, step: StepGraphs, files: dict) -> Manifest:
    """manifest.json's content (``actcomp_edge.core.manifest``). norm: the input's {"mean",
    "std"}; dropout: the p the graphs leave out; layers: trainable_layers; files: name ->
    SHA-256."""
    program = split.program
    hw = tuple(program.shapes["image"][1:])
    memory = predicted_memory(program, config, batch_size)
    schedule, memory_plan = planned_schedule(step, layers, config, batch_size,
                                             memory.rank_basis)
    graphs = Graphs(step.forward, list(step.backward), GRAPH_FILES["evaluate"],
                    {k: v for k, v in GRAPH_FILES.items() if k != "evaluate"}, step.nchwc)
    return Manifest(
        model=program.name,
        input=Input(hw[0], hw[1], list(norm["mean"]), list(norm["std"]),
                    {"channels": 3, "layout": "NCHW", "pixel_scale": "pixel / 255"}),
        num_classes=program.num_classes, batch_size=batch_size,
        train=Train.from_json({k: (list(v) if isinstance(v, tuple) else v)
                               for k, v in asdict(config).items()}),
        trainable_layers=layers, trainable_params=split.trainable_params, graphs=graphs,
        schedule=schedule, predicted_memory=memory, memory_plan=memory_plan, files=files,
        opset=OPSET, min_onnxruntime=MIN_ONNXRUNTIME,
        classes=list(classes) if classes else [str(i) for i in range(program.num_classes)],
        # the graphs have no dropout: recorded so that the runner says it trains without it
        dropout_not_applied=dropout or None, extra={"ir_version": IR_VERSION})
