"""A module applied several times in a loop, with an outer state injected into each cycle (the
hierarchical-reasoning form: ``low = block(low + high)`` for a few cycles, then ``high = ...``).

It used to crash calibration: one node (the injected state) is the input of several layers, and
only one of them kept its stashed input. Now:

1. calibration runs; planted dead FFN neurons and residual channels are removed exactly at two
   batch and sequence sizes (the loop's weights are shared by every application and sliced once);
2. a depth change is refused in one line naming the looped module and how many times it runs.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from subclone_testing import groups_of, plant_dead, relative_error, run
from torch import nn

import subclone_graph as sg

VOCAB, D, FFN, CYCLES = 40, 32, 48, 3


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.up, self.down = nn.RMSNorm(D), nn.Linear(D, FFN), nn.Linear(FFN, D)

    def forward(self, x):
        return x + self.down(F.relu(self.up(self.norm(x))))


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(2))

    def forward(self, x, injected):
        x = x + injected
        for layer in self.layers:
            x = layer(x)
        return x


class Looped(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.low, self.high = Stack(), Stack()
        self.norm, self.head = nn.RMSNorm(D), nn.Linear(D, VOCAB, bias=False)

    def forward(self, ids):
        high = self.embed(ids)
        low = torch.zeros_like(high)
        for _ in range(CYCLES):
            low = self.low(low, high)            # the same weights, applied once per cycle
        high = self.high(high, low)
        return self.head(self.norm(high))


def _ids(batch, seq, seed):
    return (torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


@pytest.fixture(scope="module")
def parent():
    torch.manual_seed(0)
    model, inputs = Looped().eval(), _ids(2, 8, 0)
    gm = sg.trace(model, inputs)
    sg.analyze_channels(gm)
    return model, inputs, gm


def test_planted_dead_structure_of_a_looped_module_is_removed_exactly(parent):
    model, inputs, gm = parent
    keys = [layer.key for layer in gm.meta["subclone.layers"]]
    assert keys.count("low.layers.0") == CYCLES
    (stream,) = groups_of(gm, "residual")
    dead = {g.id: list(range(1, FFN, 2)) for g in groups_of(gm, "ffn")}
    dead[stream.id] = [0, 9, D - 1]
    planted = copy.deepcopy(gm)
    plant_dead(planted, dead)
    checked = [inputs, _ids(3, 5, 7)]
    child = sg.subclone(planted, inputs, sg.Target(hidden=D - 3, ffn=0.5), calibration=checked)
    assert child.get_parameter("low.layers.0.up.weight").shape == (FFN // 2, D - 3)
    for x in checked:
        assert relative_error(run(child, x), run(planted, x)) < 1e-5


def test_a_depth_change_of_a_looped_module_is_refused_in_one_line(parent):
    _, inputs, gm = parent
    with pytest.raises(ValueError, match=r"module low\.layers\.0 runs 3 times .*depth cannot change") as error:
        sg.subclone(gm, inputs, sg.Target(layers=len(gm.meta["subclone.layers"]) - 1), calibration=[inputs])
    assert "\n" not in str(error.value)
