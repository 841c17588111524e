"""The training artifact's manifest: format, checks (shared by exporter and device runner).

An artifact is a folder:

    manifest.json      what it is, how to run it, predicted memory and the step's memory plan
                       (export.memory_plan), SHA-256 of every file
    forward_<p>.onnx   forward partitions (cut at every fine-tuned conv input)
    backward_<p>.onnx  the reverse of forward_<p> with its params' optimizer update (p = N..1)
    evaluate.onnx      image -> logits with the trainable weights as inputs
    inference.onnx     image -> logits, every weight baked in (deployable)
    overview.onnx      the whole step in one graph for people (Netron): ai.actcomp nodes mark
                       where activations are decomposed; not executed, no initializers
    weights.npz        trainable parameters (float32)
    optimizer.npz      optimizer state (float32)

`load_manifest` refuses (ArtifactError, one line naming the key) a manifest that lacks a
field the runner reads or has one of the wrong type (SCHEMA), or whose file names are not
plain names in the folder; it returns the typed ``Manifest`` (below), whose fields are the
ones SCHEMA checks. Each part keeps the keys it does not name in ``extra``, so
``Manifest.from_json(d).to_json() == d`` for every manifest this exporter writes (an older
one without ``train.activation_budget`` or a layer's ``masks`` gains them as null and []).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .methods import METHODS, RETIRED

# CPython's own SHA-256: hashlib's loads OpenSSL's libcrypto, 3.5 MiB of the board's RSS
# (README study 5; 7x slower, 60 ms for a 5 MiB artifact)
try:
    from _sha256 import sha256  # Python <= 3.11
except ImportError:  # pragma: no cover - the Python in use decides
    try:
        from _sha2 import sha256  # Python >= 3.12
    except ImportError:
        from hashlib import sha256

FORMAT = "actcomp-edge/training-artifact"
# 3: the manifest carries the digest of its own content; 4: masks cross between graphs as
# bool, held as bits by the runner, which also makes the masks of fine-tuned conv inputs
# (``Layer.input_mask``)
FORMAT_VERSION = 4
MANIFEST = "manifest.json"
MIN_ONNXRUNTIME = "1.16.3"


class ArtifactError(ValueError):
    """An artifact that must not be run: missing, tampered, too new, or for a newer runtime."""


def sha256_file(path) -> str:
    digest = sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_classes(path) -> list:
    """An ImageFolder's class names in label order: its sub-folder names, sorted (what the
    runner's data loader labels, and what `actcomp export --classes DIR` writes)."""
    return sorted(p.name for p in Path(path).iterdir() if p.is_dir())


def version_tuple(text: str) -> tuple:
    parts = []
    for piece in str(text).split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch in "0123456789")  # not "²": int() fails
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def content_digest(manifest: dict) -> str:
    """SHA-256 of the manifest's content: its canonical JSON without the "digest" field."""
    content = {k: v for k, v in manifest.items() if k != "digest"}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return sha256(canonical.encode()).hexdigest()


def manifest_bytes(manifest: dict) -> bytes:
    """manifest.json: the manifest with its content digest."""
    signed = dict(manifest, digest=content_digest(manifest))
    return (json.dumps(signed, indent=1, sort_keys=True) + "\n").encode()


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} does not fit a float")
    return value


def load_manifest(folder, onnxruntime_version: str | None = None,
                  verify: bool = True) -> Manifest:
    """Read and check manifest.json: format and version, every field the runner reads (see
    SCHEMA), (when given) that this onnxruntime is new enough, and with ``verify`` its own
    content against its digest and every file against its SHA-256."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder} is not a training artifact: no {MANIFEST}")
    try:
        manifest = json.loads(path.read_bytes(), parse_constant=_no_constant,
                              parse_float=_finite_float)
    except (OSError, ValueError, RecursionError) as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not an actcomp-edge training artifact manifest")
    version = manifest.get("format_version")
    if _is_int(version) and version > FORMAT_VERSION:
        raise ArtifactError(f"artifact format version {version!r} is newer than this runner "
                            f"supports ({FORMAT_VERSION}): update actcomp-edge on the device")
    if _is_int(version) and version < FORMAT_VERSION:
        raise ArtifactError(f"artifact format version {version!r} is older than this runner "
                            f"runs ({FORMAT_VERSION}): re-export it with this actcomp-edge")
    check_schema(manifest, path)
    needed = manifest["min_onnxruntime"]
    if onnxruntime_version and version_tuple(onnxruntime_version) < version_tuple(needed):
        raise ArtifactError(f"onnxruntime {onnxruntime_version} is too old for this artifact "
                            f"(needs >= {needed})")
    if verify:
        if manifest["digest"] != content_digest(manifest):
            raise ArtifactError(f"{path} was edited after export (its content does not match "
                                f"its digest): re-export the artifact")
        for name, digest in sorted(manifest["files"].items()):
            file = folder / name
            try:
                if not file.is_file():
                    raise ArtifactError(f"artifact file {name} is missing from {folder}")
                if sha256_file(file) != digest:
                    raise ArtifactError(f"artifact file {name} fails its SHA-256 check "
                                        f"(truncated or modified)")
            except OSError as e:
                raise ArtifactError(f"artifact file {name} cannot be read: {e.strerror or e}") \
                    from None
    return Manifest.from_json(manifest)


# ---------------------------------------------------------------- schema

MAX_COUNT = 2 ** 31 - 1   # sizes, counts, strides
MAX_ELEMENTS = 2 ** 40    # of one activation (C, H, W), so that B*C*H*W fits an int64


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_count(v) -> bool:
    return _is_int(v) and 1 <= v <= MAX_COUNT


def _is_number(v) -> bool:
    return _is_int(v) or isinstance(v, float) and math.isfinite(v)


def _is_text(v) -> bool:
    """A str that prints as UTF-8 (JSON can spell a lone surrogate: "\\ud800")."""
    if not isinstance(v, str):
        return False
    try:
        v.encode()
    except UnicodeEncodeError:
        return False
    return True


def _is_file_name(v) -> bool:
    """A plain file name in the artifact folder: no directory part, not "." or "..", no NUL."""
    return (_is_text(v) and v not in ("", ".", "..") and not any(c in v for c in "/\\\0")
            and len(v.encode()) <= 255)


def _is_version(v) -> bool:
    return _is_text(v) and re.fullmatch(r"[0-9]{1,9}(\.[0-9]{1,9}){0,3}", v) is not None


def _list_of(test, lengths=None):
    return lambda v: (isinstance(v, list) and (lengths is None or len(v) in lengths)
                      and all(map(test, v)))


def _is_shape(v) -> bool:
    return _list_of(_is_count, (3,))(v) and math.prod(v) <= MAX_ELEMENTS


def _is_step(v) -> bool:
    return isinstance(v, dict) and (
        v.keys() in ({"run"}, {"run", "micro_batch"}) and _is_file_name(v["run"])
        and _is_count(v.get("micro_batch", 1))
        or v.keys() == {"compress"} and _is_text(v["compress"]))


def _is_input_mask(v) -> bool:
    return isinstance(v, dict) and v.keys() in ({"bits", "above"}, {"bits", "above", "below"}) \
        and _is_text(v["bits"]) and all(_is_number(v[k]) for k in v.keys() - {"bits"})


def _is_rank_model(v) -> bool:
    """memory_plan.rank_model: null, or {"numpy_fixed_at": [bytes per schedule position],
    "arena": {graph file: {"symbols": [[layer, mode 0..3], ...], "positions": [[[c, [e per
    symbol]], ...], ...]}}} (export.memory_plan.rank_model)."""
    def is_term(t, n):
        return isinstance(t, list) and len(t) == 2 and _is_int(t[0]) and t[0] >= 0 and \
            _list_of(lambda e: _is_int(e) and 0 <= e <= 8)(t[1]) and len(t[1]) == n

    def is_graph(g):
        if not (isinstance(g, dict) and g.keys() == {"symbols", "positions"}
                and _list_of(lambda s: isinstance(s, list) and len(s) == 2 and _is_text(s[0])
                             and _is_int(s[1]) and 0 <= s[1] <= 3)(g["symbols"])):
            return False
        n = len(g["symbols"])
        return _list_of(_list_of(lambda t: is_term(t, n)))(g["positions"])
    return v is None or (
        isinstance(v, dict) and v.keys() == {"numpy_fixed_at", "arena"}
        and _list_of(lambda b: _is_int(b) and b >= 0)(v["numpy_fixed_at"])
        and isinstance(v["arena"], dict) and all(_is_file_name(k) and is_graph(g)
                                                for k, g in v["arena"].items()))


OBJECT = ("an object", lambda v: isinstance(v, dict))
TEXT = ("a string", _is_text)
TEXTS = ("a list of strings", _list_of(_is_text))
COUNT = (f"an integer in 1..{MAX_COUNT}", _is_count)
BYTES = ("an integer in 0..2**63-1", lambda v: _is_int(v) and 0 <= v < 2 ** 63)
FILE = ("a plain file name", _is_file_name)
# What the device runner, `actcomp-device info` and `actcomp check` read: key -> (what it
# must be, test). "[]": every item of a list; "?": optional; a key's parent comes first.
SCHEMA = {
    "format_version": ("an integer >= 1", lambda v: _is_int(v) and 1 <= v <= FORMAT_VERSION),
    "digest": ("a SHA-256 (64 hex digits)",
               lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None),
    "model": TEXT,
    "opset": COUNT,
    "min_onnxruntime": ("a version like 1.16.3", _is_version),
    "input": OBJECT,
    "input.height": COUNT,
    "input.width": COUNT,
    "input.mean": ("a list of 1 or 3 numbers", _list_of(_is_number, (1, 3))),
    "input.std": ("a list of 1 or 3 non-zero numbers",
                  _list_of(lambda x: _is_number(x) and x != 0, (1, 3))),
    "num_classes": COUNT,
    "classes?": ("null or a list of strings", lambda v: v is None or _list_of(_is_text)(v)),
    "dropout_not_applied?": ("null or a number in [0, 1)",
                             lambda v: v is None or _is_number(v) and 0 <= v < 1),
    "batch_size": COUNT,
    "train": OBJECT,
    "train.method": (f"one of {', '.join(METHODS)}", lambda v: _is_text(v) and v in METHODS),
    "train.eps": ("null or a number", lambda v: v is None or _is_number(v)),
    "train.ranks": ("null or a list of integers >= 1", lambda v: v is None
                    or _list_of(_is_count)(v)),
    "train.rank_cap": ("null, an integer >= 1 or a list of them (or nulls)",
                       lambda v: v is None or _is_count(v)
                       or _list_of(lambda x: x is None or _is_count(x))(v)),
    "train.activation_budget?": ("null or a number of bytes >= 1",
                                 lambda v: v is None or _is_count(v)),
    "train.optimizer": TEXT,
    "train.momentum?": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1),
    "trainable_layers": ("a list", lambda v: isinstance(v, list)),
    "trainable_layers[]": OBJECT,
    "trainable_layers[].name": TEXT,
    "trainable_layers[].input": TEXT,
    "trainable_layers[].input_shape": ("a list of 3 integers >= 1 (C, H, W) of at most "
                                       "2**40 elements", _is_shape),
    "trainable_layers[].stride": ("an integer >= 1 or a list of 2 (height, width)",
                                  lambda v: _is_count(v) or _list_of(_is_count, (2,))(v)),
    "trainable_layers[].kept": TEXTS,
    "trainable_layers[].masks?": TEXTS,
    "trainable_layers[].input_mask?": ('{"bits": string, "above": number (, "below": '
                                       'number)}', _is_input_mask),
    "trainable_params": TEXTS,
    "graphs": OBJECT,
    "graphs.forward": ("a list of plain file names", _list_of(_is_file_name)),
    "graphs.backward": ("a non-empty list of plain file names",
                        lambda v: _list_of(_is_file_name)(v) and bool(v)),
    "graphs.evaluate": FILE,
    "schedule": ("a non-empty list", lambda v: isinstance(v, list) and bool(v)),
    "schedule[]": ('{"run": file name (, "micro_batch": samples a run)} or {"compress": layer '
                   'name}', _is_step),
    "predicted_memory": OBJECT,
    "predicted_memory.batch_size": COUNT,
    "predicted_memory.input_size": ("a list of 2 integers >= 1", _list_of(_is_count, (2,))),
    "predicted_memory.rank_basis": TEXT,
    "predicted_memory.paper_bytes": BYTES,
    "predicted_memory.full_bytes": BYTES,
    "memory_plan": OBJECT,
    "memory_plan.batch_size": COUNT,
    "memory_plan.rank_basis": TEXT,
    "memory_plan.working_set_bytes": BYTES,
    "memory_plan.pool_bytes": BYTES,
    "memory_plan.arena_bytes": BYTES,
    "memory_plan.numpy_peak_bytes": BYTES,
    "memory_plan.peak_at": TEXT,
    "memory_plan.arena_bytes_per_graph?": ("an object of graph file -> bytes", lambda v:
                                           isinstance(v, dict) and all(
                                               _is_file_name(k) and _is_int(b) and b >= 0
                                               for k, b in v.items())),
    "memory_plan.session_bytes?": BYTES,
    "memory_plan.rank_model?": ('null or {"numpy_fixed_at": [bytes], "arena": {file: '
                                '{"symbols": [[layer, mode]], "positions": [[[c, [e]]]]}}}',
                                _is_rank_model),
    "files": ("a non-empty object", lambda v: isinstance(v, dict) and bool(v)),
}


def check_schema(manifest: dict, where) -> None:
    """A one-line ArtifactError naming the key unless every SCHEMA key is there with the
    right type, every name in "files" is a plain file name with a SHA-256, and the names the
    runner follows lead somewhere: "run" to a forward graph or the backward, "compress" to a
    trainable layer (each one's), every file it opens to an entry of "files"; a method for
    square convs only (gf-r2) has one stride per layer."""
    def fail(key, problem):
        raise ArtifactError(f"{where}: key {key!r} {problem}")

    train = manifest.get("train")
    method = train.get("method") if isinstance(train, dict) else None
    if isinstance(method, str) and method in RETIRED:
        fail("train.method", f"is {method!r}, which {RETIRED[method]} replaced: export the "
                             f"model again with --method {RETIRED[method]}")
    for pattern, (what, test) in SCHEMA.items():
        for key, value in _lookup(manifest, pattern, fail):
            if not test(value):
                fail(key, f"must be {what}, got {_show(value)}")
    for name, digest in manifest["files"].items():
        if not _is_file_name(name):
            fail("files", f"lists {_show(name)}, which is not a plain file name in the folder")
        if not (isinstance(digest, str) and re.fullmatch("[0-9a-f]{64}", digest)):
            fail(f"files.{name}", f"must be a SHA-256 (64 hex digits), got {_show(digest)}")
    classes = manifest.get("classes")
    if classes is not None and len(classes) != manifest["num_classes"]:
        fail("classes", f"names {len(classes)} classes, num_classes is "
                        f"{manifest['num_classes']}")
    graphs = manifest["graphs"]
    runs = set(graphs["forward"]) | set(graphs["backward"])
    layers = {layer["name"] for layer in manifest["trainable_layers"]}
    for i, step in enumerate(manifest["schedule"]):
        if "run" in step and step["run"] not in runs:
            fail(f"schedule[{i}].run", f"names no forward or backward graph: {_show(step['run'])}")
        if "compress" in step and step["compress"] not in layers:
            fail(f"schedule[{i}].compress", f"names no trainable layer: "
                                            f"{_show(step['compress'])}")
    if METHODS[manifest["train"]["method"]].square_only:
        for i, layer in enumerate(manifest["trainable_layers"]):
            if not isinstance(layer["stride"], int):
                fail(f"trainable_layers[{i}].stride", f"must be one integer for "
                     f"{manifest['train']['method']}, got {_show(layer['stride'])}")
    model = manifest["memory_plan"].get("rank_model")
    if model is not None:  # what working_set_at reads: a position each, known layers, modes
        modes = len(METHODS[manifest["train"]["method"]].rank_symbols)
        if not modes:
            fail("memory_plan.rank_model", f"must be null for {manifest['train']['method']}, "
                                           f"which has no ranks")
        if "arena_bytes_per_graph" not in manifest["memory_plan"]:
            fail("memory_plan.rank_model", "needs memory_plan.arena_bytes_per_graph beside it")
        if any(mode >= modes for entry in model["arena"].values()
               for _, mode in entry["symbols"]):
            fail("memory_plan.rank_model", f"names a mode past the method's {modes} ranks")
        if len(model["numpy_fixed_at"]) != len(manifest["schedule"]):
            fail("memory_plan.rank_model.numpy_fixed_at", f"has {len(model['numpy_fixed_at'])} "
                 f"positions, the schedule {len(manifest['schedule'])}")
        for graph, entry in model["arena"].items():
            unknown = {layer for layer, _ in entry["symbols"]} - layers
            if unknown or graph not in manifest["memory_plan"].get("arena_bytes_per_graph", {}):
                fail(f"memory_plan.rank_model.arena.{graph}", "names a graph or layer the plan "
                     f"does not have: {_show(sorted(unknown)[0] if unknown else graph)}")
    missing = layers - {step.get("compress") for step in manifest["schedule"]}
    if missing:
        fail("schedule", f"never compresses the input of {_show(sorted(missing)[0])}")
    opened = runs | {graphs["evaluate"], "weights.npz", "optimizer.npz"}
    opened |= _nchwc_files(graphs, runs, fail)
    for name in sorted(opened):
        if name not in manifest["files"]:
            fail("files", f"does not list {name!r}, which the runner opens")


def _nchwc_files(graphs: dict, runs: set, fail) -> set:
    """The files graphs.nchwc names (Graphs.nchwc), after checking its form."""
    nchwc = graphs.get("nchwc")
    if nchwc is None:
        return set()
    if not (isinstance(nchwc, dict) and isinstance(nchwc.get("variants"), dict)
            and all(_is_file_name(nchwc.get(k)) for k in ("probe", "probe_data"))):
        fail("graphs.nchwc", 'must be {"variants": {run: file name}, "probe": file name, '
                             f'"probe_data": file name}}, got {_show(nchwc)}')
    for run, variant in nchwc["variants"].items():
        if run not in runs or not _is_file_name(variant):
            fail(f"graphs.nchwc.variants.{run}", f"must map a forward or backward graph to a "
                                                 f"file name, got {_show(variant)}")
    return set(nchwc["variants"].values()) | {nchwc["probe"], nchwc["probe_data"]}


def _lookup(manifest: dict, pattern: str, fail):
    """(key, value) of every node a SCHEMA pattern names; fail() where one is missing."""
    nodes = [("", manifest)]
    parts = pattern.rstrip("?").split(".")
    for depth, part in enumerate(parts):
        name, every = part.rstrip("[]"), part.endswith("[]")
        found = []
        for prefix, node in nodes:
            key = f"{prefix}.{name}" if prefix else name
            if name not in node:
                if pattern.endswith("?") and depth == len(parts) - 1:
                    continue
                fail(key, "is missing")
            if every:
                found += [(f"{key}[{i}]", item) for i, item in enumerate(node[name])]
            else:
                found.append((key, node[name]))
        nodes = found
    return nodes


def _show(value) -> str:
    """A JSON value, shortened for an error message."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------- types

def _rest(d: dict, named) -> dict:
    """The keys of a manifest part that its type does not name, as they are."""
    return {k: v for k, v in d.items() if k not in named}


@dataclass
class Input:
    """The image batch the graphs take: float32 (B, 3, height, width), RGB,
    (pixel / 255 - mean) / std."""
    height: int             # pixels
    width: int              # pixels
    mean: list              # 1 or 3 numbers, per channel
    std: list               # 1 or 3 non-zero numbers, per channel
    extra: dict = field(default_factory=dict)  # channels, layout, pixel_scale

    def to_json(self) -> dict:
        return {**self.extra, "height": self.height, "width": self.width, "mean": self.mean,
                "std": self.std}

    @classmethod
    def from_json(cls, d: dict) -> Input:
        return cls(d["height"], d["width"], d["mean"], d["std"],
                   _rest(d, ("height", "width", "mean", "std")))


@dataclass
class Train:
    """The training recipe the graphs were made for (export's TrainConfig)."""
    method: str                  # a METHODS name
    eps: float | None            # explained-variance threshold of the ranks; None: fixed ranks
    ranks: list | None           # fixed ranks, one per mode
    rank_cap: int | list | None  # the largest rank of every mode, or one per mode (or None)
    optimizer: str               # sgd or adamw
    activation_budget: int | None = None  # bytes of kept activations, all layers (asi)
    momentum: float | None = None         # sgd's; None: not written
    extra: dict = field(default_factory=dict)  # n_layers, weight_decay, betas, ...

    def to_json(self) -> dict:
        momentum = {} if self.momentum is None else {"momentum": self.momentum}
        return {**self.extra, "method": self.method, "eps": self.eps, "ranks": self.ranks,
                "rank_cap": self.rank_cap, "optimizer": self.optimizer,
                "activation_budget": self.activation_budget, **momentum}

    @classmethod
    def from_json(cls, d: dict) -> Train:
        named = ("method", "eps", "ranks", "rank_cap", "optimizer", "activation_budget",
                 "momentum")
        return cls(d["method"], d["eps"], d["ranks"], d["rank_cap"], d["optimizer"],
                   d.get("activation_budget"), d.get("momentum"), _rest(d, named))


@dataclass
class Layer:
    """A fine-tuned conv: what the device decomposes and the tensors its backward takes."""
    name: str
    input: str             # the tensor the device decomposes (the conv's input)
    input_shape: list      # (C, H, W) of input, one sample
    stride: int | list     # the conv's stride, or (height, width)
    kept: list             # names of the kept pieces (names.kept), in the method's order
    # what its forward partition keeps beside the pieces: masks, argmaxes, saved acts and
    # factors (names.is_saved), a squeeze-excitation Linear's input
    masks: list = field(default_factory=list)
    # the backward mask of the input x the runner packs at the decomposition, from x itself:
    # {"bits": names.mask_bits(x), "above": lo, "below": hi (absent: none)}, lo < x < hi
    # (x is a clip's or a leaky ReLU's output: exactly its input's mask); None: not one
    input_mask: dict | None = None
    extra: dict = field(default_factory=dict)  # output_shape, kernel, padding, groups, ...

    def to_json(self) -> dict:
        return {**self.extra, "name": self.name, "input": self.input,
                "input_shape": self.input_shape, "stride": self.stride, "kept": self.kept,
                "masks": self.masks,
                **({"input_mask": self.input_mask} if self.input_mask else {})}

    @classmethod
    def from_json(cls, d: dict) -> Layer:
        named = ("name", "input", "input_shape", "stride", "kept", "masks", "input_mask")
        return cls(d["name"], d["input"], d["input_shape"], d["stride"], d["kept"],
                   d.get("masks", []), d.get("input_mask"), _rest(d, named))


@dataclass
class Run:
    """A schedule step: run graph file ``graph``, on slices of ``micro_batch`` samples."""
    graph: str
    micro_batch: int | None = None  # None: the whole batch at once

    def to_json(self) -> dict:
        slices = {} if self.micro_batch is None else {"micro_batch": self.micro_batch}
        return {"run": self.graph, **slices}


@dataclass
class Compress:
    """A schedule step: decompose the input of fine-tuned conv ``layer`` (numpy)."""
    layer: str

    def to_json(self) -> dict:
        return {"compress": self.layer}


def step_from_json(d: dict) -> Run | Compress:
    """A schedule item: {"run": file (, "micro_batch": n)} or {"compress": layer}."""
    if "compress" in d:
        return Compress(d["compress"])
    return Run(d["run"], d.get("micro_batch"))


@dataclass
class Graphs:
    """The graph files: forward partitions and backward runs in order, and the evaluator."""
    forward: list    # forward_<p>.onnx of the partitions with nodes
    backward: list   # backward_<p>.onnx in execution order, then update.onnx
    evaluate: str    # image -> logits, the trainable weights as inputs
    extra: dict = field(default_factory=dict)  # inference, overview
    # {"variants": {forward or backward run: its form on onnxruntime's NCHWc kernels},
    # "probe": a graph of those kernels, "probe_data": its x, dy and expected dw (npz)}; {}: none
    nchwc: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {**self.extra, "forward": self.forward, "backward": self.backward,
                "evaluate": self.evaluate, **({"nchwc": self.nchwc} if self.nchwc else {})}

    @classmethod
    def from_json(cls, d: dict) -> Graphs:
        return cls(d["forward"], d["backward"], d["evaluate"],
                   _rest(d, ("forward", "backward", "evaluate", "nchwc")), d.get("nchwc", {}))


@dataclass
class PredictedMemory:
    """The memory model's prediction of what is kept for backward (core.memory.Plan)."""
    batch_size: int
    input_size: list     # (height, width)
    rank_basis: str      # how the ranks were obtained: exact / fixed / bound
    paper_bytes: int     # the fine-tuned convs' inputs as kept
    full_bytes: int      # and the masks and the classifier's input
    extra: dict = field(default_factory=dict)  # model, method, eps, layers, *_mib

    def to_json(self) -> dict:
        return {**self.extra, "batch_size": self.batch_size, "input_size": self.input_size,
                "rank_basis": self.rank_basis, "paper_bytes": self.paper_bytes,
                "full_bytes": self.full_bytes}

    @classmethod
    def from_json(cls, d: dict) -> PredictedMemory:
        named = ("batch_size", "input_size", "rank_basis", "paper_bytes", "full_bytes")
        return cls(*(d[k] for k in named), _rest(d, named))


@dataclass
class MemoryPlan:
    """One step's planned memory at batch_size (export.memory_plan.step_plan), in bytes."""
    batch_size: int
    rank_basis: str
    working_set_bytes: int   # pool + arena + numpy's peak + session_bytes (in extra)
    pool_bytes: int          # the tensors held between graph runs
    arena_bytes: int         # the largest intermediates of one graph run
    numpy_peak_bytes: int    # the decompositions' kept pieces and workspace, at their peak
    peak_at: str             # the schedule step where the working set peaks
    extra: dict = field(default_factory=dict)  # arena_graph, arena_bytes_per_graph,
    #                                            session_bytes, rank_model

    def to_json(self) -> dict:
        return {**self.extra, "batch_size": self.batch_size, "rank_basis": self.rank_basis,
                "working_set_bytes": self.working_set_bytes, "pool_bytes": self.pool_bytes,
                "arena_bytes": self.arena_bytes, "numpy_peak_bytes": self.numpy_peak_bytes,
                "peak_at": self.peak_at}

    @classmethod
    def from_json(cls, d: dict) -> MemoryPlan:
        named = ("batch_size", "rank_basis", "working_set_bytes", "pool_bytes", "arena_bytes",
                 "numpy_peak_bytes", "peak_at")
        return cls(*(d[k] for k in named), _rest(d, named))


@dataclass
class Manifest:
    """manifest.json: what the artifact is and how to run a training step of it."""
    model: str
    input: Input
    num_classes: int
    batch_size: int                # the batch the graphs and the memory plan were made for
    train: Train
    trainable_layers: list         # of Layer, in forward order
    trainable_params: list         # param names (weights.npz)
    graphs: Graphs
    schedule: list                 # of Run and Compress: one training step in order
    predicted_memory: PredictedMemory
    memory_plan: MemoryPlan
    files: dict                    # file name -> SHA-256 hex digest
    opset: int
    min_onnxruntime: str           # the oldest onnxruntime that runs the graphs
    format_version: int = FORMAT_VERSION
    classes: list | None = None    # class names in label order; None: not written
    dropout_not_applied: float | None = None  # the model's dropout p the graphs leave out
    digest: str | None = None      # content_digest, as read (manifest_bytes writes it)
    extra: dict = field(default_factory=dict)  # ir_version, anything else

    def to_json(self) -> dict:
        optional = {k: v for k, v in (("classes", self.classes), ("digest", self.digest),
                                      ("dropout_not_applied", self.dropout_not_applied))
                    if v is not None}
        return {**self.extra, "format": FORMAT, "format_version": self.format_version,
                "model": self.model, "input": self.input.to_json(),
                "num_classes": self.num_classes, "batch_size": self.batch_size,
                "train": self.train.to_json(),
                "trainable_layers": [layer.to_json() for layer in self.trainable_layers],
                "trainable_params": self.trainable_params, "graphs": self.graphs.to_json(),
                "schedule": [step.to_json() for step in self.schedule],
                "predicted_memory": self.predicted_memory.to_json(),
                "memory_plan": self.memory_plan.to_json(), "files": self.files,
                "opset": self.opset, "min_onnxruntime": self.min_onnxruntime, **optional}

    @classmethod
    def from_json(cls, d: dict) -> Manifest:
        named = ("format", "format_version", "model", "input", "num_classes", "batch_size",
                 "train", "trainable_layers", "trainable_params", "graphs", "schedule",
                 "predicted_memory", "memory_plan", "files", "opset", "min_onnxruntime",
                 "classes", "dropout_not_applied", "digest")
        return cls(
            d["model"], Input.from_json(d["input"]), d["num_classes"], d["batch_size"],
            Train.from_json(d["train"]), [Layer.from_json(x) for x in d["trainable_layers"]],
            d["trainable_params"], Graphs.from_json(d["graphs"]),
            [step_from_json(x) for x in d["schedule"]],
            PredictedMemory.from_json(d["predicted_memory"]),
            MemoryPlan.from_json(d["memory_plan"]), d["files"], d["opset"],
            d["min_onnxruntime"], d["format_version"], d.get("classes"),
            d.get("dropout_not_applied"), d.get("digest"), _rest(d, named))
