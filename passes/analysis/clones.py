"""Clones in a parent: channels that are exact copies of each other, folded when a shrink removes them.

A grown child (``analysis/grow.py``) holds each channel ``n`` times, and so does any model with
duplicated neurons. Two indices ``i``, ``j`` of a group are **clones** when swapping them leaves
every tensor unchanged (through every composite of the group: a head's whole ``head_dim``
block, a fused projection's part). The network is then symmetric under that swap, so the two
channels carry equal values for every input, and removing ``j`` while adding its contraction
weights to ``i``'s — ``2·W[:, i]`` for a pair — computes the same function: the inverse of
cloning. A norm over the group keeps its statistic when every kept index stands for the same
number ``m`` of copies (the mean over copies is the mean over one); the √(D/d) correction then
counts ``D/m`` as the parent's width.

Cases (``fold_choice``):
1. detection (``clone_classes``) only where the scores hold near ties (clones score alike) and
   tensors hold values (a streamed parent's are placeholders: no folding there): each index's
   slices of every tensor of the group and its composites, hashed; the classes found are
   verified by permuting every class at once (a rotation) and comparing every tensor;
2. a group folds when all its classes have one size ``m > 1``, the target keeps at most one index
   per class (per expert, for a group with one order per expert: the classes hold in every expert), and cloning would be exact over it (``grow.fold_problem``: no sum, softmax,
   unbiased variance or two-activation contraction over it); the child keeps the best-scoring
   representative of each class it keeps — one copy each, whatever the ties;
3. otherwise the group is shrunk as any other (every index its own).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from .. import state
from ..errors import PassError
from ..fx_utils import get_attribute
from .channel_graph import ChannelGraph
from .grow import problems
from .keep_sets import derive_keep

__all__ = ["clone_classes", "folded_groups", "unfolded_sizes", "has_near_ties", "fold_candidates"]


def has_near_ties(scores: torch.Tensor, rtol: float = 1e-6) -> bool:
    """Two scores equal within ``rtol``: what clones look like (a cheap filter before hashing)."""
    flat = scores.reshape(-1, scores.shape[-1])[0].double().sort().values
    gaps = flat[1:] - flat[:-1]
    return bool((gaps <= rtol * flat[1:].abs().clamp_min(1e-30)).any())


def _related(graph: ChannelGraph, group: int) -> dict[int, torch.Tensor]:
    """Every group built from ``group`` (and itself): the indices of it each index of ``group`` has, (n, k)."""
    size = graph.groups[group].size
    keep, _ = derive_keep(graph, {group: torch.arange(size).view(size, 1)}, {})
    return {g: k for g, k in keep.items() if k.dim() == 2 and k.shape[0] == size and graph.groups[g].static}


def _tensor_dims(gm: fx.GraphModule, graph: ChannelGraph, related: dict) -> list[tuple[torch.Tensor, int, int]]:
    """(tensor, dim, group) of every attribute dim in a related group, each tensor once."""
    seen, found = set(), []
    for node in gm.graph.nodes:
        channels = state.CHANNELS.of(node, graph) if node.op == "get_attr" else None
        if channels is None:
            continue
        tensor = get_attribute(gm, node.target)
        for dim, g in enumerate(channels.groups):
            if g in related and (id(tensor), dim) not in seen and tensor.shape[dim] == graph.groups[g].size:
                seen.add((id(tensor), dim))
                found.append((tensor, dim, g))
    return found


def _symmetric(found, related: dict, permutation: torch.Tensor, graph, group) -> bool:
    """Every tensor unchanged by ``permutation`` of ``group`` lifted to its composites."""
    lifted = {}
    for g, k in related.items():
        # position k[i, o] of a composite moves to k[permutation[i], o]; positions of no row stay
        lifted[g] = torch.arange(graph.groups[g].size)
        lifted[g][k.reshape(-1)] = k[permutation].reshape(-1)
    for tensor, dim, g in found:
        others = [(d, h) for t, d, h in found if t is tensor]
        moved = tensor.detach()
        for d, h in others:
            moved = moved.index_select(d, lifted[h])
        if not torch.equal(moved, tensor.detach()):
            return False
    return True


def clone_classes(gm: fx.GraphModule, graph: ChannelGraph, group: int) -> torch.Tensor | None:
    """``rep[i]``: the lowest index of ``i``'s clone class (case 1); None when every index is its
    own, or the tensors hold no values."""
    try:
        related = _related(graph, group)
    except PassError:           # a structure the keep-sets cannot lift one index of: no folding
        return None
    found = _tensor_dims(gm, graph, related)
    if not found or any(t.is_meta or isinstance(t, FakeTensor) for t, _, _ in found):
        return None
    size = graph.groups[group].size
    keys = [[] for _ in range(size)]
    for tensor, dim, g in found:
        rows = tensor.detach().movedim(dim, 0)[related[g]].reshape(size, -1).contiguous()
        for i in range(size):
            keys[i].append(hash(rows[i].numpy().tobytes()) if rows.dtype != torch.bfloat16
                           else hash(rows[i].view(torch.int16).numpy().tobytes()))
    first: dict[tuple, int] = {}
    rep = torch.tensor([first.setdefault(tuple(k), i) for i, k in enumerate(keys)])
    if bool((rep == torch.arange(size)).all()):
        return None
    rotation = torch.arange(size)
    for r in rep.unique().tolist():
        members = (rep == r).nonzero().flatten()
        rotation[members] = members.roll(1)
    return rep if _symmetric(found, related, rotation, graph, group) else None


def folded_groups(graph: ChannelGraph, folded: dict[int, int]) -> dict[int, int]:
    """Each folded group and every composite built from folded parts: the copies each kept index
    of it stands for (a factor multiplies its parts' copies; a concatenation of parts that all
    stand for the same number keeps it)."""
    out = dict(folded)
    changed = True
    while changed:
        changed = False
        for rel in graph.relations:
            whole, parts = graph.find(rel.whole), graph.part_groups(rel)
            if whole in out or not any(p in out for p in parts):
                continue
            if rel.kind == "factor":
                out[whole] = math.prod(out.get(p, 1) for p in parts)
                changed = True
            elif all(p in out for p in parts) and len({out[p] for p in parts}) == 1:
                out[whole] = out[parts[0]]
                changed = True
    return out


def unfolded_sizes(graph: ChannelGraph, folded: dict[int, int]) -> dict[int, float]:
    """The width each group touched by a fold had before its copies were made: ``size / copies``
    for a folded group and its evenly folded composites, and for a composite whose parts stand
    for different numbers of copies (a projection's output split into a folded part and a kept
    one, as a state-space block's dt rank beside its B and C), the sum (a concatenation) or the
    product (a factor) of its parts' widths. A group is shrunk only where its child size is
    below this width: removing copies alone loses nothing."""
    out = {g: graph.groups[g].size / copies for g, copies in folded_groups(graph, folded).items()
           if graph.groups[g].static}
    changed = True
    while changed:
        changed = False
        for rel in graph.relations:
            whole, parts = graph.find(rel.whole), graph.part_groups(rel)
            if whole in out or not any(p in out for p in parts) \
                    or not all(graph.groups[p].static for p in [whole, *parts]):
                continue
            widths = [out.get(p, graph.groups[p].size) for p in parts]
            out[whole] = math.prod(widths) if rel.kind == "factor" else sum(widths)
            changed = True
    return out


def fold_candidates(gm: fx.GraphModule | None, graph: ChannelGraph, group: int, scores: torch.Tensor,
                    keep: int) -> tuple[torch.Tensor, int] | None:
    """(the representative of each clone class, the class size ``m``) when ``group`` folds to
    ``keep`` indices (cases 1-2), else None."""
    if gm is None or keep >= graph.groups[group].size or not has_near_ties(scores):
        return None
    rep = clone_classes(gm, graph, group)
    if rep is None:
        return None
    representatives = rep.unique()
    sizes = torch.bincount(rep)[representatives]
    if keep > len(representatives) or len(set(sizes.tolist())) != 1:
        return None
    copies = int(sizes[0])
    cloned: dict[int, int | None] = {g: c for g, c in folded_groups(graph, {group: copies}).items()}
    cloned.update({w: None for w in graph.composites_containing(group) if w not in cloned})
    if next(problems(gm, graph, cloned), None) is not None:
        return None
    return representatives, copies
