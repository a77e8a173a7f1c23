"""Rewrite: repeat layers to make a deeper child (paper §3: a deeper child repeats middle layers).

Invariant: for each index ``i`` in ``state.DUPLICATE``, a copy of layer ``i`` runs
right after it, reading layer ``i``'s stream output, and every use of that output outside layer
``i`` reads the copy's output instead. The child therefore computes layer ``i`` twice:
``y = L_i(L_i(x))``. A duplicated layer whose residual branches output zero is the identity, so
then the child's outputs equal the parent's exactly.

What is copied:
1. every node of the layer: those whose ``nn_module_stack`` holds the layer's module path
   (``FindResidualBlocksPass``'s key), in graph order, inserted after the layer's last node;
2. every attribute only the layer reads: a fresh tensor (a clone — an ``nn.Parameter`` stays a
   trainable ``nn.Parameter``, a buffer stays a buffer) under the layer's path with a fresh
   index past the last one in its container (``model.layers.3`` → ``model.layers.30`` when
   there are 30), so ``gm.get_submodule`` finds it; missing owners are made as empty
   ``nn.Module`` containers. Two names of one tensor in the layer stay one tensor in the copy;
3. the copies keep the originals' metadata (``val``, ``state.CHANNELS`` — so
   ``KeepChannelsPass`` slices a copy as it slices its original — and the other node keys of
   ``passes/state.py``, values shared, never mutated); their ``nn_module_stack`` names the new
   path, so ``find_layers`` sees the copy as a layer of its own; an attention site of the layer
   gets a twin for the copy.

Shared, not copied: what the layer reads from outside it (masks, rotary cos/sin, symbolic
sizes, attributes also read elsewhere). An index repeated ``n`` times gives ``n`` copies in a
row. Indices refer to ``state.LAYERS`` as it is when this pass runs; layers are found again after each
copy, so later indices follow the shifted numbering.

Writes ``state.LAYERS`` (found again) and ``state.ATTENTION``, and empties ``state.DUPLICATE``.
``ensures()``: the layer count grew by the number of copies, and every layer and attention site
names a live node.
"""
from __future__ import annotations

import dataclasses
import re

import torch
import torch.fx as fx

from .. import state
from ..analysis.find_blocks import find_layers
from ..errors import PassError, PostconditionError
from ..fx_utils import attribute_path, container_of, get_attribute, in_module, module_paths
from ..infra import SubclonePass
from ..state import Layer
from ..tensor_edits import edit_tensor
from .drop_blocks import check_layer_state, renumber_attention_sites

__all__ = ["DuplicateLayersPass", "duplicate_layers", "duplicate_layer"]


def _fresh_key(gm: fx.GraphModule, key: str) -> str:
    """``key`` with its item index replaced by one past every index used in its container."""
    prefix = container_of(key)
    item = re.compile(re.escape(prefix) + r"(?:\.|\[)(\d+)\]?(?=$|[.\[])")
    used = {int(m.group(1)) for node in gm.graph.nodes for path in module_paths(node)
            for m in [item.match(path)] if m}
    container = _submodule_or_none(gm, attribute_path(prefix)) if prefix else gm
    if container is not None:
        used |= {int(name) for name, _ in container.named_children() if name.isdigit()}
    fresh = max(used, default=-1) + 1
    return f"{prefix}[{fresh}]" if key[len(prefix)] == "[" else f"{prefix}.{fresh}"


def _submodule_or_none(gm: fx.GraphModule, path: str):
    """The module at ``path``; None when export kept no module there (only its tensors)."""
    module = gm
    for part in path.split("."):
        module = getattr(module, part, None)
        if not isinstance(module, torch.nn.Module):
            return None
    return module


def _renamed(path: str, key: str, new_key: str) -> str:
    if path == key or path.startswith(key + ".") or path.startswith(key + "["):
        return new_key + path[len(key):]
    return path


def _renamed_stack(stack: dict, key: str, new_key: str) -> dict:
    return {name.replace(key, new_key, 1) if _renamed(path, key, new_key) != path else name:
            (_renamed(path, key, new_key), kind) for name, (path, kind) in stack.items()}


def _own_nodes(gm: fx.GraphModule, key: str) -> list[fx.Node]:
    """The layer's nodes and the attributes only the layer reads, in graph order."""
    inside = {n for n in gm.graph.nodes if in_module(n, key)}
    read_only_here = {n for n in gm.graph.nodes
                      if n.op == "get_attr" and n.users and all(u in inside for u in n.users)}
    return [n for n in gm.graph.nodes if n in inside or n in read_only_here]


def _register(gm: fx.GraphModule, target: str, original: str, value: torch.Tensor) -> None:
    """Set ``value`` at ``target``, as a parameter, buffer or plain attribute like ``original``."""
    prefix, _, name = target.rpartition(".")
    owner = gm
    for part in prefix.split(".") if prefix else ():
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
        if not isinstance(owner, torch.nn.Module):
            raise PassError(f"cannot place the copy of {original} at {target}: {part} is not a module")
    if hasattr(owner, name):
        raise PassError(f"cannot place the copy of {original} at {target}: the name is taken")
    old_prefix, _, old_name = original.rpartition(".")
    old_owner = gm.get_submodule(old_prefix) if old_prefix else gm
    if isinstance(value, torch.nn.Parameter):
        owner.register_parameter(name, value)
    elif old_name in old_owner._buffers:
        owner.register_buffer(name, value, persistent=old_name not in old_owner._non_persistent_buffers_set)
    else:
        setattr(owner, name, value)


class _Copier:
    """Copies one layer's nodes and attributes under a new module path."""

    def __init__(self, gm: fx.GraphModule, key: str, new_key: str) -> None:
        self.gm, self.key, self.new_key = gm, key, new_key
        self.old_attr, self.new_attr = attribute_path(key), attribute_path(new_key)
        self.targets: dict[int, str] = {}          # id(original tensor) -> new attribute name

    def attribute(self, node: fx.Node) -> fx.Node:
        tensor = get_attribute(self.gm, node.target)
        if id(tensor) not in self.targets:
            if node.target.startswith(self.old_attr + "."):
                target = self.new_attr + node.target[len(self.old_attr):]
            else:
                target = f"{self.new_attr}.{node.target.replace('.', '_')}"
            # a copy through the one edit path: a streamed parent's writer reads it from the original
            value = edit_tensor(self.gm, tensor) if isinstance(tensor, torch.Tensor) else tensor
            _register(self.gm, target, node.target, value)
            self.targets[id(tensor)] = target
        with self.gm.graph.inserting_after(node):
            return self.gm.graph.get_attr(self.targets[id(tensor)])

    def copy(self, nodes: list[fx.Node], env: dict, cursor: fx.Node) -> None:
        for node in nodes:
            if node.op == "get_attr":
                new = self.attribute(node)
            else:
                with self.gm.graph.inserting_after(cursor):
                    new = self.gm.graph.node_copy(node, lambda n: env.get(n, n))
                cursor = new
            new.meta = dict(node.meta)
            if "nn_module_stack" in node.meta:
                new.meta["nn_module_stack"] = _renamed_stack(node.meta["nn_module_stack"], self.key, self.new_key)
            env[node] = new


def duplicate_layer(gm: fx.GraphModule, layer: Layer) -> str:
    """Insert a copy of ``layer`` right after it (see module docstring); return the copy's
    module path. Does not recompile; ``layer`` must be current (found after the last change)."""
    if layer.key is None:
        raise PassError(f"layer {layer.index} has no module path (not an item of a ModuleList or "
                        "Sequential): its nodes cannot be told apart, so it cannot be duplicated")
    nodes = {n.name: n for n in gm.graph.nodes}
    source, output = nodes[layer.input], nodes[layer.output]
    own = _own_nodes(gm, layer.key)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    last = max((n for n in own if n.op != "get_attr"), key=order.__getitem__)
    late = [u.name for u in output.users if not in_module(u, layer.key) and order[u] < order[last]]
    if late:
        raise PassError(f"cannot duplicate layer {layer.key}: {', '.join(late)} reads its output "
                        f"before the layer's last node {last.name}, where the copy would start")
    new_key = _fresh_key(gm, layer.key)
    env = {source: output}
    _Copier(gm, layer.key, new_key).copy(own, env, last)
    copies = set(env.values()) - {output}
    new_output = env[output]
    output.replace_all_uses_with(new_output, delete_user_cb=lambda u: u not in copies and not in_module(u, layer.key))
    _copy_attention_sites(gm, env)
    return new_key


def _copy_attention_sites(gm: fx.GraphModule, env: dict) -> None:
    sites = state.ATTENTION.get(gm)
    if sites is None:
        return
    names = {old.name: new.name for old, new in env.items()}
    twins = tuple(dataclasses.replace(site, node=names[site.node]) for site in sites if site.node in names)
    state.ATTENTION.set(gm, tuple(sites) + twins)


class DuplicateLayersPass(SubclonePass):
    """Duplicate the layers listed in ``state.DUPLICATE`` (see module docstring)."""

    requires_keys = (state.LAYERS,)

    def __init__(self) -> None:
        self.expected: int | None = None

    def run(self, gm: fx.GraphModule) -> bool:
        wanted = sorted(state.DUPLICATE.get(gm) or ())
        layers = state.LAYERS.need(gm)
        self.expected = len(layers) + len(wanted)
        if not wanted:
            return False
        bad = [i for i in wanted if not isinstance(i, int) or not 0 <= i < len(layers)]
        if bad:
            raise PassError(f"state.DUPLICATE: layer {bad[0]} does not exist; layers are 0..{len(layers) - 1}")
        found = list(layers)
        for done, index in enumerate(wanted):
            # Sorted: ``done`` copies precede this one, so parent layer ``index`` (or its
            # latest copy, for a repeated index) is now at ``index + done``.
            duplicate_layer(gm, found[index + done])
            found = find_layers(gm)
        state.LAYERS.set(gm, tuple(found))
        state.DUPLICATE.set(gm, ())
        renumber_attention_sites(gm, found)
        return True

    def ensures(self, graph_module: fx.GraphModule) -> None:
        count = len(state.LAYERS.need(graph_module))
        if self.expected is not None and count != self.expected:
            raise PostconditionError(f"DuplicateLayersPass: {count} layers are found after duplicating; "
                                     f"expected {self.expected}")
        check_layer_state(graph_module, "DuplicateLayersPass")


def duplicate_layers(gm: fx.GraphModule, indices: list[int]) -> fx.GraphModule:
    """Plain-function twin: duplicate these layer indices (needs FindResidualBlocksPass first)."""
    state.DUPLICATE.set(gm, tuple(indices))
    return DuplicateLayersPass()(gm).graph_module
