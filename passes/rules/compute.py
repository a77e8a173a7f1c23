"""Rules for ops that compute: elementwise, reductions, norms, contractions, attention.

Identities each rule states:
- unary elementwise, casts, dropout, softmax: every out dim equals the same in dim.
- the in-place twin of an elementwise op (``masked_fill_``, ``relu_``): as the op; its result is
  ``self``. An alias (``multiply``) is rewritten as its op by the trace (``rules/aliases.py``).
- binary elementwise (add, mul, where, comparisons, masks, min/max of two tensors): right-aligned broadcasting;
  dims of equal size are equal, a size-1 dim broadcasts and joins nothing.
- reductions (mean, sum, var, amax): kept dims are equal; reduced dims are recorded, since
  the rescale pass compensates a mean over a shrunk residual stream.
- layer_norm / rms_norm: out equals in; weight and bias equal the normalised dims.
- linear / addmm / mm / bmm / matmul / einsum: batch dims equal (broadcast), the contracted
  dims of both operands equal; with a weight operand its in-features are *contracted* and
  its out-features *produced* (what makes an MLP width or a residual stream). A matmul or an
  einsum of two activations over (…, heads, positions, dim) is noted as an attention site; its
  heads may be merged into the batch (``(b·h, s, d)``), resolved to ``h`` after solving.
- embedding: out's last dim is the table's feature dim; the vocabulary dim is frozen.
- conv: out channel = weight dim 0 = bias; in channel = weight dim 1 (groups=1) or
  out channel (depthwise); spatial dims are new.
- scaled_dot_product_attention: q, k, v and out agree on batch dims, q·k on the head dim,
  v·out on the value dim; query heads equal kv heads, or (enable_gqa) factor into kv heads ×
  a new per-group dim. The site is recorded for head scoring.
"""
from __future__ import annotations

import torch

from ..fx_utils import tensor_shape
from .registry import is_weight, register

__all__: list[str] = []

aten = torch.ops.aten

_UNARY = [
    aten.abs.default, aten.neg.default, aten.exp.default, aten.log.default, aten.sqrt.default,
    aten.rsqrt.default, aten.reciprocal.default, aten.sin.default, aten.cos.default,
    aten.tanh.default, aten.sigmoid.default, aten.relu.default, aten.gelu.default,
    aten.silu.default, aten.erf.default, aten.pow.Tensor_Scalar, aten.square.default,
    aten.sign.default, aten.floor.default, aten.ceil.default, aten.round.default,
    aten.hardtanh.default, aten.leaky_relu.default, aten.elu.default, aten.softplus.default,
    aten.mish.default, aten.hardswish.default, aten.hardsigmoid.default, aten.log1p.default,
    aten.expm1.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
    aten.detach.default, aten.lift_fresh_copy.default, aten.dropout.default,
    aten.feature_dropout.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
    aten.to.other, aten._to_copy.default, aten.type_as.default, aten.logical_not.default,
    aten.bitwise_not.default, aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar,
    aten.div.Scalar, aten.rsub.Scalar, aten.clamp.default, aten.clamp_min.default,
    aten.clamp_max.default, aten.softmax.int, aten._softmax.default, aten.log_softmax.int,
    aten._log_softmax.default, aten.tril.default, aten.triu.default, aten.nan_to_num.default, aten.isinf.default,
    aten.isnan.default, aten.fill.Scalar, aten.pow.Scalar, aten.acos.default, aten.asin.default,
    aten.atan.default, aten.tan.default, aten.sinh.default, aten.cosh.default, aten.asinh.default,
    aten.acosh.default, aten.atanh.default, aten.exp2.default, aten.log2.default, aten.log10.default,
    aten.trunc.default, aten.frac.default, aten.erfc.default, aten.erfinv.default, aten.relu6.default,
    aten.selu.default, aten.celu.default, aten.threshold.default, aten.logit.default, aten.sgn.default,
    aten.sinc.default, aten.signbit.default, aten.log_sigmoid.default, aten.positive.default,
]
_BINARY = [
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.div.Tensor_mode,
    aten.pow.Tensor_Tensor, aten.maximum.default, aten.minimum.default, aten.eq.Tensor,
    aten.eq.Scalar, aten.ne.Tensor, aten.ne.Scalar, aten.lt.Tensor, aten.lt.Scalar,
    aten.le.Tensor, aten.le.Scalar, aten.gt.Tensor, aten.gt.Scalar, aten.ge.Tensor,
    aten.ge.Scalar, aten.__and__.Tensor, aten.__or__.Tensor, aten.logical_and.default,
    aten.logical_or.default, aten.bitwise_and.Tensor, aten.bitwise_or.Tensor,
    aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.masked_fill.Scalar,
    aten.masked_fill.Tensor, aten.rsub.Tensor, aten.remainder.Tensor, aten.fmod.Tensor,
    aten.floor_divide.default, aten.atan2.default, aten.addcmul.default, aten.lerp.Scalar,
    aten.clamp.Tensor, aten.clamp_min.Tensor, aten.clamp_max.Tensor, aten.min.other, aten.max.other,
    aten.fmin.default, aten.fmax.default,
    # self.copy_(src): the result is ``self``; src broadcasts to self's shape (right-aligned),
    # so its dims are self's (latent attention fills a new key tensor's slices this way)
    aten.copy_.default, aten.copy.default,
]


def _in_place_twins(ops) -> list:
    """``aten.X_.overload`` for each ``aten.X.overload`` that has one (``masked_fill_.Scalar``,
    ``relu_``): the result is ``self``, written in place with what ``X`` returns, whose shape is
    ``self``'s, so the dims flow as for ``X``."""
    twins = []
    for op in ops:
        packet = getattr(aten, op._schema.name.split("::")[-1] + "_", None)
        if packet is not None and op._overloadname in packet.overloads():
            twins.append(getattr(packet, op._overloadname))
    return twins


@register(*_UNARY, *_BINARY, *_in_place_twins(_UNARY + _BINARY))
def _elementwise(ctx):
    out_shape = ctx.out_shape()
    if out_shape is None:
        return
    for x in ctx.tensor_args():
        shape = ctx.shape(x)
        offset = len(out_shape) - len(shape)
        for d, size in enumerate(shape):
            if offset + d >= 0 and size == out_shape[offset + d]:
                ctx.eq(ctx.v(x, d), ctx.out(offset + d))


@register(aten.cumsum.default, aten.cumprod.default, aten.diff.default, aten.flip.default,
          aten.roll.default, aten.sort.default, aten.argsort.default)
def _order_dependent(ctx):
    # The result at index i depends on the order of indices along the dim: freeze it.
    x = ctx.arg(0, "self")
    rank = len(ctx.shape(x))
    if ctx.node.target is aten.cumsum.default and x.name in ctx.graph.histograms and rank == 1:
        # running totals of a histogram over a dim's indices (where each index's rows end, as
        # grouped matmul offsets): index i stays index i, an index no value points at adds nothing
        ctx.eq(ctx.v(x, 0), ctx.out(0))
        return
    dims = ctx.arg(1, "dims", -1)
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    if ctx.node.target in (aten.diff.default, aten.sort.default, aten.argsort.default):
        dims = [ctx.arg(1, "dim", -1)]
    dims = [d % rank for d in dims if isinstance(d, int)]
    for d in range(rank):
        if d in dims:
            ctx.freeze(ctx.v(x, d), "the result depends on the order along this dim")
    for index, shape in ctx.output_shapes():
        for d in range(min(rank, len(shape))):
            if d in dims:
                ctx.freeze(ctx.out(d, index), "the result depends on the order along this dim")
            elif shape[d] == ctx.shape(x)[d]:
                ctx.eq(ctx.v(x, d), ctx.out(d, index))


@register(aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default,
          aten.var.correction, aten.std.correction, aten.mean.default, aten.sum.default,
          aten.var.dim, aten.std.dim, aten.max.dim, aten.min.dim, aten.argmax.default,
          aten.logsumexp.default, aten.norm.ScalarOpt_dim, aten.linalg_vector_norm.default,
          aten.any.dim, aten.all.dim)
def _reduce(ctx):
    x = ctx.arg(0, "self")
    rank = len(ctx.shape(x))
    dims = ctx.arg(1, "dim", None)
    if ctx.node.target in (aten.norm.ScalarOpt_dim, aten.linalg_vector_norm.default):
        dims = ctx.arg(2, "dim", None)
    if dims is None or dims == []:
        dims = list(range(rank))
    dims = sorted({d % rank for d in (dims if isinstance(dims, (list, tuple)) else [dims])})
    ctx.reduce(x, dims)
    for index, shape in ctx.output_shapes():
        kept = [d for d in range(rank) if d not in dims]
        if len(shape) == rank:          # keepdim
            for d in kept:
                ctx.eq(ctx.v(x, d), ctx.out(d, index))
        else:
            for out_dim, d in enumerate(kept):
                ctx.eq(ctx.v(x, d), ctx.out(out_dim, index))


_NORMS_WITH_BIAS = (aten.layer_norm.default, aten.native_layer_norm.default)


@register(aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default,
          aten._fused_rms_norm.default)
def _layer_norm(ctx):
    x, normalized = ctx.arg(0, "input"), ctx.arg(1, "normalized_shape")
    rank, k = len(ctx.shape(x)), len(ctx.arg(1, "normalized_shape"))
    ctx.reduce(x, list(range(rank - k, rank)))
    ctx.literal(1, [ctx.v(x, rank - k + i) for i in range(k)])
    for index, shape in ctx.output_shapes():
        for d in range(rank):
            if shape[d] == ctx.shape(x)[d]:
                ctx.eq(ctx.v(x, d), ctx.out(d, index))
    params = [ctx.arg(2, "weight")]
    if ctx.node.target in _NORMS_WITH_BIAS:
        params.append(ctx.arg(3, "bias"))
    for param in params:
        if param is not None and tensor_shape(param) is not None:
            for i in range(len(normalized)):
                ctx.eq(ctx.v(param, i), ctx.v(x, rank - k + i))


@register(aten.group_norm.default, aten.native_group_norm.default)
def _group_norm(ctx):
    x = ctx.arg(0, "input")
    ctx.freeze(ctx.v(x, 1), "group norm couples channels within groups")
    _channel_norm(ctx, weight_args=(2, 3))


@register(aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
          aten.native_batch_norm.default, aten._native_batch_norm_legit_functional.default)
def _batch_norm(ctx):
    _channel_norm(ctx, weight_args=(1, 2, 3, 4))


def _channel_norm(ctx, weight_args):
    x = ctx.arg(0, "input")
    for index, shape in ctx.output_shapes():
        if len(shape) == len(ctx.shape(x)):
            for d in range(len(shape)):
                ctx.eq(ctx.v(x, d), ctx.out(d, index))
    for i in weight_args:
        p = ctx.arg(i, "")
        if p is not None and tensor_shape(p):
            ctx.eq(ctx.v(p, 0), ctx.v(x, 1))


def _matmul_dims(ctx, a, b, out_index=None):
    """out = a @ b with numpy broadcasting of leading dims; marks weight contraction."""
    sa, sb, so = ctx.shape(a), ctx.shape(b), ctx.out_shape(out_index)
    contract_a, contract_b = ctx.v(a, -1), ctx.v(b, -2 if len(sb) > 1 else -1)
    if is_weight(b) and not is_weight(a):
        ctx.contract(contract_a, contract_b)
    elif is_weight(a) and not is_weight(b):
        ctx.contract(contract_b, contract_a)
    else:
        ctx.contract_values(contract_a, contract_b)
    if len(sa) > 1:
        ctx.eq(ctx.v(a, -2), ctx.out(-2 if len(sb) > 1 else -1, out_index))
    if len(sb) > 1:
        ctx.eq(ctx.v(b, -1), ctx.out(-1, out_index))
        if is_weight(b) and not is_weight(a):
            ctx.produce(ctx.out(-1, out_index))
    if is_weight(a) and not is_weight(b) and len(sa) > 1:
        ctx.produce(ctx.out(-2 if len(sb) > 1 else -1, out_index))
    batch_out = len(so) - (2 if len(sa) > 1 and len(sb) > 1 else 1)
    for x, rank_x in ((a, len(sa) - 2), (b, len(sb) - 2)):
        for d in range(max(rank_x, 0)):
            od = batch_out - rank_x + d
            if od >= 0 and ctx.shape(x)[d] == so[od]:
                ctx.eq(ctx.v(x, d), ctx.out(od, out_index))
    if not is_weight(a) and not is_weight(b) and len(sa) >= 3 and len(sb) >= 3:
        _note_eager_attention(ctx, a, b, batch_out, out_index)


def _note_eager_attention(ctx, a, b, batch_out, out_index) -> None:
    """Attention written as two matmuls (q·kᵀ, then p·v) over (…, heads, positions, dim):
    the last batch dim holds the heads, b's holds the kv heads, and the head dim is the
    static one of the contracted dim (q·kᵀ) or the output's last dim (p·v). A heads dim
    merged with the batch (``(b·h, s, d)``, a dynamic size) is noted too: the analysis takes
    its static factor ``h`` once the graph is solved (``AnalyzeChannelsPass``)."""
    heads, kv_heads = ctx.out(batch_out - 1, out_index), ctx.v(b, len(ctx.shape(b)) - 3)
    contracted = ctx.shape(a)[-1]
    head_dim = ctx.v(a, -1) if isinstance(contracted, int) else ctx.out(-1, out_index)
    head_dim_size = contracted if isinstance(contracted, int) else ctx.out_shape(out_index)[-1]
    if isinstance(head_dim_size, int):
        ctx.attention_op(heads, kv_heads, head_dim)


@register(aten.linear.default)
def _linear(ctx):
    x, w, bias = ctx.arg(0, "input"), ctx.arg(1, "weight"), ctx.arg(2, "bias")
    rank = len(ctx.shape(x))
    ctx.contract(ctx.v(x, -1), ctx.v(w, 1))
    ctx.eq(ctx.v(w, 0), ctx.out(-1))
    ctx.produce(ctx.out(-1))
    if bias is not None:
        ctx.eq(ctx.v(bias, 0), ctx.out(-1))
    for d in range(rank - 1):
        ctx.eq(ctx.v(x, d), ctx.out(d))


@register(aten.mm.default, aten.bmm.default, aten.matmul.default)
def _mm(ctx):
    _matmul_dims(ctx, ctx.arg(0, "self"), ctx.arg(1, "mat2"))


@register(aten.addmm.default, aten.baddbmm.default, aten.addbmm.default)
def _addmm(ctx):
    bias = ctx.arg(0, "self")
    _matmul_dims(ctx, ctx.arg(1, "mat1"), ctx.arg(2, "mat2"))
    out_shape, shape = ctx.out_shape(), ctx.shape(bias)
    for d, size in enumerate(shape):
        od = len(out_shape) - len(shape) + d
        if size == out_shape[od]:
            ctx.eq(ctx.v(bias, d), ctx.out(od))


@register(aten.einsum.default)
def _einsum(ctx):
    equation, operands = ctx.arg(0, "equation"), ctx.arg(1, "tensors")
    inputs, _, output = equation.replace(" ", "").partition("->")
    terms = inputs.split(",")
    if "." in equation or not output and "->" not in equation:
        ctx.freeze_all("einsum with an ellipsis or an implicit output")
        return
    seen: dict[str, int] = {}
    for term, x in zip(terms, operands):
        for d, letter in enumerate(term):
            v = ctx.v(x, d)
            if letter in seen:
                ctx.eq(seen[letter], v)
            else:
                seen[letter] = v
    for d, letter in enumerate(output):
        ctx.eq(seen[letter], ctx.out(d))
    weights = [x for x in operands if is_weight(x)]
    if not weights and len(operands) == 2:
        _note_einsum_attention(ctx, terms, output, operands, seen)
    summed = sorted(set(terms[0]) & set(terms[1]) - set(output)) if len(operands) == 2 else []
    if len(weights) == 1 and len(operands) == 2:
        w = operands.index(weights[0])
        for letter in summed:
            ctx.contract(ctx.v(operands[1 - w], terms[1 - w].index(letter)), ctx.v(operands[w], terms[w].index(letter)))
        for d, letter in enumerate(output):
            if letter in terms[w] and not all(letter in t for t in terms):
                ctx.produce(ctx.out(d))
    else:
        for letter in summed:
            ctx.contract_values(ctx.v(operands[0], terms[0].index(letter)), ctx.v(operands[1], terms[1].index(letter)))


def _note_einsum_attention(ctx, terms, output, operands, seen) -> None:
    """Attention written as einsums (``bqhd,bkhd->bhqk``, then ``bhqk,bkhd->bqhd``), read as the
    two matmuls it is: the heads are the last letter both operands and the output share, the
    head dim the one contracted letter when static (q·kᵀ), else the second operand's one free
    letter (p·v)."""
    a, b = terms
    batch = [letter for letter in output if letter in a and letter in b]
    contracted = [letter for letter in a if letter in b and letter not in output]
    free_b = [letter for letter in b if letter not in a]
    if not batch or len(contracted) != 1:
        return
    head_dim = contracted[0]
    if not isinstance(ctx.graph.sizes[seen[head_dim]], int):
        if len(free_b) != 1:
            return
        head_dim = free_b[0]
    if isinstance(ctx.graph.sizes[seen[head_dim]], int):
        heads = batch[-1]
        ctx.attention_op(seen[heads], ctx.v(operands[1], b.index(heads)), seen[head_dim])


@register(aten.embedding.default)
def _embedding(ctx):
    table, ids = ctx.arg(0, "weight"), ctx.arg(1, "indices")
    ctx.freeze(ctx.v(table, 0), "embedding rows are looked up by token id")
    ctx.eq(ctx.v(table, 1), ctx.out(-1))
    ctx.produce(ctx.out(-1))
    for d in range(len(ctx.shape(ids))):
        ctx.eq(ctx.v(ids, d), ctx.out(d))


# conv*.padding: the same op with a string padding ("same" / "valid"), which moves no channel
@register(aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
          aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding)
def _conv(ctx):
    x, w, bias = ctx.arg(0, "input"), ctx.arg(1, "weight"), ctx.arg(2, "bias")
    groups_index = 8 if ctx.node.target is aten.convolution.default else 6
    groups = ctx.arg(groups_index, "groups", 1)
    ctx.eq(ctx.v(w, 0), ctx.out(1))
    ctx.produce(ctx.out(1))
    if bias is not None:
        ctx.eq(ctx.v(bias, 0), ctx.out(1))
    if groups == 1:
        ctx.contract(ctx.v(x, 1), ctx.v(w, 1))
    elif groups == ctx.shape(x)[1] == ctx.out_shape()[1]:
        ctx.eq(ctx.v(x, 1), ctx.out(1))
        ctx.literal(groups_index, ctx.out(1))       # depthwise: one group per channel kept
    else:
        ctx.freeze(ctx.v(x, 1), "grouped convolution")
        ctx.freeze(ctx.out(1), "grouped convolution")
    if ctx.shape(x)[0] == ctx.out_shape()[0]:
        ctx.eq(ctx.v(x, 0), ctx.out(0))


@register(aten.max_pool2d.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default,
          aten.max_pool1d.default, aten.avg_pool1d.default, aten.adaptive_avg_pool1d.default)
def _pool(ctx):
    x = ctx.arg(0, "self")
    for d in range(2 if len(ctx.shape(x)) > 2 else 1):
        ctx.eq(ctx.v(x, d), ctx.out(d))


@register(aten.scaled_dot_product_attention.default)
def _sdpa(ctx):
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    mask = ctx.arg(3, "attn_mask")
    sq, sk, so = ctx.shape(q), ctx.shape(k), ctx.out_shape()
    ctx.eq(ctx.v(q, -1), ctx.v(k, -1))          # head dim, contracted by q·k
    ctx.eq(ctx.v(v, -1), ctx.out(-1))           # value dim
    ctx.eq(ctx.v(q, -2), ctx.out(-2))           # query positions
    ctx.eq(ctx.v(k, -2), ctx.v(v, -2))          # key positions
    ctx.eq(ctx.v(k, -3), ctx.v(v, -3))          # kv heads
    ctx.eq(ctx.v(q, -3), ctx.out(-3))           # query heads
    if sq[-3] == sk[-3]:
        ctx.eq(ctx.v(q, -3), ctx.v(k, -3))
    else:
        ctx.factor(ctx.v(q, -3), [ctx.v(k, -3), ctx.fresh(sq[-3] // sk[-3], "gqa")])
    for d in range(len(sq) - 3):
        ctx.eq(ctx.v(q, d), ctx.out(d))
        for x in (k, v):
            if ctx.shape(x)[d] == sq[d]:
                ctx.eq(ctx.v(x, d), ctx.v(q, d))
    if mask is not None:
        for d, size in enumerate(ctx.shape(mask)):
            od = len(so) - len(ctx.shape(mask)) + d
            if od < len(so) - 1 and size == so[od]:
                ctx.eq(ctx.v(mask, d), ctx.out(od))
            elif od == len(so) - 1 and size == sk[-2]:
                ctx.eq(ctx.v(mask, d), ctx.v(k, -2))
    ctx.attention_op(ctx.out(-3), ctx.v(k, -3), ctx.v(q, -1))


def _no_channels(ctx):
    pass


register(
    aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten.sym_size.int,
    aten.sym_numel.default, aten.sym_stride.int, aten.sym_constrain_range_for_size.default,
    aten.sym_constrain_range.default, aten._assert_async.msg, aten.scalar_tensor.default,
)(_no_channels)


@register(aten._local_scalar_dense.default, aten.item.default)
def _to_python(ctx):
    ctx.freeze_all("its value is read back into Python")
