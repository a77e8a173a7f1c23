"""Rewrite: remove whole layers — their residual branches, their code and their weights.

Invariant: for each dropped layer, every use of its stream output outside the layer now reads
its stream input (``FindResidualBlocksPass`` found both), so the layer computes the identity;
every node that no longer reaches the output is erased (metadata assertions on dead tensors
too), and every attribute and submodule no remaining node reads is deleted. A pre-norm layer
whose branches output zero is removed exactly; a post-norm layer is removed with its norm. A value
the layer computes from nothing it owns (a mask from the inputs) and hands to later layers stays,
as code outside the layer; one made from its stream or weights refuses the drop.

Layers are dropped last to first, so that consecutive dropped layers chain correctly. The
remaining layers are renumbered in ``state.LAYERS``, the attention sites of dropped layers leave
``state.ATTENTION`` (the others are renumbered), and ``state.DROP`` is emptied. ``ensures()``: no
node of a dropped layer remains, and every layer and attention site names a live node.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
from torch.fx.node import _side_effectful_functions

from .. import state
from ..analysis.find_blocks import layer_of_node
from ..errors import PostconditionError
from ..fx_utils import attribute_path, get_attribute, in_module, module_path, written_arguments
from ..infra import SubclonePass

__all__ = ["DropBlocksPass", "drop_blocks", "eliminate_dead_code", "renumber_attention_sites", "check_layer_state"]

# Checks that only look at a value (a tensor's metadata, a data-dependent size like a token
# count per expert): they guard nothing the graph computes, so they die with what they check.
_CHECKS = {torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default,
           torch.ops.aten.sym_constrain_range_for_size.default, torch.ops.aten.sym_constrain_range.default,
           torch.ops.aten._assert_async.msg}


def _has_side_effects(node: fx.Node) -> bool:
    # fx's is_impure() also keeps random ops (sdpa with dropout); an unused one is still dead.
    if node.target in _CHECKS:
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is not None and schema.is_mutable and _writes_only_unread_intermediates(node):
        return False
    return node.target in _side_effectful_functions or bool(schema is not None and schema.is_mutable)


def _writes_only_unread_intermediates(node: fx.Node) -> bool:
    """An in-place op (``x.add_(y)``, ``w /= w.sum()``) whose written tensors are computed in the
    graph and read by nothing after it: its effect is invisible, it is as dead as its
    out-of-place twin. A write into a view writes its base and every other view of it
    (``key = x.new_empty(...); key[..., :d].copy_(k)`` is read through ``key``)."""
    written = [node.args[i] if i < len(node.args) else node.kwargs.get(name)
               for i, name in written_arguments(node.target)]
    if not written or not all(isinstance(w, fx.Node) for w in written):
        return False
    aliases = set().union(*(_aliases(w) for w in written))
    if not all(a.op == "call_function" for a in aliases):
        return False                                    # writes a graph input or a weight
    readers = {u for a in aliases for u in a.users if u is not node and u not in aliases}
    later = node.next
    while later.op != "root" and readers:
        if later in readers:
            return False
        later = later.next
    return True


def _view_base(node: fx.Node) -> fx.Node | None:
    """The tensor ``node`` is a view of (its schema's returned alias set), else None."""
    if node.op != "call_function":
        return None
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        return node.args[0] if _view_base(node.args[0]) is not None else None     # split(...)[i]
    schema = getattr(node.target, "_schema", None)
    if schema is None or schema.is_mutable:
        return None
    returned = [r.alias_info for r in schema.returns if r.alias_info is not None]
    if not returned:
        return None
    for i, argument in enumerate(schema.arguments):
        info = argument.alias_info
        if info is not None and not info.is_write and info.before_set & returned[0].before_set:
            value = node.args[i] if i < len(node.args) else node.kwargs.get(argument.name)
            return value if isinstance(value, fx.Node) else None
    return None


def _aliases(node: fx.Node) -> set[fx.Node]:
    """Every node sharing ``node``'s storage through views: its base and all views of the base."""
    root = node
    while (base := _view_base(root)) is not None:
        root = base
    found, frontier = {root}, [root]
    while frontier:
        for user in frontier.pop().users:
            if user not in found and _view_base(user) is not None and user.args and user.args[0] in found:
                found.add(user)
                frontier.append(user)
    return found


def eliminate_dead_code(gm: fx.GraphModule) -> int:
    erased, changed = 0, True
    while changed:
        changed = False
        for node in reversed(list(gm.graph.nodes)):
            if node.users or node.op in ("placeholder", "output", "call_module", "get_attr"):
                continue
            if node.op == "call_function" and _has_side_effects(node):
                continue
            gm.graph.erase_node(node)
            erased += 1
            changed = True
    return erased


def _delete_unused_attributes(gm: fx.GraphModule) -> None:
    """Delete tensors no node reads; an unread alias of a read tensor (a tied weight's second
    name) keeps its get_attr node, so the name and its module survive."""
    used = {id(get_attribute(gm, n.target)) for n in gm.graph.nodes if n.op == "get_attr" and n.users}
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users and id(get_attribute(gm, node.target)) not in used:
            gm.graph.erase_node(node)
    for kind in ("_parameters", "_buffers"):
        for module_name, module in list(gm.named_modules()):
            for name in list(getattr(module, kind)):
                if id(getattr(module, kind)[name]) not in used:
                    del getattr(module, kind)[name]
    gm.delete_all_unused_submodules()


def _removable(layer, nodes: dict) -> set[fx.Node]:
    """A layer goes by reading its input where its output was read. A value computed inside it and
    read after it other than through its output outlives it: where it depends on nothing the
    layer owns (a mask made from the inputs in the first layer that needs it, then handed on), it
    is returned with the layer's nodes it needs, to stay as code outside the layer; where it
    depends on the layer's stream input or weights (a second stream it hands to the next layer:
    mixing weights of several residual streams), refused before anything changes."""
    if layer.key is None:
        return set()
    output, kept = nodes[layer.output], set()
    for node in nodes.values():
        if node is output or not in_module(node, layer.key) or isinstance(node.meta.get("val"), torch.SymInt):
            continue
        outside = next((u for u in node.users if not in_module(u, layer.key)), None)
        if outside is None:
            continue
        needed = _unowned_ancestry(node, layer, nodes[layer.input])
        if needed is None:
            raise ValueError(f"Target.layers: layer {layer.index} ({layer.key}) cannot be removed: {node.name} computed in "
                             f"it is read after it by {outside.name} (in {module_path(outside)}), not through its "
                             "output; leave Target.layers and drop_layers unset")
        kept |= needed
    return kept


def _unowned_ancestry(node: fx.Node, layer, stream_input: fx.Node) -> set[fx.Node] | None:
    """The nodes computed in ``layer`` that ``node`` is made from (itself included), or None where
    it depends on what the layer owns: its stream input or a weight under its path."""
    prefix = attribute_path(layer.key) + "."
    found, frontier = set(), [node]
    while frontier:
        current = frontier.pop()
        if current is stream_input or (current.op == "get_attr" and current.target.startswith(prefix)):
            return None
        if current in found or current.op != "call_function" or not in_module(current, layer.key):
            continue          # a graph input, another weight, or computed before the layer
        found.add(current)
        frontier.extend(current.all_input_nodes)
    return found


def _move_out_of(nodes: set[fx.Node], key: str) -> None:
    """Record ``nodes`` as computed outside the module at ``key`` (its frames left out of their
    module stacks): they are no longer the layer's code."""
    for node in nodes:
        stack = node.meta.get("nn_module_stack") or {}
        node.meta["nn_module_stack"] = {k: v for k, v in stack.items()
                                        if not (v[0] == key or v[0].startswith(key + "."))}


def _no_stream_lost(layers, drop: set, nodes: dict) -> None:
    """A kept layer's stream input or output that only dropped layers read, and that is no
    dropped layer's input (read on by the layer after it), would die with them: the dropped layer
    carries a second stream the kept one hands it (two streams through one stack of layers).
    Refused before anything changes."""
    keys = [layers[i].key for i in drop if layers[i].key is not None]
    handed_on = {layers[i].input for i in drop}
    for layer in layers:
        if layer.index in drop:
            continue
        for name in (layer.input, layer.output):
            readers = list(nodes[name].users)
            if name not in handed_on and readers and all(any(in_module(u, k) for k in keys) for u in readers):
                raise ValueError(f"Target.layers: layer {min(drop)} ({layers[min(drop)].key}) cannot be removed: "
                                 f"{name}, the stream of layer {layer.index} ({layer.key}), is read only by the "
                                 "dropped layers (they carry a second stream on); leave Target.layers and drop_layers unset")


class DropBlocksPass(SubclonePass):
    """Remove the layers listed in ``state.DROP`` (see module docstring)."""

    requires_keys = (state.LAYERS, state.DROP)

    def __init__(self) -> None:
        self.dropped: tuple[str, ...] = ()

    def run(self, gm: fx.GraphModule) -> bool:
        layers, drop = state.LAYERS.need(gm), set(state.DROP.need(gm))
        self.dropped = tuple(layers[i].key for i in sorted(drop) if layers[i].key is not None)
        if not drop:
            return False
        nodes = {n.name: n for n in gm.graph.nodes}
        outliving = {index: _removable(layers[index], nodes) for index in sorted(drop)}
        _no_stream_lost(layers, drop, nodes)
        for index, kept in outliving.items():       # only once nothing refused
            _move_out_of(kept, layers[index].key)
        for index in sorted(drop, reverse=True):
            layer = layers[index]
            output, source = nodes[layer.output], nodes[layer.input]
            output.replace_all_uses_with(source, delete_user_cb=lambda user: not in_module(user, layer.key))
        eliminate_dead_code(gm)
        _delete_unused_attributes(gm)
        # a layer after a dropped one now reads what the dropped one read
        source_of = {layers[i].output: layers[i].input for i in drop}

        def source(name: str) -> str:
            while name in source_of:
                name = source_of[name]
            return name

        kept = [dataclasses.replace(layer, index=new, input=source(layer.input)) for new, layer in
                enumerate(layer for layer in layers if layer.index not in drop)]
        state.LAYERS.set(gm, tuple(kept))
        state.DROP.set(gm, ())
        renumber_attention_sites(gm, kept)
        return True

    def ensures(self, graph_module: fx.GraphModule) -> None:
        # sizes computed in a dropped layer may stay: export shares symbolic-size arithmetic
        # (tokens × experts per token) between layers, so a kept layer can read it
        left = [n.name for n in graph_module.graph.nodes if any(in_module(n, key) for key in self.dropped)
                and not isinstance(n.meta.get("val"), torch.SymInt)]
        if left:
            raise PostconditionError(f"DropBlocksPass: {left[0]} of a dropped layer is still in the graph")
        check_layer_state(graph_module, "DropBlocksPass")


def renumber_attention_sites(gm: fx.GraphModule, layers) -> None:
    """Keep the attention sites whose node is still in the graph, with the layer it is in now."""
    index = {layer.key: layer.index for layer in layers if layer.key is not None}
    nodes = {n.name: n for n in gm.graph.nodes}
    sites = state.ATTENTION.get(gm)
    if sites is not None:
        state.ATTENTION.set(gm, tuple(dataclasses.replace(site, layer=layer_of_node(nodes[site.node], index))
                                      for site in sites if site.node in nodes))


def check_layer_state(gm: fx.GraphModule, name: str) -> None:
    """Every layer and attention site names a node of the graph; layers are numbered 0..n-1."""
    nodes = {n.name for n in gm.graph.nodes}
    for position, layer in enumerate(state.LAYERS.need(gm)):
        if layer.index != position:
            raise PostconditionError(f"{name}: layer {position} is numbered {layer.index}")
        for node in (layer.input, layer.output):
            if node not in nodes:
                raise PostconditionError(f"{name}: layer {position} names {node}, which is not in the graph")
    for site in state.ATTENTION.get(gm) or ():
        if site.node not in nodes:
            raise PostconditionError(f"{name}: attention site {site.node} is not in the graph")


def drop_blocks(gm: fx.GraphModule, layers_to_drop: list[int]) -> fx.GraphModule:
    """Plain-function twin: drop these layer indices (needs FindResidualBlocksPass first)."""
    state.DROP.set(gm, tuple(layers_to_drop))
    return DropBlocksPass()(gm).graph_module
