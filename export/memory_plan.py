"""The memory plan of a training step, made at export (``actcomp_edge.core.memplan`` does the
lifetimes and the pool; this adds what only the graphs know).

Working set = what the runner allocates once and then reuses, plus what the step holds:

    pool        every tensor held between graph runs, placed by lifetime (exact)
    arena       onnxruntime's shared arena: the largest intermediate set of any one graph run
                (tensors alive together in node order, from onnx shape inference)
    numpy       at each schedule position: the kept pieces alive, the
                results (new params, state, gradients), the image batch, and the transient
                of a decomposition (the method's ``workspace``) or of a backward run's
                unpacked masks
    sessions    memplan.SESSION_BYTES for each graph the step runs

Data-dependent ranks (eps) take their bound (full multilinear rank, capped by a rank cap):
``rank_basis`` says which; ``rank_model`` is the plan as a function of the ranks, which
the board evaluates at the ranks it saw (memplan.working_set_at). Bytes; float32 4,
bool/uint8 1.
"""
from __future__ import annotations

import math
from math import prod

import onnx
from onnx import shape_inference

from actcomp_edge.core import memplan, names
from actcomp_edge.core.manifest import MemoryPlan, Run
from actcomp_edge.core.memory import layer_ranks
from actcomp_edge.core.methods import METHODS, NCHWC_DOMAIN, Method

ELEMENT_BYTES = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.BOOL: 1,
                 onnx.TensorProto.UINT8: 1, onnx.TensorProto.INT64: 8,
                 onnx.TensorProto.INT32: 4}


NCHWC_TWIN = "planned as the NCHWc kernel: no column buffer"


def planning_twin(model: onnx.ModelProto) -> None:
    """Make model's NCHWc nodes (``NCHWC_DOMAIN``) ones shape inference knows, in place:
    ReorderInput / ReorderOutput an Identity (the same bytes when the channels fill whole
    blocks, as the exporter makes them), the blocked Conv a Conv (the same output bytes)
    marked NCHWC_TWIN (a direct kernel: no column buffer)."""
    for node in model.graph.node:
        if node.domain != NCHWC_DOMAIN:
            continue
        node.domain = ""
        if node.op_type in ("ReorderInput", "ReorderOutput"):
            node.op_type = "Identity"
            del node.attribute[:]
        else:
            node.doc_string = NCHWC_TWIN
    kept = [o for o in model.opset_import if o.domain != NCHWC_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def concrete(model: onnx.ModelProto, dims: dict) -> onnx.ModelProto:
    """A copy whose symbolic input dims are numbers (``dims``: symbol -> size), shapes
    inferred; NCHWc nodes as their planning_twin."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    planning_twin(model)
    for value in model.graph.input:
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param:
                size = dims[d.dim_param]
                d.ClearField("dim_param")
                d.dim_value = int(size)
    return shape_inference.infer_shapes(model, data_prop=True)


def tensor_bytes(model: onnx.ModelProto) -> dict:
    """name -> bytes of every tensor whose shape inference could tell."""
    out = {}
    for value in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        t = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if None not in shape:
            out[value.name] = prod(shape) * ELEMENT_BYTES.get(t.elem_type, 4)
    return out


def node_workspace(node, model_sizes: dict, shapes: dict) -> list:
    """Bytes a kernel allocates for itself while it runs (onnxruntime CPU), in parts (each a
    product of dims): Einsum permutes every input into a copy first; a Conv that is not 1x1
    unfolds one image at a time into a (C/group * kh * kw, H' * W') column buffer, a
    ConvTranspose its (O/group * kh * kw, H * W) one."""
    if node.op_type == "Einsum":
        return [model_sizes.get(name, 0) for name in node.input]
    if node.op_type in ("Conv", "ConvTranspose") and node.doc_string != NCHWC_TWIN:
        w = shapes.get(node.input[1])      # Conv (O, C/g, kh, kw); ConvTranspose (C, O/g, kh, kw)
        image = shapes.get(node.output[0] if node.op_type == "Conv" else node.input[0])
        if not w or not image or None in w or None in image or w[2] * w[3] == 1:
            return []
        return [4 * w[1] * w[2] * w[3] * image[2] * image[3]]
    return []


def arena_peak(model: onnx.ModelProto, pooled: set) -> int:
    """Largest sum of intermediates alive together when the nodes run in order, plus the
    running kernel's own workspace (node_workspace): see arena_sets."""
    return max((sum(terms.values()) for terms in position_terms(model, pooled)), default=0)


def arena_sets(model: onnx.ModelProto, pooled: set) -> list:
    """(node, the intermediates alive while it runs) per node in order: each tensor made by
    its node, freed after its last reader; graph outputs not in the pool stay to the end;
    inputs, initializers and pooled outputs are not the arena's."""
    nodes = model.graph.node
    outside = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer}
    kept = {o.name for o in model.graph.output} - pooled
    last = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            last[name] = i
    live, out = [], []
    for i, node in enumerate(nodes):
        live += [name for name in node.output if name and name not in outside
                 and name not in pooled and name not in live]
        out.append((node, list(live)))
        live = [name for name in live if name in kept or last.get(name, -1) > i]
    return out


def tensor_shapes(model: onnx.ModelProto) -> dict:
    """name -> shape (None for an unknown dim), initializers included."""
    out = {init.name: tuple(init.dims) for init in model.graph.initializer}
    for value in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        out[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    return out


def rank_dims(layers: list, method: str, batch: int, ranks, rank_cap) -> tuple:
    """(symbol -> size for the graphs' symbolic dims: the batch and the kept pieces' ranks at
    their bound, cap or fixed value; layer -> those ranks)."""
    dims, per_layer = {"batch": batch}, {}
    for layer in layers:
        shape = (batch,) + tuple(layer.input_shape)
        chosen = layer_ranks(method, shape, ranks, rank_cap)
        per_layer[layer.name] = chosen
        for symbol, k in zip(METHODS[method].rank_symbols, chosen or ()):
            dims[f"{layer.name}/{symbol}"] = k
    return dims, per_layer


def step_plan(models: dict, graphs: dict, dims: dict, chosen: dict, schedule: list,
              layers: list, method: str, batch: int, rank_basis: str,
              variants: dict | None = None) -> MemoryPlan:
    """The plan of one step at ``batch``. models: graph file -> ModelProto; graphs: the same
    made concrete at ``dims`` (rank_dims), whose ranks per layer are ``chosen``; schedule:
    of manifest.Run and Compress; layers: of manifest.Layer; variants: run -> the file the
    runner may run instead (Graphs.nchwc), planned at the run's micro batch. Returns the
    manifest's ``memory_plan``: the working set, its parts and where it peaks."""
    io = {name: ([i.name for i in g.graph.input if i.name not in
                  {init.name for init in g.graph.initializer}],
                 [o.name for o in g.graph.output]) for name, g in graphs.items()}
    sizes = {}
    for g in graphs.values():
        sizes.update(tensor_bytes(g))
    for name in [n for n in sizes if names.is_mask_bool(n)]:  # held as its bits (pooled)
        sizes[names.stored(name)] = batch * memplan.packed_bytes(sizes[name] // batch)
    for layer in layers:  # the mask the runner packs of an input, pooled as bits too
        if layer.input_mask:
            sizes[layer.input_mask["bits"]] = batch * memplan.packed_bytes(
                prod(layer.input_shape))
    by_name = {layer.name: layer for layer in layers}
    row = METHODS[method]
    buffers = memplan.pool_buffers(schedule, io, by_name, row.keeps_input, lambda n: sizes[n])
    _, pool = memplan.place(buffers)
    pooled = {b.name for b in buffers}
    micro = {item.graph: item.micro_batch for item in schedule
             if isinstance(item, Run) and item.micro_batch}
    micro.update({variant: micro[run] for run, variant in (variants or {}).items()
                  if run in micro})
    at_bound = {name: concrete(models[name], dict(dims, batch=micro[name]))
                if name in micro else graphs[name] for name in graphs}  # at its run's batch
    arena = {name: arena_peak(graph, pooled) for name, graph in at_bound.items()}
    last = memplan.last_use(schedule, io, by_name, row.keeps_input)
    labels = 8 * batch  # the image batch has its place in the pool until its last reader
    fixed, results = [], 0
    for item in schedule:  # numpy's rank-free bytes at each position
        unpacked = 0
        if isinstance(item, Run):
            for name in io[item.graph][1]:
                if names.is_new(name) or names.is_grad(name):
                    results += sizes[name]
            # the bool masks the run reads, unpacked from their bits a slice at a time
            unpacked = sum(sizes[name] for name in io[item.graph][0]
                           if names.is_mask_bool(name)) * micro.get(item.graph, batch) // batch
        fixed.append(labels + results + unpacked)
    numpy_at = memplan.numpy_trace(schedule, by_name, row, chosen, batch, fixed,
                                   memplan.release_positions(by_name, last))
    peak_position = max(range(len(schedule)), key=lambda p: numpy_at[p] + memplan.live_bytes(
        buffers, p))
    arena_bytes = max(arena.values(), default=0)
    sessions = memplan.SESSION_BYTES * len({item.graph for item in schedule
                                            if isinstance(item, Run)})
    working_set = pool + arena_bytes + max(numpy_at, default=0) + sessions
    where = schedule[peak_position]
    peak_at = where.graph if isinstance(where, Run) else f"compress {where.layer}"
    return MemoryPlan(batch, rank_basis, working_set_bytes=working_set, pool_bytes=pool,
                      arena_bytes=arena_bytes, numpy_peak_bytes=max(numpy_at, default=0),
                      peak_at=peak_at, extra={
                          "arena_graph": max(arena, key=arena.get) if arena else None,
                          "arena_bytes_per_graph": arena, "session_bytes": sessions,
                          "rank_model": {"numpy_fixed_at": fixed, "arena": rank_model(
                              models, at_bound, dims, micro, pooled, row)}
                          if row.ranks else None})


PROBE, MOVED, CHECK = 2, 3, 5  # a rank's value at the base point, when it alone moves, all at once


def rank_model(models: dict, at_bound: dict, dims: dict, micro: dict, pooled: set,
               row: Method) -> dict:
    """graph -> {"symbols": [[layer, mode], ...], "positions": [terms, ...]}: the arena of
    each graph with ranks in its shapes, as ``memplan.arena_at`` reads it. Each tensor's
    bytes (and each kernel's workspace) is a monomial c * prod(k_i ** e_i), fitted on shape
    inference with every rank at PROBE, then each alone at MOVED, and checked with all at
    CHECK; a term that is none counts at its bytes in ``at_bound`` (each graph made
    concrete at ``dims``, the bound, at its run's batch: sizes grow with the ranks). A
    position's bytes are the sum of its terms; positions another bounds term by term are
    left out."""
    out = {}
    for name, model in models.items():
        symbols = sorted({d.dim_param for value in model.graph.input
                          for d in value.type.tensor_type.shape.dim
                          if d.dim_param and d.dim_param != "batch"})
        if not symbols:
            continue
        base = dict(dims, batch=micro.get(name, dims["batch"]))
        points = [dict(base, **dict.fromkeys(symbols, PROBE))]
        points += [dict(points[0], **{s: MOVED}) for s in symbols]
        points.append(dict(base, **dict.fromkeys(symbols, CHECK)))
        terms = [position_terms(concrete(model, point), pooled) for point in points]
        terms.append(position_terms(at_bound[name], pooled))
        out[name] = {"symbols": [[s.rsplit("/", 1)[0], row.rank_symbols.index(
            s.rsplit("/", 1)[1])] for s in symbols], "positions": fit_positions(terms)}
    return out


def position_terms(model: onnx.ModelProto, pooled: set) -> list:
    """Per node position, the bytes of each term of arena_peak's sum: {tensor or
    "workspace@<node>/<part>": bytes}."""
    sizes, shapes = tensor_bytes(model), tensor_shapes(model)
    return [dict({name: sizes.get(name, 0) for name in live},
                 **{f"workspace@{i}/{j}": part
                    for j, part in enumerate(node_workspace(node, sizes, shapes))})
            for i, (node, live) in enumerate(arena_sets(model, pooled))]


def fit_positions(terms: list) -> list:
    """The positions' polynomials (each a list of terms [[c, [e_1..e_n]], ...]) from
    position_terms at rank_model's points: PROBE, each symbol at MOVED, CHECK, the bound."""
    base, moved, check, bound = terms[0], terms[1:-2], terms[-2], terms[-1]
    out = []
    for i, position in enumerate(base):
        poly = {}
        for key, at_base in position.items():
            exponents = monomial([at[i].get(key, 0) for at in moved], at_base)
            total = sum(exponents or ())
            if exponents is None or (at_base // PROBE ** total) * CHECK ** total != \
                    check[i].get(key, 0):
                exponents, coefficient = [0] * len(moved), bound[i].get(key, 0)
            else:
                coefficient = at_base // PROBE ** total
            if coefficient:
                poly[tuple(exponents)] = poly.get(tuple(exponents), 0) + coefficient
        out.append(poly)
    kept = []
    for i, poly in enumerate(out):  # drop a position another bounds term by term
        if not any(j != i and (other != poly or j < i) and all(
                other.get(e, 0) >= c for e, c in poly.items()) for j, other in enumerate(out)):
            kept.append([[c, list(e)] for e, c in sorted(poly.items())])
    return kept


def monomial(moved: list, at_base: int):
    """The exponents e_j with moved[j] = at_base * (MOVED / PROBE) ** e_j, or None."""
    exponents = []
    for at in moved:
        ratio = at / at_base if at_base else (0.0 if at else 1.0)
        e = round(math.log(ratio, MOVED / PROBE)) if ratio > 0 else -1
        if e < 0 or abs(ratio - (MOVED / PROBE) ** e) > 1e-9 * ratio:
            return None
        exponents.append(e)
    return exponents


SLICE_FLOOR_BYTES = 8 << 20  # below this an arena is not worth more graph runs a step
# onnxruntime's arena is memory apart from the pool, so it adds to it: slice a run until its
# intermediates are at most this share of the largest held tensor (measured, N=42 batch 64
# 224 px HOSVD: working set 323 -> 237 MiB at 1/4, step time within noise; with the arena in
# one region (runtime.cap_arena) 211.7 -> 204.7 MiB at 1/8, peak RSS 303.7 -> 296.6 MiB, the
# step 2644 -> 3021 ms; configurations whose tensors are under 64 MiB are not sliced further:
# SLICE_FLOOR_BYTES)
ARENA_SHARE = 0.125


def pooled_outputs(model: onnx.ModelProto) -> set:
    """The outputs of a graph the pool holds: all but its bool masks (packed out of the
    arena as they come, ``names.stored``)."""
    return {o.name for o in model.graph.output if not names.is_mask_bool(o.name)}


def choose_micro_batches(graphs: dict, schedule: list, batch: int,
                         variants: dict | None = None) -> list:
    """The schedule with ``micro_batch`` (samples a run) on every graph run whose
    intermediates at the whole batch exceed ARENA_SHARE of the largest tensor held between
    runs (the step holds that one whole anyway: a decomposition takes the full batch), so
    the arena stays a small part beside the pool. Every forward partition but the last (the
    loss is a mean over the batch) and every backward partition is a sum or map over
    samples. graphs: the concrete graphs at ``batch``; variants: run -> the file the runner
    may run instead (planned by the larger of the two)."""
    runs = [item.graph for item in schedule if isinstance(item, Run)]
    forward = [name for name in runs if name.startswith("forward_")]
    chunkable = set(forward[:-1]) | {name for name in runs if name.startswith("backward_")}
    held = max(size for g in graphs.values() for name, size in tensor_bytes(g).items()
               if name in pooled_outputs(g))
    target = max(int(held * ARENA_SHARE), SLICE_FLOOR_BYTES)
    out = []
    for item in schedule:
        name = item.graph if isinstance(item, Run) else None
        if name in chunkable:
            arena = max(arena_peak(graphs[g], pooled_outputs(graphs[g]))
                        for g in (name, (variants or {}).get(name)) if g)
            if arena > target:
                item = Run(name, max(1, batch * target // arena))
        out.append(item)
    return out
