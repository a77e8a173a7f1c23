"""Rewrite: keep only the chosen channels — slice tensors, rewrite every literal size.

Invariant: after the pass, every attribute (parameter, buffer, computed constant) has, along
each dim, the kept indices of that dim's group in order (an index kept several times — a
grown width's clones, ``analysis/grow.py`` — gathered as often), and every literal size an op holds
(view/reshape/expand shapes, split sizes, repeat counts, slice bounds, creation shapes) equals
the new size of the group it names. A dim whose group keeps everything is untouched.

Cases:
1. a parameter is replaced by a new ``nn.Parameter`` (trainable, same ``requires_grad``); a
   buffer stays a buffer; a plain tensor attribute stays one;
2. one tensor reachable under several names (tied weights) becomes one new tensor, set under
   every name, so the child stays tied;
3. a literal that is a group's last index (``SizeOffset``: a histogram's ``max``) or a sum of
   groups' sizes (a ``tensor_split`` boundary) follows their sizes;
   a group with one order per expert (a ``(experts, kept)`` keep-set) is gathered per expert
   along the tensor's expert dim (a ``tensor_edits.Take`` with ``rows``), before any cut of the
   expert dim itself: still one fused tensor. Every tensor changes through
   ``tensor_edits.edit_tensor`` (a streamed parent's writer replays the same takes);
4. a node kept at the parent's length (``state.PICKS``: a static ``arange``, whose values depend
   on its length) is followed by ``index_select`` of its group's kept indices (a non-persistent
   buffer of the graph module): every user reads the kept values, the node itself is untouched;
5. literals: an entry that is ``-1`` or computed from the input (a symbolic size) is left
   alone; slices get ``start``/``end`` from the new sizes of the parts before and inside them;
   a constant consecutive index (a slice in disguise) becomes that slice.

Reads ``state.KEEP`` / ``state.SIZES`` (ChooseKeepPass), the channel graph and the node keys
``CHANNELS`` / ``LITERALS`` / ``SLICE_PARTS`` / ``PICKS``. ``ensures()`` checks the invariant on the
result: every attribute's dims and every integer literal that names a group have that group's
child size, and every picked node is read only through its pick.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .. import state
from ..analysis.expert_orders import expert_dim
from ..errors import PassError, PostconditionError
from ..fx_utils import get_attribute, replace_tensors
from ..infra import SubclonePass, refresh_meta
from ..tensor_edits import Take, edit_tensor

__all__ = ["KeepChannelsPass", "keep_channels"]

aten = torch.ops.aten


def _keeps_all(kept: torch.Tensor, size: int) -> bool:
    """The keep-set is every index once, in order: nothing to gather."""
    return kept.shape[-1] == size and bool((kept == torch.arange(size)).all())


def _takes(gm, graph, keep, node, old) -> list[Take]:
    """The takes of one attribute: per expert first (before any cut of the expert dim), then plain."""
    channels = state.CHANNELS.of(node, graph)
    cuts, per_expert = [], []
    for d, g in enumerate(channels.groups):
        # a dim already at its kept size was sliced by an earlier run: the pass is idempotent
        if g not in keep or _keeps_all(keep[g], graph.groups[g].size) or old.shape[d] != graph.groups[g].size:
            continue
        if keep[g].dim() == 1:
            cuts.append(Take(d, keep[g]))
            continue
        experts_dim = expert_dim(graph, g, channels.groups)
        if experts_dim is None:
            raise PassError(f"KeepChannelsPass: {node.target} dim {d} keeps one order per expert, "
                            "but the tensor has no expert dim")
        per_expert.append(Take(d, keep[g], rows=experts_dim))
    return per_expert + cuts


def _slice_attributes(gm: fx.GraphModule, graph, keep) -> int:
    replaced: dict[int, torch.Tensor] = {}
    for node in gm.graph.nodes:
        channels = state.CHANNELS.of(node, graph) if node.op == "get_attr" else None
        if channels is None:
            continue
        old = get_attribute(gm, node.target)
        takes = _takes(gm, graph, keep, node, old)
        if takes and id(old) not in replaced:
            replaced[id(old)] = edit_tensor(gm, old, takes)
    replace_tensors(gm, replaced)
    return len(replaced)


_PICK_PREFIX = "_subclone_kept_"


def _picked_by(node: fx.Node) -> fx.Node | None:
    """The ``index_select`` of ``node``'s kept indices an earlier run inserted, if any."""
    for user in node.users:
        if (user.target is aten.index_select.default and user.args[0] is node and len(user.args) > 2
                and getattr(user.args[2], "op", None) == "get_attr" and user.args[2].target.startswith(_PICK_PREFIX)):
            return user
    return None


def _pick_kept(gm: fx.GraphModule, graph, keep) -> int:
    """After each node kept at the parent's length (case 4), pick its group's kept indices."""
    picked = 0
    for node in list(gm.graph.nodes):
        pick = state.PICKS.of(node, graph)
        group = None if pick is None else graph.find(pick.vertex)
        if group not in keep or _keeps_all(keep[group], graph.groups[group].size) or _picked_by(node):
            continue
        if keep[group].dim() != 1:
            raise PassError(f"KeepChannelsPass: {node.name} is picked by one order per expert")
        name = next(f"{_PICK_PREFIX}{node.name}{i or ''}" for i in range(len(gm.graph.nodes) + 1)
                    if not hasattr(gm, f"{_PICK_PREFIX}{node.name}{i or ''}"))
        gm.register_buffer(name, keep[group].clone(), persistent=False)
        with gm.graph.inserting_before(node):
            index = gm.graph.get_attr(name)
        with gm.graph.inserting_after(node):
            select = gm.graph.call_function(aten.index_select.default, (node, pick.dim, index))
        node.replace_all_uses_with(select, delete_user_cb=lambda user: user is not select)
        picked += 1
    return picked


def _offset_size(literal: state.SizeOffset, graph, sizes) -> int | None:
    """The child's value of a ``SizeOffset`` literal; ``None`` where a size is symbolic."""
    vertices = literal.vertex if isinstance(literal.vertex, tuple) else (literal.vertex,)
    total = literal.offset
    for vertex in vertices:
        group = graph.find(vertex)
        size = sizes.get(group, graph.groups[group].size)
        if not isinstance(size, int):
            return None
        total += size
    return total


def _new_literal(value, vertex, graph, sizes):
    if isinstance(vertex, state.SizeOffset):        # a last index, or a sum of sizes
        new = _offset_size(vertex, graph, sizes)
        return value if new is None or isinstance(value, (fx.Node, bool)) else type(value)(new)
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


def _as_slice(node: fx.Node) -> list:
    """A constant consecutive index (a slice in disguise, see ``rules.index``) becomes the
    slice it is: ``x[..., [i, …]]`` → ``aten.slice(x, dim, start, end)``; the caller sets the bounds."""
    x, indices = node.args[0], list(node.args[1])
    dim = next(i for i, idx in enumerate(indices) if idx is not None)
    node.target = aten.slice.Tensor
    return [x, dim, 0, 0]


def _rewrite_literals(gm: fx.GraphModule, graph, sizes) -> int:
    changed = 0
    for node in gm.graph.nodes:
        literals = state.LITERALS.of(node, graph)
        args, kwargs = list(node.args), dict(node.kwargs)
        for index, vertices in (literals.vertices.items() if literals is not None else ()):
            where = kwargs if isinstance(index, str) else args        # a keyword-only size: by name
            if (index not in where) if isinstance(index, str) else index >= len(args):
                continue
            old = where[index]
            if isinstance(vertices, tuple) and isinstance(old, (list, tuple)):
                where[index] = type(old)(_new_literal(v, w, graph, sizes) for v, w in zip(old, vertices))
            elif not isinstance(vertices, tuple):
                where[index] = _new_literal(old, vertices, graph, sizes)
        parts = state.SLICE_PARTS.of(node, graph)
        if parts is not None:
            before, inside = sizes[graph.find(parts.before)], sizes[graph.find(parts.inside)]
            if node.target is not aten.slice.Tensor:
                args = _as_slice(node)
            args += [0, 0, 0, 0][len(args):]
            args[2], args[3] = before, before + inside
        if tuple(args) != node.args or kwargs != node.kwargs:
            node.args, node.kwargs = tuple(args), kwargs
            changed += 1
    return changed


class KeepChannelsPass(SubclonePass):
    """Slice every coupled tensor to its kept channels and rewrite every literal size."""

    requires_keys = (state.KEEP, state.SIZES, state.CHANNEL_GRAPH)

    def run(self, gm: fx.GraphModule) -> bool:
        graph = state.CHANNEL_GRAPH.need(gm)
        keep, sizes = state.KEEP.need(gm), state.SIZES.need(gm)
        sliced = _slice_attributes(gm, graph, keep)
        rewritten = _rewrite_literals(gm, graph, sizes) + _pick_kept(gm, graph, keep)
        if sliced or rewritten:
            gm.recompile()
            refresh_meta(gm)
        return bool(sliced or rewritten)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        graph, sizes = state.CHANNEL_GRAPH.need(graph_module), state.SIZES.need(graph_module)
        for node in graph_module.graph.nodes:
            channels = state.CHANNELS.of(node, graph)
            if node.op == "get_attr" and channels is not None:
                shape = tuple(get_attribute(graph_module, node.target).shape)
                want = tuple(sizes.get(g, s) for g, s in zip(channels.groups, shape))
                if shape != want:
                    raise PostconditionError(f"KeepChannelsPass: {node.target} has shape {shape}, "
                                             f"its channel groups say {want}")
            literals = state.LITERALS.of(node, graph)
            for index, vertices in (literals.vertices.items() if literals is not None else ()):
                _check_literal(node, index, vertices, graph, sizes)
            pick = state.PICKS.of(node, graph)
            if pick is not None and sizes.get(graph.find(pick.vertex)) != graph.sizes[pick.vertex] and (
                    _picked_by(node) is None or set(node.users) != {_picked_by(node)}):
                raise PostconditionError(f"KeepChannelsPass: {node.name} keeps the parent's length, "
                                         "but not every user reads its kept indices")


def _check_literal(node: fx.Node, index: int | str, vertices, graph, sizes) -> None:
    if (index not in node.kwargs) if isinstance(index, str) else index >= len(node.args):
        return
    held = node.kwargs[index] if isinstance(index, str) else node.args[index]
    values, vertices = (held, vertices) if isinstance(vertices, tuple) else ([held], [vertices])
    if not isinstance(values, (list, tuple)):
        return
    for value, vertex in zip(values, vertices):
        if isinstance(vertex, state.SizeOffset):
            want = _offset_size(vertex, graph, sizes)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
        else:
            if vertex is None or not isinstance(value, int) or isinstance(value, bool) or value == -1:
                continue
            want = sizes.get(graph.find(vertex))
        if want is not None and value != want:
            raise PostconditionError(f"KeepChannelsPass: {node.name} holds the size {value} where its "
                                     f"channel group has {want}")


def keep_channels(gm: fx.GraphModule) -> fx.GraphModule:
    """Plain-function twin of ``KeepChannelsPass``."""
    return KeepChannelsPass()(gm).graph_module
