"""Rewrite: repeat layers to make a deeper child (paper §3: a deeper child repeats middle layers).

Invariant: for each index ``i`` in ``gm.meta["subclone.duplicate"]``, a copy of layer ``i`` runs
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
3. the copies keep the originals' metadata (``val``, ``subclone.channels`` — so
   ``KeepChannelsPass`` slices a copy as it slices its original — and the other
   ``subclone.*`` keys); their ``nn_module_stack`` names the new path, so ``find_layers``
   sees the copy as a layer of its own.

Shared, not copied: what the layer reads from outside it (masks, rotary cos/sin, symbolic
sizes, attributes also read elsewhere). An index repeated ``n`` times gives ``n`` copies in a
row. Indices refer to ``gm.meta["subclone.layers"]`` as it is when this pass runs; layers are
found again after each copy, so later indices follow the shifted numbering.

Writes ``gm.meta["subclone.layers"]`` (found again) and empties ``gm.meta["subclone.duplicate"]``.
"""
from __future__ import annotations

import re

import torch
import torch.fx as fx

from .find_blocks import _ITEM, Layer, _in_layer, find_layers, layer_of_node
from .infra import PassError, SubclonePass, get_attribute, need, same_kind, track_origin

__all__ = ["DuplicateLayersPass", "duplicate_layers", "duplicate_layer"]


def _attr_path(module_path: str) -> str:
    """Module path as an attribute name: ``a.b[3]`` → ``a.b.3``."""
    return module_path.replace("[", ".").replace("]", "")


def _fresh_key(gm: fx.GraphModule, key: str) -> str:
    """``key`` with its item index replaced by one past every index used in its container."""
    match = _ITEM.search(key)
    prefix = key[: match.start()]
    item = re.compile(re.escape(prefix) + r"(?:\.|\[)(\d+)\]?(?=$|[.\[])")
    used = {int(m.group(1)) for node in gm.graph.nodes
            for path, _ in (node.meta.get("nn_module_stack") or {}).values()
            for m in [item.match(path)] if m}
    try:
        container = gm.get_submodule(_attr_path(prefix)) if prefix else gm
        used |= {int(name) for name, _ in container.named_children() if name.isdigit()}
    except AttributeError:
        pass
    fresh = max(used, default=-1) + 1
    return f"{prefix}[{fresh}]" if match.group(0).startswith("[") else f"{prefix}.{fresh}"


def _renamed(path: str, key: str, new_key: str) -> str:
    if path == key or path.startswith(key + ".") or path.startswith(key + "["):
        return new_key + path[len(key):]
    return path


def _renamed_stack(stack: dict, key: str, new_key: str) -> dict:
    return {name.replace(key, new_key, 1) if _renamed(path, key, new_key) != path else name:
            (_renamed(path, key, new_key), kind) for name, (path, kind) in stack.items()}


def _own_nodes(gm: fx.GraphModule, key: str) -> list[fx.Node]:
    """The layer's nodes and the attributes only the layer reads, in graph order."""
    inside = {n for n in gm.graph.nodes if _in_layer(n, key)}
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


def _clone(tensor: torch.Tensor) -> torch.Tensor:
    return same_kind(tensor, tensor.detach().clone())


class _Copier:
    """Copies one layer's nodes and attributes under a new module path."""

    def __init__(self, gm: fx.GraphModule, key: str, new_key: str) -> None:
        self.gm, self.key, self.new_key = gm, key, new_key
        self.old_attr, self.new_attr = _attr_path(key), _attr_path(new_key)
        self.targets: dict[int, str] = {}          # id(original tensor) -> new attribute name

    def attribute(self, node: fx.Node) -> fx.Node:
        tensor = get_attribute(self.gm, node.target)
        if id(tensor) not in self.targets:
            if node.target.startswith(self.old_attr + "."):
                target = self.new_attr + node.target[len(self.old_attr):]
            else:
                target = f"{self.new_attr}.{node.target.replace('.', '_')}"
            value = _clone(tensor) if isinstance(tensor, torch.Tensor) else tensor
            track_origin(self.gm, tensor, value)
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
    late = [u.name for u in output.users if not _in_layer(u, layer.key) and order[u] < order[last]]
    if late:
        raise PassError(f"cannot duplicate layer {layer.key}: {', '.join(late)} reads its output "
                        f"before the layer's last node {last.name}, where the copy would start")
    new_key = _fresh_key(gm, layer.key)
    env = {source: output}
    _Copier(gm, layer.key, new_key).copy(own, env, last)
    copies = set(env.values()) - {output}
    new_output = env[output]
    output.replace_all_uses_with(new_output, delete_user_cb=lambda u: u not in copies and not _in_layer(u, layer.key))
    _copy_attention_sites(gm, env)
    return new_key


def _copy_attention_sites(gm: fx.GraphModule, env: dict) -> None:
    sites = gm.meta.get("subclone.attention")
    if sites is None:
        return
    names = {old.name: new.name for old, new in env.items()}
    sites += [dict(site, node=names[site["node"]]) for site in list(sites) if site["node"] in names]


def _renumber_attention_sites(gm: fx.GraphModule, layers: list[Layer]) -> None:
    index = {layer.key: layer.index for layer in layers if layer.key is not None}
    nodes = {n.name: n for n in gm.graph.nodes}
    for site in gm.meta.get("subclone.attention", ()):
        if site["node"] in nodes:
            site["layer"] = layer_of_node(nodes[site["node"]], index)


class DuplicateLayersPass(SubclonePass):
    """Duplicate the layers listed in ``gm.meta["subclone.duplicate"]`` (see module docstring)."""

    requires_meta = (("subclone.layers", "FindResidualBlocksPass"),)

    def run(self, gm: fx.GraphModule) -> bool:
        wanted = sorted(gm.meta.get("subclone.duplicate") or [])
        if not wanted:
            return False
        layers = need(gm, "subclone.layers", "FindResidualBlocksPass")
        bad = [i for i in wanted if not isinstance(i, int) or not 0 <= i < len(layers)]
        if bad:
            raise PassError(f"subclone.duplicate: layer {bad[0]} does not exist; layers are 0..{len(layers) - 1}")
        found = layers
        for done, index in enumerate(wanted):
            # Sorted: ``done`` copies precede this one, so parent layer ``index`` (or its
            # latest copy, for a repeated index) is now at ``index + done``.
            duplicate_layer(gm, found[index + done])
            found = find_layers(gm)
        if len(found) != len(layers) + len(wanted):
            raise PassError(f"after duplicating layers {wanted}, {len(found)} layers are found; "
                            f"expected {len(layers) + len(wanted)}")
        gm.meta["subclone.layers"] = found
        gm.meta["subclone.duplicate"] = []
        _renumber_attention_sites(gm, found)
        return True


def duplicate_layers(gm: fx.GraphModule, indices: list[int]) -> fx.GraphModule:
    """Plain-function twin: duplicate these layer indices (needs FindResidualBlocksPass first)."""
    gm.meta["subclone.duplicate"] = list(indices)
    return DuplicateLayersPass()(gm).graph_module
