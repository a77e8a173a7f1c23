"""Choose which channels, heads and layers the child keeps; derive every group's keep-set.

Decisions (the paper's recipe, ties broken by the lower index, kept indices in order):
0. a fraction in the target is resolved per group (``Target.size_of``, ``target.relative_size``);
   an absolute count on groups of one kind that differ in width is refused;
1. residual: the ``hidden`` best channels by score (one order for the whole network);
2. ffn / latent: per group, the ``ffn`` / ``latent`` best neurons; a group with one order per
   expert (``ChannelGroup.experts``) keeps each expert's own best ones (a ``(experts, k)`` keep);
3. experts: per mixture-of-experts layer, the ``experts`` best by router-weighted output; at least
   the k its router's top-k picks per token (else a one-line error);
   a group that is one group concatenated with itself (``cat(p, p)``) keeps the best of ``p``'s
   indices (scores summed over the copies) in every copy;
4. heads: per attention op, the ``kv_heads`` best kv groups (a group scores the sum of its query
   heads), then in each kept group its ``heads / kv_heads`` best query heads (query head ``r`` of
   kv group ``g`` is head ``g · (parent's heads per group) + r``);
5. growth (a size above the parent's, ``analysis/grow.py``): each index cloned; heads as whole kv
   groups with their query heads, and query heads within each group; what cloning cannot keep
   exact is refused (``grow.check_growable``);
6. clones (a grown parent's copies, ``analysis/clones.py``): a group whose indices come in
   classes of exact copies keeps one representative per class it keeps, the best-scoring
   classes; ``state.FOLDED`` says how many copies each kept index stands for;
7. layers: ``drop_layers`` as given, else ``depth="middle"`` drops the middle ones and
   ``depth="measured"`` the ones with the smallest ‖f(x)‖/‖x+f(x)‖ (needs calibration); a layer
   whose stream input is computed inside it (a stage transition changing the stream's width
   before its first block) is refused in one line rather than half removed.

Every other group follows (``keep_sets.derive_keep``). A frozen group that would lose an index is
an error naming the op that froze it.

Writes ``state.TARGET``, ``state.KEEP`` ({group: LongTensor of kept indices}), ``state.SIZES``
({group: child size}), ``state.SIZE_CHANGES`` (kind → parent and child size of each group),
``state.FOLDED`` ({group: copies each kept index stands for}),
``state.DROP`` and ``state.DUPLICATE``. ``ensures()``: every residual / ffn group has the target's
size and the layers left after dropping and repeating are ``Target.layers``.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .. import state
from ..fx_utils import in_module, tensor_shape
from ..errors import PassError, PostconditionError, PreconditionError
from ..infra import SubclonePass
from ..state import SizeChange
from ..target import Target, Times, is_fraction, is_relative
from .channel_graph import ChannelGraph
from .clones import fold_candidates
from .grow import check_growable, grow_heads, grow_keep
from .keep_sets import derive_keep, tiling

__all__ = ["ChooseKeepPass", "choose", "top_k", "pick", "middle_layers", "SELECTIONS", "DEPTHS"]

# How channels are picked: the paper's scores, or the data-free baselines and ablations.
SELECTIONS = ("score", "first", "uniform")
# How layers are picked: the paper's middle, measured ‖f(x)‖/‖x+f(x)‖, or the first ones.
DEPTHS = ("middle", "measured", "first")


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, ties to the lower index, returned in ascending order."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def pick(scores: torch.Tensor, k: int, selection: str = "score") -> torch.Tensor:
    """k indices out of len(scores): best scores, the first k, or k evenly spaced; for a
    (experts, channels) score, k per expert, row by row."""
    if scores.dim() == 2:
        return torch.stack([pick(row, k, selection) for row in scores])
    n = len(scores)
    if selection == "first" or k >= n:
        return torch.arange(min(k, n))
    if selection == "uniform":
        return torch.linspace(0, n - 1, k).round().long()
    return top_k(scores, k)


def _check(name: str, value: int | None, limit: int, what: str) -> None:
    if value is not None and value > limit:
        raise ValueError(f"Target.{name}={value} is larger than the parent's {what} ({limit}); allowed: 1..{limit}")


def _same_widths(name: str, value, widths, kind: str) -> None:
    """An absolute count needs every group of its kind to have one parent width."""
    widths = sorted(set(widths))
    if value is not None and not is_relative(value) and len(widths) > 1:
        raise ValueError(f"Target.{name}={value} is an absolute count, but this model's {kind} groups differ in "
                         f"width ({', '.join(map(str, widths))}); give a fraction such as Target({name}=0.5) "
                         "to keep that share of each")


def _head_counts(target: Target, n_heads: int, n_kv: int, grouped: bool) -> tuple:
    """(heads, kv_heads) of one attention op with fractions resolved (module docstring of target.py):
    kv heads round on their own; query heads to a multiple of the child's kv heads."""
    heads, kv_heads = target.heads, target.kv_heads
    if isinstance(kv_heads, Times):
        kv_heads = kv_heads.factor * n_kv
    if isinstance(heads, Times):
        heads = heads.factor * n_heads
    if is_fraction(kv_heads):
        kv_heads = target.size_of("kv_heads", n_kv)
    if is_fraction(heads):
        per_group = n_heads // n_kv
        if not grouped:
            heads = target.size_of("heads", n_heads)
        else:
            child_kv = kv_heads or n_kv
            heads = child_kv * min(per_group, max(1, int(heads * n_heads / child_kv + 0.5)))
    return heads, kv_heads


def _not_frozen(graph: ChannelGraph, gid: int, name: str) -> None:
    reason = graph.groups[gid].reason
    if reason is not None:
        raise ValueError(f"Target.{name} cannot shrink this model: {reason}")


def _frozen_candidate(graph: ChannelGraph) -> str:
    """Why a width a weight produces or contracts inside a layer is not a group to shrink: the
    reason of the first such frozen group (it names the op and module that froze it), or ''."""
    weighted = graph.produced | graph.contracted
    for group in sorted(graph.groups.values(), key=lambda g: (g.layer if g.layer is not None else -1, g.id)):
        if (not group.static or group.reason is None or group.layer is None or group.size < 2
                or group.kind in ("heads", "kv_heads", "head_dim")):
            continue
        related = [group.id, *graph.composites_containing(group.id)]     # a fused gate/up's half
        if any(v in weighted for g in related for v in graph.groups[g].vertices):
            return f"; a layer's width is frozen by {group.reason}"
    return ""


def _pick_or_fold(gm, graph, group: int, scores, k: int, selection: str, folded: dict) -> torch.Tensor:
    """``pick`` — or, where the group's indices are classes of exact copies, one representative
    of each of the best ``k`` classes (``clones.fold_candidates``), recorded in ``folded``."""
    found = fold_candidates(gm, graph, group, scores, k)
    if found is None:
        return pick(scores, k, selection)
    representatives, copies = found
    folded[group] = copies
    return representatives[pick(scores[..., representatives], k, selection)].sort(dim=-1).values


def _choose_heads(graph, site, target, scores, keep, sizes, selection, gm=None, folded=None) -> None:
    hq, kv, rep = site.heads, site.kv_heads, site.rep
    n_heads, n_kv = graph.groups[hq].size, graph.groups[kv].size
    per_group = n_heads // n_kv
    heads, kv_heads = _head_counts(target, n_heads, n_kv, rep is not None)
    if rep is None and heads is not None and kv_heads is not None and heads != kv_heads:
        raise ValueError(f"Target.kv_heads={kv_heads} must equal Target.heads={heads}: this model's "
                         "attention has no kv grouping (every query head has its own key and value)")
    if rep is None:
        heads = kv_heads = heads or kv_heads
    if heads is None:
        heads = kv_heads * per_group        # the parent's query heads per kv head
    if kv_heads is None:
        kv_heads = n_kv                     # the parent's kv heads
    if heads > n_heads or kv_heads > n_kv:
        grow_heads(graph, site, heads, kv_heads, keep, sizes)
        return
    _check("heads", heads, n_heads, "query heads per layer")
    _check("kv_heads", kv_heads, n_kv, "kv heads per layer")
    if heads % kv_heads or heads // kv_heads > per_group:
        raise ValueError(f"Target.heads={heads} does not fit the kv grouping: the parent has {n_heads} query heads "
                         f"in {n_kv} kv groups, the child {kv_heads}; heads must be kv_heads × (1..{per_group})")
    if (heads, kv_heads) == (n_heads, n_kv):
        return
    _not_frozen(graph, hq, "heads")
    head_scores = scores[hq]
    folded = {} if folded is None else folded
    tiled = tiling(graph, hq)
    if tiled is not None and rep is None:
        _choose_tile(graph, hq, "heads", heads, head_scores, keep, selection)
        return
    if tiled is not None:
        raise ValueError(f"Target.heads cannot shrink this model: {tiled[2]} makes its {n_heads} heads {tiled[1]} "
                         f"copies of one group of heads (head i pairs with head i + {n_heads // tiled[1]}) and "
                         "its attention also groups them by key/value head; the two orders cannot both be kept")
    if rep is None:
        keep[hq] = _pick_or_fold(gm, graph, hq, head_scores, heads, selection, folded)
        return
    _not_frozen(graph, kv, "kv_heads")
    if site.rep_outer:
        _choose_repeated_heads(graph, site, heads, kv_heads, head_scores, keep, sizes, selection)
        return
    by_group = head_scores.view(n_kv, per_group)
    if heads // kv_heads == per_group:      # whole kv groups: a group of clones folds
        groups = _pick_or_fold(gm, graph, kv, by_group.sum(1), kv_heads, selection, folded)
    else:
        groups = pick(by_group.sum(1), kv_heads, selection)
    kept = [g * per_group + r for g in groups.tolist()
            for r in pick(by_group[g], heads // kv_heads, selection).tolist()]
    keep[kv], keep[hq], sizes[rep] = groups, torch.tensor(kept), heads // kv_heads


def _choose_repeated_heads(graph, site, heads, kv_heads, head_scores, keep, sizes, selection) -> None:
    """Query heads ``rep × kv_heads`` (``AttentionSite.rep_outer``: head ``i·n_kv + g`` reads kv head
    ``g``): the best kv groups, and the same best repeats in all of them (the repeat is one
    literal, ``k.repeat(1, r, 1, 1)``); the query heads follow as their product."""
    hq, kv, rep = site.heads, site.kv_heads, site.rep
    n_kv, per_group = graph.groups[kv].size, graph.groups[hq].size // graph.groups[kv].size
    by_repeat = head_scores.view(per_group, n_kv)
    groups = pick(by_repeat.sum(0), kv_heads, selection)
    if heads // kv_heads == per_group:
        repeats = torch.arange(per_group)
    else:
        _not_frozen(graph, rep, "heads")
        repeats = pick(by_repeat[:, groups].sum(1), heads // kv_heads, selection)
    keep[kv], keep[rep], sizes[rep] = groups, repeats, heads // kv_heads


def _choose_tile(graph: ChannelGraph, gid: int, what: str, size: int, scores, keep: dict, selection: str) -> None:
    """A tiled group (``keep_sets.tiling``) keeps ``size / copies`` indices of its part, the best by their
    scores summed over the copies; ``derive_keep`` repeats them in every copy."""
    part, copies, origin = tiling(graph, gid)
    if size % copies:
        raise ValueError(f"Target.{what}: {origin} makes a group of {graph.groups[gid].size} from {copies} copies of one "
                         f"group, so the child keeps a multiple of {copies}, not {size}")
    reason = graph.groups[part].reason
    if reason is not None:
        raise ValueError(f"Target.{what} cannot shrink this model: {origin} repeats a group that is frozen: {reason}")
    keep[part] = pick(scores.view(copies, -1).sum(0), size // copies, selection)


def choose(graph: ChannelGraph, attention, target: Target, scores, selection: str = "score", gm=None,
           folded: dict | None = None) -> tuple[dict, dict]:
    """Keep-sets of the decided groups; ``gm`` (its tensors) lets clones fold into ``folded``."""
    keep: dict[int, torch.Tensor] = {}
    sizes: dict[int, int] = {}
    folded = {} if folded is None else folded
    for kind, value, what in (("residual", target.hidden, "hidden"), ("ffn", target.ffn, "ffn"),
                              ("latent", target.latent, "latent"), ("experts", target.experts, "experts")):
        groups = [g for g in graph.groups.values() if g.role == kind and g.static]
        if value is None:
            continue
        if not groups:
            raise ValueError(f"Target.{what}={value}: this model has no {kind} channel group to shrink"
                             + _frozen_candidate(graph))
        _same_widths(what, value, [g.size for g in groups], kind)
        for group in groups:
            size = target.size_of(what, group.size)
            if size > group.size and kind != "experts":
                keep[group.id] = grow_keep(group, size, what)
                continue
            _check(what, size, group.size, f"{kind} width")
            if size < group.size:
                _not_frozen(graph, group.id, what)
                if tiling(graph, group.id) is not None and scores[group.id].dim() == 1:
                    _choose_tile(graph, group.id, what, size, scores[group.id], keep, selection)
                    continue
                keep[group.id] = _pick_or_fold(gm, graph, group.id, scores[group.id], size, selection, folded)
    if (target.heads or target.kv_heads) and not attention:
        raise ValueError("Target.heads: this model has no attention op whose heads could be removed")
    _same_widths("heads", target.heads, [graph.groups[s.heads].size for s in attention], "attention heads")
    _same_widths("kv_heads", target.kv_heads, [graph.groups[s.kv_heads].size for s in attention], "kv heads")
    for site in attention:
        if target.heads is not None or target.kv_heads is not None:
            _choose_heads(graph, site, target, scores, keep, sizes, selection, gm, folded)
    return keep, sizes


def _enough_to_pick(graph: ChannelGraph, sizes: dict, target: Target) -> None:
    """A top-k over a dim needs at least k of its indices (a router picking k experts per token)."""
    for vertex, k, origin in graph.picks:
        group = graph.group_of(vertex)
        if isinstance(k, int) and group.static and sizes.get(group.id, group.size) < k:
            what = f"Target.experts={target.experts}" if group.role == "experts" else "the target"
            raise ValueError(f"{what} keeps {sizes[group.id]} of {group.size} indices, but {origin} picks "
                             f"the top {k} of them for each token; keep at least {k}")


def _no_looped_layer(layers, changed: list[int]) -> None:
    """A model with a module that runs several times (a loop over one module: its applications
    are layers of one key, and the states fed into each cycle are blocks between them) keeps its
    depth: removing or repeating one application would not remove or repeat its weights, and no
    config field counts applications."""
    keys = [layer.key for layer in layers]
    looped = next((k for k in keys if k is not None and keys.count(k) > 1), None)
    if changed and looped is not None:
        raise ValueError(f"Target.layers: module {looped} runs {keys.count(looped)} times (a loop over one module): "
                         "this model's depth cannot change; leave Target.layers and drop_layers unset")


def _removable(gm: fx.GraphModule, drops: list[int]) -> None:
    """A layer is removed by reading its stream input where its output was read; a layer whose
    stream input is computed inside it (its first part changes the stream's shape — a stage
    transition that projects and pools the stream — and is no residual block) cannot be."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for layer in state.LAYERS.need(gm):
        start = nodes[layer.input]
        if layer.index in drops and start.op == "call_function" and in_module(start, layer.key):
            entering = _entering_tensors(start, layer.key)
            shapes = f" ({_shape(entering[0])} → {_shape(start)})" if len(entering) == 1 else ""
            raise ValueError(f"Target.layers: layer {layer.index} ({layer.key}) cannot be removed: its first part "
                             f"changes the stream{shapes} and is no residual block; keep it (drop_layers=[...] "
                             "names layers that can go)")


def _entering_tensors(node: fx.Node, key: str) -> list[fx.Node]:
    """The tensors from outside module ``key`` that ``node`` (inside it) is computed from."""
    seen, frontier, entering = {node}, [node], []
    while frontier:
        for source in frontier.pop().all_input_nodes:
            if source in seen:
                continue
            seen.add(source)
            if source.op == "call_function" and in_module(source, key):
                frontier.append(source)
            elif source.op != "get_attr" and tensor_shape(source) is not None:
                entering.append(source)
    return entering


def _shape(node: fx.Node) -> str:
    shape = tensor_shape(node)
    return "×".join(str(s) for s in shape) if shape is not None else "?"


def size_changes(graph: ChannelGraph, sizes: dict) -> tuple[SizeChange, ...]:
    """Parent and child size of every group of a target kind (what a config's fields describe)."""
    kinds = ("residual", "ffn", "latent", "heads", "kv_heads", "head_dim", "experts")
    return tuple(SizeChange(g.kind, g.id, g.layer, g.size, sizes[g.id]) for g in graph.groups.values()
                 if g.kind in kinds and g.static)


def middle_layers(count: int, keep: int) -> list[int]:
    """Indices to drop so that the first ceil(keep/2) and the last floor(keep/2) layers stay."""
    head = (keep + 1) // 2
    return list(range(head, count - (keep - head)))


class ChooseKeepPass(SubclonePass):
    """Decide keep-sets and dropped layers from a ``Target`` and the channel scores."""

    requires_keys = (state.CHANNEL_GRAPH, state.ATTENTION, state.LAYERS, state.SCORES)
    clears = "choice"

    def __init__(self, target: Target, drop_layers=None, depth: str = "middle", selection: str = "score") -> None:
        if depth not in DEPTHS:
            raise ValueError(f"depth={depth!r}: allowed values are {', '.join(DEPTHS)}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection={selection!r}: allowed values are {', '.join(SELECTIONS)}")
        if not isinstance(target, Target):
            raise TypeError(f"target must be a subclone_graph.Target, got {type(target).__name__}")
        self.target, self.drop_layers, self.depth, self.selection = target, drop_layers, depth, selection

    def run(self, gm: fx.GraphModule) -> bool:
        graph = state.CHANNEL_GRAPH.need(gm)
        folded: dict[int, int] = {}
        keep, sizes = choose(graph, state.ATTENTION.need(gm), self.target, state.SCORES.need(gm), self.selection,
                             gm, folded)
        keep, new_sizes = derive_keep(graph, keep, sizes)
        check_growable(gm, graph, keep, new_sizes)
        _enough_to_pick(graph, new_sizes, self.target)
        state.TARGET.set(gm, self.target)
        state.KEEP.set(gm, keep)
        state.SIZES.set(gm, new_sizes)
        state.SIZE_CHANGES.set(gm, size_changes(graph, new_sizes))
        state.FOLDED.set(gm, folded)
        drops, duplicates = self._drops(gm), self._duplicates(gm)
        _no_looped_layer(state.LAYERS.need(gm), [*drops, *duplicates])
        _removable(gm, drops)
        state.DROP.set(gm, tuple(drops))
        state.DUPLICATE.set(gm, tuple(duplicates))
        return False

    def ensures(self, graph_module: fx.GraphModule) -> None:
        graph, sizes = state.CHANNEL_GRAPH.need(graph_module), state.SIZES.need(graph_module)
        wanted = {"residual": "hidden", "ffn": "ffn", "latent": "latent", "experts": "experts"}
        for group in graph.groups.values():
            want = self.target.size_of(wanted[group.kind], group.size) if group.kind in wanted else None
            if want is not None and sizes[group.id] != want:
                raise PostconditionError(f"ChooseKeepPass: {group.kind} group {group.id} gets {sizes[group.id]} "
                                         f"channels, the target is {want}")
        count = len(state.LAYERS.need(graph_module))
        child = count - len(state.DROP.need(graph_module)) + len(state.DUPLICATE.need(graph_module))
        wanted_layers = self._wanted_layers(count)
        if wanted_layers is not None and self.drop_layers is None and child != wanted_layers:
            raise PostconditionError(f"ChooseKeepPass: the child would have {child} layers, "
                                     f"the target is {wanted_layers}")

    def _wanted_layers(self, count: int) -> int | None:
        """Target.layers with a fraction resolved against the parent's ``count`` layers."""
        return self.target.size_of("layers", count) if count else self.target.layers

    def _duplicates(self, gm: fx.GraphModule) -> list[int]:
        """Layers to repeat for a deeper child: the middle ones, each right after itself."""
        count = len(state.LAYERS.need(gm))
        wanted = self._wanted_layers(count)
        if count == 0 and (wanted is not None or self.drop_layers):
            raise PassError("the model has no residual layers (no x + f(x) whose branch reads a weight): "
                            "its depth cannot change; leave Target.layers and drop_layers unset")
        if wanted is None or wanted <= count or self.drop_layers is not None:
            return []
        extra = wanted - count
        first = max(0, (count - extra) // 2)
        return sorted((first + i) % count for i in range(extra))

    def _drops(self, gm: fx.GraphModule) -> list[int]:
        count = len(state.LAYERS.need(gm))
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
        wanted = self._wanted_layers(count)
        if wanted is None or wanted >= count:
            return []
        if self.depth == "measured":
            if not state.LAYER_RATIOS.has(gm):
                raise PreconditionError("depth='measured' needs state.LAYER_RATIOS: run ScoreChannelsPass "
                                        "with calibration data first")
            ratios = state.LAYER_RATIOS.get(gm)
            order = sorted(range(count), key=lambda i: (ratios[i], i))
            return sorted(order[: count - wanted])
        if self.depth == "first":
            return list(range(wanted, count))
        return middle_layers(count, wanted)
