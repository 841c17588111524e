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
plain names in the folder; what it returns can be indexed without a KeyError or TypeError.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

from .methods import METHODS, RETIRED

FORMAT = "actcomp-edge/training-artifact"
FORMAT_VERSION = 3  # 3: the manifest carries the digest of its own content
MANIFEST = "manifest.json"
MIN_ONNXRUNTIME = "1.16.3"


class ArtifactError(ValueError):
    """An artifact that must not be run: missing, tampered, too new, or for a newer runtime."""


def sha256_file(path) -> str:
    digest = hashlib.sha256()
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
    return hashlib.sha256(canonical.encode()).hexdigest()


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


def load_manifest(folder, onnxruntime_version: str | None = None, verify: bool = True) -> dict:
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
        raise ArtifactError(f"artifact format version {version!r} predates the manifest's "
                            f"digest: re-export it with this actcomp-edge")
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
    return manifest


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
    missing = layers - {step.get("compress") for step in manifest["schedule"]}
    if missing:
        fail("schedule", f"never compresses the input of {_show(sorted(missing)[0])}")
    for name in sorted(runs | {graphs["evaluate"], "weights.npz", "optimizer.npz"}):
        if name not in manifest["files"]:
            fail("files", f"does not list {name!r}, which the runner opens")


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
