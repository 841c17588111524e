"""``export_module``: a user's nn.Module (and ``FILE.py:FUNCTION``) -> training artifact."""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from actcomp_edge.core import arch
from actcomp_edge.core.manifest import Manifest

from .artifact import export_program
from .torch_frontend import FrontendError, program_from_module
from .training_graph import TrainConfig
from .weight_files import WeightsError, mismatches, read_weight_file

NORMS = {"half": arch.HALF_NORM,
         "imagenet": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}


def load_model_file(ref: str) -> nn.Module:
    """``FILE.py:FUNCTION`` -> FUNCTION(), which must return an nn.Module."""
    path, _, function = ref.rpartition(":")
    file = Path(path)
    if not file.is_file():
        raise FrontendError(f"--model {ref}: no such file {file}")
    spec = importlib.util.spec_from_file_location(f"actcomp_user_model_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pickled references and dataclasses resolve
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's code: any error, reported in one line
        raise FrontendError(f"--model {ref}: importing {file} failed: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") \
            from None
    build = getattr(module, function, None)
    if not callable(build):
        raise FrontendError(f"--model {ref}: {file} has no function {function!r}")
    try:
        model = build()
    except TypeError as e:  # FUNCTION(...) with parameters it needs
        raise FrontendError(f"--model {ref}: {function}() must build the model with no "
                            f"arguments: {str(e).splitlines()[0]} (wrap it in one that does)") \
            from None
    except Exception as e:  # the user's code: any error, reported in one line
        raise FrontendError(f"--model {ref}: {function}() failed: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(model, nn.Module):
        raise FrontendError(f"--model {ref}: {function}() returned a {type(model).__name__}, "
                            f"not a torch.nn.Module")
    return model


def load_state(module: nn.Module, path) -> None:
    """Weights file (weight_files.FORMATS) into the module, by its own state_dict names."""
    arrays = read_weight_file(path)
    state = module.state_dict()
    wanted = [k for k in state if not k.endswith("num_batches_tracked")]
    arrays = {k: a for k, a in arrays.items() if not k.endswith("num_batches_tracked")}
    problems = mismatches({k: tuple(state[k].shape) for k in wanted}, arrays)
    if problems:
        raise WeightsError(f"weights {path} do not fit the module's state_dict: "
                           + "; ".join(problems))
    with torch.no_grad():
        for k in wanted:
            state[k].copy_(torch.from_numpy(np.asarray(arrays[k])))


@dataclass
class ModuleOptions:
    """What export_module needs besides the recipe (TrainConfig)."""
    input_size: int | tuple          # pixels: H of a square image, or (H, W)
    batch_size: int                  # the batch the memory is predicted for
    num_classes: int | None = None   # the final Linear's outputs (None: the module's own)
    classes: list | None = None      # class names (None: "0", "1", ...)
    norm: str = "half"               # the input normalisation the module expects (NORMS)
    seed: int = 0                    # torch seed of a re-initialised final Linear
    name: str | None = None          # the artifact's model name (None: the module's class)
    force: bool = False              # replace the artifact in out_dir


def export_module(module: nn.Module, out_dir, config: TrainConfig,
                  options: ModuleOptions) -> Manifest:
    """Trace the module (torch_frontend), then build its training artifact; a num_classes
    that differs from the module's re-initialises the final Linear (torch's init, seeded).
    Returns the manifest."""
    program, dropout = program_from_module(module, options.input_size, options.name)
    head = program.ops[-1]
    num_classes = options.num_classes
    if num_classes and num_classes != program.num_classes:
        torch.manual_seed(options.seed)
        fresh = nn.Linear(program.shapes[head.inputs[0]][0], num_classes,
                          bias=head.attrs["bias"] is not None)
        program.params[head.attrs["weight"]] = fresh.weight.detach().numpy().copy()
        if head.attrs["bias"]:
            program.params[head.attrs["bias"]] = fresh.bias.detach().numpy().copy()
        program.shapes["logits"] = (num_classes,)
        program.num_classes = num_classes
    return export_program(program, out_dir, config, options.batch_size, options.classes,
                          NORMS[options.norm], dropout, options.force)
