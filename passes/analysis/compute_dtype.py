"""Calibration of a half-precision parent, computed in a wider dtype (float32 by default).

Scores are statistics of activations; a bfloat16 parent computed in bfloat16 gives them with
bfloat16 noise, and on a CPU without bfloat16 matrix units it runs 10–30× slower than float32
(measured: 1–5 against ~30 GFLOP/s a core here). So calibration runs every op of a half-precision
graph in ``dtype``, from the same weights:

- every half-precision tensor an op reads is widened to ``dtype`` (exact: widening adds no
  error), and every half-precision dtype literal the trace wrote (``_to_copy(dtype=bfloat16)``
  after a norm, ``full(dtype=…)``) is read as ``dtype`` — so the whole graph runs in ``dtype``;
- except the reads of a *gather* (``GATHERS``: an embedding lookup, an index): it copies rows,
  so it runs on the stored tensor and its result is widened — the same values, without a wide
  copy of a vocabulary-sized table.

``call_widened`` is the one place this happens: the segment runner (``segments``) calls it for
every op, whatever the weights' source. The model is never changed: widened tensors are copies.
"""
from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from ..fx_utils import written_arguments

__all__ = ["HALF_DTYPES", "GATHERS", "COMPUTE_DTYPES", "widen", "call_widened", "gather_only_attributes"]

HALF_DTYPES = (torch.float16, torch.bfloat16)
# the command line's --calib-dtype: a name -> compute_dtype ("model": the model's own dtype)
COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64, "model": None}

aten = torch.ops.aten
# ops whose result is a copy of some of their first argument's entries: exact in any dtype
GATHERS = frozenset({aten.embedding.default, aten.index_select.default, aten.index.Tensor, aten.gather.default,
                     aten.select.int, aten.slice.Tensor})


def widen(tree, dtype: torch.dtype):
    """``tree`` with every half-precision tensor cast to ``dtype`` and every half dtype literal
    replaced by ``dtype``."""
    def one(value):
        if isinstance(value, torch.dtype):
            return dtype if value in HALF_DTYPES else value
        if isinstance(value, torch.Tensor) and value.dtype in HALF_DTYPES:
            return value.to(dtype)
        return value
    return pytree.tree_map(one, tree)


def call_widened(target, args, kwargs, dtype: torch.dtype | None):
    """A node's ATen op ``target(*args, **kwargs)`` run in ``dtype`` (module docstring);
    ``dtype=None`` runs it as it is."""
    if dtype is None:
        return target(*args, **kwargs)
    if target in GATHERS:
        rest, kwargs = widen((args[1:], kwargs), dtype)
        return widen(target(args[0], *rest, **kwargs), dtype)
    if _writes_first(target):       # an in-place op must write into its tensor, not into a wide copy
        rest, kwargs = widen((args[1:], kwargs), dtype)
        return target(args[0], *rest, **kwargs)
    args, kwargs = widen((args, kwargs), dtype)
    return target(*args, **kwargs)


def _writes_first(target) -> bool:
    return any(position == 0 for position, _ in written_arguments(target))


def gather_only_attributes(gm, live=None) -> set[str]:
    """The attribute targets of ``gm`` that only gathers read (among ``live`` node names, when
    given): a runner widens every other attribute once, up front, and these never."""
    readers: dict[str, set] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            readers.setdefault(node.target, set()).update(
                (user.target, user.args[0] is node) for user in node.users if live is None or user.name in live)
    return {target for target, uses in readers.items() if uses and all(op in GATHERS and first for op, first in uses)}
