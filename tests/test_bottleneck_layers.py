"""A bottleneck layer: the stream projected down inside the layer, residual blocks at that inner
width, projected back up and added to the layer's input (MobileBERT's form). It used to crash
calibration (the layer bounded by an inner block: input and output of different widths).

1. the inner blocks belong to their layer, and the layers are bounded on the stream they were
   given: each layer's input and output have the stream's width; each layer's inner width is a
   residual group of its own;
2. identity = parent; planted dead FFN neurons and dead channels of both streams are removed
   exactly (``Target.hidden`` as a fraction: each stream keeps its share);
3. a real reduction (fractions, a layer fewer) runs at another batch and sequence size.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from subclone_testing import groups_of, plant_dead, relative_error, run
from torch import nn

import subclone_graph as sg
from subclone_graph.passes.fx_utils import tensor_shape

VOCAB, D, INNER, FFN = 40, 32, 16, 48


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.up, self.down = nn.RMSNorm(INNER), nn.Linear(INNER, FFN), nn.Linear(FFN, INNER)

    def forward(self, x):
        return x + self.down(F.relu(self.up(self.norm(x))))


class BottleneckLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.into, self.out = nn.Linear(D, INNER), nn.Linear(INNER, D)
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.norm = nn.RMSNorm(D)

    def forward(self, x):
        h = self.into(x)
        for block in self.blocks:
            h = block(h)
        return self.norm(x + self.out(h))


class Model(nn.Module):
    def __init__(self, layers=3):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(BottleneckLayer() for _ in range(layers))
        self.head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _ids(batch, seq, seed):
    return (torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    model, inputs = Model().eval(), _ids(2, 8, 0)
    gm = sg.trace(model, inputs)
    sg.analyze_channels(gm)
    return model, inputs, gm


def test_layers_are_bounded_on_the_stream_they_were_given(built):
    _, _, gm = built
    nodes = {n.name: n for n in gm.graph.nodes}
    layers = gm.meta["subclone.layers"]
    assert [layer.key for layer in layers] == [f"layers.{i}" for i in range(3)]
    for layer in layers:       # the inner blocks belong to their layer, bounded on the stream
        assert len(layer.blocks) == 3
        assert tensor_shape(nodes[layer.input])[-1] == tensor_shape(nodes[layer.output])[-1] == D
    # the stream, and each layer's inner width: a residual group of its own
    assert sorted(g.size for g in groups_of(gm, "residual")) == [INNER] * 3 + [D]
    assert not groups_of(gm, "frozen")


def test_identity_and_planted_dead_neurons_and_both_streams(built):
    model, inputs, gm = built
    gm = copy.deepcopy(gm)          # a private copy: the fixture is shared
    same = sg.subclone(gm, inputs, sg.Target())
    checked = [inputs, _ids(3, 5, 7)]
    for x in checked:
        assert relative_error(run(same, x), run(model, x)) < 1e-6
    dead = {g.id: list(range(1, FFN, 2)) for g in groups_of(gm, "ffn")}
    for stream in groups_of(gm, "residual"):
        dead[stream.id] = list(range(0, stream.size, 4))       # a quarter of each stream
    plant_dead(gm, dead)
    child = sg.subclone(gm, inputs, sg.Target(hidden=0.75, ffn=0.5), calibration=checked)
    assert child.get_parameter("layers.0.into.weight").shape == (INNER * 3 // 4, D * 3 // 4)
    for x in checked:
        assert relative_error(run(child, x), run(gm, x)) < 1e-5


def test_a_real_reduction_runs_at_another_size(built):
    model, inputs, gm = built
    child = sg.subclone(model, inputs, sg.Target(hidden=0.5, ffn=0.5, layers=2),
                        calibration=[_ids(4, 16, 100 + i) for i in range(2)])
    got = run(child, _ids(3, 11, 5))
    assert got.shape == (3, 11, VOCAB) and torch.isfinite(got).all()
    assert sg.count_parameters(child) < sg.count_parameters(model)
