"""Choose which channels, heads and layers the child keeps; derive every group's keep-set.

Decisions (the paper's recipe, ties broken by the lower index, kept indices in order):
1. residual: the ``hidden`` best channels by score (one order for the whole network);
2. ffn: per layer, the ``ffn`` best neurons;
3. heads: per attention op, the ``kv_heads`` best kv groups (a group scores the sum of its query
   heads), then in each kept group its ``heads / kv_heads`` best query heads;
4. layers: ``drop_layers`` as given, else ``depth="middle"`` drops the middle ones and
   ``depth="measured"`` the ones with the smallest ‖f(x)‖/‖x+f(x)‖ (needs calibration).

Every other group follows: a factor composite keeps the Kronecker product of its parts, a
concat keeps each part shifted by its offset, a group no decision reaches keeps everything.
Relations that carry a decision are resolved before those that would keep a group whole, and
a decided concatenation passes each undecided part the indices in its range (a fused qkv kept
per head gives its ``cat(q_bias, k_bias, v_bias)`` parts their heads). Afterwards every relation
must agree with the keep-sets, else ``PassError``. A frozen group that would lose an index is
an error naming the op that froze it.

Writes ``gm.meta["subclone.keep"]`` ({group: LongTensor of kept indices}),
``gm.meta["subclone.sizes"]`` ({group: new size}) and ``gm.meta["subclone.drop"]``.
"""
from __future__ import annotations

import numbers

from dataclasses import dataclass

import torch
import torch.fx as fx

from .channel_graph import ChannelGraph
from .infra import PassError, SubclonePass, need

__all__ = ["Target", "ChooseKeepPass", "derive_keep", "top_k", "pick", "SELECTIONS", "DEPTHS"]

# How channels are picked: the paper's scores, or the data-free baselines and ablations.
SELECTIONS = ("score", "first", "uniform")
# How layers are picked: the paper's middle, measured ‖f(x)‖/‖x+f(x)‖, or the first ones.
DEPTHS = ("middle", "measured", "first")


@dataclass(frozen=True)
class Target:
    """The child's size. ``None`` keeps the parent's."""

    hidden: int | None = None
    layers: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    ffn: int | None = None

    def __post_init__(self):
        for name in ("hidden", "layers", "heads", "kv_heads", "ffn"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool)):
                raise TypeError(f"Target.{name} must be an int or None, got {type(value).__name__}")
            if value is not None:
                object.__setattr__(self, name, int(value))     # numpy.int64 and friends become int
            if value is not None and value < 1:
                raise ValueError(f"Target.{name}={value}: must be at least 1 (or None to keep the parent's)")


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, ties to the lower index, returned in ascending order."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def pick(scores: torch.Tensor, k: int, selection: str = "score") -> torch.Tensor:
    """k indices out of len(scores): best scores, the first k, or k evenly spaced."""
    n = len(scores)
    if selection == "first" or k >= n:
        return torch.arange(min(k, n))
    if selection == "uniform":
        return torch.linspace(0, n - 1, k).round().long()
    return top_k(scores, k)


def _check(name: str, value: int | None, limit: int, what: str) -> None:
    if value is not None and value > limit:
        raise ValueError(f"Target.{name}={value} is larger than the parent's {what} ({limit}); allowed: 1..{limit}")


def _not_frozen(graph: ChannelGraph, gid: int, name: str) -> None:
    reason = graph.groups[gid].reason
    if reason is not None:
        raise ValueError(f"Target.{name} cannot shrink this model: {reason}")


def _choose_heads(graph, site, target, scores, keep, sizes, selection) -> None:
    hq, kv, rep = site["heads"], site["kv_heads"], site["rep"]
    n_heads, n_kv = graph.groups[hq].size, graph.groups[kv].size
    per_group = n_heads // n_kv
    _check("heads", target.heads, n_heads, "query heads per layer")
    _check("kv_heads", target.kv_heads, n_kv, "kv heads per layer")
    heads, kv_heads = target.heads, target.kv_heads
    if rep is None and heads is not None and kv_heads is not None and heads != kv_heads:
        raise ValueError(f"Target.kv_heads={kv_heads} must equal Target.heads={heads}: this model's "
                         "attention has no kv grouping (every query head has its own key and value)")
    if heads is None:
        heads = (kv_heads or n_kv) * per_group
    if kv_heads is None:
        kv_heads = heads if rep is None else heads // per_group if heads % per_group == 0 else -1
    if kv_heads < 1 or heads % kv_heads or heads // kv_heads > per_group:
        raise ValueError(f"Target.heads={heads} does not fit the kv grouping: the parent has {n_heads} query heads "
                         f"in {n_kv} kv groups; heads must be kv_heads × (1..{per_group})")
    if (heads, kv_heads) == (n_heads, n_kv):
        return
    _not_frozen(graph, hq, "heads")
    head_scores = scores[hq]
    if rep is None:
        keep[hq] = pick(head_scores, heads, selection)
        return
    _not_frozen(graph, kv, "kv_heads")
    by_group = head_scores.view(n_kv, per_group)
    groups = pick(by_group.sum(1), kv_heads, selection)
    kept = [g * per_group + r for g in groups.tolist()
            for r in pick(by_group[g], heads // kv_heads, selection).tolist()]
    keep[kv], keep[hq], sizes[rep] = groups, torch.tensor(kept), heads // kv_heads


def choose(graph: ChannelGraph, attention, target: Target, scores, selection: str = "score") -> tuple[dict, dict]:
    keep: dict[int, torch.Tensor] = {}
    sizes: dict[int, int] = {}
    for kind, value, what in (("residual", target.hidden, "hidden"), ("ffn", target.ffn, "ffn")):
        groups = [g for g in graph.groups.values() if g.role == kind and g.static]
        if value is None:
            continue
        if not groups:
            raise ValueError(f"Target.{what}={value}: this model has no {kind} channel group to shrink")
        for group in groups:
            _check(what, value, group.size, f"{kind} width")
            if value < group.size:
                _not_frozen(graph, group.id, what)
                keep[group.id] = pick(scores[group.id], value, selection)
    if (target.heads or target.kv_heads) and not attention:
        raise ValueError("Target.heads: this model has no attention op whose heads could be removed")
    for site in attention:
        if target.heads is not None or target.kv_heads is not None:
            _choose_heads(graph, site, target, scores, keep, sizes, selection)
    return keep, sizes


def derive_keep(graph: ChannelGraph, keep: dict, sizes: dict) -> tuple[dict, dict]:
    """Extend decisions to every group through factor and concat relations (see docstring)."""
    keep = dict(keep)
    full = lambda g: torch.arange(graph.groups[g].size)  # noqa: E731
    is_whole = {graph.find(rel.whole) for rel in graph.relations}
    # phase 0: only what decisions imply; 1: fill undecided parts of relations that carry a
    # decision (a kept subset), so they win over relations that would keep a group whole; 2: fill all
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
                carries_decision = any(p in keep and len(keep[p]) < graph.groups[p].size for p in parts)
                if (phase == 2 or phase == 1 and carries_decision) and any(p not in keep and p not in sizes
                                                                            for p in parts):
                    for p in parts:
                        if p not in keep and p not in sizes and p not in is_whole:
                            keep[p] = full(p)
                if all(p in keep for p in parts):
                    keep[w] = _compose(rel.kind, [keep[p] for p in parts], [graph.groups[p].size for p in parts])
                    changed = True
    _check_relations(graph, keep)
    new_sizes = {g: len(k) for g, k in keep.items()}
    new_sizes.update(sizes)
    for gid, group in graph.groups.items():
        if group.static and gid not in new_sizes:
            new_sizes[gid] = group.size
        if group.reason is not None and group.static and new_sizes[gid] != group.size:
            raise ValueError(f"cannot shrink a group of size {group.size}: {group.reason}")
    return keep, new_sizes


def _split_down(graph: ChannelGraph, keep: dict, sizes: dict, whole: int, parts: list[int]) -> bool:
    """A concatenation whose whole is decided (a fused qkv kept per head, seen also as
    ``cat(q_bias, k_bias, v_bias)``): each undecided part keeps the whole's indices in its range."""
    changed, offset = False, 0
    for p in parts:
        size = graph.groups[p].size
        if p not in keep and p not in sizes and graph.groups[p].static:
            inside = keep[whole][(keep[whole] >= offset) & (keep[whole] < offset + size)]
            keep[p] = inside - offset
            changed = True
        offset += size
    return changed


def _check_relations(graph: ChannelGraph, keep: dict) -> None:
    """Every relation must agree with the keep-sets (a group without one keeps everything): a
    group that is both the product of some groups and the concatenation of others (a fused qkv
    seen by a reshape and by a bias ``cat``) must keep the same channels through both, or its
    tensors would be sliced one way and its literals another — refused instead of guessed."""
    def kept(g):
        return keep[g] if g in keep else torch.arange(graph.groups[g].size)

    for rel in graph.relations:
        w, parts = graph.find(rel.whole), graph.part_groups(rel)
        if not all(graph.groups[g].static for g in (w, *parts)):
            continue
        derived = _compose(rel.kind, [kept(p) for p in parts], [graph.groups[p].size for p in parts])
        if not torch.equal(derived, kept(w)):
            g = graph.groups[w]
            raise PassError(f"channel group {g.id} (size {g.size}, {g.kind}, layer {g.layer}) would keep other "
                            f"channels than its {rel.kind} of groups {list(parts)} implies; freeze it or keep it whole")


def _compose(kind: str, keeps: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
    if kind == "concat":
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        return torch.cat([k + o for k, o in zip(keeps, offsets)])
    result = keeps[0]
    for k, size in zip(keeps[1:], sizes[1:]):
        result = (result[:, None] * size + k[None, :]).reshape(-1)
    return result


def middle_layers(count: int, keep: int) -> list[int]:
    """Indices to drop so that the first ceil(keep/2) and the last floor(keep/2) layers stay."""
    head = (keep + 1) // 2
    return list(range(head, count - (keep - head)))


class ChooseKeepPass(SubclonePass):
    """Decide keep-sets and dropped layers from a ``Target`` and the channel scores."""

    requires_meta = (("subclone.channel_graph", "AnalyzeChannelsPass"),
                     ("subclone.scores", "ScoreChannelsPass"))

    def __init__(self, target: Target, drop_layers=None, depth: str = "middle", selection: str = "score") -> None:
        if depth not in DEPTHS:
            raise ValueError(f"depth={depth!r}: allowed values are {', '.join(DEPTHS)}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection={selection!r}: allowed values are {', '.join(SELECTIONS)}")
        self.target, self.drop_layers, self.depth, self.selection = target, drop_layers, depth, selection

    def run(self, gm: fx.GraphModule) -> bool:
        graph = need(gm, "subclone.channel_graph", "AnalyzeChannelsPass")
        scores = need(gm, "subclone.scores", "ScoreChannelsPass")
        keep, sizes = choose(graph, gm.meta["subclone.attention"], self.target, scores, self.selection)
        keep, new_sizes = derive_keep(graph, keep, sizes)
        gm.meta["subclone.keep"] = keep
        gm.meta["subclone.sizes"] = new_sizes
        gm.meta["subclone.drop"] = self._drops(gm)
        gm.meta["subclone.duplicate"] = self._duplicates(gm)
        return False

    def _duplicates(self, gm: fx.GraphModule) -> list[int]:
        """Layers to repeat for a deeper child: the middle ones, each right after itself."""
        count, wanted = len(gm.meta["subclone.layers"]), self.target.layers
        if count == 0 and (wanted is not None or self.drop_layers):
            raise PassError("the model has no residual layers (no x + f(x) whose branch reads a weight): "
                            "its depth cannot change; leave Target.layers and drop_layers unset")
        if wanted is None or wanted <= count or self.drop_layers is not None:
            return []
        extra = wanted - count
        first = max(0, (count - extra) // 2)
        return sorted((first + i) % count for i in range(extra))

    def _drops(self, gm: fx.GraphModule) -> list[int]:
        count = len(gm.meta["subclone.layers"])
        if count == 0:
            self._duplicates(gm)        # raises when a depth change was asked for
            return []
        if self.drop_layers is not None:
            bad = [i for i in self.drop_layers if not isinstance(i, int) or not 0 <= i < count]
            if bad:
                raise ValueError(f"drop_layers={list(self.drop_layers)}: index {bad[0]} is out of range; allowed: 0..{count - 1}")
            if len(set(self.drop_layers)) >= count:
                raise ValueError(f"drop_layers={list(self.drop_layers)} removes all {count} layers; keep at least one")
            return sorted(set(self.drop_layers))
        wanted = self.target.layers
        if wanted is None or wanted >= count:
            return []
        if self.depth == "measured":
            ratios = need(gm, "subclone.layer_ratios", "ScoreChannelsPass with calibration data")
            order = sorted(range(count), key=lambda i: (ratios[i], i))
            return sorted(order[: count - wanted])
        if self.depth == "first":
            return list(range(wanted, count))
        return middle_layers(count, wanted)
