"""Guards torch.export puts on input sizes (``passes/analysis/input_guards.py``), on small models:

1. a Python loop over the sequence pins it: reported, naming the axis and the traced length;
2. a branch on the length raises the least length: reported with its bound; a model that needs
   that length itself (the eager model fails below it too) is not confined by its trace;
3. a learned position table bounds the length from above, as it bounds the parent: not reported;
4. a plain model: nothing;
5. ``sg.subclone`` refuses the first two in one line naming the guard, and with
   ``fixed_sizes=True`` makes a child that runs at the traced sizes.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import subclone_graph as sg
from subclone_graph.passes.analysis.input_guards import input_guards


class Loop(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.mix = nn.Embedding(11, 8), nn.Linear(8, 8)

    def forward(self, ids):
        x = self.embed(ids)
        state, outs = torch.zeros_like(x[:, 0]), []
        for t in range(ids.shape[1]):
            state = torch.tanh(self.mix(state) + x[:, t])
            outs.append(state)
        return torch.stack(outs, 1)


class FixedPosition(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.mix = nn.Embedding(11, 8), nn.Linear(8, 8)

    def forward(self, ids):
        x = self.embed(ids)
        if ids.shape[1] > 10:                       # the trace keeps this branch: at least 11 positions
            x = x + x[:, 10:11]
        return self.mix(x)


class NeedsFour(nn.Module):
    """A model that itself needs 4 positions (it checks, as a kernel of 4 would): its own limit,
    not the trace's."""

    def __init__(self):
        super().__init__()
        self.embed, self.mix = nn.Embedding(11, 8), nn.Linear(8, 8)

    def forward(self, ids):
        torch._check(ids.shape[1] >= 4, lambda: "needs 4 positions")
        x = self.embed(ids)
        return x + self.mix(x)


class WindowOfFour(nn.Module):
    """Windows of 4 positions: export assumes the s - 3 windows are never exactly 1, so its
    trace rejects length 4, where the eager model runs — a confinement of the trace."""

    def __init__(self):
        super().__init__()
        self.embed, self.mix = nn.Embedding(11, 8), nn.Linear(8, 8)

    def forward(self, ids):
        x = self.embed(ids)
        windows = x.unfold(1, 4, 1)                 # (b, s - 3, 8, 4): fails below 4 positions
        return self.mix(x[:, 3:] + windows.mean(-1))


class Positions(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.positions, self.mix = nn.Embedding(11, 8), nn.Parameter(torch.randn(32, 8)), nn.Linear(8, 8)

    def forward(self, ids):
        x = self.embed(ids) + self.positions[: ids.shape[1]]
        return x + self.mix(x)


def _traced(model, seq):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sg.trace(model.eval(), (torch.randint(0, 11, (2, seq)),))


def test_a_loop_over_the_sequence_pins_it():
    (guard,) = input_guards(_traced(Loop(), 5))
    assert guard.axis == "ids.size()[1]" and guard.guard == "ids.size()[1] == 5"


def test_a_branch_on_the_length_raises_the_least_length():
    guards = input_guards(_traced(FixedPosition(), 12))
    assert guards and all(g.axis == "ids.size()[1]" for g in guards)
    assert {g.failing[0] for g in guards} == {2}
    assert sg.passes.state.INPUT_GUARDS.get(_traced(FixedPosition(), 12))       # the eager model runs at 2


def test_a_limit_the_model_has_itself_is_no_confinement():
    gm = _traced(NeedsFour(), 6)
    assert input_guards(gm)                                                    # export bounds the length
    assert sg.passes.state.INPUT_GUARDS.get(gm) == ()                            # and so does the model


def test_an_upper_bound_alone_and_a_plain_model_report_nothing():
    assert input_guards(_traced(Positions(), 6)) == []
    model = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 8))
    assert input_guards(_traced(model, 6)) == []


def test_subclone_refuses_a_pinned_length_naming_the_guard_and_accepts_it_when_asked():
    ids = torch.randint(0, 11, (2, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(sg.TraceError) as error:
            sg.subclone(Loop().eval(), (ids,), sg.Target())
        child = sg.subclone(Loop().eval(), (ids,), sg.Target(), fixed_sizes=True)
    message = str(error.value)
    assert "\n" not in message and "ids.size()[1] == 5" in message and "fixed_sizes=True" in message
    assert child(torch.randint(0, 11, (3, 5))).shape == (3, 5, 8)        # at the traced length


def test_subclone_refuses_a_raised_least_length_and_not_the_model_s_own():
    with pytest.raises(sg.TraceError, match=r"ids.size\(\)\[1\] (>= 11|> 10)"):
        sg.subclone(FixedPosition().eval(), (torch.randint(0, 11, (2, 12)),), sg.Target())
    child = sg.subclone(NeedsFour().eval(), (torch.randint(0, 11, (2, 6)),), sg.Target())
    assert child(torch.randint(0, 11, (3, 9))).shape == (3, 9, 8)


def test_a_length_the_trace_rejects_where_the_model_runs_is_refused():
    # the model's own limit is 4; export's trace also rejects exactly 4 (a window count of 1)
    ids = torch.randint(0, 11, (2, 6))
    with pytest.raises(sg.TraceError, match=r"Ne\(ids.size\(\)\[1\] - 3, 1\)|ids.size\(\)\[1\]"):
        sg.subclone(WindowOfFour().eval(), (ids,), sg.Target())
    child = sg.subclone(WindowOfFour().eval(), (ids,), sg.Target(), fixed_sizes=True)
    assert child(torch.randint(0, 11, (3, 9))).shape == (3, 6, 8)
    WindowOfFour()(torch.randint(0, 11, (3, 4)))                       # the eager model runs at 4


class LoopNeedsFour(Loop):
    """Pinned by its loop, and unable to run below 4 positions itself (a kernel of 4)."""

    def forward(self, ids):
        return super().forward(ids)[:, 3:] + self.embed(ids).unfold(1, 4, 1).mean(-1)


def test_a_pin_is_tried_above_the_traced_length_where_the_model_runs():
    # the least rejected length (2) is the model's own limit; 7, above the traced 6, is not
    gm = _traced(LoopNeedsFour(), 6)
    assert sg.passes.state.INPUT_GUARDS.get(gm) == ("ids.size()[1] == 6 (raised at " + input_guards(gm)[0].where + ")",)
