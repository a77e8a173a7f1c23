"""Values built in the graph from ``arange`` over a width that shrinks (``rules.shape._arange``,
``KeepChannelsPass`` case 4): the arange keeps the parent's length and the child reads its kept
indices, picked right after it — what a constant tensor of the parent's would give, sliced.

1. ALiBi: per-head slopes ``2^(-8(h+1)/H)`` from ``arange(1, H + 1)``, added to the scores. The
   heads stay prunable; planted dead heads that are not the last ones (so the kept heads' slopes
   are not a prefix of the parent's) are removed exactly, and the child subclones again (its
   constant index ``index_select`` over the heads: the index's dim is the output's);
2. sinusoidal frequencies over the stream from ``arange(D // 2)`` (sine and cosine halves), scaling
   the embedding: planted dead stream channels are removed exactly.

Without the rule the arange freezes what it touches (the heads, the stream) and the subclone is
refused; a rule that rewrote the arange's length would give the kept heads the first slopes.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from subclone_testing import groups_of, plant_dead, relative_error, run
from torch import nn

import subclone_graph as sg

VOCAB, D, FFN, HEADS, HEAD_DIM = 40, 32, 48, 4, 8
aten = torch.ops.aten


def _ids(batch, seq, seed):
    return (torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


class AlibiAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(D, 3 * HEADS * HEAD_DIM), nn.Linear(HEADS * HEAD_DIM, D)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        slopes = torch.pow(2.0, -8.0 / HEADS * torch.arange(1, HEADS + 1, device=x.device))
        position = torch.arange(s, device=x.device)
        distance = (position[None, :] - position[:, None]).clamp(max=0)
        scores = q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM) + slopes[:, None, None] * distance
        scores = scores.masked_fill(distance.new_ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        y = scores.softmax(-1) @ v
        return self.out(y.transpose(1, 2).reshape(b, s, HEADS * HEAD_DIM))


class AlibiModel(nn.Module):
    def __init__(self, layers=2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.attn = nn.ModuleList(AlibiAttention() for _ in range(layers))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(D, FFN), nn.ReLU(), nn.Linear(FFN, D)) for _ in range(layers))
        self.norms = nn.ModuleList(nn.RMSNorm(D) for _ in range(2 * layers + 1))
        self.head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for i, (attn, mlp) in enumerate(zip(self.attn, self.mlp)):
            x = x + attn(self.norms[2 * i](x))
            x = x + mlp(self.norms[2 * i + 1](x))
        return self.head(self.norms[-1](x))


def _analysed(model, inputs):
    gm = sg.trace(model, inputs)
    sg.analyze_channels(gm)
    return gm


@pytest.fixture(scope="module")
def alibi():
    torch.manual_seed(0)
    model, inputs = AlibiModel().eval(), _ids(2, 8, 0)
    return model, inputs, _analysed(model, inputs)


def test_alibi_slopes_from_arange_leave_the_heads_prunable(alibi):
    _, _, gm = alibi
    assert not gm.meta["subclone.unknown_ops"] and not groups_of(gm, "frozen")
    assert len(groups_of(gm, "heads")) == 2
    assert len([n for n in gm.graph.nodes if n.target is aten.arange.start]) == 2     # the slopes of each layer


def test_alibi_planted_dead_heads_are_removed_exactly_with_the_kept_heads_slopes(alibi):
    model, inputs, gm = alibi
    # kept heads 1 and 3: their slopes are not the first two
    plant_dead(gm, {heads.id: [0, 2] for heads in groups_of(gm, "heads")})
    checked = [inputs, _ids(3, 5, 7)]
    child = sg.subclone(gm, inputs, sg.Target(heads=HEADS - 2), calibration=checked + [_ids(4, 16, 100)])
    assert child.get_parameter("attn.0.qkv.weight").shape == (3 * (HEADS - 2) * HEAD_DIM, D)
    picks = [n for n in child.graph.nodes if n.target is aten.index_select.default]
    assert len(picks) == 2 and all(pick.args[0].target is aten.arange.start for pick in picks)
    for x in checked:
        assert relative_error(run(child, x), run(gm, x)) < 1e-5

    # the child subclones again: its constant index is sliced with the heads it picks
    again = _analysed(child, inputs)
    assert not groups_of(again, "frozen") or all(g.size == HEADS for g in groups_of(again, "frozen"))
    plant_dead(again, {heads.id: [0] for heads in groups_of(again, "heads")})      # the parent's head 1
    grandchild = sg.subclone(again, inputs, sg.Target(heads=1), calibration=checked + [_ids(4, 16, 100)])
    for x in checked:
        assert relative_error(run(grandchild, x), run(again, x)) < 1e-5


class SinusoidalScaleModel(nn.Module):
    """The embedding scaled per channel by sinusoids of the position, at frequencies from an
    ``arange`` over half the stream (sines in the first half, cosines in the second)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(nn.Sequential(nn.RMSNorm(D), nn.Linear(D, FFN), nn.ReLU(), nn.Linear(FFN, D))
                                    for _ in range(2))
        self.norm, self.head = nn.RMSNorm(D), nn.Linear(D, VOCAB, bias=False)

    def forward(self, ids):
        position = torch.arange(ids.shape[1], device=ids.device, dtype=torch.float32)[:, None]
        frequency = torch.exp(torch.arange(D // 2, device=ids.device, dtype=torch.float32) * (-math.log(1e4) / D))
        angle = position * frequency
        x = self.embed(ids) * (1.5 + torch.cat([angle.sin(), angle.cos()], dim=-1))
        for layer in self.layers:
            x = x + layer(x)
        return self.head(self.norm(x))


def test_sinusoidal_frequencies_from_arange_leave_the_stream_prunable():
    torch.manual_seed(0)
    model, inputs = SinusoidalScaleModel().eval(), _ids(2, 8, 0)
    gm = _analysed(model, inputs)
    assert not groups_of(gm, "frozen")
    (stream,) = groups_of(gm, "residual")
    half = D // 2
    plant_dead(gm, {stream.id: [0, 5, half, half + 5]})     # the sine and cosine of frequencies 0 and 5
    checked = [inputs, _ids(3, 5, 7)]
    child = sg.subclone(gm, inputs, sg.Target(hidden=D - 4), calibration=checked)
    assert child.get_parameter("embed.weight").shape == (VOCAB, D - 4)
    for x in checked:
        assert relative_error(run(child, x), run(gm, x)) < 1e-5
