"""Analysis: build the channel-dependency graph and name its groups.

Runs every node's rule (``op_rules``) to state which dims are equal, factored or concatenated,
ties together attributes that are one tensor (tied embeddings), solves the graph and gives
each group a kind:

1. ``residual`` — a static dim of a residual add's output that a weight contracts: the stream.
2. ``heads`` / ``kv_heads`` / ``head_dim`` — the head dims of an attention op (query heads,
   kv heads when GQA/MQA makes them a different group, the per-head dim). Heads merged into
   the batch (``(b, h, s, d) → (b·h, s, d)`` before ``bmm``) are the static factor of that dim.
3. ``ffn`` — a static dim that one weight produces and another contracts inside a layer (an
   MLP's hidden width, a fused gate/up's half), not part of the attention heads;
   ``latent`` — such a dim that a normalisation averages over (a low-rank bottleneck with its
   own norm, as latent attention's query and key/value ranks): no MLP width, so ``Target.ffn``
   leaves it whole. An MLP width of a mixture of experts may keep one order per expert
   (``expert_orders.mark_expert_orders``: ``ChannelGroup.experts``).
4. ``frozen`` — any of the above, or another static group, that an op forbids slicing; the
   reason names the op and module.
5. ``fixed`` (other static dims: vocabulary, tokens, classes) and ``dynamic`` (batch, seq).

Writes ``state.CHANNELS`` on every node (the group id of each dim of its tensor output; the op
rules write ``LITERALS`` / ``REDUCES`` / ``SLICE_PARTS`` / ``ATTENTION_OP``), and
``state.CHANNEL_GRAPH``, ``state.ATTENTION`` and ``state.UNKNOWN_OPS`` on the graph, after
clearing every key an earlier analysis left; modifies nothing else.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from .. import state
from ..fx_utils import get_attribute, module_path, tensor_shape
from ..errors import PostconditionError
from ..infra import SubclonePass
from ..rules import apply_rule
from ..state import AttentionSite
from .channel_graph import ChannelGraph
from .expert_orders import mark_expert_orders
from .find_blocks import FindResidualBlocksPass, layer_of_node

__all__ = ["AnalyzeChannelsPass", "analyze_channels"]

aten = torch.ops.aten


def _attribute_vertices(gm: fx.GraphModule, graph: ChannelGraph) -> None:
    """Attributes that are one tensor (a tied embedding) must be sliced as one."""
    first_by_tensor: dict[int, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or tensor_shape(node) is None:
            continue
        tensor = get_attribute(gm, node.target)
        other = first_by_tensor.setdefault(id(tensor), node)
        for d, size in enumerate(tensor_shape(node)):
            v = graph.vertex((node.name, 0, d), size)
            if other is not node:
                graph.eq(v, graph.vertex((other.name, 0, d), size), f"tied attribute {node.target}")


def build_channel_graph(gm: fx.GraphModule) -> tuple[ChannelGraph, list[str]]:
    graph = ChannelGraph()
    _attribute_vertices(gm, graph)
    unknown = []
    for node in gm.graph.nodes:
        missing = apply_rule(node, graph)
        if missing is not None:
            unknown.append(f"{missing} in {module_path(node)}")
        # every output dim is a vertex before solving, also the ones no rule mentioned (a size-1
        # dim unsqueeze made): each then belongs to a group, its own if nothing else
        for d, size in enumerate(tensor_shape(node) or ()):
            graph.vertex((node.name, 0, d), size)
    graph.solve()
    return graph, unknown


def _classify(gm: fx.GraphModule, graph: ChannelGraph, layers) -> list[dict]:
    nodes = {n.name: n for n in gm.graph.nodes}
    layer_of_key = {layer.key: layer.index for layer in layers if layer.key is not None}
    residual = set()
    for layer in layers:
        for block in layer.blocks:
            for d, size in enumerate(tensor_shape(nodes[block.add])):
                group = graph.group_of(graph.vertex((block.add, 0, d), size))
                if group.static and any(v in graph.contracted for v in group.vertices):
                    residual.add(group.id)
    attention, head_structure = [], set()
    for node in gm.graph.nodes:
        op = state.ATTENTION_OP.of(node, graph)
        if op is None:
            continue
        heads, kv = _static_heads(graph, op.heads), _static_heads(graph, op.kv_heads)
        if heads is None or kv is None or any(seen.heads == heads for seen in attention):
            continue        # no static heads; or eager attention: q·kᵀ and p·v are one site
        kv, rep, rep_outer = _kv_and_rep(gm, graph, heads, kv, op.kv_heads)
        head_dim = graph.group_of(op.head_dim).id
        attention.append(AttentionSite(node.name, heads, kv, rep, head_dim, layer_of_node(node, layer_of_key),
                                       rep_outer))
        head_structure |= {heads, kv, head_dim} | ({rep} if rep is not None else set())
    derived = set()
    for g in head_structure:
        derived |= graph.composites_containing(g)
    normalised = _normalised_groups(gm, graph)
    for group in graph.groups.values():
        group.layer = _layer_of(graph, group, nodes, layer_of_key)
        group.tensors = [(nodes[graph.labels[v][0]].target, graph.labels[v][2]) for v in group.vertices
                         if graph.labels[v][0] in nodes and nodes[graph.labels[v][0]].op == "get_attr"]
        if not group.static:
            continue
        if group.id in residual:
            group.kind = "residual"
        elif group.id in head_structure:
            group.kind = next(k for k in ("heads", "kv_heads", "head_dim", "rep")
                              if any(getattr(site, k) == group.id for site in attention))
            group.kind = "fixed" if group.kind == "rep" else group.kind
        elif group.id not in derived and _is_hidden_width(graph, group) and group.layer is not None:
            group.kind = "latent" if group.id in normalised else "ffn"
        group.role = group.kind
        if group.reason is not None and group.kind in ("residual", "heads", "kv_heads", "ffn", "latent"):
            group.kind = "frozen"
    return attention


def _static_heads(graph: ChannelGraph, vertex: int) -> int | None:
    """The group of the heads at ``vertex``: its own when static; when the heads were merged
    into the batch (``(b, h, s, d) → (b·h, s, d)``, a dynamic size), the one static factor of
    that merge; None when there is no such single factor."""
    group = graph.group_of(vertex)
    if group.static:
        return group.id
    static_parts = {p for rel in graph.relations_of(group.id, "factor")
                    for p in graph.part_groups(rel) if graph.groups[p].static}
    return static_parts.pop() if len(static_parts) == 1 else None


def _kv_and_rep(gm: fx.GraphModule, graph: ChannelGraph, heads: int, kv: int, key_vertex: int):
    """(kv group, repeat group, whether the repeat is the outer factor): query heads = kv heads ×
    repeat (``repeat_interleave`` / ``expand``: head ``g·r + i`` reads kv head ``g``) or repeat × kv
    heads (``k.repeat(1, r, 1, 1)``: head ``i·n_kv + g`` reads kv head ``g``), where repeat owns
    no tensor.

    With ``enable_gqa`` the op itself states the factor; with repeated k/v (``expand`` then
    ``reshape``, or ``repeat``) the kv heads seen by the op *are* the query heads, and the factor is
    one step back: which of its two parts the kv heads are is read off the key before its repeat.
    Plain multi-head attention has no repeat."""
    attributes = {n.name for n in gm.graph.nodes if n.op == "get_attr"}
    for rel in graph.relations_of(heads, "factor"):
        parts = graph.part_groups(rel)
        if len(parts) != 2:
            continue
        if heads == kv and _key_heads(gm, graph, key_vertex, heads, parts) == parts[1]:
            return parts[1], parts[0], True
        owns_tensor = any(graph.labels[v][0] in attributes for v in graph.groups[parts[-1]].vertices)
        if parts[0] == kv or (heads == kv and not owns_tensor):
            return parts[0], parts[1], False
    if heads != kv:
        graph.groups[heads].reason = graph.groups[heads].reason or "query heads are not kv heads × a repeat"
    return kv, None, False


def _key_heads(gm: fx.GraphModule, graph: ChannelGraph, key_vertex: int, heads: int, parts: list[int]) -> int | None:
    """The part of ``heads = parts[0] × parts[1]`` that the key holds before it is repeated: the
    first node back from the attention op's key (through nodes holding the heads or a part) that
    holds exactly one of the two parts and not their product."""
    nodes = {n.name: n for n in gm.graph.nodes}
    todo, seen = [nodes.get(graph.labels[key_vertex][0])], set()
    while todo and len(seen) < 64:
        node = todo.pop(0)
        if node is None or node in seen:
            continue
        seen.add(node)
        groups = {graph.find(graph.vertex_of[(node.name, 0, d)]) for d in range(len(tensor_shape(node) or ()))
                  if (node.name, 0, d) in graph.vertex_of}
        held = [p for p in parts if p in groups]
        if len(held) == 1 and heads not in groups:
            return held[0]
        if held or heads in groups:
            todo.extend(node.all_input_nodes)
    return None


# reductions that compute a normalisation's statistic (a sum or a max over a width is no norm)
_NORM_STATISTICS = {aten.mean.dim, aten.mean.default, aten.var.correction, aten.var.dim, aten.std.correction,
                    aten.std.dim, aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default,
                    aten.linalg_vector_norm.default, aten.norm.ScalarOpt_dim}


def _normalised_groups(gm: fx.GraphModule, graph: ChannelGraph) -> set[int]:
    """Groups some normalisation averages over."""
    groups = set()
    for node in gm.graph.nodes:
        reduces = state.REDUCES.of(node, graph)
        if reduces is not None and node.target in _NORM_STATISTICS:
            groups |= {graph.find(v) for v in reduces.vertices}
    return groups


def _is_hidden_width(graph: ChannelGraph, group) -> bool:
    if not any(v in graph.contracted for v in group.vertices):
        return False
    if any(v in graph.produced for v in group.vertices):
        return True
    return any(any(v in graph.produced for v in graph.groups[w].vertices)
               for w in graph.composites_containing(group.id))


def _layer_of(graph: ChannelGraph, group, nodes, layer_of_key) -> int | None:
    """The layer most of the group's tensors are computed in."""
    votes = Counter()
    for v in group.vertices:
        node = nodes.get(graph.labels[v][0])
        if node is not None and node.op == "call_function":
            layer = layer_of_node(node, layer_of_key)
            if layer is not None:
                votes[layer] += 1
    return votes.most_common(1)[0][0] if votes else None


class AnalyzeChannelsPass(SubclonePass):
    """Analysis: the channel-dependency graph and its named groups (see module docstring)."""

    requires_keys = (state.LAYERS,)
    clears = "channels"

    def run(self, gm: fx.GraphModule) -> bool:
        layers = state.LAYERS.need(gm)
        graph, unknown = build_channel_graph(gm)
        attention = _classify(gm, graph, layers)
        for node in gm.graph.nodes:
            shapes = tensor_shape(node)
            if shapes is not None:
                groups = tuple(graph.find(graph.vertex((node.name, 0, d), s)) for d, s in enumerate(shapes))
                state.CHANNELS.set(node, state.NodeChannels(graph.token, groups))
        mark_expert_orders(gm, graph)
        state.CHANNEL_GRAPH.set(gm, graph)
        state.ATTENTION.set(gm, tuple(attention))
        state.UNKNOWN_OPS.set(gm, tuple(unknown))
        return False

    def ensures(self, graph_module: fx.GraphModule) -> None:
        graph = state.CHANNEL_GRAPH.need(graph_module)
        for node in graph_module.graph.nodes:
            channels = state.CHANNELS.of(node, graph)
            if channels is not None and any(g not in graph.groups for g in channels.groups):
                raise PostconditionError(f"AnalyzeChannelsPass: a dim of {node.name} belongs to no channel group")


def analyze_channels(gm: fx.GraphModule) -> ChannelGraph:
    """Plain-function twin: run the block finder and this analysis, return the graph."""
    FindResidualBlocksPass()(gm)
    AnalyzeChannelsPass()(gm)
    return state.CHANNEL_GRAPH.need(gm)
