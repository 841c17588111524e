"""The step's memory plan: lifetimes of the tensors the device holds between graph runs,
their places in one preallocated pool, and the predicted working set (numpy-free, torch-free).

A training step is the manifest's ``schedule``: graph runs and decompositions, in order.
Every tensor a run outputs has a static shape at a given batch, so its lifetime is known
before the step: from the item that makes it to the last item that reads it. Tensors whose
lifetimes overlap get disjoint places in the pool; the rest share (first fit, largest first,
as a compiler's storage planner). The device allocates the pool once and onnxruntime writes
the runs' outputs straight into it (IOBinding), so no step allocates or page-faults them.

The image batch is pooled too: the data loader writes it into its place before the step.
Not pooled: ``new/*`` and ``grad/*`` (the step's results, kept after it), ``loss`` and
``logits``, and what numpy makes (the kept pieces of a decomposition). A forward's bool
mask is pooled as its bits (``names.stored``): the runner packs each micro-batch of it into
them as the run makes it, so the bool stays in onnxruntime's arena.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

from . import names
from .manifest import Compress

ALIGN = 64  # bytes: every place starts on a cache line
# What an onnxruntime session adds at its first run beyond its tensors (its worker thread's
# stack pages and first-run state): 305 KiB each over 85 sessions of one 256 x 256 MatMul,
# intra-op threads 2, of which 256 KiB the output its own arena kept (onnxruntime 1.32.0,
# x86-64; a helper's smaps breakdown of mcunet's 85 sessions found 4.0 MiB of thread stacks)
SESSION_BYTES = 49 << 10


@dataclass(frozen=True)
class Buffer:
    name: str
    nbytes: int
    start: int      # schedule position that makes it
    end: int        # last schedule position that reads it (inclusive)

    def overlaps(self, other: "Buffer") -> bool:
        return self.start <= other.end and other.start <= self.end


def pooled(name: str) -> bool:
    """Whether a run's output goes to the pool (the step's results do not; a bool mask goes
    as its bits, ``names.stored``)."""
    return not (names.is_new(name) or names.is_grad(name) or name in ("loss", "logits"))


def last_use(schedule: list, io: dict, layers: dict, keeps_input: bool) -> dict:
    """tensor (as the runner holds it: ``names.stored``) -> last schedule position that reads
    it. schedule: of manifest.Run and
    Compress; io: graph -> (input names, output names); layers: name -> manifest.Layer.
    keeps_input (vanilla): the kept piece *is* the conv input, so the conv input lives until
    its backward partition."""
    last = {}
    for position, item in enumerate(schedule):
        if isinstance(item, Compress):
            last[layers[item.layer].input] = position
        else:
            for name in io[item.graph][0]:
                last[names.stored(name)] = position  # a mask is held as its bits
    if keeps_input:
        for layer in layers.values():
            x = layer.input
            last[x] = max(last.get(x, -1), last.get(layer.kept[0], -1))
    return last


STEP_INPUT = "image"  # the step's image batch: written into the pool before the step


def pool_buffers(schedule: list, io: dict, layers: dict, keeps_input: bool, nbytes) -> list:
    """Buffer of every pooled run output (by its stored name; ``nbytes(name)``: its bytes),
    of every mask the runner packs at a decomposition (``Layer.input_mask``), and of the
    image batch (made before the first item,
    free after its last reader: later tensors reuse its place). A second gradient of the same
    tensor (``d/<t>`` from another consumer) gets a buffer of its own for that run only
    (then it is summed into the first)."""
    last = last_use(schedule, io, layers, keeps_input)
    made = set()
    buffers = [Buffer(STEP_INPUT, nbytes(STEP_INPUT), 0, last.get(STEP_INPUT, 0))]
    for position, item in enumerate(schedule):
        if isinstance(item, Compress):
            mask = layers[item.layer].input_mask  # the runner packs it at the decomposition
            if mask:
                bits = mask["bits"]
                buffers.append(Buffer(bits, nbytes(bits), position, last.get(bits, position)))
            continue
        for name in io[item.graph][1]:
            if not pooled(name):
                continue
            name = names.stored(name)  # a bool mask is held as its bits
            if name in made:
                buffers.append(Buffer(pool_key(name, position, made), nbytes(name), position,
                                      position))
            else:
                made.add(name)
                buffers.append(Buffer(name, nbytes(name), position, last.get(name, position)))
    return buffers


PACK_BLOCK_BYTES = 1 << 20  # bool mask packed into bits at most this much at a time


def packed_bytes(elements: int) -> int:
    """Bytes of a sample's mask of ``elements`` (C*H*W) at 1 bit each (np.packbits)."""
    return -(-elements // 8)


def mask_pack_samples(elements: int) -> int:
    """Samples of ``elements`` (C*H*W) each packed into bits at a time (two bool temporaries)."""
    return max(1, PACK_BLOCK_BYTES // max(1, elements))


def pool_key(name: str, position: int, made) -> str:
    """The pool place of output ``name`` of the run at ``position``."""
    return f"{name}@{position}" if name in made else name


def place(buffers: list) -> tuple:
    """(offset per buffer name, pool bytes): largest first, each at the lowest aligned
    offset that overlaps no placed buffer alive at the same time."""
    offsets, placed = {}, []
    for buf in sorted(buffers, key=lambda b: (-b.nbytes, b.start, b.name)):
        offset = 0
        for other, at in sorted(((o, offsets[o.name]) for o in placed if o.overlaps(buf)),
                                key=lambda pair: pair[1]):
            if at >= offset + buf.nbytes:
                break  # fits in the gap below this one
            offset = max(offset, _aligned(at + other.nbytes))
        offsets[buf.name] = offset
        placed.append(buf)
    total = max((offsets[b.name] + b.nbytes for b in placed), default=0)
    return offsets, _aligned(total)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def live_bytes(buffers: list, position: int) -> int:
    return sum(b.nbytes for b in buffers if b.start <= position <= b.end)


# ------------------------------------------------------- the plan at the ranks a run saw
# eps ranks are planned at their bound at export. The exporter also writes what the plan
# needs to be evaluated at other ranks (memory_plan.rank_model): per graph run, the arena
# at each node position where it may peak as a polynomial in the ranks, and per schedule
# position numpy's rank-free bytes. The board evaluates it at the ranks it saw.

def polynomial(terms: list, values: list) -> int:
    """sum of c * prod(v_i ** e_i) over terms [[c, [e_1, .., e_n]], ...], values (v_1..v_n)."""
    total = 0
    for coefficient, exponents in terms:
        term = coefficient
        for value, exponent in zip(values, exponents):
            term *= value ** exponent
        total += term
    return int(total)


def arena_at(model: dict, bound: dict, ranks: dict) -> int:
    """Bytes of onnxruntime's arena at ``ranks`` (layer -> rank per mode): the largest
    position of any graph. model: graph -> {"symbols": [[layer, mode], ...], "positions":
    [terms, ...]} (polynomial); a graph it does not model takes its ``bound`` bytes."""
    peak = 0
    for graph, at_bound in bound.items():
        entry = model.get(graph)
        if entry is None:
            peak = max(peak, at_bound)
            continue
        values = [ranks[layer][mode] for layer, mode in entry["symbols"]]
        peak = max([peak] + [polynomial(terms, values) for terms in entry["positions"]])
    return peak


def numpy_trace(schedule: list, layers: dict, row, ranks: dict, batch: int, fixed: list,
                release: dict) -> list:
    """Bytes numpy holds at each schedule position: ``fixed`` (the labels, the results made
    so far, the masks a backward unpacks), the kept pieces of every layer decomposed and not
    yet released (``release``: layer -> the last position that reads them) and, at a
    Compress, the decomposition's workspace or the packing of its input's mask. layers:
    name -> manifest Layer; row: the method's Method; ranks: layer -> rank per mode."""
    live, out = {}, []
    for position, item in enumerate(schedule):
        transient = 0
        if isinstance(item, Compress):
            layer = layers[item.layer]
            shape, stride = (batch,) + tuple(layer.input_shape), layer.stride
            k = ranks.get(layer.name)
            live[layer.name] = 0 if row.keeps_input else 4 * row.kept_floats(shape, k, stride)
            transient = row.workspace(shape, k, stride)
            if layer.input_mask:  # packed before the decomposition: two bool blocks
                elements = prod(layer.input_shape)
                transient = max(transient, 2 * mask_pack_samples(elements) * elements)
        out.append(fixed[position] + sum(live.values()) + transient)
        for name in [name for name in live if release[name] <= position]:
            del live[name]
    return out


def release_positions(layers: dict, last: dict) -> dict:
    """layer -> the last schedule position that reads its kept pieces (-1: none)."""
    return {name: last.get(layer.kept[0], -1) if layer.kept else -1
            for name, layer in layers.items()}


def working_set_at(plan, schedule: list, layers: dict, row, ranks: dict, last: dict):
    """The memory plan's working set (bytes, at plan.batch_size) with the data-dependent
    ranks at ``ranks`` (layer -> rank per mode, e.g. the largest a run saw) instead of their
    bound: pool + arena + numpy's peak + sessions, as export.memory_plan.step_plan sums
    them. plan: the manifest's MemoryPlan; last: memplan.last_use of the step. None without
    a rank model."""
    model = plan.extra.get("rank_model")
    if not model or set(ranks) != set(layers):
        return None
    numpy = max(numpy_trace(schedule, layers, row, ranks, plan.batch_size,
                            model["numpy_fixed_at"], release_positions(layers, last)))
    arena = arena_at(model["arena"], plan.extra["arena_bytes_per_graph"], ranks)
    return plan.pool_bytes + arena + numpy + plan.extra.get("session_bytes", 0)
