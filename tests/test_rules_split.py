"""``tensor_split`` at indices: along a channel dim (a fused gate/up projection cut at a boundary
that must follow the shrunk width) and along the sequence (a boundary computed from the input).

Checks: the MLP and the stream stay prunable (no unknown op); the identity child equals the
parent; planted dead FFN neurons and residual channels are removed with outputs unchanged; the
child's boundary literal is the child's width, and the child runs at another sequence length.
The sequence split's one-token tail makes export refuse length 2 (a contiguity guard the eager
model lacks): the trace reports it, subclone refuses it unless ``fixed_sizes=True``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from subclone_testing import groups_of, plant_dead, relative_error, run
from torch import nn

import subclone_graph as sg
from subclone_graph.passes.analysis.input_guards import input_guards

VOCAB, D, FFN = 40, 32, 48


class SplitLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(D)
        self.gate_up, self.down = nn.Linear(D, 2 * FFN, bias=False), nn.Linear(FFN, D, bias=False)
        self.mix = nn.Linear(D, D, bias=False)

    def forward(self, x):
        h = self.norm(x)
        gate, up = torch.tensor_split(self.gate_up(h), [FFN], dim=-1)
        x = x + self.down(F.silu(gate) * up)
        # a sequence split at a boundary computed from the input (the recurrent models' form)
        head, tail = torch.tensor_split(x, [x.shape[1] - 1], dim=1)
        return torch.cat([head, tail + self.mix(tail)], dim=1)


class SplitModel(nn.Module):
    def __init__(self, layers=2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(SplitLayer() for _ in range(layers))
        self.norm, self.head = nn.RMSNorm(D), nn.Linear(D, VOCAB, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def _ids(batch, seq, seed):
    return (torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


@pytest.fixture(scope="module")
def parent():
    torch.manual_seed(0)
    model, inputs = SplitModel().eval(), _ids(2, 8, 0)
    gm = sg.trace(model, inputs)
    sg.analyze_channels(gm)
    return model, inputs, gm


def test_tensor_split_at_indices_keeps_the_mlp_and_stream_prunable(parent):
    _, _, gm = parent
    assert not gm.meta["subclone.unknown_ops"]
    assert len(groups_of(gm, "ffn")) == 2 and len(groups_of(gm, "residual")) == 1
    assert not groups_of(gm, "frozen")


def test_the_one_token_tail_is_the_only_confined_length(parent):
    # export's contiguity check specialises the tail piece (length s - 1) away from 1: the trace,
    # unlike the eager model, refuses s = 2, and sg.subclone refuses it without fixed_sizes
    model, inputs, gm = parent
    assert [g.failing for g in input_guards(gm)] == [(2,)]
    with pytest.raises(sg.TraceError, match=r"ids.size\(\)\[1\] - 1, 1"):
        sg.subclone(model, inputs, sg.Target())


def test_identity_and_planted_dead_neurons_and_channels(parent):
    model, inputs, gm = parent
    same = sg.subclone(model, inputs, sg.Target(), fixed_sizes=True)      # every length but 2
    for x in (inputs, _ids(3, 5, 7)):
        assert relative_error(run(same, x), run(model, x)) < 1e-6
    (residual,) = groups_of(gm, "residual")
    dead = {g.id: [1, 7, FFN - 1] for g in groups_of(gm, "ffn")}
    dead[residual.id] = [0, 9]
    plant_dead(gm, dead)
    calib = [_ids(2, 8, 100 + i) for i in range(2)]
    child = sg.subclone(gm, inputs, sg.Target(hidden=D - 2, ffn=FFN - 3), calibration=calib, fixed_sizes=True)
    assert child.get_parameter("layers.0.gate_up.weight").shape == (2 * (FFN - 3), D - 2)
    boundaries = [n.args[1] for n in child.graph.nodes if n.target is torch.ops.aten.tensor_split.indices]
    assert [FFN - 3] in boundaries
    for x in (inputs, _ids(3, 5, 7)):
        assert relative_error(run(child, x), run(gm, x)) < 1e-5
