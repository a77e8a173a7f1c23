"""Rules for picking values by index: select, index_select, gather/scatter, advanced indexing
(``x[idx]``, ``index_put``, ``index_add``), padding and sliding windows (``unfold``). What an
index picks along a dim is data, so an indexed dim is frozen; every other dim flows through
(see ``op_rules``). One exception:
a constant index that is consecutive (``qkv[..., [-2]]``, ``x[:, [3, 4, 5]]``) is a slice in
disguise and is related like ``slice`` (``concat(before, picked, after)``); the rewrite turns it
into that slice with the child's bounds. Another: an index whose values are the indices of the
indexed dim itself (a top-k's picks, ``RuleContext.point``) — a per-expert tensor gathered for
each routed row — relates that dim to the one the values point into, as ``gather`` does."""
from __future__ import annotations

import torch
from torch import fx

from ..fx_utils import CASTS, get_attribute, plain_size, same_size
from .registry import register

__all__ = ["constant_values", "consecutive_run"]

aten = torch.ops.aten
_CONSTANT_PASS = CASTS | {aten.lift_fresh_copy.default}


@register(aten.select.int)
def _select(ctx):
    x = ctx.arg(0, "self")
    rank = len(ctx.shape(x))
    dim = ctx.arg(1, "dim") % rank
    ctx.freeze(ctx.v(x, dim), "select picks one index of this dim")
    for d in range(rank - 1):
        ctx.eq(ctx.v(x, d if d < dim else d + 1), ctx.out(d))


@register(aten.index_select.default)
def _index_select(ctx):
    # out[..., i, ...] = x[..., index[i], ...]: the values point into x's dim (frozen), and the
    # out dim is the index's own dim — the kept indices of one are those of the other (a constant
    # index, such as the kept heads a child picks from an arange, is sliced with it)
    x, index = ctx.arg(0, "self"), ctx.arg(2, "index")
    rank = len(ctx.shape(x))
    dim = ctx.arg(1, "dim") % rank
    ctx.freeze(ctx.v(x, dim), "index_select picks indices of this dim")
    if len(ctx.shape(index) or ()) == 1:
        ctx.eq(ctx.v(index, 0), ctx.out(dim))
    else:
        ctx.freeze(ctx.out(dim), "index_select picks indices of this dim")
    for d in range(rank):
        if d != dim:
            ctx.eq(ctx.v(x, d), ctx.out(d))


@register(aten.gather.default, aten.scatter.src, aten.scatter.value,
          aten.take_along_dim.default, aten.masked_select.default, aten.nonzero.default)
def _pick_values(ctx):
    # Which index lands where depends on the index values: nothing may be sliced, unless the
    # indices are those of the dim gathered along (a top-k's picks): then index i is still i.
    if ctx.node.target is aten.gather.default and (_gather_own_indices(ctx) or _gather_computed(ctx)):
        return
    ctx.freeze_all("picks elements by computed indices")


def _gather_own_indices(ctx) -> bool:
    x, dim, index = ctx.arg(0, "self"), ctx.arg(1, "dim"), ctx.arg(2, "index")
    pointed = ctx.pointer(index)
    if pointed is None or len(ctx.shape(x)) != len(ctx.shape(index)):
        return False
    dim %= len(ctx.shape(x))
    ctx.read_pointer(index)
    ctx.eq(ctx.v(x, dim), pointed)
    for d, size in enumerate(ctx.shape(index)):
        ctx.eq(ctx.v(index, d), ctx.out(d))
        if d != dim and size == ctx.shape(x)[d]:
            ctx.eq(ctx.v(x, d), ctx.v(index, d))
    return True


def _gather_computed(ctx) -> bool:
    """``out[..., j, ..., k] = x[..., j, ..., index[..., j, ..., k]]`` (gather along ``dim``) with
    computed indices (a relative-position bucket per query and key): the values point into x's
    ``dim``, frozen; along every other dim position j reads position j whatever the values, so x's,
    the index's and out's dims of one size are equal (a per-head bias table gathered by one bucket
    map expanded over the heads keeps its heads prunable). Indices that point into a dim of their
    own (``ctx.pointer``) are left to ``_gather_own_indices`` or frozen."""
    x, dim, index = ctx.arg(0, "self"), ctx.arg(1, "dim"), ctx.arg(2, "index")
    shape, picks = ctx.shape(x), ctx.shape(index)
    if ctx.pointer(index) is not None or not shape or picks is None or len(shape) != len(picks):
        return False
    dim %= len(shape)
    ctx.freeze(ctx.v(x, dim), "gather reads computed indices of this dim")
    for d, size in enumerate(picks):
        ctx.eq(ctx.v(index, d), ctx.out(d))
        if d == dim:
            continue
        if same_size(size, shape[d]):
            ctx.eq(ctx.v(x, d), ctx.v(index, d))
        else:                       # the index covers a prefix of x's dim: the two do not shrink alike
            ctx.freeze(ctx.v(x, d), "gather reads a prefix of this dim")
            ctx.freeze(ctx.v(index, d), "gather reads a prefix of this dim")
    return True


def _broadcast_shape(shapes):
    """Right-aligned broadcast of ``shapes``; ``None`` when two sizes could differ."""
    rank = max((len(s) for s in shapes), default=0)
    out = [1] * rank
    for shape in shapes:
        for d, size in enumerate(shape):
            d += rank - len(shape)
            if same_size(out[d], 1):
                out[d] = size
            elif not (same_size(size, 1) or same_size(size, out[d])):
                return None
    return out


def _index_layout(ctx, indices):
    """Where advanced indexing puts things, when it can be told without the index values.

    Returns ``(first, last, index_nodes, broadcast)``: the index tensors sit at dims
    ``first..last`` of ``self`` with no gap, and their broadcast shape replaces those dims in
    the result. ``None`` for what must freeze: a boolean mask (it keeps a data-dependent
    number of elements, over as many dims as it has), index tensors with a gap between them
    (the result then puts the index dims first), or index tensors that do not broadcast."""
    positions = [i for i, idx in enumerate(indices) if idx is not None]
    if not positions or positions != list(range(positions[0], positions[-1] + 1)):
        return None
    nodes = [indices[i] for i in positions]
    for idx in nodes:
        val = idx.meta.get("val") if isinstance(idx, fx.Node) else None
        if not isinstance(val, torch.Tensor) or val.dtype in (torch.bool, torch.uint8):
            return None
    broadcast = _broadcast_shape([ctx.shape(idx) for idx in nodes])
    if broadcast is None:
        return None
    return positions[0], positions[-1], nodes, broadcast


def _relate_indexed(ctx, x, layout, result_vertex, why):
    """State the facts of ``x[indices]`` whose result dim ``r`` is ``result_vertex(r)``."""
    first, last, nodes, broadcast = layout
    rank, width = len(ctx.shape(x)), len(broadcast)
    for d in range(rank):
        if d < first:
            ctx.eq(ctx.v(x, d), result_vertex(d))
        elif d > last:
            ctx.eq(ctx.v(x, d), result_vertex(d - (last + 1 - first) + width))
        else:
            # The index values point into this dim: slicing it would make them point elsewhere.
            ctx.freeze(ctx.v(x, d), why)
    for idx in nodes:
        shape = ctx.shape(idx)
        offset = width - len(shape)
        for d, size in enumerate(shape):
            if same_size(size, broadcast[offset + d]):     # a broadcast size-1 dim joins nothing
                ctx.eq(ctx.v(idx, d), result_vertex(first + offset + d))


def constant_values(node) -> torch.Tensor | None:
    """The values of an index that is a constant of the module (a lifted list like ``[-2]``)."""
    seen = 0
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _CONSTANT_PASS and seen < 4:
        node, seen = node.args[0], seen + 1
    if not isinstance(node, fx.Node) or node.op != "get_attr" or node.graph.owning_module is None:
        return None
    value = get_attribute(node.graph.owning_module, node.target)
    return value if isinstance(value, torch.Tensor) else None


def consecutive_run(values: torch.Tensor | None, n) -> int | None:
    """The start of ``values`` when they are ``start, start+1, …`` inside ``0..n`` (negative
    indices counted from the end): a slice in disguise. Else None."""
    if values is None or values.dim() != 1 or not isinstance(n, int) or values.dtype.is_floating_point:
        return None
    wrapped = [int(v) + n if int(v) < 0 else int(v) for v in values.tolist()]
    if not wrapped or not all(0 <= v < n for v in wrapped):
        return None
    if wrapped != list(range(wrapped[0], wrapped[0] + len(wrapped))):
        return None
    return wrapped[0]


def _index_as_slice(ctx, x, indices) -> bool:
    """``x[..., [i, i+1, …], …]`` with a constant index: the slice it is (see ``_slice``)."""
    positions = [i for i, idx in enumerate(indices) if idx is not None]
    if len(positions) != 1:
        return False
    dim, index = positions[0], indices[positions[0]]
    n = plain_size(ctx.shape(x)[dim])
    start = consecutive_run(constant_values(index), n)
    if start is None:
        return False
    kept = plain_size(ctx.out_shape()[dim])
    for d in range(len(ctx.shape(x))):
        if d != dim:
            ctx.eq(ctx.v(x, d), ctx.out(d))
    before, after = ctx.fresh(start, "before"), ctx.fresh(n - start - kept, "after")
    ctx.slice_of(before, ctx.out(dim), after)
    ctx.concat(ctx.v(x, dim), [before, ctx.out(dim), after])
    return True


def _index_own_indices(ctx, x, layout) -> bool:
    """``x[..., idx, ...]`` with one index tensor whose values are the indices of that very dim (a
    router's top-k picks, sorted: a per-expert tensor gathered for each routed row): index ``e``
    of the values is index ``e`` of the dim, so the dim is related to the one they point into
    (it may shrink with it) and the result's index dims are ``idx``'s."""
    first, last, nodes, broadcast = layout
    if first != last or ctx.pointer(nodes[0]) is None:
        return False
    ctx.read_pointer(nodes[0])
    ctx.eq(ctx.v(x, first), ctx.pointer(nodes[0]))
    rank, width = len(ctx.shape(x)), len(broadcast)
    for d in range(rank):
        if d != first:
            ctx.eq(ctx.v(x, d), ctx.out(d if d < first else d - 1 + width))
    for d in range(len(ctx.shape(nodes[0]))):
        ctx.eq(ctx.v(nodes[0], d), ctx.out(first + d))
    return True


@register(aten.index.Tensor, aten._unsafe_index.Tensor)
def _index(ctx):
    x, indices = ctx.arg(0, "self"), list(ctx.arg(1, "indices"))
    if _index_as_slice(ctx, x, indices):
        return
    layout = _index_layout(ctx, indices)
    if layout is None:
        ctx.freeze_all("picks elements by a mask or by index tensors that move dims")
        return
    if _index_own_indices(ctx, x, layout):
        return
    _relate_indexed(ctx, x, layout, ctx.out, "the index values point into this dim")


@register(aten.index_put.default, aten.index_put_.default, aten._unsafe_index_put.default)
def _index_put(ctx):
    # self[indices] = values: the result is self (same dims); values broadcast to the shape
    # self[indices] would have, so its dims right-align with that shape.
    x, indices, values = ctx.arg(0, "self"), list(ctx.arg(1, "indices")), ctx.arg(2, "values")
    layout = _index_layout(ctx, indices)
    if layout is None:
        ctx.freeze_all("writes elements by a mask or by index tensors that move dims")
        return
    first, last, _, broadcast = layout
    in_shape = ctx.shape(x)
    for d in range(len(in_shape)):
        ctx.eq(ctx.v(x, d), ctx.out(d))
    picked = list(in_shape[:first]) + list(broadcast) + list(in_shape[last + 1:])
    keys = [ctx.fresh(size, f"picked{r}") for r, size in enumerate(picked)]
    _relate_indexed(ctx, x, layout, lambda r: keys[r], "the index values point into this dim")
    shape = ctx.shape(values)
    offset = len(picked) - len(shape)
    for d, size in enumerate(shape):
        if offset + d >= 0 and same_size(size, picked[offset + d]):
            ctx.eq(ctx.v(values, d), keys[offset + d])


@register(aten.index_add.default, aten.index_add_.default)
def _index_add(ctx):
    # self.index_add(dim, index, source): source's slice i is added at self's index[i] of dim;
    # every other dim of source is the same dim of self.
    x, index, source = ctx.arg(0, "self"), ctx.arg(2, "index"), ctx.arg(3, "source")
    rank = len(ctx.shape(x))
    dim = ctx.arg(1, "dim") % max(rank, 1)
    for d in range(rank):
        ctx.eq(ctx.v(x, d), ctx.out(d))
    if rank == 0 or len(ctx.shape(source)) != rank:
        ctx.freeze_all("adds a source of another rank")
        return
    ctx.freeze(ctx.v(x, dim), "the index values point into this dim")
    ctx.eq(ctx.v(source, dim), ctx.v(index, 0))
    for d in range(rank):
        if d != dim:
            ctx.eq(ctx.v(source, d), ctx.v(x, d))


@register(aten.pad.default, aten.constant_pad_nd.default, aten.reflection_pad1d.default,
          aten.reflection_pad2d.default, aten.reflection_pad3d.default,
          aten.replication_pad1d.default, aten.replication_pad2d.default,
          aten.replication_pad3d.default)
def _pad(ctx):
    # The pad list runs from the last dim backwards, (before, after) per dim. It holds amounts,
    # not sizes, so an unpadded dim may shrink with no literal to rewrite.
    x, pad = ctx.arg(0, "self"), list(ctx.arg(1, "pad"))
    rank = len(ctx.shape(x))
    padded = set()
    for k in range(0, len(pad), 2):
        amounts = [plain_size(a) for a in pad[k:k + 2]]
        if not all(isinstance(a, int) and a == 0 for a in amounts):
            padded.add(rank - 1 - k // 2)     # a computed amount may be non-zero: padded
    for d in range(rank):
        if d in padded:
            # Where the border goes (and, reflecting, what it copies) depends on the dim's size.
            ctx.freeze(ctx.v(x, d), "padded dim")
            ctx.freeze(ctx.out(d), "padded dim")
        else:
            ctx.eq(ctx.v(x, d), ctx.out(d))


@register(aten.unfold.default)
def _unfold(ctx):
    # out[..., i, ..., k] = x[..., i·step + k, ...]: the windows along ``dimension`` (a short
    # convolution's sliding windows over the positions) become that dim (their count) and a new
    # last dim (the window); which element lands where depends on both sizes, so they freeze, and
    # every other dim (the channels) flows through.
    x = ctx.arg(0, "self")
    rank = len(ctx.shape(x))
    dim = ctx.arg(1, "dimension") % max(rank, 1)
    ctx.freeze(ctx.v(x, dim), "unfold slides windows along this dim")
    ctx.freeze(ctx.out(dim), "unfold's windows")
    ctx.freeze(ctx.out(rank), "unfold's window")
    for d in range(rank):
        if d != dim:
            ctx.eq(ctx.v(x, d), ctx.out(d))
