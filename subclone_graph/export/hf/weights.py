"""The child's tensors under a parent-class model's names, fitted to that model's state dict.

Each layer's module path is renumbered by its position (``x.layers.0, x.layers.2`` →
``x.layers.0, x.layers.1``; a duplicated layer takes the index of where it runs); a name the class
ties to another (an output head tied to the embedding) takes the one tensor the child has under
either name; a tensor of the class the child has in no layer at all (never read by its graph: a
decoder-only run's cross-attention, an unused pooler) keeps the class's initialisation."""
from __future__ import annotations

import itertools

import torch
import torch.fx as fx

from subclone_graph.passes import state as pass_state
from subclone_graph.passes.fx_utils import attribute_path, container_item, container_of, get_attribute

from subclone_graph.export.hf.common import HFExportError, required

__all__ = ["layer_renames", "hf_names", "child_state_dict", "tied_names", "name_pattern", "fitted", "load_fitted"]


def layer_renames(layers) -> dict[str, str]:
    """Old module path of each layer -> the path with its position in its container."""
    renames, counts = {}, {}
    for layer in layers:
        if layer.key is None:
            continue
        path = attribute_path(layer.key)
        if container_item(path) is None:
            continue
        container = container_of(path)
        position = counts.get(container, 0)
        counts[container] = position + 1
        renames[path] = f"{container}.{position}"
    return renames


def _renamed(name: str, renames: dict[str, str]) -> str:
    for old in sorted(renames, key=len, reverse=True):
        if name.startswith(old + "."):
            return renames[old] + name[len(old):]
    return name


def hf_names(child: fx.GraphModule) -> dict[str, str]:
    """Each state-dict name of the child -> its name in a parent-class model with contiguous layers."""
    renames = layer_renames(required(child, pass_state.LAYERS))
    names = {}
    for name in child.state_dict(keep_vars=True):
        new = _renamed(name, renames)
        if new in names.values():
            raise HFExportError(f"two child tensors map to {new!r} after renumbering the layers")
        names[name] = new
    return names


def child_state_dict(child: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The child's tensors its graph reads, under the names a parent-class model with contiguous
    layers uses (a tensor it holds but never reads is no part of what it computes: ``fitted``)."""
    names = hf_names(child)
    read = {id(get_attribute(child, n.target)) for n in child.graph.nodes if n.op == "get_attr" and n.users}
    return {names[name]: tensor.detach() for name, tensor in child.state_dict(keep_vars=True).items()
            if id(tensor) in read}


def tied_names(model: torch.nn.Module) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, tensor in itertools.chain(model.named_parameters(remove_duplicate=False),
                                        model.named_buffers(remove_duplicate=False)):
        groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


def name_pattern(name: str) -> str:
    """A state-dict name with its container indices as ``*`` (``a.layers.3.w`` → ``a.layers.*.w``)."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def fitted(model: torch.nn.Module, state: dict) -> tuple[dict, list[str]]:
    """``state`` keyed like ``model.state_dict()``, filling tied names; and the problems found.

    A tensor of the class that the child has in no layer at all (a cross-attention a decoder-only
    run never reads, a pooler the head does not use) is left to the class's own initialisation:
    the child's graph never read it, so it cannot change what the class computes on the child's
    inputs — which the final check verifies."""
    wanted = model.state_dict(keep_vars=True)
    partners = {n: names for names in tied_names(model) for n in names}
    non_persistent = {n for n, _ in model.named_buffers(remove_duplicate=False)} - set(wanted)
    present = {name_pattern(n) for n in state}
    fitted, problems = {}, []
    for name, target in wanted.items():
        source = next((s for s in [name, *partners.get(name, ())] if s in state), None)
        if source is None and name_pattern(name) not in present:
            continue
        if source is None:
            problems.append(f"{name}: missing from the child")
        elif tuple(state[source].shape) != tuple(target.shape):
            problems.append(f"{name}: child {tuple(state[source].shape)}, class {tuple(target.shape)}")
        else:
            fitted[name] = state[source]
    problems += [f"{name}: not in the class" for name in state if name not in wanted and name not in non_persistent]
    return fitted, problems


def load_fitted(model: torch.nn.Module, state: dict) -> None:
    """Load the child's tensors into ``model`` (every child tensor, every class tensor the child
    has a counterpart of; ``fitted``), as ``strict=True`` would except for the tensors it leaves."""
    found, problems = fitted(model, state)
    if problems:
        raise HFExportError(f"the child's tensors do not fit {type(model).__name__}: {'; '.join(problems[:4])}")
    model.load_state_dict(found, strict=False)
