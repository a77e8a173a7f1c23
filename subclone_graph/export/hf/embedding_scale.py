"""An embedding scale a class derives from its config (√hidden), folded for ``save_hf``.

A child whose hidden size shrank still multiplies its embedding by the parent's constant, but the
class built from the child's config computes its own from the new size. The ratio is measured,
never looked up by family, on a *probe* that cannot be mistaken for a scale: several distinct
tokens, whose rows differ in norm — one token, or one token repeated, would make a norm of the
rows (an untrained uniform gain) look like a constant multiple (45.9 where the truth was 1).

- the child's scale (``child_scales``): each token-table lookup of the child's graph is given
  the probe's rows, and every user of the lookup that computes from those rows and constants
  alone is evaluated — the constants as the child computes them (a bfloat16 √hidden stays its
  bfloat16 value), the product in float64 — so the ratio is exact in every dtype;
- the class's (``_class_embedding_scale``): the ratio hooked around the class's input
  embedding on the same probe tokens, within the rounding of the class's dtype.

Where they differ, ``fold_scale`` puts the ratio into the table, and, when the output head
shares that table, takes it back out at the final norm's gain (its offset ``a`` in ``(a + w)``
measured on a probe, so ``1 + w`` gains work).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from subclone_graph.passes.fx_utils import get_attribute

__all__ = ["fold_embedding_scale", "fold_scale", "child_scales", "probe_ids"]

PROBE_TOKENS = 16


def probe_ids(vocab: int) -> torch.Tensor:
    """(1, n) distinct token ids spread over the vocabulary (n = min(vocab, 16))."""
    return torch.linspace(0, vocab - 1, min(vocab, PROBE_TOKENS)).round().long().unique()[None]


def _constant_ratio(new: torch.Tensor, old: torch.Tensor, probe: bool = False) -> float | None:
    """``c`` when ``new == c · old`` row by row and everywhere, within the rounding of ``new``'s
    dtype; None when not. ``probe``: ``old`` are token rows, which must tell a scale from a
    normalisation — at least two rows, differing in norm — or nothing is measured (None)."""
    if new.shape != old.shape or not old.abs().max() > 0 or old.dim() == 0:
        return None
    rows_new, rows_old = new.double().reshape(-1, old.shape[-1]), old.double().reshape(-1, old.shape[-1])
    norms = rows_old.norm(dim=1)
    if probe:                      # rows of zeros (a padding token) say nothing
        rows_new, rows_old, norms = rows_new[norms > 0], rows_old[norms > 0], norms[norms > 0]
        if len(rows_old) < 2 or torch.allclose(norms, norms[0].expand_as(norms), rtol=1e-3):
            return None            # one norm for every row: a normalisation would look like a scale
    rtol = max(1e-4, 4 * torch.finfo(new.dtype).eps) if new.is_floating_point() else 1e-4
    ratio = float((rows_new * rows_old).sum() / (rows_old ** 2).sum())
    per_row = (rows_new * rows_old).sum(1) / (rows_old ** 2).sum(1).clamp_min(1e-300)
    if not torch.allclose(per_row, torch.full_like(per_row, ratio), rtol=rtol, atol=0):
        return None
    return ratio if torch.allclose(rows_new, ratio * rows_old, rtol=rtol, atol=rtol * float(rows_old.abs().max())) \
        else None


def _embedding_lookups(child: fx.GraphModule) -> list[fx.Node]:
    """The token-table lookups of ``child``: ``aten.embedding`` of a stored table."""
    return [n for n in child.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.embedding.default
            and n.args[0].op == "get_attr"]


def _constant(node, tensor_of, depth: int = 4):
    """``node``'s value when it depends on no input (attributes and literals only), computed
    as the child computes it; None otherwise."""
    if not isinstance(node, fx.Node):
        return node
    if node.op == "get_attr":
        return tensor_of(node)
    if node.op != "call_function" or depth == 0:
        return None
    missing = object()

    def value(arg):
        found = _constant(arg, tensor_of, depth - 1) if isinstance(arg, fx.Node) else arg
        return missing if found is None and isinstance(arg, fx.Node) else found

    args, kwargs = fx.node.map_aggregate(node.args, value), fx.node.map_aggregate(node.kwargs, value)
    if any(a is missing for a in torch.utils._pytree.tree_leaves((args, kwargs))):
        return None
    with torch.no_grad():
        return node.target(*args, **kwargs)


def _in_float64(tree):
    """Every floating tensor and floating dtype literal of ``tree`` as float64."""
    def one(value):
        if isinstance(value, torch.dtype):
            return torch.float64 if value.is_floating_point else value
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(torch.float64)
        return value
    return torch.utils._pytree.tree_map(one, tree)


def _scale_of(lookup: fx.Node, rows: torch.Tensor, tensor_of) -> float | None:
    """The one constant the users of ``lookup`` multiply ``rows`` by (1.0: none; None: not one)."""
    ratios = []
    for user in lookup.users:
        if user.op != "call_function" or user.target is torch.ops.aten._assert_tensor_metadata.default:
            continue
        others = [a for a in (*user.args, *user.kwargs.values()) if isinstance(a, fx.Node) and a is not lookup]
        constants = {a: _constant(a, tensor_of) for a in others}
        if any(v is None for v in constants.values()):
            continue                # reads an input too (positions added): not a scale of the rows
        mapped = lambda a: rows if a is lookup else constants[a] if a in constants else a  # noqa: E731
        args = fx.node.map_aggregate(user.args, lambda a: mapped(a) if isinstance(a, fx.Node) else a)
        kwargs = fx.node.map_aggregate(user.kwargs, lambda a: mapped(a) if isinstance(a, fx.Node) else a)
        try:
            with torch.no_grad():
                out = user.target(*_in_float64(args), **_in_float64(kwargs))
        except (RuntimeError, TypeError, ValueError):      # an op that cannot take the probe: not a scale
            continue
        if isinstance(out, torch.Tensor):
            ratios.append(_constant_ratio(out, rows, probe=True))
    scales = [r for r in ratios if r is not None and not math.isclose(r, 1.0, rel_tol=1e-6)]
    return scales[0] if len(scales) == 1 else 1.0 if not scales else None


def child_scales(child: fx.GraphModule, tensor_of=None) -> dict[str, float | None]:
    """{table attribute: the constant the child multiplies its looked-up rows by} (module
    docstring); ``tensor_of(get_attr node)`` gives an attribute's tensor (default: the module's)."""
    tensor_of = tensor_of or (lambda node: get_attribute(child, node.target))
    scales = {}
    for lookup in _embedding_lookups(child):
        table = tensor_of(lookup.args[0]).detach()
        rows = table[probe_ids(table.shape[0])].double()
        scales[lookup.args[0].target] = _scale_of(lookup, rows, tensor_of)
    return scales


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
            seen.setdefault("scale", _constant_ratio(output, looked_up, probe=True))

    def before(module, args):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        embedded = seen.get("embedded")
        if embedded is not None and "scale" not in seen and first is not None and first.shape == embedded.shape \
                and not torch.equal(first, embedded):
            seen["scale"] = _constant_ratio(first, embedded, probe=True)

    handles = [embedding.register_forward_hook(after)]
    handles += [m.register_forward_pre_hook(before) for m in model.modules() if m is not embedding]
    try:
        with torch.no_grad():
            try:                # the probe's distinct tokens (a token model takes input_ids first)
                model(probe_ids(embedding.weight.shape[0]))
            except Exception:   # a model that needs more inputs: its example, if its rows can tell
                seen.clear()
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
    # by value: the head may read a view of it (``hidden[:, -k:]``); the module with a 1-D weight
    # among those returning it (a post-norm layer returns its last norm's output: the layer has
    # no weight, its norm has; ``fold_scale`` measures that the weight is a gain before using it)
    return next((m for m, o in reversed(outputs) if isinstance(o, torch.Tensor) and isinstance(read, torch.Tensor)
                 and o.shape == read.shape and torch.equal(o, read)
                 and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 1), None)


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
    scales = [scale for target, scale in child_scales(child).items()
              if torch.equal(get_attribute(child, target), table.detach())]
    return fold_scale(model, inputs, scales[0] if len(scales) == 1 else None)


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
