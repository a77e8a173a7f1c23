"""The input sizes a traced model — and every child made from it — runs at, and examples of them.

Tracing keeps the batch axis of every tensor input dynamic, and the sequence axis (dim 1) of
integer inputs and of 3-D float inputs (``dynamic_axes``). A model whose code specialises on a
size (a Python loop over the sequence pins the traced length; a reshape into chunks of 4 makes it
a multiple of 4) is traced only with ``fixed_sizes=True``, and its graph runs at the sizes the
guards allow: ``state.INPUT_SIZES`` (``passes.analysis.input_guards.allowed_sizes``), per confined
input axis the sizes from 2 to 64 none of its guards rejects.

``fitting_size(gm, batch, length)``: the (batch, length) nearest the wanted one where ``gm`` runs.
``another_example(gm, example)``: ``example`` at another batch and sequence length (one more row,
five more positions, each the nearest size ``gm`` runs at — an axis its graph holds static, as
torch.export holds one of size 1, keeps its size —; the data tiled from the example's own,
so token ids stay in the vocabulary and masks stay masks), or None when ``gm`` runs at the
example's sizes only.
"""
from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from subclone_graph.passes import state

__all__ = ["dynamic_axes", "fitting_size", "another_example", "resized", "MORE_ROWS", "MORE_POSITIONS"]

# the second size a check runs at: the example's with one more row and five more positions (an
# odd length, unlike the even ones examples are made with, so a code path for one parity is seen)
MORE_ROWS, MORE_POSITIONS = 1, 5


def dynamic_axes(value) -> tuple[int, ...]:
    """The axes ``trace`` keeps dynamic on an input value (module docstring)."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return ()
    if value.dim() >= 2 and (not value.is_floating_point() or value.dim() == 3):
        return (0, 1)
    return (0,)


def _nearest(allowed: set[int] | None, wanted: int) -> int:
    if allowed is None or wanted in allowed or not allowed:
        return wanted
    return min(allowed, key=lambda size: (abs(size - wanted), size))


def _allowed(gm, batch_axis: bool) -> set[int] | None:
    """The sizes every confined batch (or sequence) axis of ``gm``'s inputs allows; None: any."""
    sets = [set(sizes) for (_, dim), sizes in (state.INPUT_SIZES.get(gm) or {}).items() if (dim == 0) == batch_axis]
    return set.intersection(*sets) if sets else None


def fitting_size(gm, batch: int, length: int) -> tuple[int, int]:
    """The (batch, sequence length) nearest the wanted one that ``gm``'s traced graph runs at."""
    return _nearest(_allowed(gm, True), batch), _nearest(_allowed(gm, False), length)


def resized(value, dim: int, size: int):
    """``value`` tiled or cut along ``dim`` to ``size`` (the same data, another size)."""
    if not isinstance(value, torch.Tensor) or value.dim() <= dim or not value.shape[dim]:
        return value
    if value.shape[dim] < size:
        repeats = [1] * value.dim()
        repeats[dim] = -(-size // value.shape[dim])
        value = value.repeat(*repeats)
    return value.narrow(dim, 0, size).clone()


def _static_axes(gm) -> set[int]:
    """The batch (0) and sequence (1) axes some input of ``gm``'s graph holds at a fixed size."""
    static = set()
    for node in getattr(getattr(gm, "graph", None), "nodes", ()):
        value = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(value, torch.Tensor):
            static |= {axis for axis in dynamic_axes(value) if not isinstance(value.shape[axis], torch.SymInt)}
    return static


def another_example(gm, example: tuple) -> tuple | None:
    """``example`` at another batch and sequence length where ``gm`` runs (module docstring)."""
    leaves = [v for v in pytree.tree_leaves(example) if dynamic_axes(v)]
    if not leaves:
        return None
    batch = leaves[0].shape[0]
    long = [v for v in leaves if len(dynamic_axes(v)) > 1]
    length = long[0].shape[1] if long else None
    new_batch, new_length = fitting_size(gm, batch + MORE_ROWS, (length or 0) + MORE_POSITIONS)
    static = _static_axes(gm)
    # torch.export specialises an axis of size 0 or 1, and the graph keeps what it traced static
    new_batch = batch if batch <= 1 or 0 in static else new_batch
    new_length = length if length is None or length <= 1 or 1 in static else new_length
    if new_batch == batch and (length is None or new_length == length):
        return None

    def resize(value):
        axes = dynamic_axes(value)
        if not axes:
            return value
        value = resized(value, 0, new_batch)
        return resized(value, 1, new_length) if 1 in axes and length is not None else value

    return pytree.tree_map(resize, example)
