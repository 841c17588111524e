"""The training artifact's manifest: format, checks (shared by exporter and device runner).

An artifact is a folder:

    manifest.json      what it is, how to run it, predicted memory, SHA-256 of every file
    forward_<p>.onnx   forward partitions (cut at every fine-tuned conv input)
    backward.onnx      gradients + optimizer update
    evaluate.onnx      image -> logits with the trainable weights as inputs
    inference.onnx     image -> logits, every weight baked in (deployable)
    overview.onnx      the whole step in one graph for people (Netron): ai.actcomp nodes mark
                       where activations are decomposed; not executed, no initializers
    weights.npz        trainable parameters (float32)
    optimizer.npz      optimizer state (float32)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

FORMAT = "actcomp-edge/training-artifact"
FORMAT_VERSION = 1
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


def version_tuple(text: str) -> tuple:
    parts = []
    for piece in str(text).split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def load_manifest(folder, onnxruntime_version: str | None = None, verify: bool = True) -> dict:
    """Read and check manifest.json: format and version, files present with their SHA-256,
    and (when given) that this onnxruntime is new enough."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder} is not a training artifact: no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not an actcomp-edge training artifact manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(f"artifact format version {version!r} is newer than this runner "
                            f"supports ({FORMAT_VERSION}): update actcomp-edge on the device")
    needed = manifest.get("min_onnxruntime", MIN_ONNXRUNTIME)
    if onnxruntime_version and version_tuple(onnxruntime_version) < version_tuple(needed):
        raise ArtifactError(f"onnxruntime {onnxruntime_version} is too old for this artifact "
                            f"(needs >= {needed})")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{path} lists no files")
    if verify:
        for name, digest in sorted(files.items()):
            file = folder / name
            if Path(name).name != name or not file.is_file():
                raise ArtifactError(f"artifact file {name} is missing from {folder}")
            if sha256_file(file) != digest:
                raise ArtifactError(f"artifact file {name} fails its SHA-256 check "
                                    f"(truncated or modified)")
    return manifest
