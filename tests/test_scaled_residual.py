"""A residual whose skip is scaled: ``x = w * x + f(norm(x))`` with a learned per-channel gain ``w``
(or a number). ``FindResidualBlocksPass`` follows the skip back through the gain to the stream, so
the block, its layer and the residual stream are found; the gain is sliced with the stream.

1. the layers and the stream are found (one block per branch, two per layer);
2. planted dead stream channels are removed exactly (the gains keep the kept channels' values);
3. a layer is dropped: its tensors, gains included, go with it.

Without the rule no block is found and ``Target.hidden`` is refused (no residual stream).
"""
from __future__ import annotations

import pytest
import torch
from subclone_testing import groups_of, plant_dead, relative_error, run
from torch import nn

import subclone_graph as sg

VOCAB, D, FFN, LAYERS = 40, 32, 48, 3


def _ids(batch, seq, seed):
    return (torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(D), nn.RMSNorm(D)
        self.mix = nn.Linear(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, FFN), nn.ReLU(), nn.Linear(FFN, D))
        self.skip_gain = nn.Parameter(torch.rand(D) + 0.5)

    def forward(self, x):
        x = self.skip_gain * x + self.mix(self.norm1(x))
        return 0.5 * x + self.mlp(self.norm2(x))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
        self.norm, self.head = nn.RMSNorm(D), nn.Linear(D, VOCAB, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


@pytest.fixture()
def parent():
    torch.manual_seed(0)
    model, inputs = Model().eval(), _ids(2, 8, 0)
    gm = sg.trace(model, inputs)
    sg.analyze_channels(gm)
    return model, inputs, gm


def test_the_blocks_and_the_stream_are_found_through_the_skip_gain(parent):
    _, _, gm = parent
    layers = gm.meta["subclone.layers"]
    assert [len(layer.blocks) for layer in layers] == [2] * LAYERS
    (stream,) = groups_of(gm, "residual")
    assert ("layers.0.skip_gain", 0) in stream.tensors


def test_planted_dead_stream_channels_are_removed_exactly(parent):
    _, inputs, gm = parent
    (stream,) = groups_of(gm, "residual")
    plant_dead(gm, {stream.id: [0, 5, D - 1]})
    checked = [inputs, _ids(3, 5, 7)]
    child = sg.subclone(gm, inputs, sg.Target(hidden=D - 3), calibration=checked)
    assert child.get_parameter("layers.0.skip_gain").shape == (D - 3,)
    for x in checked:
        assert relative_error(run(child, x), run(gm, x)) < 1e-5


def test_a_layer_with_a_scaled_skip_is_dropped_whole(parent):
    _, inputs, gm = parent
    child = sg.subclone(gm, inputs, sg.Target(layers=LAYERS - 1, hidden=0.5), calibration=[inputs, _ids(3, 5, 7)])
    names = {name.split(".")[1] for name, _ in child.named_parameters() if name.startswith("layers.")}
    assert len(names) == LAYERS - 1
    assert run(child, _ids(3, 5, 7)).shape == (3, 5, VOCAB)
