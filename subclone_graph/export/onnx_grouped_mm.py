"""ONNX export of grouped (mixture-of-experts) matmuls: one portable op, one exact translation.

``torch.onnx`` cannot export a grouped matmul with offsets: torchlib's ``aten::_grouped_mm``
refuses ``offs``; transformers' opaque ``transformers::grouped_mm_fallback`` (what a float32
expert block traces to) has no translation; and ``aten._grouped_mm`` (what a bfloat16 one traces
to) only traces in bfloat16, so the float32 graph ``export_onnx`` makes of a bfloat16 child
cannot even be re-traced. Two pieces fix that, keyed by the op, for any model:

1. ``portable_grouped_mm(gm)`` returns a GraphModule (new graph, the same parameters; ``gm``
   itself is not changed) where every grouped matmul of the mixture-of-experts form —
   ``aten._grouped_mm(x 2-D, w 3-D, offs)`` without bias or ``out_dtype``, and
   ``transformers::grouped_mm_fallback(x, w, offs)`` — calls ``subclone_graph::grouped_mm``
   instead: the same math in any float dtype (its torch kernel is one ``torch.mm`` per expert,
   the reference loop), traceable with fake tensors. Other forms are left as they are (the
   exporter then names them).
2. ``translation_table()`` maps that op (and transformers' op, for an ``nn.Module`` exported
   directly) to its ONNX translation, for ``torch.onnx.export(custom_translation_table=...)``.

The math (x: (S, in) rows sorted by expert; w: (E, in, out); offs: (E,) cumulative row counts;
``start_e = offs[e-1]``, ``start_0 = 0``)::

    out[start_e : offs[e]] = x[start_e : offs[e]] @ w[e]      for e = 0 .. E-1
    out[offs[E-1] : S]     = 0                                (rows no expert owns)

In ONNX: E ``Slice`` (tensor bounds, so the row counts stay data-dependent) + ``MatMul`` pairs,
one ``Concat`` of the E blocks and a zero tail; E is static (the weight's first dim), so the
loop is unrolled at export time. Invariant: exact — each row is one plain matmul with its own
expert's matrix, as in torch (``tests/test_onnx_moe.py``: the op against transformers' kernel,
the rewritten graph against the original, the translation in onnxruntime against torch).

Cost, and why this form: O(S·in·out) flops and O(S·out) memory, the same as the op itself. The
exact forms a rewrite in plain torch ops could use instead (torch cannot slice by data-dependent
bounds without unbacked symbols) are worse: gathering w per row (``w[expert_of_row]``, then a
batched matmul) materialises an (S, in, out) tensor — O(tokens·top_k·in·out) memory, tens of GB
for one layer of a 30B MoE at 512 tokens; masking (``Σ_e mask_e · (x @ w[e])``) keeps memory at
O(S·out) but costs E× the flops (128× with 128 experts). The price of unrolling is graph size:
about six nodes per expert per grouped matmul (three slices, the weight, a matmul).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.fx as fx

__all__ = ["grouped_mm", "portable_grouped_mm", "translation_table", "onnx_grouped_mm"]


@torch.library.custom_op("subclone_graph::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows ``start_e:offs[e]`` of ``x`` times ``weight[e]``; rows past ``offs[-1]`` are zero."""
    out = x.new_zeros(x.shape[0], weight.shape[2])
    start = 0
    for expert, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = torch.mm(x[start:end], weight[expert])
        start = end
    return out


@grouped_mm.register_fake
def _grouped_mm_shape(x, weight, offs):
    if x.dim() != 2 or weight.dim() != 3 or offs.shape != (weight.shape[0],) or x.shape[1] != weight.shape[1]:
        raise ValueError(f"subclone_graph::grouped_mm: expected x (S, in), weight (E, in, out), offs (E,); got "
                         f"{tuple(x.shape)}, {tuple(weight.shape)}, {tuple(offs.shape)}")
    return x.new_empty(x.shape[0], weight.shape[2])


def _fallback_op():
    """transformers' op, once transformers' mixture-of-experts code registered it (else None)."""
    namespace = getattr(torch.ops, "transformers")
    return namespace.grouped_mm_fallback.default if hasattr(namespace, "grouped_mm_fallback") else None


def _portable_args(node: fx.Node):
    """(x, weight, offs) of a grouped matmul of the mixture-of-experts form, else None."""
    fallback = _fallback_op()
    if fallback is not None and node.target is fallback:
        names = ("input", "weight", "offs")
    elif node.target is torch.ops.aten._grouped_mm.default:
        if node.kwargs.get("bias") is not None or node.kwargs.get("out_dtype") is not None or len(node.args) > 3:
            return None
        names = ("self", "mat2", "offs")
    else:
        return None
    args = list(node.args) + [node.kwargs.get(name) for name in names[len(node.args):]]
    x, weight, offs = args[:3]
    ranks = [len(a.meta["val"].shape) if isinstance(a, fx.Node) and "val" in a.meta else None for a in (x, weight)]
    return (x, weight, offs) if offs is not None and ranks == [2, 3] else None


def portable_grouped_mm(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule computing what ``gm`` computes, each grouped matmul of the mixture-of-experts
    form replaced by ``subclone_graph::grouped_mm`` (module doc, 1). ``gm`` is returned itself
    when it has none; otherwise it is left unchanged and the result shares its parameters."""
    if not any(_portable_args(node) for node in gm.graph.nodes if node.op == "call_function"):
        return gm
    graph = copy.deepcopy(gm.graph)           # new nodes (meta copied shallowly), the same codegen
    found = [(node, args) for node in graph.nodes if node.op == "call_function"
             and (args := _portable_args(node)) is not None]
    for node, args in found:
        with graph.inserting_before(node):
            portable = graph.call_function(torch.ops.subclone_graph.grouped_mm.default, tuple(args))
        portable.meta = dict(node.meta)
        node.replace_all_uses_with(portable)
        graph.erase_node(node)
    result = fx.GraphModule(gm, graph)
    result.meta.update(gm.meta)
    return result


def onnx_grouped_mm(x, weight, offs):
    """The ONNX translation of ``subclone_graph::grouped_mm`` (module doc), emitted into the graph
    ``torch.onnx`` is building; ``x`` must be 2-D and ``weight`` 3-D with a static expert count."""
    from onnxscript import ir
    from onnxscript.onnx_opset import opset18 as op

    if x.shape is None or len(x.shape) != 2 or weight.shape is None or len(weight.shape) != 3 \
            or not isinstance(weight.shape[0], int):
        raise NotImplementedError(f"grouped matmul: expected x (S, in) and weight (E, in, out) with a static E; "
                                  f"got {x.shape} and {weight.shape}")
    experts = weight.shape[0]
    ends = op.Cast(offs, to=ir.DataType.INT64)
    starts = op.Concat(op.Constant(value_ints=[0]), op.Slice(ends, [0], [-1], [0]), axis=0)
    blocks = []
    for e in range(experts):
        rows = op.Slice(x, op.Slice(starts, [e], [e + 1], [0]), op.Slice(ends, [e], [e + 1], [0]), [0])
        blocks.append(op.MatMul(rows, op.Gather(weight, op.Constant(value_int=e), axis=0)))
    unowned = op.Sub(op.Shape(x, start=0, end=1), op.Slice(ends, [-1], [experts], [0]))
    tail = op.Expand(op.CastLike(op.Constant(value_float=0.0), x), op.Concat(unowned, op.Shape(weight, start=2),
                                                                             axis=0))
    return op.Concat(*blocks, tail, axis=0)


def translation_table() -> dict[torch._ops.OpOverload, Callable]:
    """``custom_translation_table`` entries for ``torch.onnx.export``: our op, and transformers' op
    (same signature, same math) when it is registered in this process."""
    table: dict = {torch.ops.subclone_graph.grouped_mm.default: onnx_grouped_mm}
    fallback = _fallback_op()
    if fallback is not None:
        table[fallback] = onnx_grouped_mm
    return table
