"""An embedding scale a class derives from its config (√hidden), folded for ``save_hf``.

A child whose hidden size shrank still multiplies its embedding by the parent's constant, but the
class built from the child's config computes its own from the new size. The ratio is measured,
never looked up by family: the child's scale is the constant ratio between an embedding lookup
and the next value computed from it in the child's graph; the class's is the same ratio hooked
around its input embedding. Where they differ, ``fold_embedding_scale`` puts the ratio into the
table, and, when the output head shares that table, takes it back out at the final norm's gain
(its offset ``a`` in ``(a + w)`` measured on a probe, so ``1 + w`` gains work).
``fold_scale`` takes the child's scale already measured: the streamed writer reads it off its
segment-by-segment reference run (``embedding_lookups``, ``scale_after``).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from subclone_graph.passes.fx_utils import get_attribute

__all__ = ["fold_embedding_scale", "fold_scale", "embedding_lookups", "scale_after"]


def _constant_ratio(new: torch.Tensor, old: torch.Tensor) -> float | None:
    """``c`` when ``new == c · old`` everywhere (within float rounding), else None."""
    if new.shape != old.shape or not old.abs().max() > 0:
        return None
    ratio = float((new.double() * old.double()).sum() / (old.double() ** 2).sum())
    return ratio if torch.allclose(new.double(), ratio * old.double(), rtol=1e-4, atol=1e-6) else None


def embedding_lookups(child: fx.GraphModule) -> list[fx.Node]:
    """The token-table lookups of ``child``: ``aten.embedding`` of a stored table."""
    return [n for n in child.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.embedding.default
            and n.args[0].op == "get_attr"]


def scale_after(lookup: fx.Node, values: dict) -> float | None:
    """The constant the graph multiplies the rows ``lookup`` read by (1.0: none; None: not one
    constant), from the values of ``lookup`` and of its users (``values[node]``)."""
    embedded = values[lookup]
    ratios = [_constant_ratio(v, embedded) for n, v in values.items()
              if n in lookup.users and isinstance(v, torch.Tensor)]
    scales = [r for r in ratios if r is not None and not math.isclose(r, 1.0, rel_tol=1e-6)]
    return scales[0] if len(scales) == 1 else 1.0 if not scales else None


def _child_embedding_scale(child: fx.GraphModule, table: torch.Tensor, inputs: tuple) -> float | None:
    """The constant the child multiplies its token embedding by, measured by running the
    child's graph: the lookup whose table is ``table``, then its users."""
    nodes = [n for n in embedding_lookups(child) if torch.equal(get_attribute(child, n.args[0].target), table)]
    if len(nodes) != 1:
        return None
    watched = {nodes[0], *nodes[0].users}
    values: dict[fx.Node, torch.Tensor] = {}

    class _Watch(fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if node in watched:
                values[node] = value
            return value

    with torch.no_grad():
        _Watch(child).run(*inputs)
    return scale_after(nodes[0], values)


def _class_embedding_scale(model: torch.nn.Module, inputs: tuple) -> float | None:
    """The constant the class multiplies its token embedding by — inside the embedding module,
    or before the first module that reads something else than the looked-up rows (1.0: none;
    None: not a constant multiple)."""
    embedding, seen = model.get_input_embeddings(), {}

    def after(module, args, output):
        if not isinstance(output, torch.Tensor):        # (rows, scaling): no plain lookup to compare
            seen.setdefault("scale", None)
            return
        # the table lookup itself: an embedding module may scale inside its own forward
        looked_up = torch.nn.functional.embedding(args[0], module.weight)
        seen.setdefault("embedded", looked_up)
        if not torch.equal(output, looked_up):
            seen.setdefault("scale", _constant_ratio(output, looked_up))

    def before(module, args):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        embedded = seen.get("embedded")
        if embedded is not None and "scale" not in seen and first is not None and first.shape == embedded.shape \
                and not torch.equal(first, embedded):
            seen["scale"] = _constant_ratio(first, embedded)

    handles = [embedding.register_forward_hook(after)]
    handles += [m.register_forward_pre_hook(before) for m in model.modules() if m is not embedding]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen.get("scale", 1.0)


def _gain_offset(norm: torch.nn.Module) -> float | None:
    """``a`` of a norm whose output is ``n(x) · (a + weight) + bias``: 0 for a plain gain, 1 for
    a ``(1 + w)`` gain; measured with the weight at 0 and at 1 (restored after)."""
    weight, probe = norm.weight, torch.randn(3, norm.weight.shape[0], generator=torch.Generator().manual_seed(0))
    saved = weight.detach().clone()
    bias = getattr(norm, "bias", None)
    saved_bias = bias.detach().clone() if isinstance(bias, torch.Tensor) else None
    try:
        with torch.no_grad():
            if saved_bias is not None:
                bias.zero_()
            weight.zero_()
            at_zero = norm(probe.to(weight.dtype)).double()
            weight.fill_(1)
            step = norm(probe.to(weight.dtype)).double() - at_zero
    finally:
        with torch.no_grad():
            weight.copy_(saved)
            if saved_bias is not None:
                bias.copy_(saved_bias)
    return _constant_ratio(at_zero, step)


def _final_norm(model: torch.nn.Module, inputs: tuple) -> torch.nn.Module | None:
    """The module whose output is what the output head reads, when it has a 1-D ``weight``."""
    head, found = model.get_output_embeddings(), {}
    outputs: list[tuple[torch.nn.Module, torch.Tensor]] = []
    handles = [m.register_forward_hook(lambda m, a, o: outputs.append((m, o))) for m in model.modules() if m is not head]
    handles.append(head.register_forward_pre_hook(lambda m, a: found.setdefault("read", a[0])))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    read = found.get("read")
    # by value: the head may read a view of it (``hidden[:, -k:]``)
    norm = next((m for m, o in reversed(outputs) if isinstance(o, torch.Tensor) and isinstance(read, torch.Tensor)
                 and o.shape == read.shape and torch.equal(o, read)), None)
    weight = getattr(norm, "weight", None)
    return norm if isinstance(weight, torch.Tensor) and weight.dim() == 1 else None


def _input_embeddings(model: torch.nn.Module):
    """The class's token embedding module; None for a class that has none (a vision model's
    ``get_input_embeddings`` may raise ``NotImplementedError``)."""
    try:
        return model.get_input_embeddings()
    except NotImplementedError:
        return None


def fold_embedding_scale(child: fx.GraphModule, model: torch.nn.Module, inputs: tuple) -> list[str]:
    """Make ``model`` (the class, built from the child's config, holding its weights) scale its
    token embedding as the child does, when the class derives that scale from a size the child
    changed (√hidden); ``fold_scale`` with the child's scale measured on its graph."""
    table = getattr(_input_embeddings(model), "weight", None)
    if not isinstance(table, torch.Tensor) or table.dim() != 2:
        return []                  # no token table (a patch embedding): nothing to fold
    return fold_scale(model, inputs, _child_embedding_scale(child, table.detach(), inputs))


def fold_scale(model: torch.nn.Module, inputs: tuple, wanted: float | None) -> list[str]:
    """Make ``model`` multiply its token embedding by ``wanted`` (the child's scale): the ratio
    to the class's own goes into the embedding table, and, when the output head shares that
    table, back out of the final norm's gain (``a + w`` measured, so ``1 + w`` gains work).
    Returns the names of the tensors it changed. Where no such fold exists the model is left
    alone and the caller's check refuses with the difference."""
    table = getattr(_input_embeddings(model), "weight", None)
    if not isinstance(table, torch.Tensor) or table.dim() != 2:
        return []
    has = _class_embedding_scale(model, inputs)
    if wanted is None or not has or math.isclose(wanted, has, rel_tol=1e-7):
        return []
    ratio = wanted / has
    head = model.get_output_embeddings()
    norm = None
    if head is not None and head.weight is table:
        norm = _final_norm(model, inputs)
        offset = _gain_offset(norm) if norm is not None else None
        if offset is None:
            return []
    changed = [table]
    with torch.no_grad():
        table.mul_(ratio)
        if norm is not None:
            norm.weight.copy_((offset + norm.weight) / ratio - offset)
            changed.append(norm.weight)
            if isinstance(getattr(norm, "bias", None), torch.Tensor):
                norm.bias.div_(ratio)
                changed.append(norm.bias)
    ids = {id(t) for t in changed}
    return [name for name, t in model.state_dict(keep_vars=True).items() if id(t) in ids]
