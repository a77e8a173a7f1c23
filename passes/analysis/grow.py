"""Grow as well as shrink: which channels a wider child clones, and what cloning cannot preserve.

HyperCloning (Samragh et al., 2024, arXiv 2409.12903) makes a wider model compute exactly what a
narrower one does. Here it is a keep-set with repeated indices: a group grown ``n`` times keeps
every parent index ``n`` times, each index's copies side by side (``clone_index``: ``[0, 0, 1, 1,
…]``). That layout survives the channel graph's relations: a concatenation's parts clone their
own indices (a fused q/k/v, a ``cat`` of rotary halves), and a factor composite is the Kronecker
product of its parts, so a grown head clones its whole ``head_dim`` block and a grown kv group
its query heads. ``KeepChannelsPass`` then gathers every tensor and rewrites every literal as
it does for a shrink; ``ScaleClonedReadsPass`` divides every weight that sums over a grown width
by the number of copies, so that the copies add up to the parent's value.

The math: with ``x' = [x, x]`` (each channel twice) and ``W' = [W/2, W/2]``, ``W' x' = W x``.
A norm over the cloned stream sees the same statistic: ``mean(x'²) = mean(x²)`` and
``var(x') = var(x)``, so RMSNorm and LayerNorm (gains, biases and ε cloned/unchanged) output the
clone of the parent's output; a max over clones is the max. Elementwise ops act per channel.

What cannot be preserved by cloning is refused in one line naming the op and its module
(``check_growable``), never guessed:
1. a sum over a grown width (``sum``, ``logsumexp``, a vector norm) counts each copy;
2. a softmax over a grown width spreads the mass over the copies;
3. an unbiased variance or standard deviation divides by ``N·n − 1``, not ``n·(N − 1)``;
4. a contraction of two activations over a grown width (no weight to divide);
5. indices of an ``argmax`` / ``max.dim`` over a grown width would point at other positions;
6. a width cloned unevenly (a concatenation of a grown part and a kept one) under a contraction
   or a reduction: no single divisor makes it exact.
A width frozen by an op, or a size that is not an integer multiple of the parent's, is refused
too (``grow_keep``). Heads grow as whole kv groups with their query heads (``kv_heads × a``) and
as query heads within each kv group (``heads / kv_heads × b``); shrinking one while growing the
other is refused.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .. import state
from ..fx_utils import module_path
from .channel_graph import ChannelGraph, ChannelGroup

__all__ = ["clone_index", "grow_keep", "grow_heads", "multiplicity", "grown_groups", "check_growable",
           "problems", "GROWN_KINDS"]

aten = torch.ops.aten

# target field of each kind of group a Target may grow
GROWN_KINDS = {"residual": "hidden", "ffn": "ffn", "latent": "latent", "heads": "heads", "kv_heads": "kv_heads"}

# reductions whose value over n copies of every channel is their value over one copy
_INVARIANT = {aten.mean.dim, aten.mean.default, aten.amax.default, aten.amin.default, aten.any.dim,
              aten.all.dim, aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default,
              aten._fused_rms_norm.default}
_VARIANCES = {aten.var.correction, aten.std.correction, aten.var.dim, aten.std.dim}
_WITH_INDICES = {aten.max.dim, aten.min.dim}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default}


def clone_index(size: int, copies: int) -> torch.Tensor:
    """Every index of ``range(size)`` ``copies`` times, each index's copies side by side."""
    return torch.arange(size).repeat_interleave(copies)


def _copies(name: str, size: int, parent: int, reason: str | None) -> int:
    if size % parent:
        raise ValueError(f"Target.{name}={size} cannot grow a width of {parent} by cloning: not a whole multiple "
                         f"of it (allowed: {parent * 2}, {parent * 3}, …, or a factor: Times(n), xN on the command line)")
    if reason is not None:
        raise ValueError(f"Target.{name} cannot grow this model: {reason}")
    return size // parent


def grow_keep(group: ChannelGroup, size: int, name: str) -> torch.Tensor:
    """The keep-set of a group grown to ``size`` (a multiple of its size): each index cloned."""
    return clone_index(group.size, _copies(name, size, group.size, group.reason))


def grow_heads(graph: ChannelGraph, site, heads: int, kv_heads: int, keep: dict, sizes: dict) -> None:
    """Clone an attention op's kv groups ``a = kv_heads / parent kv`` times, each with its query
    heads, and the query heads in every group ``b = (heads / kv_heads) / parent's per group``
    times: query head ``(g, r)`` of the child reads kv group ``g`` as its parent head did."""
    hq, kv, rep = site.heads, site.kv_heads, site.rep
    n_heads, n_kv = graph.groups[hq].size, graph.groups[kv].size
    if rep is None:                      # every query head has its own key and value
        keep[hq] = grow_keep(graph.groups[hq], heads, "heads")
        return
    per_group = n_heads // n_kv
    if heads % kv_heads:
        raise ValueError(f"Target.heads={heads} does not fit the kv grouping: {kv_heads} kv groups need "
                         f"heads = kv_heads × (query heads per group)")
    if kv_heads < n_kv or heads // kv_heads < per_group:
        raise ValueError(f"Target.heads={heads}, kv_heads={kv_heads}: growing one of query heads and kv heads while "
                         f"shrinking the other is refused (the parent has {n_heads} query heads in {n_kv} kv groups); "
                         "grow both, or kv heads with the query heads per group kept")
    keep[kv] = grow_keep(graph.groups[kv], kv_heads, "kv_heads")
    per_child = heads // kv_heads
    copies = _copies("heads", per_child * n_kv, per_group * n_kv, graph.groups[hq].reason)
    keep[rep] = clone_index(per_group, copies)
    sizes[rep] = per_child


def multiplicity(keep: torch.Tensor, size: int) -> int | None:
    """How many times a keep-set holds each parent index it holds: one number when it holds
    each the same number of times (1 for a plain cut), ``None`` when uneven."""
    rows = keep.reshape(-1, keep.shape[-1])
    counts = {int(c) for row in rows for c in torch.bincount(row, minlength=size) if c}
    return counts.pop() if len(counts) == 1 else None


def grown_groups(graph: ChannelGraph, keep: dict, sizes: dict) -> dict[int, int | None]:
    """Every static group the child holds more of than the parent: its number of copies of
    each index (``None``: uneven)."""
    return {gid: multiplicity(keep[gid], graph.groups[gid].size) for gid in keep
            if graph.groups[gid].static and sizes.get(gid, graph.groups[gid].size) > graph.groups[gid].size}


def _refuse(node: fx.Node, graph: ChannelGraph, group: int, why: str) -> None:
    g = graph.groups[group]
    raise ValueError(f"cannot grow this model by cloning: {node.target} ({node.name} in {module_path(node)}) {why} "
                     f"(a {g.kind} width, group {g.id} of size {g.size})")


def _reduction_problem(node: fx.Node) -> str | None:
    """Why a reduction over n copies of every channel differs from one over a single copy."""
    if node.target in _INVARIANT:
        return None
    if node.target in _VARIANCES:
        unbiased = node.kwargs.get("correction", node.args[2] if len(node.args) > 2 else None)
        if node.target in (aten.var.dim, aten.std.dim):
            unbiased = node.kwargs.get("unbiased", node.args[2] if len(node.args) > 2 else True)
        return None if unbiased in (0, 0.0, False) else "takes an unbiased variance over it (N·n − 1 ≠ n·(N − 1))"
    if node.target in _WITH_INDICES:
        uses_indices = any(u.target is operator.getitem and u.args[1] == 1 for u in node.users)
        return "returns indices into it, which cloning moves" if uses_indices else None
    return "sums over it: each of the n copies would count"


def problems(gm: fx.GraphModule, graph: ChannelGraph, cloned: dict[int, int | None]):
    """(node, group, why) for each op over a cloned group (``{group: copies, None: uneven}``)
    that cloning cannot keep exact (module docstring, cases 1-6)."""
    touched = lambda vertices: [graph.find(v) for v in vertices if graph.find(v) in cloned]  # noqa: E731
    for node in gm.graph.nodes:
        reduces = state.REDUCES.of(node, graph)
        for g in touched(reduces.vertices if reduces is not None else ()):
            why = _reduction_problem(node) if cloned[g] is not None else "reduces over a width cloned unevenly"
            if why is not None:
                yield node, g, why
        contracts = state.CONTRACTS.of(node, graph)
        for g in touched(contracts.vertices if contracts is not None else ()):
            if contracts.weight is None:
                yield node, g, "contracts two activations over it: no weight to divide by the copies"
            elif cloned[g] is None:
                yield node, g, "contracts a width cloned unevenly: no single divisor makes it exact"
        if node.target in _SOFTMAX:
            channels = state.CHANNELS.of(node.args[0], graph) if isinstance(node.args[0], fx.Node) else None
            dim = node.args[1] if len(node.args) > 1 else -1
            if channels is not None and channels.groups[dim] in cloned:
                yield node, channels.groups[dim], "takes a softmax over it: the copies share the mass"


def check_growable(gm: fx.GraphModule, graph: ChannelGraph, keep: dict, sizes: dict) -> None:
    """Refuse what cloning cannot keep exact (module docstring, cases 1-6)."""
    grown = grown_groups(graph, keep, sizes)
    for node, group, why in problems(gm, graph, grown) if grown else ():
        _refuse(node, graph, group, why)
