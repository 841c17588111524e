"""Weight files -> {name: float32 array}, by suffix; never an untrusted pickle.

| suffix            | read with                                  |
|-------------------|--------------------------------------------|
| .npz              | numpy, allow_pickle=False                  |
| .pth .pt          | torch.load(weights_only=True): tensors only |
| .safetensors      | safetensors (the ``export`` extra)         |

A ``.pth`` may hold the state_dict itself or wrap it as ``{"state_dict": ...}`` /
``{"model": ...}``; a ``module.`` prefix on every name (DataParallel) is dropped.
Every failure is a WeightsError of one short line.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

MAX_DETAIL = 160  # characters of an underlying error kept in the message


class WeightsError(ValueError):
    """A weights file that cannot be read, or does not fit the model."""


def _detail(e: Exception) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= MAX_DETAIL else text[:MAX_DETAIL] + "..."


def read_npz(path: Path) -> dict:
    if not zipfile.is_zipfile(path):  # np.load would take any other bytes for a pickle
        raise WeightsError(f"cannot read weights {path}: not an .npz (a zip of .npy arrays)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except ValueError as e:
        if "pickle" in str(e):
            raise WeightsError(f"cannot read weights {path}: it holds pickled objects, not "
                               f"arrays") from None
        raise WeightsError(f"cannot read weights {path}: {_detail(e)}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise WeightsError(f"cannot read weights {path}: not an .npz ({_detail(e)})") from None


def read_torch(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise WeightsError(f"refusing weights {path}: unpickling it would run code "
                               f"(weights_only=True allows tensors only); save "
                               f"model.state_dict() instead") from None
        raise WeightsError(f"cannot read weights {path}: not a torch file") from None
    except Exception as e:  # a non-torch file fails anywhere in torch's legacy reader
        raise WeightsError(f"cannot read weights {path}: not a torch file ({_detail(e)})") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise WeightsError(f"cannot read weights {path}: it holds a {type(obj).__name__}, not a "
                           f"state_dict of tensors")
    names = list(obj)
    if all(n.startswith("module.") for n in names):
        obj = {n[len("module."):]: v for n, v in obj.items()}
    return {n: v.detach().to(torch.float32).numpy() if v.is_floating_point() else v.numpy()
            for n, v in obj.items()}


def read_safetensors(path: Path) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise WeightsError(f"reading {path} needs the safetensors package: pip install "
                           f"'actcomp-edge[export]'") from None
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError
        raise WeightsError(f"cannot read weights {path}: not a .safetensors file "
                           f"({_detail(e)})") from None
    return {n: v.to(torch.float32).numpy() if v.is_floating_point() else v.numpy()
            for n, v in tensors.items()}


def listing(names: list, limit: int = 3) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def mismatches(expected: dict, arrays: dict, strict: bool = True) -> list:
    """What keeps arrays {name: array} from filling expected {name: shape}, as short lists: a
    shape mismatch always, missing and unexpected names when strict."""
    wrong = [f"{n}: expected {tuple(shape)}, got {arrays[n].shape}" for n, shape in
             expected.items() if n in arrays and tuple(arrays[n].shape) != tuple(shape)]
    missing = [n for n in expected if n not in arrays]
    unexpected = [n for n in arrays if n not in expected]
    problems = ["shape mismatch " + listing(wrong, 2)] if wrong else []
    if strict and missing:
        problems.append("missing " + listing(missing))
    if strict and unexpected:
        problems.append("unexpected " + listing(unexpected))
    return problems


FORMATS = {".npz": read_npz, ".pth": read_torch, ".pt": read_torch,
           ".safetensors": read_safetensors}


def read_weight_file(path) -> dict:
    """{name: array} of a weights file (FORMATS, by suffix)."""
    path = Path(path)
    reader = FORMATS.get(path.suffix.lower())
    if reader is None:
        raise WeightsError(f"cannot read weights {path}: unknown format "
                           f"'{path.suffix or '(no suffix)'}'; give {', '.join(FORMATS)}")
    if not path.is_file():
        raise WeightsError(f"cannot read weights {path}: no such file")
    return reader(path)
