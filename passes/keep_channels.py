"""Rewrite: keep only the chosen channels — slice tensors, rewrite every literal size.

Invariant: after the pass, every attribute (parameter, buffer, computed constant) has, along
each dim, the kept indices of that dim's group in order, and every literal size an op holds
(view/reshape/expand shapes, split sizes, repeat counts, slice bounds, creation shapes) equals
the new size of the group it names. A dim whose group keeps everything is untouched.

Cases:
1. a parameter is replaced by a new ``nn.Parameter`` (trainable, same ``requires_grad``); a
   buffer stays a buffer; a plain tensor attribute stays one;
2. one tensor reachable under several names (tied weights) becomes one new tensor, set under
   every name, so the child stays tied;
3. literals: an entry that is ``-1`` or computed from the input (a symbolic size) is left
   alone; slices get ``start``/``end`` from the new sizes of the parts before and inside them.

Reads ``subclone.keep``/``subclone.sizes`` (ChooseKeepPass) and the channel graph.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .infra import SubclonePass, get_attribute, need, refresh_meta, replace_tensors, same_kind, track_origin

__all__ = ["KeepChannelsPass", "keep_channels"]


def _sliced(tensor: torch.Tensor, cuts: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    new = tensor.detach()
    for dim, index in cuts:
        new = new.index_select(dim, index.to(new.device))
    return same_kind(tensor, new.clone().contiguous())


def _slice_attributes(gm: fx.GraphModule, graph, keep) -> int:
    replaced: dict[int, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or "subclone.channels" not in node.meta:
            continue
        cuts = [(d, keep[g]) for d, g in enumerate(node.meta["subclone.channels"])
                if g in keep and len(keep[g]) < graph.groups[g].size]
        old = get_attribute(gm, node.target)
        if cuts and id(old) not in replaced:
            replaced[id(old)] = _sliced(old, cuts)
            track_origin(gm, old, replaced[id(old)], cuts=cuts)
    replace_tensors(gm, replaced)
    return len(replaced)


def _new_literal(value, vertex, graph, sizes):
    if isinstance(value, fx.Node):
        return _new_size_expression(value, vertex, graph, sizes)
    if not isinstance(value, int) or isinstance(value, bool) or value == -1 or vertex is None:
        return value
    return sizes.get(graph.find(vertex), value)


def _new_size_expression(value: fx.Node, vertex, graph, sizes):
    """A size computed in the graph, like ``batch * heads``: replace the literal factor that
    is a shrunk part of the dim's group (a fresh node, since the old one may have other uses)."""
    if vertex is None or value.op != "call_function" or value.target is not operator.mul:
        return value
    group = graph.find(vertex)
    changed = {graph.groups[p].size: sizes[p] for rel in graph.relations_of(group, "factor")
               for p in graph.part_groups(rel) if graph.groups[p].static and sizes.get(p) != graph.groups[p].size}
    literals = [a for a in value.args if isinstance(a, int) and a in changed]
    if len(literals) != 1:
        return value
    args = tuple(changed[a] if isinstance(a, int) and a == literals[0] else a for a in value.args)
    with value.graph.inserting_after(value):
        return value.graph.call_function(operator.mul, args)


def _rewrite_literals(gm: fx.GraphModule, graph, sizes) -> int:
    changed = 0
    for node in gm.graph.nodes:
        literals = node.meta.get("subclone.literals", {})
        args = list(node.args)
        for index, vertices in literals.items():
            if index >= len(args):
                continue
            old = args[index]
            if isinstance(vertices, list) and isinstance(old, (list, tuple)):
                args[index] = type(old)(_new_literal(v, w, graph, sizes) for v, w in zip(old, vertices))
            elif not isinstance(vertices, list):
                args[index] = _new_literal(old, vertices, graph, sizes)
        parts = node.meta.get("subclone.slice_parts")
        if parts is not None:
            before, inside, _ = (sizes[graph.find(p)] for p in parts)
            args += [0, 0, 0, 0][len(args):]
            args[2], args[3] = before, before + inside
        if tuple(args) != node.args:
            node.args = tuple(args)
            changed += 1
    return changed


class KeepChannelsPass(SubclonePass):
    """Slice every coupled tensor to its kept channels and rewrite every literal size."""

    requires_meta = (("subclone.keep", "ChooseKeepPass"), ("subclone.channel_graph", "AnalyzeChannelsPass"))

    def run(self, gm: fx.GraphModule) -> bool:
        graph = need(gm, "subclone.channel_graph", "AnalyzeChannelsPass")
        keep, sizes = need(gm, "subclone.keep", "ChooseKeepPass"), gm.meta["subclone.sizes"]
        sliced = _slice_attributes(gm, graph, keep)
        rewritten = _rewrite_literals(gm, graph, sizes)
        if sliced or rewritten:
            gm.recompile()
            refresh_meta(gm)
        return bool(sliced or rewritten)


def keep_channels(gm: fx.GraphModule) -> fx.GraphModule:
    return KeepChannelsPass()(gm).graph_module
