"""Rules for mixture-of-experts matmuls: one matrix per expert, applied to the rows routed to it.

``grouped_mm(x, w, offs)`` (``aten._grouped_mm`` and transformers' CPU fallback): ``x`` is
(tokens sorted by expert, in), ``w`` is (experts, in, out), ``offs`` (experts,) holds the
cumulative row counts — row ``r`` belongs to expert ``e`` when ``offs[e-1] <= r < offs[e]``.

Identities the rules state (``topk``, ``histc`` live here: routing is what they serve):
1. the in channels of ``x`` are contracted with ``w``'s dim 1; ``w``'s dim 2 is the out channel
   (produced); rows flow from ``x`` to the output;
2. ``w``'s dim 0 *is* ``offs``'s dim 0 (index ``e`` of both is expert ``e``): every grouped
   matmul sharing the offsets shares one expert dim. The offsets are the running totals of a
   histogram of the routed expert ids (``histc`` → ``cumsum``), the ids the indices of a top-k
   over the router's scores: so the expert dim is the router's output dim, and ``Target.experts``
   slices router rows, expert tensors and the literals (``histc``'s bins and max) together;
3. the expert dim indexes independent channel orders of ``w``'s in and out dims: each expert's
   matrix may keep its own channels (``RuleContext.rows_by_expert``). Whether a group of those
   channels *gets* one order per expert is decided after classification
   (``analysis.expert_orders``): only an MLP width whose every tensor carries the expert dim and
   whose every activation keeps the expert-sorted rows.
"""
from __future__ import annotations

import torch

from ..fx_utils import plain_size
from ..state import SizeOffset
from .registry import is_weight, register

__all__: list[str] = []

aten = torch.ops.aten


@register(aten._grouped_mm.default, "transformers::grouped_mm_fallback.default")
def _grouped_mm(ctx):
    x, w = ctx.arg(0, "self" if ctx.node.target is aten._grouped_mm.default else "input"), ctx.arg(1, "mat2")
    offsets = ctx.arg(2, "offs")
    if x is None or w is None or len(ctx.shape(x)) != 2 or len(ctx.shape(w)) != 3 or not is_weight(w):
        ctx.freeze_all("grouped matmul of a form the rule does not know")
        return
    ctx.contract(ctx.v(x, 1), ctx.v(w, 1))
    ctx.eq(ctx.v(w, 2), ctx.out(1))
    ctx.produce(ctx.out(1))
    ctx.eq(ctx.v(x, 0), ctx.out(0))
    offset_shape = ctx.shape(offsets) if offsets is not None else None
    if offset_shape is not None and len(offset_shape) == 1 and offset_shape[0] == ctx.shape(w)[0]:
        ctx.eq(ctx.v(w, 0), ctx.v(offsets, 0))
        ctx.rows_by_expert(x, offsets, ctx.v(w, 0), [ctx.v(w, 1), ctx.v(w, 2)])
    else:
        ctx.freeze(ctx.v(w, 0), "the experts of a grouped matmul whose offsets are not one per expert")


@register(aten.topk.default)
def _topk(ctx):
    """(values, indices) of the k largest along a dim: the other dims flow; the k dim is new
    (frozen: its size is the literal k); the indices point into the dim (``point``), whose size
    must stay at least k (``graph.picks``)."""
    x, k = ctx.arg(0, "self"), ctx.arg(1, "k")
    rank = len(ctx.shape(x))
    dim = ctx.arg(2, "dim", -1) % rank
    for index, shape in ctx.output_shapes():
        for d in range(rank):
            if d == dim:
                ctx.freeze(ctx.out(d, index), "the k indices a top-k picks")
            elif shape[d] == ctx.shape(x)[d]:
                ctx.eq(ctx.v(x, d), ctx.out(d, index))
    ctx.point(1, ctx.v(x, dim))
    # k as a plain size: a k computed in the graph is a Node, which the graph must not hold (a
    # deep copy of it would walk the whole fx graph node by node)
    ctx.graph.picks.append((ctx.v(x, dim), plain_size(k), ctx.origin))


@register(aten.histc.default)
def _histc(ctx):
    """A histogram of values that are the indices of one dim (``bins`` = its size, ``min`` 0,
    ``max`` its last index): bin i counts the values pointing at index i, so the bins *are* that
    dim; ``bins`` and ``max`` follow its size. Any other histogram freezes what it touches."""
    x, bins = ctx.arg(0, "self"), ctx.arg(1, "bins", 100)
    low, high = ctx.arg(2, "min", 0), ctx.arg(3, "max", 0)
    pointed = ctx.pointer(x)
    if pointed is None or bins != ctx.graph.sizes[pointed] or low != 0 or high != bins - 1:
        ctx.freeze_all("a histogram of values that are not the indices of one dim")
        return
    ctx.read_pointer(x)
    ctx.eq(ctx.out(0), pointed)
    ctx.literal(1, pointed)
    ctx.literal(3, SizeOffset(pointed, -1))
    ctx.graph.histograms.add(ctx.node.name)
