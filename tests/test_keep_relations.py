"""Keep-sets through a group seen by two relations: a fused qkv that a reshape splits into
(3, heads, head_dim) and whose bias is built as ``cat(q_bias, zeros, v_bias)`` (timm's Eva, BEiT).
The decision on heads must reach the bias parts through the concatenation, or the weight and its
bias would be sliced differently (and before, they were: the child failed at its first call)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import subclone_graph as sg
from subclone_graph.passes.state import channel_groups
from subclone_testing import analysed, groups_of, plant_dead_heads, relative_error, run


class FusedQKVWithCatBias(nn.Module):
    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(11, dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.randn(dim))
        self.v_bias = nn.Parameter(torch.randn(dim))
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 11)

    def forward(self, ids):
        x = self.embed(ids)
        b, n, d = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.head(x + self.proj(o))


def _model():
    torch.manual_seed(0)
    return FusedQKVWithCatBias().eval(), (torch.randint(0, 11, (2, 6)),)


def test_heads_reach_the_concatenated_bias():
    model, example = _model()
    child = sg.subclone(model, example, sg.Target(heads=2))
    params = dict(child.named_parameters())
    assert params["qkv.weight"].shape == (24, 16)
    assert params["q_bias"].shape == params["v_bias"].shape == (8,)
    assert run(child, (torch.randint(0, 11, (3, 7)),)).shape == (3, 7, 11)


def test_dead_heads_are_removed_exactly():
    model, example = _model()
    gm = analysed(model, example)
    heads, _ = plant_dead_heads(gm)
    assert heads == 3 and not groups_of(gm, "frozen")
    child = sg.subclone(copy.deepcopy(gm), example, sg.Target(heads=heads))
    assert sg.count_parameters(child) < sg.count_parameters(gm)
    for batch, seq in ((2, 6), (3, 9)):
        x = (torch.randint(0, 11, (batch, seq)),)
        assert relative_error(run(child, x), run(gm, x)) < 1e-5


def test_every_channel_id_in_the_metadata_is_a_group():
    # dims no rule mentions (unsqueeze's new size-1 dim) get a group of their own before solving
    model, example = _model()
    gm = analysed(model, example)
    graph = gm.meta["subclone.channel_graph"]
    ids = {g for n in gm.graph.nodes for g in channel_groups(n)}
    assert ids and ids <= set(graph.groups)
