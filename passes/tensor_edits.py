"""One description of a tensor edit, applied now or replayed later from a checkpoint on disk.

Every rewrite that changes a tensor's values — keeping channels (``KeepChannelsPass``), the
√(D/d) rescale (``RescaleResidualPass``), a duplicated layer's copies (``DuplicateLayersPass``),
per-expert gathers — describes the change once, as edits:

- ``Take(dim, index)``: keep ``index`` along ``dim``, in order; an index may repeat (a grown
  width's clones). With ``rows``, ``index`` is 2-D: entry ``r`` of dim ``rows`` keeps its own
  row ``index[r]`` (one neuron order per expert);
- ``Scale(factor, offset, dim)``: ``x · factor + offset``, computed in at least float32 and
  rounded once to the tensor's dtype; ``factor`` a number, or a 1-D tensor along ``dim`` (one
  factor per index: a read divided by its copies).

``edit_tensor(gm, tensor, edits)`` is the one place they are applied: to a real tensor now; and
where the graph's tensors stand for a checkpoint on disk (``state.TENSOR_ORIGINS`` holds an
``EditProgram`` per fake tensor), the same edits are also appended to the tensor's program,
which a writer replays (``EditProgram.replay``) tensor by tensor, reading only the kept slices.

The invariant: replaying a program gives the bits that applying its edits one by one gives,
in every dtype. A program is kept in a normal form — first one index per dim (all takes
composed), then the elementwise steps in order — and that is exact: a take only moves values,
and an elementwise step computes each entry from that entry alone (a per-index factor is taken
along with its dim), so taking before or after a step changes no bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .errors import PassError
from .fx_utils import same_kind

__all__ = ["Take", "Scale", "EditProgram", "edit_tensor", "record_edits", "gather_per_row"]


def gather_per_row(tensor: torch.Tensor, dim: int, rows: int, index: torch.Tensor) -> torch.Tensor:
    """``tensor`` keeping, along ``dim``, the indices ``index[r]`` in entry ``r`` of dim ``rows``."""
    moved = tensor.movedim((rows, dim), (0, 1))
    index = index.to(tensor.device)
    picked = torch.stack([moved[r].index_select(0, index[r]) for r in range(moved.shape[0])])
    return picked.movedim((0, 1), (rows, dim))


@dataclass(frozen=True, eq=False)
class Take:
    dim: int
    index: torch.Tensor          # 1-D long; 2-D (entries of ``rows``, kept) with ``rows``
    rows: int | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is None:
            return x.index_select(self.dim, self.index.to(x.device))
        return gather_per_row(x, self.dim, self.rows, self.index)


@dataclass(frozen=True, eq=False)
class Scale:
    factor: float | torch.Tensor
    offset: float = 0.0
    dim: int | None = None       # the dim a 1-D ``factor`` runs along

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        factor = self.factor
        if isinstance(factor, torch.Tensor):
            shape = [1] * x.dim()
            shape[self.dim] = -1
            factor = factor.to(device=wide.device, dtype=wide.dtype).reshape(shape)
        out = wide * factor
        if self.offset:
            out = out + self.offset
        return out.to(x.dtype)

    def taken(self, take: Take) -> "Scale":
        """This step as it reads after ``take`` (a per-index factor follows its dim)."""
        if not isinstance(self.factor, torch.Tensor) or self.dim != take.dim:
            return self
        if take.rows is not None:
            raise PassError("a per-index factor along a dim taken per row cannot be replayed")
        return Scale(self.factor[take.index.to(self.factor.device)], self.offset, self.dim)


@dataclass(frozen=True, eq=False)
class EditProgram:
    """A tensor of the checkpoint (``source``, of ``shape``) with edits: ``index`` per dim (None:
    all; 1-D: kept indices; 2-D: per entry of dim ``rows[dim]``), then ``steps`` in order."""

    source: str
    shape: tuple
    index: tuple = ()
    rows: tuple = ()
    steps: tuple = ()

    def then(self, edit) -> "EditProgram":
        if isinstance(edit, Scale):
            return EditProgram(self.source, self.shape, self.index, self.rows, self.steps + (edit,))
        index = list(self.index) or [None] * len(self.shape)
        rows = list(self.rows) or [None] * len(self.shape)
        kept = edit.index.detach().to("cpu").long()
        before = index[edit.dim]
        if edit.rows is None:
            index[edit.dim] = kept if before is None else before[kept] if before.dim() == 1 else before[:, kept]
            # fewer entries of a dim another dim is indexed per entry of: its rows follow
            index = [i[kept] if rows[d] == edit.dim else i for d, i in enumerate(index)]
        else:
            if rows[edit.dim] not in (None, edit.rows):
                raise PassError(f"{self.source}: dim {edit.dim} is taken per entry of two different dims")
            index[edit.dim] = kept if before is None else before[kept] if before.dim() == 1 else before.gather(1, kept)
            rows[edit.dim] = edit.rows
        steps = tuple(step.taken(edit) for step in self.steps)
        return EditProgram(self.source, self.shape, tuple(index), tuple(rows), steps)

    def replay(self, read) -> torch.Tensor:
        """The edited tensor from ``read(source, index)`` (one 1-D index or None per dim)."""
        index = list(self.index) or [None] * len(self.shape)
        per_row = sorted({r for r in self.rows if r is not None})
        if not per_row:
            value = read(self.source, tuple(index))
        else:
            value = self._read_per_row(read, index, per_row[0])
        for step in self.steps:
            value = step.apply(value)
        return value

    def _read_per_row(self, read, index: list, rows: int) -> torch.Tensor:
        entries = torch.arange(self.shape[rows]) if index[rows] is None else index[rows]
        pieces = []
        for r in range(len(entries)):            # each entry of ``rows`` with its own indices
            one = [entries[r:r + 1] if d == rows else i[r] if self.rows[d] == rows else i
                   for d, i in enumerate(index)]
            pieces.append(read(self.source, tuple(one)))
        if pieces:
            return torch.cat(pieces, dim=rows)
        # no entry along ``rows``: an empty read, each per-row index by its width alone
        return read(self.source, tuple(entries[:0] if d == rows else torch.zeros(i.shape[-1], dtype=torch.long)
                                       if self.rows[d] == rows else i for d, i in enumerate(index)))


def record_edits(gm: fx.GraphModule, old, new, edits) -> None:
    """Where the graph tracks programs (``state.TENSOR_ORIGINS``), record that ``new`` is ``old``
    with ``edits``; the mapping is replaced whole, never mutated, and keeps the tensor so that
    its ``id`` stays its own."""
    from . import state

    programs = state.TENSOR_ORIGINS.get(gm) if hasattr(gm, "meta") else None
    if programs is None or id(old) not in programs:
        return
    program = programs[id(old)][1]
    for edit in edits:
        program = program.then(edit)
    state.TENSOR_ORIGINS.set(gm, {**programs, id(new): (new, program)})


def edit_tensor(gm: fx.GraphModule, tensor: torch.Tensor, edits=()) -> torch.Tensor:
    """``tensor`` with ``edits`` applied (a copy when there are none), as what ``tensor`` is (a
    trainable ``nn.Parameter`` or a tensor); recorded for replay where the graph tracks programs."""
    with torch.no_grad():
        new = tensor.detach()
        for edit in edits:
            new = edit.apply(new)
        new = new.clone() if not edits else new.contiguous()
    new = same_kind(tensor, new)
    record_edits(gm, tensor, new, edits)
    return new
