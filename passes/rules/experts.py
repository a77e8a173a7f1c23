"""Rules for mixture-of-experts matmuls: one matrix per expert, applied to the rows routed to it.

``grouped_mm(x, w, offs)`` (``aten._grouped_mm`` and transformers' CPU fallback): ``x`` is
(tokens sorted by expert, in), ``w`` is (experts, in, out), ``offs`` (experts,) holds the
cumulative row counts — row ``r`` belongs to expert ``e`` when ``offs[e-1] <= r < offs[e]``.

Identities the rule states:
1. the in channels of ``x`` are contracted with ``w``'s dim 1; ``w``'s dim 2 is the out channel
   (produced); rows flow from ``x`` to the output;
2. ``w``'s dim 0 *is* ``offs``'s dim 0 (index ``e`` of both is expert ``e``): every grouped
   matmul sharing the offsets shares one expert dim. It is frozen (the expert count is fixed);
3. the expert dim indexes independent channel orders of ``w``'s in and out dims: each expert's
   matrix may keep its own channels (``RuleContext.rows_by_expert``). Whether a group of those
   channels *gets* one order per expert is decided after classification
   (``analysis.expert_orders``): only an MLP width whose every tensor carries the expert dim and
   whose every activation keeps the expert-sorted rows.
"""
from __future__ import annotations

import torch

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
    ctx.freeze(ctx.v(w, 0), "the experts of a grouped matmul")
    offset_shape = ctx.shape(offsets) if offsets is not None else None
    if offset_shape is not None and len(offset_shape) == 1 and offset_shape[0] == ctx.shape(w)[0]:
        ctx.eq(ctx.v(w, 0), ctx.v(offsets, 0))
        ctx.rows_by_expert(x, offsets, ctx.v(w, 0), [ctx.v(w, 1), ctx.v(w, 2)])
