"""Keep-sets of every channel group, derived from the decided ones through the relations.

The math: a factor composite ``w = p1 × p2`` (row-major) keeps the Kronecker product of its parts'
keep-sets, ``w[i1·|p2| + i2]`` for every kept ``i1`` and ``i2``; a concat ``w = p1 ‖ p2`` keeps each
part's indices shifted by the sizes before it. A part decided by size only (a GQA repeat that keeps
``k`` of each kv group's query heads, each group its own best ``k``) has no keep-set of its own:
the composite is decided directly, and it must keep exactly ``k`` indices inside the block of each
kept index of the parts before it.

Cases (``derive_keep``):
1. phase 0: only what decisions imply; phase 1: undecided parts of relations that carry a
   decision (a kept subset, or a grown one's clones) are filled first, so they win over relations that would keep a
   group whole; phase 2: fill all;
2. a decided concatenation passes each undecided part the indices in its range (a fused qkv kept
   per head gives its ``cat(q_bias, k_bias, v_bias)`` parts their heads);
3. afterwards every relation must agree with the keep-sets (``check_relations``), else
   ``PassError``; a frozen group that would lose an index is an error naming the op that froze it;
4. a group that is one group concatenated with itself (``tiling``) is decided through that group:
   it keeps the same indices in every copy (``ChooseKeepPass``);
5. a group with one order per expert keeps a ``(experts, kept)`` tensor, row ``e`` for expert ``e``;
   a composite of it composes row by row (a part kept alike in every expert is repeated per row).
"""
from __future__ import annotations

import torch

from ..errors import PassError
from .channel_graph import ChannelGraph

__all__ = ["derive_keep", "check_relations", "compose", "tiling"]


def derive_keep(graph: ChannelGraph, keep: dict, sizes: dict) -> tuple[dict, dict]:
    """Extend decisions to every group (see module docstring); returns (keep, child sizes)."""
    keep = dict(keep)
    full = lambda g: torch.arange(graph.groups[g].size)  # noqa: E731
    is_whole = {graph.find(rel.whole) for rel in graph.relations}
    for phase in range(3):
        changed = True
        while changed:
            changed = False
            for rel in graph.relations:
                w, parts = graph.find(rel.whole), graph.part_groups(rel)
                if w in keep and rel.kind == "concat":
                    changed |= _split_down(graph, keep, sizes, w, parts)
                if w in keep or not graph.groups[w].static:
                    continue
                for p in parts:
                    # a part decided to stay whole (a GQA repeat kept at full size) keeps every index
                    if p not in keep and sizes.get(p) == graph.groups[p].size:
                        keep[p] = full(p)
                carries_decision = any(p in keep and keep[p].shape[-1] != graph.groups[p].size for p in parts)
                if (phase == 2 or phase == 1 and carries_decision) and any(p not in keep and p not in sizes
                                                                            for p in parts):
                    for p in parts:
                        if p not in keep and p not in sizes and p not in is_whole:
                            keep[p] = full(p)
                if all(p in keep for p in parts):
                    keep[w] = compose(rel.kind, [keep[p] for p in parts], [graph.groups[p].size for p in parts])
                    changed = True
    check_relations(graph, keep, sizes)
    new_sizes = {g: k.shape[-1] for g, k in keep.items()}
    new_sizes.update(sizes)
    for gid, group in graph.groups.items():
        if group.static and gid not in new_sizes:
            new_sizes[gid] = group.size
        if group.reason is not None and group.static and new_sizes[gid] != group.size:
            raise ValueError(f"cannot {'grow' if new_sizes[gid] > group.size else 'shrink'} a group of size {group.size}: {group.reason}")
    return keep, new_sizes


def tiling(graph: ChannelGraph, gid: int) -> tuple[int, int, str] | None:
    """``(part, copies, origin)`` when group ``gid`` is one group concatenated with itself
    (``cat(p, p)``: a sinusoidal table's sin and cos halves of one frequency group, heads
    paired across two halves): it keeps the part's indices in every copy, never a top-k of its own."""
    for rel in graph.relations_of(gid, "concat"):
        parts = graph.part_groups(rel)
        if len(parts) > 1 and len(set(parts)) == 1:
            return parts[0], len(parts), rel.origin
    return None


def _split_down(graph: ChannelGraph, keep: dict, sizes: dict, whole: int, parts: list[int]) -> bool:
    """Each undecided part of a decided concatenation keeps the whole's indices in its range."""
    changed, offset = False, 0
    for p in parts:
        size = graph.groups[p].size
        if p not in keep and p not in sizes and graph.groups[p].static:
            rows = keep[whole].reshape(-1, keep[whole].shape[-1])
            inside = [row[(row >= offset) & (row < offset + size)] - offset for row in rows]
            if len({len(row) for row in inside}) > 1:
                raise PassError(f"channel group {p} would keep a different number of channels in each expert")
            keep[p] = torch.stack(inside) if keep[whole].dim() == 2 else inside[0]
            changed = True
        offset += size
    return changed


def check_relations(graph: ChannelGraph, keep: dict, sizes: dict | None = None) -> None:
    """Every relation must agree with the keep-sets (a group without one keeps everything): a
    group that is both the product of some groups and the concatenation of others (a fused qkv
    seen by a reshape and by a bias ``cat``) must keep the same channels through both, or its
    tensors would be sliced one way and its literals another — refused instead of guessed."""
    sizes = sizes or {}

    def kept(g):
        return keep[g] if g in keep else torch.arange(graph.groups[g].size)

    for rel in graph.relations:
        w, parts = graph.find(rel.whole), graph.part_groups(rel)
        if not all(graph.groups[g].static for g in (w, *parts)):
            continue
        part_sizes = [graph.groups[p].size for p in parts]
        per_parent = [p not in keep and sizes.get(p, graph.groups[p].size) < graph.groups[p].size for p in parts]
        if rel.kind == "factor" and any(per_parent):
            agrees = _agrees_per_parent(kept(w), [kept(p) for p in parts[:-1]], part_sizes, sizes.get(parts[-1]))
            agrees = agrees and per_parent[-1] and not any(per_parent[:-1])
        else:
            agrees = torch.equal(compose(rel.kind, [kept(p) for p in parts], part_sizes), kept(w))
        if not agrees:
            g = graph.groups[w]
            raise PassError(f"channel group {g.id} (size {g.size}, {g.kind}, layer {g.layer}) would keep other "
                            f"channels than its {rel.kind} of groups {list(parts)} implies; freeze it or keep it whole")


def _agrees_per_parent(whole: torch.Tensor, leading: list[torch.Tensor], sizes: list[int], last_kept) -> bool:
    """``whole`` keeps ``last_kept`` indices of the last part inside each kept block of the
    leading parts (their Kronecker product), in order."""
    if last_kept is None:
        return False
    blocks = compose("factor", leading, sizes[:-1]) if len(leading) > 1 else leading[0]
    if len(whole) != len(blocks) * last_kept:
        return False
    rows = whole.view(len(blocks), last_kept)
    return bool(torch.equal(rows // sizes[-1], blocks[:, None].expand_as(rows))
                and (rows[:, 1:] > rows[:, :-1]).all())


def compose(kind: str, keeps: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
    """The composite's keep-set; with one order per expert (a 2-D part), row by row (case 4)."""
    rows = {k.shape[0] for k in keeps if k.dim() == 2}
    if rows:
        if len(rows) > 1:
            raise PassError("parts of one composite keep orders for different numbers of experts")
        expert_rows = [[k[e] if k.dim() == 2 else k for k in keeps] for e in range(rows.pop())]
        return torch.stack([compose(kind, row, sizes) for row in expert_rows])
    if kind == "concat":
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        return torch.cat([k + o for k, o in zip(keeps, offsets)])
    result = keeps[0]
    for k, size in zip(keeps[1:], sizes[1:]):
        result = (result[:, None] * size + k[None, :]).reshape(-1)
    return result
