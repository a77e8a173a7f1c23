"""One neuron order per expert: which MLP widths of a mixture of experts get one, and the math.

A fused expert tensor ``(experts, 2·inner, hidden)`` / ``(experts, inner, hidden)`` holds one MLP
per expert; every expert sees other tokens, so each keeps its own best ``inner`` neurons. The op
rule of a grouped matmul (``rules.experts``) states that its weight's expert dim indexes
independent channel orders and which rows belong to which expert (``state.EXPERT_ROWS``).

0. ``mark_expert_orders``: the expert dim of a grouped matmul's weight — one group with the
   router's output rows and any per-expert bias, linked through the routing (``rules.experts``) —
   is of kind ``experts`` (``Target.experts``), or ``frozen`` with the reason of the op that forbids it;
1. ``mark_expert_orders``: an ``ffn`` group of such a weight gets one order per expert
   (``ChannelGroup.experts`` = the expert dim's group, set on it and on every composite built
   from it, like a fused gate/up) when every grouped matmul it meets shares one expert dim and
   one offsets tensor, every tensor attribute of it carries that expert dim (so it can be
   gathered per expert), and every activation of it keeps the expert-sorted rows (an op that
   mixed the rows of different experts along it — a sum over tokens — would mix orders). Else
   the group keeps one order for all experts, as a dense MLP does.
2. Scores: row ``r`` of a grouped matmul's input counts for the expert whose offsets range holds
   it (``expert_row_sums``); a group's score is then ``(experts, inner)``, and its keep-set too.
   An expert scores the mean over its rows of ‖router weight × its output‖ (REAP;
   ``output_watch_list``); an expert no calibration token reached scores 0.
3. Slicing: ``KeepChannelsPass`` keeps, in expert ``e``, the indices of row ``e`` of the keep-set
   (``tensor_edits.Take`` with ``rows`` = the expert dim).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .. import state
from .channel_graph import ChannelGraph

__all__ = ["mark_expert_orders", "row_watch_list", "output_watch_list", "expert_row_sums", "expert_dim"]


def _candidates(gm: fx.GraphModule, graph: ChannelGraph) -> dict[int, set]:
    """ffn group → {(expert group, rows group, offsets node)} of every grouped matmul it meets."""
    found: dict[int, set] = {}
    for node in gm.graph.nodes:
        rows = state.EXPERT_ROWS.of(node, graph)
        if rows is None:
            continue
        for vertex in rows.channels:
            group = graph.group_of(vertex)
            if group.kind == "ffn" and group.static:
                found.setdefault(group.id, set()).add((graph.find(rows.experts), graph.find(rows.rows), rows.offsets))
    return found


def _keeps_expert_structure(gm: fx.GraphModule, graph: ChannelGraph, involved: set, experts: int, rows: int) -> bool:
    for node in gm.graph.nodes:
        channels = state.CHANNELS.of(node, graph)
        if channels is None or not involved & set(channels.groups):
            continue
        if node.op == "get_attr" and experts not in channels.groups:
            return False
        if experts not in channels.groups and rows not in channels.groups:
            return False
    return True


def mark_expert_orders(gm: fx.GraphModule, graph: ChannelGraph) -> None:
    """Name the expert dims (kind ``experts``, case 0) and set ``ChannelGroup.experts`` on every
    MLP width that may keep one order per expert (case 1)."""
    for node in gm.graph.nodes:
        rows = state.EXPERT_ROWS.of(node, graph)
        group = graph.group_of(rows.experts) if rows is not None else None
        if group is not None and group.static and group.kind in ("fixed", "frozen"):
            group.role = "experts"
            group.kind = "frozen" if group.reason is not None else "experts"
    for gid, uses in _candidates(gm, graph).items():
        if len(uses) != 1:
            continue          # grouped matmuls with different expert dims or offsets: one order
        experts, rows, _ = next(iter(uses))
        involved = {gid} | graph.composites_containing(gid)
        if _keeps_expert_structure(gm, graph, involved, experts, rows):
            for g in involved:
                graph.groups[g].experts = experts


def row_watch_list(gm: fx.GraphModule, graph: ChannelGraph) -> dict[str, tuple[str, int, str]]:
    """{grouped matmul node: (input node, channel dim, offsets node)} for every grouped matmul whose
    contracted input width keeps one order per expert: its rows are scored per expert (case 2)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    watch = {}
    for node in gm.graph.nodes:
        rows = state.EXPERT_ROWS.of(node, graph)
        if rows is None:
            continue
        channels = state.CHANNELS.of(nodes[rows.input], graph)
        if channels is not None and graph.groups[channels.groups[1]].experts is not None:
            watch[node.name] = (rows.input, 1, rows.offsets)
    return watch


def output_watch_list(gm: fx.GraphModule, graph: ChannelGraph) -> dict[str, tuple[str, str]]:
    """{node: (node, offsets node)} whose rows are the router-weighted outputs of each expert (the
    REAP criterion, case 2): per offsets, the last grouped matmul's output, or the product of it
    with a per-row weight (rows, 1) when that is its one use."""
    last: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        rows = state.EXPERT_ROWS.of(node, graph)
        if rows is not None and graph.group_of(rows.experts).kind == "experts":
            last[rows.offsets] = node
    watch = {}
    for offsets, node in last.items():
        value = node
        users = list(node.users)
        if len(users) == 1 and users[0].target is torch.ops.aten.mul.Tensor:
            other = [a for a in users[0].args if a is not node]
            shape = other[0].meta.get("val").shape if other and isinstance(other[0], fx.Node) else None
            if shape is not None and len(shape) == 2 and shape[1] == 1:
                value = users[0]
        watch[value.name] = (value.name, offsets)
    return watch


def expert_row_sums(x: torch.Tensor, dim: int, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ |x| over each expert's rows, per channel: (experts, channels); rows per expert), in float64.
    Rows past ``offsets[-1]`` belong to no expert and are skipped."""
    ends = offsets.detach().to(torch.long).cpu()
    counts = torch.diff(ends, prepend=ends.new_zeros(1)).clamp_min(0)
    values = x.detach().movedim(dim, -1).reshape(-1, x.shape[dim])[: int(ends[-1])].abs().to(torch.float64)
    owner = torch.repeat_interleave(torch.arange(len(ends)), counts).to(values.device)
    sums = torch.zeros(len(ends), values.shape[1], dtype=torch.float64, device=values.device)
    sums.index_add_(0, owner, values)
    return sums.cpu(), counts.to(torch.float64)


def expert_dim(graph: ChannelGraph, group: int, channels: tuple[int, ...]) -> int | None:
    """The dim of a tensor (its channel groups ``channels``) that picks the expert of ``group``."""
    experts = graph.groups[group].experts
    return channels.index(experts) if experts is not None and experts in channels else None
