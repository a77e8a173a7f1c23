"""Layers that hand the next layer a second value beside the stream (mixing weights computed in
one layer and read in the next: the form of models with several residual streams). Removing such a
layer by reading its input where its output was read would leave that value orphaned, so:

1. a depth change that would drop one is refused in one line naming the value, who reads it and
   where, before anything changes (it used to fail DropBlocksPass's postcondition);
2. the widths still shrink: planted dead residual channels and MLP neurons are removed exactly.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from subclone_testing import groups_of, plant_dead, relative_error, run
from torch import nn

import subclone_graph as sg

VOCAB, D, FFN = 40, 32, 48


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.up, self.down = nn.RMSNorm(D), nn.Linear(D, FFN), nn.Linear(FFN, D)
        self.gate = nn.Linear(D, 1)

    def forward(self, x, mix):
        h = self.norm(x)
        x = x + mix * self.down(F.relu(self.up(h)))
        return x, torch.sigmoid(self.gate(h))          # the next layer's mixing weight


class Model(nn.Module):
    def __init__(self, layers=4):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(Layer() for _ in range(layers))
        self.norm, self.head = nn.RMSNorm(D), nn.Linear(D, VOCAB, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        mix = x.new_ones(x.shape[0], x.shape[1], 1)
        for layer in self.layers:
            x, mix = layer(x, mix)
        return self.head(self.norm(x))


def _ids(batch, seq, seed):
    return (torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


@pytest.fixture(scope="module")
def parent():
    torch.manual_seed(0)
    model, inputs = Model().eval(), _ids(2, 8, 0)
    gm = sg.trace(model, inputs)
    sg.analyze_channels(gm)
    return model, inputs, gm


def test_dropping_a_layer_that_hands_on_a_value_is_refused_in_one_line(parent):
    _, inputs, gm = parent
    with pytest.raises(ValueError, match=r"layer \d \(layers\.\d\) cannot be removed: \w+ computed in it is read "
                                         r"after it by \w+ \(in layers\.\d") as error:
        sg.subclone(gm, inputs, sg.Target(layers=3))
    assert "\n" not in str(error.value)


def test_widths_still_shrink_exactly(parent):
    _, inputs, gm = parent
    planted = copy.deepcopy(gm)
    (stream,) = groups_of(planted, "residual")
    dead = {g.id: list(range(1, FFN, 2)) for g in groups_of(planted, "ffn")}
    dead[stream.id] = [0, 5, D - 1]
    plant_dead(planted, dead)
    checked = [inputs, _ids(3, 5, 7)]
    child = sg.subclone(planted, inputs, sg.Target(hidden=D - 3, ffn=0.5), calibration=checked)
    for x in checked:
        assert relative_error(run(child, x), run(planted, x)) < 1e-5
