"""Run a training artifact's step on onnxruntime + numpy (no torch, no onnxruntime-training).

    trainer = Trainer("ART/")
    result = trainer.step(images, labels, lr=0.01)   # images (B, 3, H, W) float32, normalised
    logits = trainer.evaluate(images)

The manifest's ``schedule`` alternates forward partitions ("run") and
decompositions ("compress": the input of that fine-tuned conv is decomposed
with numpy, ``actcomp_edge.core.methods``); a full tensor is dropped as soon as no
later item needs it. Then the backward partitions run in reverse, each taking only its
conv's kept pieces, its masks (bit-packed by the forward graphs) and the gradients of what
its forward partition handed on, and freeing them when done.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import numpy as np
import onnxruntime as ort
from threadpoolctl import ThreadpoolController, threadpool_limits

from actcomp_edge.core import memplan, names
from actcomp_edge.core.decomposition import mode_energies
from actcomp_edge.core.methods import METHODS
from actcomp_edge.core.faults import crash_point
from actcomp_edge.core.manifest import (ArtifactError, Compress, Layer, Manifest, Run,
                                        load_manifest)
from actcomp_edge.core.npz import load_npz

from .recipe import add_proximal, clip_grad_norm, global_norm


@dataclass
class StepResult:
    loss: float
    logits: np.ndarray | None   # None when the forward was cut short (non-finite input)
    grads: dict                 # param -> gradient
    ranks: dict                 # layer -> rank per mode (or None)
    kept_bytes: dict            # layer -> bytes of the kept pieces
    seconds: dict = field(default_factory=dict)  # SPLIT_PARTS -> seconds of this step
    applied: bool = True        # False: non-finite activation, loss or update: step rejected
    kept_full_bytes: int = 0    # everything the backward took: kept pieces, masks, features
    kept_full_per_layer: dict = field(default_factory=dict)  # layer -> pieces + its masks
    grad_norm: float | None = None  # global L2 norm of the gradients, before clipping


# a step's parts: the frozen prefix, the fine-tuned forward, the decompositions (numpy), the
# backward partitions, the optimizer's update (with the gradient clipping before it)
SPLIT_PARTS = ("prefix", "forward", "compress", "backward", "update")


@dataclass
class Forward:
    """The forward half of a step: what the backward will take, and what was kept."""
    tensors: dict               # live tensors: kept pieces, masks, features, logits, loss, ...
    ranks: dict                 # layer -> rank per mode (or None)
    kept_bytes: dict            # layer -> bytes of the kept pieces (paper accounting)
    kept_full_bytes: int        # everything the backward takes (full accounting)
    kept_full_per_layer: dict   # layer -> kept pieces + the masks after it; "classifier"
    seconds: dict               # prefix / forward / compress


class NonFiniteActivation(ArithmeticError):
    """A fine-tuned conv's input holds NaN or Inf: the step cannot be taken."""


class MemoryBudgetError(RuntimeError):
    """onnxruntime could not allocate within its arena cap (the budget)."""


_ARENA_BYTES = None
ARENA_SLACK = 1.25  # the first arena region: the plan's arena and a quarter for fragmentation
NO_ARENA_CAP = 1 << 46  # without a budget the arena grows as the graphs need (64 TiB: no cap)
DTYPES = {"tensor(float)": np.float32, "tensor(bool)": np.bool_, "tensor(uint8)": np.uint8,
          "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def cap_arena(max_bytes: int, initial_bytes: int = -1) -> None:
    """Register a process-wide onnxruntime CPU arena of at most max_bytes, starting as one
    region of initial_bytes (the plan's arena: the graphs' intermediates are carved from it
    and do not grow it step after step; -1: onnxruntime's default). An allocation past
    max_bytes fails with an error instead of the OS killing the process. Once per process."""
    global _ARENA_BYTES
    if _ARENA_BYTES is not None:
        if _ARENA_BYTES != max_bytes:
            raise ValueError(f"the onnxruntime arena is already capped at {_ARENA_BYTES} bytes")
        return
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                             ort.OrtMemType.DEFAULT)
    # arena_extend_strategy 0 = kNextPowerOfTwo: the first region is initial_bytes (only its
    # touched pages are resident), where every run's intermediates are carved and freed
    # chunks merge again. 1 = kSameAsRequested ignores initial_bytes and grows region by
    # region as requests miss: the free space of one region cannot serve a larger request
    # of another (measured at all 42 convs, B64, 224 px, eps-HOSVD: regions of 28.3, 19.5 and
    # 16.1 MiB; peak RSS 316.2 -> 303.7 MiB with one region, step time within noise; at
    # N=42, B32, 128 px working set 64.0 -> 59.3 MiB)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(int(max_bytes), 0,
                                                            int(initial_bytes), -1))
    _ARENA_BYTES = max_bytes


# The budget is enforced by measurement (dry run, rank caps, per-step peak RSS); the arena cap
# is the hard stop against runaway allocation. onnxruntime's BFC arena keeps and fragments
# chunks, so a cap at exactly the budget fails steps that fit: 1.5x.
ARENA_HEADROOM = 1.5


def arena_for_budget(budget: int | None) -> int | None:
    """The onnxruntime arena cap (bytes) for a training budget (bytes); None: no cap."""
    return int(ARENA_HEADROOM * budget) if budget else None


def initial_arena_bytes(manifest: Manifest, cap: int | None) -> int:
    """The arena's first region: the plan's arena (the largest intermediates of any one
    graph run) with slack, within the cap."""
    return min(int(ARENA_SLACK * manifest.memory_plan.arena_bytes), cap or NO_ARENA_CAP)


def pack_mask(x: np.ndarray, above: float, below: float | None, bits: np.ndarray) -> None:
    """bits (B, ceil(C*H*W / 8)) <- np.packbits of above < x < below (below None: no upper
    bound) of each sample of x (B, C, H, W), a block of samples at a time."""
    flat = x.reshape(len(x), -1)
    step = memplan.mask_pack_samples(flat.shape[1])
    for start in range(0, len(flat), step):
        rows = flat[start:start + step]
        mask = rows > above
        if below is not None:
            mask &= rows < below
        bits[start:start + step] = np.packbits(mask, axis=1)


def run_bound(session, binding) -> None:
    try:
        session.run_with_iobinding(binding)
    except Exception as e:  # onnxruntime's own exception types
        text = str(e)
        if "bfc_arena" in text or "Available memory" in text:
            if _ARENA_BYTES == NO_ARENA_CAP:
                raise MemoryBudgetError("onnxruntime could not allocate: the board is out of "
                                        "memory") from None
            raise MemoryBudgetError(f"onnxruntime could not allocate within the memory budget "
                                    f"({_ARENA_BYTES / 2 ** 20:.1f} MiB arena)") from None
        raise


def deploy_metadata(manifest: Manifest, classes: list | None = None) -> dict:
    """What an inference model needs to be used without the artifact (its metadata_props):
    class names (JSON, output order), the input's name, size, layout and dtype, its
    normalisation and the resize rule the runner's data loader applies."""
    m = manifest.input
    default = [str(i) for i in range(manifest.num_classes)]
    return {"classes": json.dumps(list(classes or manifest.classes or default)),
            "input_name": "image", "input_size": json.dumps([m.height, m.width]),
            "layout": "NCHW float32, RGB", "normalization": json.dumps(
                {"scale": "pixel / 255", "mean": m.mean, "std": m.std}),
            "resize": f"bilinear to {m.height}x{m.width} (width x height "
                      f"{m.width}x{m.height}), whole image, no crop"}


def session_options(manifest: Manifest, threads: int | None,
                    arena_bytes: int | None) -> ort.SessionOptions:
    """The options of every session of an artifact: ``threads`` shared with numpy's BLAS
    (None: all cores), one arena for all sessions capped at arena_bytes (None: no cap)."""
    options = ort.SessionOptions()
    if threads:  # one thread budget: onnxruntime's runs and numpy's BLAS (decompositions)
        options.intra_op_num_threads = threads  # take turns on the same cores
        threadpool_limits(threads, user_api="blas")
    options.log_severity_level = 4  # failures reach the caller as exceptions
    # onnxruntime's worker threads spin after each run by default; numpy's decomposition
    # runs right after on the same cores, so spinning only steals its CPU
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # one onnxruntime arena for every session: the graphs' intermediates reuse the same
    # memory each run, and the tensors held between runs live in the pool (plan_pool)
    cap_arena(arena_bytes or NO_ARENA_CAP, initial_arena_bytes(manifest, arena_bytes))
    options.add_session_config_entry("session.use_env_allocators", "1")
    # no memory pattern: it reserves each graph's whole intermediate block per run, and the
    # shared arena then holds the blocks of several graphs (measured: +40-80 MiB)
    options.enable_mem_pattern = False
    ort.set_default_logger_severity(4)  # errors reach the user as exceptions, once
    return options


def load_session(folder: Path, name: str, options: ort.SessionOptions,
                 profile_prefix: str | None) -> ort.InferenceSession:
    """The session of graph folder/name; ArtifactError (one line) when onnxruntime refuses
    it. profile_prefix: see Trainer."""
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = f"{profile_prefix}{Path(name).stem}"
    try:
        return ort.InferenceSession(str(folder / name), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise ArtifactError(f"onnxruntime cannot load {name}: {e}".splitlines()[0]) from None


def nchwc_works(folder: Path, nchwc: dict) -> bool:
    """Whether this onnxruntime runs the artifact's NCHWc probe (manifest.Graphs.nchwc) to
    its expected dW (1e-4): a build or CPU without those kernels fails it, or refuses it.
    The probe has its own small arena and one thread, freed with it (on the step's shared
    arena it would make that arena's first region before the baseline: +10.7 MiB measured
    at batch 64, 224 px)."""
    if not nchwc:
        return False
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    try:
        probe = ort.InferenceSession(str(folder / nchwc["probe"]), options,
                                     providers=["CPUExecutionProvider"])
        data = load_npz(folder / nchwc["probe_data"])
        got = probe.run(None, {"x": data["x"], "dy": data["dy"]})[0]
    except Exception:  # onnxruntime raises its own exception types
        return False
    return got.shape == data["dw"].shape and bool(np.allclose(got, data["dw"], rtol=1e-4,
                                                                 atol=1e-4))


KERNELS = ("auto", "portable")  # auto: the NCHWc variants where the probe passes


class Trainer:
    def __init__(self, folder, threads: int | None = None, verify: bool = True,
                 arena_bytes: int | None = None, profile_prefix: str | None = None,
                 kernels: str = "auto"):
        """profile_prefix: onnxruntime's profiler on every session, its JSON written to
        ``<profile_prefix><graph>_<time>.json`` (end_profiling() returns the paths).
        kernels: KERNELS; ``self.kernels`` says which ran ("nchwc" or "portable")."""
        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder, ort.__version__, verify=verify)
        m = self.manifest
        self.threads = threads  # None: onnxruntime's and BLAS's own default, all cores
        options = session_options(m, threads, arena_bytes)
        graphs = m.graphs
        use_nchwc = kernels == "auto" and nchwc_works(self.folder, graphs.nchwc)
        self.kernels = "nchwc" if use_nchwc else "portable"
        variants = graphs.nchwc.get("variants", {}) if use_nchwc else {}
        self.sessions = {name: load_session(self.folder, variants.get(name, name), options,
                                            profile_prefix)
                         for name in graphs.forward + graphs.backward}
        self.schedule = m.schedule
        self.backward_runs = set(graphs.backward)
        runs = [(i, item.graph) for i, item in enumerate(self.schedule) if isinstance(item, Run)]
        # the optimizer's graph: the one whose outputs are the new parameters (new/<param>)
        # (the exporter's last item; a stubbed session has no outputs)
        self.update_at = next((i for i, graph in runs if any(
            names.is_new(o.name) for o in self.sessions[graph].get_outputs())),
            len(self.schedule) - 1)
        # the forward half ends where the first backward partition runs
        self.backward_from = next(i for i, graph in runs if graph in self.backward_runs)
        first = self.schedule[0]  # the frozen prefix, unless every conv is fine-tuned
        self.prefix = first.graph if isinstance(first, Run) else None
        self.params = load_npz(self.folder / "weights.npz")
        self.state = load_npz(self.folder / "optimizer.npz")
        self.step_count = 0
        train = m.train
        self.method, self.eps = train.method, train.eps
        self.ranks, self.rank_cap = train.ranks, train.rank_cap
        self.layers = {layer.name: layer for layer in m.trainable_layers}
        self.rank_caps = {}  # layer -> rank cap derived from a memory budget
        self.trackers = {}
        self.row = METHODS[self.method]
        if self.row.tracker:
            self.trackers = {name: self.row.tracker(self.eps, self.ranks, self.rank_cap)
                             for name in self.layers}
        self.blas = ThreadpoolController()  # made once: threadpool_limits rescans (0.26 ms)
        # input/output names of every session, read once (not on every step)
        self.io = {name: ([i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()])
                   for name, sess in self.sessions.items()}
        self.outputs = {o.name: (o.shape, DTYPES[o.type]) for sess in self.sessions.values()
                        for o in sess.get_outputs()}
        self.outputs.update({i.name: (i.shape, DTYPES[i.type]) for sess in self.sessions.values()
                             for i in sess.get_inputs() if i.name == memplan.STEP_INPUT})
        for name, (shape, _) in list(self.outputs.items()):  # a bool mask is held as its bits
            if names.is_mask_bool(name):
                self.outputs[names.stored(name)] = (
                    [shape[0], memplan.packed_bytes(prod(shape[1:]))], np.uint8)
        for layer in m.trainable_layers:  # and so is the mask the runner packs of an input
            if layer.input_mask:
                self.outputs[layer.input_mask["bits"]] = (
                    ["batch", memplan.packed_bytes(prod(layer.input_shape))], np.uint8)
        # which inputs and outputs have the batch as their first dim (sliced by micro-batches)
        self.batched = {v.name: bool(v.shape) and v.shape[0] == "batch"
                        for sess in self.sessions.values()
                        for v in list(sess.get_inputs()) + list(sess.get_outputs())}
        self.backward_inputs = {names.stored(n) for run in self.backward_runs
                                for n in self.io[run][0]}
        # (C, H, W) of every bool mask a backward reads: unpacked from its bits to that shape
        self.mask_shapes = {i.name: tuple(i.shape[1:]) for sess in self.sessions.values()
                            for i in sess.get_inputs() if names.is_mask_bool(i.name)}
        # the classifier head's part of the backward's inputs (each linear's input, its
        # activations' masks): what no fine-tuned layer claims, but the loss gradient
        claimed = {n for layer in self.layers.values()
                   for n in (*layer.masks, *layer.kept)} | {"dlogits"}
        self.head_inputs = self.backward_inputs - claimed
        # position in the schedule of the last item that reads each tensor: freed after it
        self.last_use = memplan.last_use(self.schedule, self.io, self.layers,
                                         self.row.keeps_input)
        self.pool, self.pool_batch, self.slots = None, 0, {}

    def end_profiling(self) -> list:
        """Stop the profiler of every session; the paths of their JSON traces."""
        return [sess.end_profiling() for sess in self.sessions.values()]

    def output_shape(self, name: str, batch: int) -> tuple:
        return tuple(batch if isinstance(d, str) or d is None else d
                     for d in self.outputs[name][0])

    def plan_pool(self, batch: int) -> list:
        """Place every pooled run output of a step at ``batch`` (memplan) and allocate the
        pool once; smaller batches use the front of each place. Returns the buffers."""
        def nbytes(name):
            return int(np.prod(self.output_shape(name, batch))) * np.dtype(
                self.outputs[name][1]).itemsize
        buffers = memplan.pool_buffers(self.schedule, self.io, self.layers, self.row.keeps_input,
                                       nbytes)
        offsets, total = memplan.place(buffers)
        self.pool = np.zeros(total, np.uint8)  # zeroed: its pages are touched once, here
        self.slots = {b.name: offsets[b.name] for b in buffers}
        self.pool_batch = batch
        return buffers

    def image_buffer(self, batch: int) -> np.ndarray:
        """float32 (batch, 3, H, W): the image batch's place in the pool (planned at batch if
        it is not yet). A batch written here is the step's input without a copy; later
        tensors of the step reuse the place, so it holds the image only until the step."""
        if batch > self.pool_batch:
            self.plan_pool(batch)
        return self._slot(memplan.STEP_INPUT, memplan.STEP_INPUT, batch)

    def _slot(self, key: str, name: str, batch: int) -> np.ndarray:
        offset = self.slots[key]
        shape, dtype = self.output_shape(name, batch), self.outputs[name][1]
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return self.pool[offset:offset + size].view(dtype).reshape(shape)

    def _release(self, tensors: dict, position: int) -> None:
        """Drop every tensor no later schedule item reads (loss and logits stay: the result)."""
        for name in list(tensors):
            if name not in ("loss", "logits") and self.last_use.get(name, -1) <= position:
                del tensors[name]

    def compress(self, layer: Layer, x: np.ndarray):
        """What the backward keeps of fine-tuned conv ``layer``'s input x (B, C, H, W)."""
        cap = self.rank_cap
        budget_cap = self.rank_caps.get(layer.name)
        if budget_cap is not None:
            cap = budget_cap if cap is None else np.minimum(cap, budget_cap).tolist()
        if self.trackers:
            tracker = self.trackers[layer.name]
            tracker.rank_cap = cap
            if tracker.factors is None:  # its first step: the exact HOSVD, every BLAS thread
                return tracker(x)
            # asi's subspace step (thin products) on one BLAS thread: a second one kept
            # 16-17 MiB more resident at N=42 (its buffers, a malloc arena) for 5-9 % less
            # time (benchmarks/scripts/numpy_parts.py: 174.3 against 166.2 ms, 42 inputs)
            with self.blas.limit(limits=1, user_api="blas"):
                return tracker(x)
        return self.row.compress(x, self.eps, self.ranks, cap, layer.stride)

    def unpack_mask(self, name: str, bits: np.ndarray) -> np.ndarray:
        """The bool (n, C, H, W) a backward reads as mask ``name``, from its bits (n, P)."""
        shape = self.mask_shapes[name]
        return np.unpackbits(bits, axis=1, count=prod(shape)).view(np.bool_).reshape(
            (len(bits), *shape))

    def _feed(self, name: str, tensors: dict):
        if names.is_mask_bool(name):  # held as bits since its forward: unpacked per slice
            return tensors[names.stored(name)]
        if name in tensors:
            return tensors[name]
        return self.params[name] if name in self.params else self.state[name]

    def _run(self, position: int, tensors: dict, out: dict) -> None:
        """Schedule item ``position`` on the live tensors; updates, gradients go to out."""
        item = self.schedule[position]
        if isinstance(item, Compress):
            layer = self.layers[item.layer]
            x = tensors[layer.input]
            # NaN/Inf cannot be decomposed: one pass to refuse them first. A method that keeps
            # x itself does no numpy work on it: a NaN reaches the loss and the step is
            # rejected there (the check cost 8 ms a step at 42 convs)
            if not self.row.keeps_input and not np.isfinite(x.sum()):
                raise NonFiniteActivation(f"the input of {layer.name} is not finite")
            if layer.input_mask:  # its backward mask, from x itself, into its pool place
                mask = layer.input_mask
                bits = tensors[mask["bits"]] = self._slot(mask["bits"], mask["bits"], self.batch)
                pack_mask(x, mask["above"], mask.get("below"), bits)
            kept = self.compress(layer, x)
            del x
            for piece, name in zip(kept.pieces, layer.kept):
                tensors[name] = np.ascontiguousarray(kept.pieces[piece], dtype=np.float32)
            out["ranks"][layer.name] = kept.rank_per_mode
            out["kept_bytes"][layer.name] = kept.nbytes
        else:
            inputs, outputs = self.io[item.graph]
            feeds = {n: self._feed(n, tensors) for n in inputs}
            placed = {}
            for name in outputs:
                held = names.stored(name)  # a bool mask's place is its bits'
                key = memplan.pool_key(held, position, tensors)
                if key in self.slots:
                    placed[name] = self._slot(key, held, self.batch)
            self._release(tensors, position)  # inputs read for the last time: feeds hold them
            results = self._run_in_slices(item, feeds, placed)
            del feeds
            for name, value in zip(outputs, results):
                if names.is_mask_bool(name):  # 1 bit an element until its backward
                    tensors[names.stored(name)] = value
                elif names.is_new(name):
                    out["updates"][names.updated_of(name)] = value
                elif name in tensors:  # d/<t> from another consumer of t: sum in place
                    np.add(tensors[name], value, out=tensors[name])
                elif names.is_grad(name):  # held for the update (and the step's result)
                    tensors[name] = out["grads"][names.param_of(name)] = value
                else:
                    tensors[name] = value
            del results
        self._release(tensors, position)

    def _run_in_slices(self, item: Run, feeds: dict, placed: dict) -> list:
        """Run a graph on the whole batch, or on slices of ``item.micro_batch`` samples (a
        partition whose every term is a map or a sum over samples: outputs with a batch dim
        are written slice by slice into their places, the others, grad/<param>, summed).
        Outputs in ``placed`` go straight into the pool; the rest are returned. A bool mask is
        packed into its bits, or unpacked from them, slice by slice: the whole bool never
        exists."""
        name = item.graph
        session, (inputs, outputs) = self.sessions[name], self.io[name]
        step = min(item.micro_batch or self.batch, self.batch)
        results = {}
        for start in range(0, self.batch, step):
            rows = slice(start, min(start + step, self.batch))
            binding = session.io_binding()
            unpacked = []  # alive until the run: the binding reads their memory
            for n in inputs:
                value = feeds[n][rows] if self.batched[n] else feeds[n]
                if names.is_mask_bool(n):
                    value = self.unpack_mask(n, value)
                    unpacked.append(value)
                binding.bind_cpu_input(n, value)
            for n in outputs:
                if n in placed and not names.is_mask_bool(n):
                    view = placed[n][rows] if self.batched[n] else placed[n]
                    binding.bind_output(n, "cpu", 0, view.dtype, view.shape, view.ctypes.data)
                else:
                    binding.bind_output(n, "cpu")
            run_bound(session, binding)
            for n, value in zip(outputs, binding.get_outputs()):
                if names.is_mask_bool(n):  # into its bits' place (memplan plans every one)
                    mask = value.numpy()
                    placed[n][rows] = np.packbits(mask.reshape(len(mask), -1), axis=1)
                    continue
                if n in placed:
                    continue
                # a copy: .numpy() is a view that would hold the block in onnxruntime's
                # arena until the result dies (a step later for a gradient), fragmenting it
                value = np.array(value.numpy())
                if n not in results:
                    results[n] = value
                elif self.batched[n]:
                    raise ValueError(f"{name}: output {n} has a batch dim but no pool place")
                else:
                    results[n] += value
            del binding, unpacked
        return [placed[n] if n in placed else results[n] for n in outputs]

    def forward(self, images: np.ndarray, labels: np.ndarray, prefix_out: dict | None = None,
                decompose: bool = True, until: int | None = None, inspect=None) -> Forward:
        """Run the schedule's forward partitions and decompositions. ``prefix_out``: the frozen
        prefix's outputs for these images, when already computed (it is then not run);
        ``decompose=False``: the partitions only (evaluation: nothing is kept); ``until``:
        only the first ``until`` schedule items; ``inspect(layer, x)``: called with each
        fine-tuned conv's input instead of decomposing it (decompose=False)."""
        tensors = {"image": np.ascontiguousarray(images, dtype=np.float32),
                   "labels": np.ascontiguousarray(labels, dtype=np.int64)}
        self.batch = len(labels)
        if self.batch > self.pool_batch:
            self.plan_pool(self.batch)
        out = {"ranks": {}, "kept_bytes": {}, "updates": {}, "grads": {}}
        seconds = {"prefix": 0.0, "forward": 0.0, "compress": 0.0}
        for position in range(self.backward_from if until is None else until):
            item = self.schedule[position]
            start = time.perf_counter()
            compress = isinstance(item, Compress)
            if compress and not decompose:
                if inspect is not None:
                    layer = self.layers[item.layer]
                    inspect(layer, tensors[layer.input])
                self._release(tensors, position)
                continue
            is_prefix = not compress and item.graph == self.prefix
            if is_prefix and prefix_out is not None:
                tensors.update(prefix_out)
                self._release(tensors, position)
                continue
            self._run(position, tensors, out)
            part = "compress" if compress else "prefix" if is_prefix else "forward"
            seconds[part] += time.perf_counter() - start
        if not decompose:
            return Forward(tensors, {}, {}, 0, {}, seconds)
        kept_bytes = out["kept_bytes"]
        per_layer = {name: kept_bytes[name] + sum(tensors[m].nbytes for m in layer.masks)
                     for name, layer in self.layers.items()}
        per_layer["classifier"] = sum(tensors[n].nbytes for n in self.head_inputs
                                      if n in tensors)
        full = sum(tensors[n].nbytes for n in tensors if n in self.backward_inputs)
        return Forward(tensors, out["ranks"], kept_bytes, int(full), per_layer, seconds)

    def layer_energies(self, images: np.ndarray) -> dict:
        """layer -> the squared singular values of each mode of its input on these images
        (decomposition.mode_energies): what an activation budget's ranks are chosen from."""
        energies = {}

        def inspect(layer, x):
            energies[layer.name] = mode_energies(x)
        self.forward(images, np.zeros(len(images), np.int64), decompose=False, inspect=inspect)
        return energies

    def fix_ranks(self, ranks: dict) -> None:
        """The ranks (one per mode) each layer's tracker keeps from its first step on (asi)."""
        for name, tracker in self.trackers.items():
            tracker.eps, tracker.ranks = None, list(ranks[name])

    def prefix_outputs(self, images: np.ndarray) -> dict:
        """The frozen prefix's outputs {name: (B, ...)} for these images (views of the pool,
        valid until the next run: copy what is kept), or {} when every conv is fine-tuned."""
        if self.prefix is None:
            return {}
        fwd = self.forward(images, np.zeros(len(images), np.int64), decompose=False,
                           until=1)
        return {n: fwd.tensors[n] for n in self.io[self.prefix][1]}

    def step(self, images: np.ndarray, labels: np.ndarray, lr: float,
             max_grad_norm: float | None = None, prefix_out: dict | None = None,
             proximal: tuple | None = None) -> StepResult:
        """One training step at learning rate lr; ``max_grad_norm``: the gradients are
        clipped to this global L2 norm before the update (recipe.clip_grad_norm);
        ``prefix_out``: the frozen prefix's outputs for these images (prefix_outputs), when
        already known; ``proximal``: (mu, anchor params), FedProx's term added to the
        gradients before clipping (recipe.add_proximal)."""
        try:
            fwd = self.forward(images, labels, prefix_out or None)
        except NonFiniteActivation:  # rejected like a NaN loss: params, state, trackers kept
            return StepResult(float("nan"), None, {}, {}, {}, applied=False)
        crash_point("step")  # fault-injection tests: a kill mid-step
        tensors = fwd.tensors
        self.step_count += 1
        tensors["lr"] = np.array(lr, np.float32)
        tensors["step"] = np.array(self.step_count, np.float32)  # AdamW's bias correction
        out = {"ranks": {}, "kept_bytes": {}, "updates": {}, "grads": {}}
        seconds = dict(fwd.seconds, backward=0.0, update=0.0)
        grad_norm = None
        for position in range(self.backward_from, len(self.schedule)):
            start = time.perf_counter()
            if position == self.update_at:  # every gradient is complete here
                grads = out["grads"]
                if proximal is not None and proximal[0]:
                    add_proximal(grads, self.params, proximal[1], proximal[0])
                grad_norm = (clip_grad_norm(grads, max_grad_norm) if max_grad_norm else
                             global_norm(grads))
                tensors.update({names.grad(name): g for name, g in grads.items()})
            self._run(position, tensors, out)
            seconds["update" if position == self.update_at else "backward"] += \
                time.perf_counter() - start
        loss = float(tensors["loss"])
        updated = out["updates"]
        applied = np.isfinite(loss) and all(np.isfinite(v).all() for v in updated.values())
        if applied:  # a NaN/Inf step is rejected: params and state stay the last good ones
            for name, value in updated.items():
                if names.is_state(name):
                    self.state[name] = value
                else:
                    self.params[name] = value
        else:
            self.step_count -= 1
        return StepResult(loss, tensors["logits"], out["grads"], fwd.ranks, fwd.kept_bytes,
                          seconds, applied, fwd.kept_full_bytes, fwd.kept_full_per_layer,
                          grad_norm)

    def state_arrays(self) -> dict:
        """Everything training needs to continue exactly: params, optimizer state, trackers."""
        arrays = names.checkpoint_arrays(self.params, self.state)
        for layer, tracker in self.trackers.items():
            arrays.update({names.tracker(layer, k): v for k, v in tracker.state().items()})
        arrays["step_count"] = np.array(self.step_count)
        return arrays

    def load_state_arrays(self, arrays: dict) -> None:
        params, state = names.under(arrays, names.PARAM), names.under(arrays, names.OPT)
        if set(params) != set(self.params) or set(state) != set(self.state):
            raise ArtifactError("checkpoint does not belong to this artifact (its arrays differ)")
        for name, value in params.items():
            if value.shape != self.params[name].shape or value.dtype != self.params[name].dtype:
                raise ArtifactError(f"array {name} is {value.dtype} {value.shape}, "
                                    f"the artifact's {self.params[name].dtype} "
                                    f"{self.params[name].shape}")
        self.params, self.state = params, state
        for layer, tracker in self.trackers.items():
            tracker.restore(names.under(arrays, names.tracker(layer, "")))
        self.step_count = int(arrays["step_count"])

    def inference_model(self, classes: list | None = None) -> bytes:
        """evaluate.onnx with the current weights baked in: runs on the image alone. Its
        metadata_props say how to use it (``deploy_metadata``); ``classes``: the names of
        its outputs (default: the artifact's)."""
        from .onnx_write import with_initializers, with_metadata
        model = (self.folder / self.manifest.graphs.evaluate).read_bytes()
        return with_metadata(with_initializers(model, self.params),
                             deploy_metadata(self.manifest, classes))

    def evaluate(self, images: np.ndarray) -> np.ndarray:
        """Logits (B, classes) of images (B, 3, H, W): the step's forward partitions without
        decompositions, in chunks of the artifact's batch, so evaluation runs in the memory
        the step already uses (its pool, micro-batches and arena)."""
        chunk = max(self.pool_batch, self.manifest.batch_size)
        logits = []
        for start in range(0, len(images), chunk):
            x = images[start:start + chunk]
            fwd = self.forward(x, np.zeros(len(x), np.int64), decompose=False)
            logits.append(np.array(fwd.tensors["logits"]))
            del fwd
        return np.concatenate(logits) if logits else np.zeros((0, self.manifest.num_classes),
                                                             np.float32)
