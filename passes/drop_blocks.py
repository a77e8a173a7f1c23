"""Rewrite: remove whole layers — their residual branches, their code and their weights.

Invariant: for each dropped layer, every use of its stream output outside the layer now reads
its stream input (``FindResidualBlocksPass`` found both), so the layer computes the identity;
every node that no longer reaches the output is erased (metadata assertions on dead tensors
too), and every attribute and submodule no remaining node reads is deleted. A pre-norm layer
whose branches output zero is removed exactly; a post-norm layer is removed with its norm.

Layers are dropped last to first, so that consecutive dropped layers chain correctly. The
remaining layers are renumbered in ``gm.meta["subclone.layers"]``.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.node import _side_effectful_functions

from .find_blocks import _in_layer
from .infra import SubclonePass, get_attribute, need

__all__ = ["DropBlocksPass", "drop_blocks", "eliminate_dead_code"]

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
    if schema is not None and schema.is_mutable and _writes_only_unread_intermediates(node, schema):
        return False
    return node.target in _side_effectful_functions or bool(schema is not None and schema.is_mutable)


def _writes_only_unread_intermediates(node: fx.Node, schema) -> bool:
    """An in-place op (``x.add_(y)``, ``w /= w.sum()``) whose written tensors are computed in the
    graph and read by nothing after it: its effect is invisible, it is as dead as its
    out-of-place twin."""
    written = [node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
               for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
    if not written or not all(isinstance(w, fx.Node) and w.op == "call_function" for w in written):
        return False
    readers = {u for w in written for u in w.users if u is not node}
    later = node.next
    while later.op != "root" and readers:
        if later in readers:
            return False
        later = later.next
    return True


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


class DropBlocksPass(SubclonePass):
    """Remove the layers listed in ``gm.meta["subclone.drop"]`` (see module docstring)."""

    requires_meta = (("subclone.layers", "FindResidualBlocksPass"), ("subclone.drop", "ChooseKeepPass"))

    def run(self, gm: fx.GraphModule) -> bool:
        layers, drop = need(gm, "subclone.layers", "FindResidualBlocksPass"), gm.meta["subclone.drop"]
        if not drop:
            return False
        nodes = {n.name: n for n in gm.graph.nodes}
        for index in sorted(drop, reverse=True):
            layer = layers[index]
            output, source = nodes[layer.output], nodes[layer.input]
            output.replace_all_uses_with(source, delete_user_cb=lambda user: not _in_layer(user, layer.key))
        eliminate_dead_code(gm)
        _delete_unused_attributes(gm)
        kept = [layer for layer in layers if layer.index not in set(drop)]
        for new_index, layer in enumerate(kept):
            layer.index = new_index
        gm.meta["subclone.layers"] = kept
        gm.meta["subclone.drop"] = []
        return True


def drop_blocks(gm: fx.GraphModule, layers_to_drop: list[int]) -> fx.GraphModule:
    """Plain-function twin: drop these layer indices (needs FindResidualBlocksPass first)."""
    gm.meta["subclone.drop"] = list(layers_to_drop)
    return DropBlocksPass()(gm).graph_module
