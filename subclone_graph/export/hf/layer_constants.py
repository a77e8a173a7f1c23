"""Constants a class derives from a layer's index, which a child whose layers moved cannot keep.

A class may compute a number from the index it gives a layer (a per-layer initial λ from
``layer_idx``), held as a plain attribute, not a weight. A child that dropped a middle layer
runs the parent's layer j as its layer i; the class built from the child's folder gives that
layer index i's constant, and no checkpoint can change it. ``moved_layer_constants(child,
config)`` finds them by building the class twice on the meta device — from the parent's config
and from the child's — and comparing every float attribute of each child layer's modules with
those of the parent layer it came from. An attribute that differs in a layer that kept its
index too follows a size in the config (an ε, ``head_dim**-0.5``), not the index, and is left
out. Nothing is run: the check is for the writer's refusal to name what the class cannot hold.
"""
from __future__ import annotations

import torch

from subclone_graph.passes import state as pass_state

from subclone_graph.export.hf.common import quiet_transformers, required
from subclone_graph.export.hf.weights import layer_renames

__all__ = ["moved_layer_constants"]


def _floats(module: torch.nn.Module) -> dict[str, float]:
    return {f"{prefix}.{name}".lstrip("."): value for prefix, sub in module.named_modules()
            for name, value in vars(sub).items() if type(value) is float}


def _differ(a: float, b: float) -> bool:
    return abs(a - b) > 1e-9 * max(1.0, abs(a), abs(b))


def moved_layer_constants(child, config) -> list[str]:
    """``path (class value; the child keeps its parent layer's value)`` for each float attribute
    that the class derives from a moved layer's index (module docstring)."""
    from accelerate import init_empty_weights

    cls, parent_config = required(child, pass_state.PARENT_CLASS), required(child, pass_state.PARENT_CONFIG)
    renames = layer_renames(required(child, pass_state.LAYERS))
    if all(old == new for old, new in renames.items()):
        return []
    try:
        with quiet_transformers(), init_empty_weights(include_buffers=True):
            parent, written = cls(parent_config), cls(config)
        pairs = [(old, new, _floats(parent.get_submodule(old)), _floats(written.get_submodule(new)))
                 for old, new in renames.items()]
    except Exception:        # a class that does not build here: nothing to name
        return []
    by_config = {name for old, new, before, after in pairs if old == new
                 for name in before.keys() & after.keys() if _differ(before[name], after[name])}
    found = []
    for old, new, before, after in pairs:
        for name in sorted(before.keys() & after.keys() - by_config):
            if old != new and _differ(before[name], after[name]):
                found.append(f"{new}.{name} ({after[name]:.4g}; the child keeps {old}'s {before[name]:.4g})")
    return found
