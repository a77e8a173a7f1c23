"""The one tensor-edit path (``passes/tensor_edits.py``): edits applied now and the same edits
recorded as a program and replayed from a reader give the same bits, in every dtype.

Programs are kept in a normal form (all takes composed into one index per dim, then the
elementwise steps); the cases are the ones that form has to get right: indices that repeat (a
grown width's clones), a per-index factor along a dim that is taken afterwards (its factors
follow the take), a per-row (per-expert) take after a plain take of the rows' dim, a take of
the rows' dim after a per-row take, and a ``(c + w)`` gain's scale-with-offset rounded once.
The reader is asked only for 1-D indices (a per-row index is read row by row).
"""
from __future__ import annotations

import pytest
import torch

from subclone_graph.passes.tensor_edits import EditProgram, Scale, Take, edit_tensor

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _cut(tensor: torch.Tensor, index: tuple) -> torch.Tensor:
    for dim, kept in enumerate(index):
        assert kept is None or kept.dim() == 1, "the reader gets 1-D indices only"
        if kept is not None:
            tensor = tensor.index_select(dim, kept)
    return tensor


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(-1).view(torch.uint8)


CASES = {
    "repeated indices then a per-index scale": [
        Take(1, torch.tensor([2, 2, 0, 5, 5])), Scale(torch.tensor([0.5, 0.5, 1.0, 1 / 3, 1 / 3]), dim=1)],
    "a per-index scale then a take of its dim": [
        Scale(torch.linspace(0.1, 2.0, 6), dim=1), Take(1, torch.tensor([4, 1, 1]))],
    "per-row take after a take of the rows' dim": [
        Take(0, torch.tensor([3, 1])), Take(1, torch.tensor([[4, 0, 0], [1, 2, 5]]), rows=0)],
    "a take of the rows' dim after a per-row take": [
        Take(1, torch.tensor([[0, 1], [2, 3], [4, 5], [1, 1]]), rows=0), Take(0, torch.tensor([2, 0, 2]))],
    "a (1 + w) gain's rescale": [Take(2, torch.tensor([4, 0, 3])), Scale(1.1547, offset=0.1547)],
    "everything": [
        Scale(0.9), Take(1, torch.tensor([5, 5, 1, 0])), Scale(torch.tensor([2.0, 0.5, 1.5, 1.0]), dim=1),
        Take(0, torch.tensor([1, 3, 3])), Take(2, torch.tensor([[4, 0], [1, 2], [2, 2]]), rows=0),
        Scale(1.25, offset=0.25)],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", list(CASES))
def test_replayed_programs_give_the_bits_of_edits_applied_now(case, dtype):
    parent = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    now = parent
    for edit in CASES[case]:
        now = edit_tensor(object(), now, [edit])          # one at a time, as the rewrites apply them
    program = EditProgram("w", tuple(parent.shape))
    for edit in CASES[case]:
        program = program.then(edit)
    asked = []

    def read(name, index):
        asked.append(index)
        return _cut(parent, index)

    replayed = program.replay(read)
    assert replayed.dtype == now.dtype == dtype and replayed.shape == now.shape
    assert torch.equal(_bits(replayed), _bits(now)), case
    assert all(i is None or i.dim() == 1 for index in asked for i in index)


def test_a_gain_scale_rounds_once_in_bfloat16():
    """``(c + w)·f − c`` in float32 then one rounding — not ``w·f`` rounded, then ``+ offset``."""
    w = (torch.randn(240, generator=torch.Generator().manual_seed(1)) * 0.3).to(torch.bfloat16)
    factor, offset = 2.0 ** 0.5, 2.0 ** 0.5 - 1
    once = Scale(factor, offset).apply(w)
    exact = (w.double() * factor + offset)
    assert torch.equal(once, (w.float() * factor + offset).to(torch.bfloat16))
    twice = w * factor + offset
    ulp = torch.finfo(torch.bfloat16).eps * exact.abs().clamp_min(2 ** -126)
    assert float(((once.double() - exact).abs() / ulp).max()) <= 0.51
    assert not torch.equal(once, twice)                   # the two-rounding way differs somewhere
