"""Save a child to disk and load it back, as a ``torch.export`` program (``.pt2``).

The child (a ``GraphModule`` called with tensors only) is exported again with its batch and
sequence axes dynamic, so the loaded module runs at any size the child runs at. Loading uses
``torch.export.load``: the file holds a serialized graph and raw tensors, so nothing in it is
unpickled as arbitrary Python objects.

Guarantees:
1. ``save`` checks the destination before exporting and never replaces an existing file unless
   ``overwrite=True`` (``outputs.check_destination``);
2. the file appears at ``path`` whole or not at all: it is written into a staging folder beside
   it (``outputs.staging_folder``) under its own name — so the archive's root folder is the
   file's stem and the same child gives the same bytes — and moved with ``os.replace``;
3. before it is moved, the written file is loaded back and its outputs compared with the
   child's at the child's dtype tolerance (``tolerance.tolerance_for``);
4. ``load(path)`` works in a fresh interpreter: the modules defining the child's output types
   (a Hugging Face ``CausalLMOutputWithPast``, registered with torch's pytree when its module is
   imported) are recorded in the archive (``extra/subclone.json``) and imported before the
   program is deserialized (only names of installed modules are imported; nothing is
   unpickled — but, as with any checkpoint, load files you trust);
5. ``load(path)`` returns a module whose outputs equal the saved child's, whose parameters
   keep their names and require gradients, so it can be trained; tied weights (an embedding
   shared with the output head) are one ``Parameter`` again, as in the child.

The loaded module takes the child's inputs only (e.g. ``input_ids``, not ``labels=``); compute a
training loss from its logits, e.g. ``F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())``.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import zipfile
from pathlib import Path

import torch
import torch.utils._pytree as pytree

from subclone_graph.export.destination import check_destination, staging_folder
from subclone_graph.passes import state
from subclone_graph.passes.fx_utils import as_input_tuple, set_attribute
from subclone_graph.export.tolerance import max_difference, model_dtype, tolerance_for
from subclone_graph.tracing import dynamic_shapes_for

__all__ = ["save", "load", "load_with_inputs", "RoundTripError"]

_EXTRA = "subclone.json"
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class RoundTripError(RuntimeError):
    """The ``.pt2`` written for a child does not reproduce the child's outputs."""


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


def _spec_modules(spec) -> set[str]:
    """Modules defining the container types of a pytree spec (not builtins, not torch's own)."""
    found, stack = set(), [spec]
    while stack:
        node = stack.pop()
        kind = getattr(node, "type", None)
        module = getattr(kind, "__module__", "builtins") if kind is not None else "builtins"
        if module not in ("builtins", "collections") and not module.startswith("torch"):
            found.add(module)
        stack.extend(node.children() if hasattr(node, "children") else node.children_specs)
    return found


def _tensors(output) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor)]


def _check_round_trip(child, file: Path, args: tuple, path: Path) -> None:
    with torch.no_grad():
        expected = _tensors(child(*args))
        got = _tensors(load(file)(*args))
    dtype = model_dtype(child)
    diff, scale = max_difference(expected, got)
    if len(got) != len(expected) or not diff <= tolerance_for(dtype) * scale:
        raise RoundTripError(f"the saved .pt2 differs from the child by {diff:.3g} (> {tolerance_for(dtype):g} × "
                             f"{scale:.3g} for {dtype}); nothing written to {path}")


def save(child: torch.nn.Module, path, *, overwrite: bool = False, example_inputs=None) -> Path:
    """Write ``child`` to ``path`` (``.pt2``) atomically and checked; return the path (see module doc)."""
    path = check_destination(path, overwrite=overwrite)
    args = _example_inputs(child, example_inputs)
    program = _export(child, args)
    modules = sorted(_spec_modules(program.call_spec.out_spec) | _spec_modules(program.call_spec.in_spec))
    with staging_folder(path.parent) as staging:
        staged = staging / path.name
        torch.export.save(program, str(staged), extra_files={_EXTRA: json.dumps({"pytree_modules": modules})})
        _check_round_trip(child, staged, args, path)
        os.replace(staged, path)
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


def _import_output_types(path: Path) -> None:
    """Import the modules that register the child's output types (recorded by ``save``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/extra/" + _EXTRA)]
            recorded = json.loads(archive.read(names[0])) if names else {}
    except (zipfile.BadZipFile, OSError, ValueError, KeyError) as error:
        raise ValueError(f"{path}: not a .pt2 archive written by subclone_graph.save ({error})") from error
    for module in recorded.get("pytree_modules", []):
        if not isinstance(module, str) or not _MODULE_NAME.match(module):
            raise ValueError(f"{path}: bad module name {module!r} in {_EXTRA}")
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ImportError(f"{path}: its outputs are {module} types; install the package that provides "
                              f"{module.split('.')[0]!r} to load it ({error})") from error


def _load_program(path) -> torch.export.ExportedProgram:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no saved child at {path}")
    _import_output_types(path)
    try:
        return torch.export.load(str(path))
    except RuntimeError as error:
        raise ValueError(f"{path}: cannot read this .pt2 ({str(error).splitlines()[0]})") from error


def load(path) -> torch.nn.Module:
    """Load a child written by ``save``: a module called like the child, with trainable parameters."""
    module = _load_program(path).module()
    _retie(module)
    return module


def load_with_inputs(path) -> tuple[torch.nn.Module, tuple | None]:
    """``load(path)`` and the example inputs saved with the child (None if the file has none)."""
    program = _load_program(path)
    module = program.module()
    _retie(module)
    saved = program.example_inputs
    return module, (tuple(saved[0]) if saved and not saved[1] else None)
