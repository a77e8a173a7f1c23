"""A ``torch.no_grad()`` block inside ``forward`` (an indexer or a detached side computation):
torch.export wraps it in ``wrap_with_set_grad_enabled``, a higher-order op no rule reads, which
froze everything it touched (the stream). ``trace`` inlines it between two grad-mode switches:

1. no unknown op; the stream and the MLP stay prunable, and planted dead residual channels and
   neurons are removed exactly at two batch and sequence sizes;
2. the child still runs the block without gradients: training it leaves the weights used only
   there without a gradient, as the parent does.
"""
from __future__ import annotations

import copy

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
        self.scorer = nn.Linear(D, 1)

    def forward(self, x):
        h = self.norm(x)
        with torch.no_grad():                       # a score that trains separately
            score = torch.sigmoid(self.scorer(h))
        return x + score * self.down(F.relu(self.up(h)))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(Layer() for _ in range(2))
        self.norm, self.head = nn.RMSNorm(D), nn.Linear(D, VOCAB, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def _ids(batch, seq, seed):
    return (torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


def test_a_no_grad_block_is_analysed_and_stays_without_gradients():
    torch.manual_seed(0)
    model, inputs = Model().eval(), _ids(2, 8, 0)
    gm = sg.trace(model, inputs)
    sg.analyze_channels(gm)
    assert not gm.meta["subclone.unknown_ops"] and not groups_of(gm, "frozen")
    planted = copy.deepcopy(gm)
    (stream,) = groups_of(planted, "residual")
    dead = {g.id: list(range(1, FFN, 2)) for g in groups_of(planted, "ffn")}
    dead[stream.id] = [0, 5, D - 1]
    plant_dead(planted, dead)
    checked = [inputs, _ids(3, 5, 7)]
    child = sg.subclone(planted, inputs, sg.Target(hidden=D - 3, ffn=0.5), calibration=checked)
    for x in checked:
        assert relative_error(run(child, x), run(planted, x)) < 1e-5
    child.train()
    child(*inputs).sum().backward()
    assert child.get_parameter("layers.0.scorer.weight").grad is None
    assert child.get_parameter("layers.0.up.weight").grad is not None
