"""Save a child to disk and load it back, as a ``torch.export`` program (``.pt2``).

The child (a ``GraphModule`` called with tensors only) is exported again with its batch and
sequence axes dynamic, so the loaded module runs at any size the child runs at. Loading uses
``torch.export.load``: the file holds a serialized graph and raw tensors, so nothing in it is
unpickled as arbitrary Python objects.

Guarantees:
1. ``save`` never replaces an existing file unless ``overwrite=True``;
2. the file appears at ``path`` whole or not at all: it is written to a hidden temporary file
   in the same folder and renamed with ``os.replace`` (atomic on one file system); on any
   failure the temporary file is removed;
3. ``load(path)`` returns a module whose outputs equal the saved child's, whose parameters
   keep their names and require gradients, so it can be trained; tied weights (an embedding
   shared with the output head) are one ``Parameter`` again, as in the child.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

import torch

from .passes import state
from .passes.fx_utils import as_input_tuple, set_attribute
from .tracing import dynamic_shapes_for

__all__ = ["save", "load"]


def _example_inputs(child: torch.nn.Module, example_inputs) -> tuple:
    if example_inputs is None and hasattr(child, "meta"):
        example_inputs = state.EXAMPLE_INPUTS.get(child)
    if example_inputs is None:
        raise ValueError(f"save: the child carries no example inputs ({state.EXAMPLE_INPUTS.name}); "
                         "pass example_inputs=")
    return as_input_tuple(example_inputs)


def _export(child: torch.nn.Module, args: tuple) -> torch.export.ExportedProgram:
    return torch.export.export(child, args, strict=False,
                               dynamic_shapes=dynamic_shapes_for(child, args, {}))


def save(child: torch.nn.Module, path, *, overwrite: bool = False, example_inputs=None) -> Path:
    """Write ``child`` to ``path`` (``.pt2``) atomically; return the path (see module doc)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    program = _export(child, _example_inputs(child, example_inputs))
    path.parent.mkdir(parents=True, exist_ok=True)
    # created by torch.export.save, so it gets the usual permissions (mkstemp's are 0600)
    staged = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp.pt2")
    try:
        torch.export.save(program, str(staged))
        os.replace(staged, path)
    finally:
        if os.path.exists(staged):
            os.remove(staged)
    return path


def _retie(module: torch.nn.Module) -> None:
    """Make tied weights one ``Parameter`` again.

    ``torch.export.load`` gives the names of a tied weight one storage but a ``Parameter`` each,
    so an optimizer would keep two states for one tensor and ``parameters()`` would count it twice.
    """
    first: dict[tuple, torch.nn.Parameter] = {}
    for name, param in list(module.named_parameters(remove_duplicate=False)):
        key = (param.untyped_storage().data_ptr(), param.storage_offset(), tuple(param.shape),
               param.stride(), param.dtype)
        if key in first:
            set_attribute(module, name, first[key])
        else:
            first[key] = param


def load(path) -> torch.nn.Module:
    """Load a child written by ``save``: a module called like the child, with trainable parameters."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no saved child at {path}")
    module = torch.export.load(str(path)).module()
    _retie(module)
    return module
