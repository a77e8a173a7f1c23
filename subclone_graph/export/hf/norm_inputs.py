"""The rescale's ε of a norm over a shrunk inner width, folded into the scale of what it normalises.

``RescaleResidualPass`` gives a norm over any width that shrank the ε ``ε·k`` (k: the width's
D/d) — a sub-norm over the attention output when heads go, over the MLP's inner width when
neurons go (``state.Rescale.eps`` lists each: the node holding the ε, the node it normalises,
k). A class has one ε for them all. As for the stream (``stream_scale.py``),

    norm(x, ε·k) = norm(s·x, ε)        with s = 1/√k,

and where ``x`` is linear in some weights, scaling those weights by ``s`` scales ``x`` by ``s``.
``linear_sources(x)`` finds them on the graph, following only ops that are linear in the path
taken (each rule is the identity it uses):

1. views, casts, transposes, a ``slice``: ``f(s·a) = s·f(a)``;
2. ``linear(a, W, b)``: ``W`` and ``b`` (``linear(a, sW, sb) = s·linear(a, W, b)``);
3. a product (``mul``, ``matmul``, ``bmm``, attention's ``softmax(qkᵀ)·v``): one factor, the first
   that is itself linear in some weights — the value, not the query or key; ``up``, not the
   activated ``gate`` of a gated MLP; a constant factor passes;
4. a sum or difference: both terms, each linear in its own weights.

Anything else (a nonlinearity, a bias-free constant added) has no such weights: that norm keeps
its ε·k and the copy computes the same as before (no fold, nothing wrong). A weight also read
elsewhere (a fused projection whose other rows feed the attention scores) would scale those
reads too: ``fold_stream_scale`` compares the folded copy's outputs with the child's and gives up
when they differ.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from subclone_graph.passes.fx_utils import WEIGHT_PASS_THROUGH, weight_attribute

__all__ = ["NORM_EPS", "inner_norm_folds", "linear_sources"]

aten = torch.ops.aten
NORM_EPS = {aten.layer_norm.default: 4, aten.native_layer_norm.default: 4, aten.rms_norm.default: 3,
              aten._fused_rms_norm.default: 3}
_PASS = WEIGHT_PASS_THROUGH | {aten.slice.Tensor, aten.select.int, aten.unsqueeze.default, aten.squeeze.dim,
                               aten.expand.default, aten.neg.default, aten.flatten.using_ints,
                               aten.unflatten.int}
_PRODUCTS = {aten.mul.Tensor, aten.matmul.default, aten.bmm.default, aten.mm.default, aten.div.Tensor}
_SUMS = {aten.add.Tensor, aten.sub.Tensor}
# attention ops: the argument index of the value, which their output is linear in
_ATTENTION_VALUE = {aten.scaled_dot_product_attention.default: 2,
                    aten._scaled_dot_product_flash_attention_for_cpu.default: 2,
                    aten._scaled_dot_product_efficient_attention.default: 2,
                    aten._scaled_dot_product_flash_attention.default: 2}


def linear_sources(node, depth: int = 0) -> set[fx.Node] | None:
    """The get_attr nodes whose scaling by s scales ``node``'s value by s (module docstring);
    None where there are none."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or depth > 64:
        return None
    target, args = node.target, node.args
    if target is aten.linear.default:
        weight, bias = weight_attribute(args[1]), args[2] if len(args) > 2 else None
        if weight is None or (bias is not None and weight_attribute(bias) is None):
            return None
        return {weight} | ({weight_attribute(bias)} if bias is not None else set())
    if target in _PASS:
        return linear_sources(args[0], depth + 1)
    if target is operator.getitem and isinstance(args[0], fx.Node) and args[0].target in _ATTENTION_VALUE and args[1] == 0:
        return linear_sources(args[0].args[_ATTENTION_VALUE[args[0].target]], depth + 1)
    if target in _ATTENTION_VALUE:
        return linear_sources(args[_ATTENTION_VALUE[target]], depth + 1)
    if target in _PRODUCTS:
        # the second factor first (attention's value, a gated MLP's ``up``); only a dividend scales a quotient
        for factor in [args[0]] if target is aten.div.Tensor else [args[1], args[0]]:
            weight = weight_attribute(factor)
            found = {weight} if weight is not None else linear_sources(factor, depth + 1)
            if found:
                return found
        return None
    if target in _SUMS and all(isinstance(a, fx.Node) for a in args[:2]) and node.kwargs.get("alpha", 1) == 1:
        left, right = (linear_sources(a, depth + 1) for a in args[:2])
        return left | right if left and right else None
    return None


def inner_norm_folds(gm: fx.GraphModule, eps: tuple, stream: set[str]) -> list[tuple[fx.Node, int, float, set]]:
    """(node holding the ε, its argument index, k, the weights to scale by 1/√k) for each ε in
    ``eps`` (``state.Rescale.eps``) not held by a node in ``stream`` (the stream's norms, folded
    by ``stream_scale``) whose normalised values are linear in weights (``linear_sources``)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    folds = []
    for holder, normalised, k in eps:
        node, values = nodes.get(holder), nodes.get(normalised)
        if node is None or values is None or holder in stream or k == 1:
            continue
        index = NORM_EPS.get(node.target)
        if index is None:
            index = next((i for i, a in enumerate(node.args) if type(a) is float), None)
        sources = linear_sources(values)
        if index is not None and index < len(node.args) and type(node.args[index]) is float and sources:
            folds.append((node, index, k, sources))
    return folds
