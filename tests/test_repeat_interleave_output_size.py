"""``repeat_interleave(x, copies, dim, output_size=n)``: the stated output size is a literal of
the output dim, rewritten with it (a keyword-only size: ``NodeLiterals`` keys it by name).

Shown on grouped-query attention of our own whose key/value heads reach the query heads by
``repeat_interleave`` with ``output_size`` (as state-space mixers spread their groups over their
heads): planted-dead kv groups (and their query heads) removed exactly, the child runs at another
size, and its ``output_size`` is the child's head count (it crashed at run time: "Invalid
output_size, expected 2 but got 4").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import subclone_graph as sg
from subclone_graph.passes import state
from subclone_testing import plant_dead, relative_error, run

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 53, 32, 4, 2, 8


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(HIDDEN, HEADS * HEAD_DIM)
        self.kv = nn.Linear(HIDDEN, 2 * KV_HEADS * HEAD_DIM)
        self.o = nn.Linear(HEADS * HEAD_DIM, HIDDEN)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2 * KV_HEADS, HEAD_DIM).transpose(1, 2).chunk(2, dim=1)
        k = k.repeat_interleave(HEADS // KV_HEADS, dim=1, output_size=HEADS)
        v = v.repeat_interleave(HEADS // KV_HEADS, dim=1, output_size=HEADS)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, HEADS * HEAD_DIM))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.norms = nn.ModuleList(nn.LayerNorm(HIDDEN) for _ in range(2))
        self.attns = nn.ModuleList(Attention() for _ in range(2))
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        for norm, attn in zip(self.norms, self.attns):
            x = x + attn(norm(x))
        return self.head(x)


def _ids(batch, seq, seed=0):
    return (torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


def test_dead_kv_groups_spread_by_repeat_interleave_are_removed_exactly():
    model = Model().eval()
    x = _ids(2, 8)
    gm = sg.trace(model, x)
    sg.analyze_channels(gm)
    sites = state.ATTENTION.need(gm)
    graph = state.CHANNEL_GRAPH.need(gm)
    assert [(graph.groups[s.heads].size, graph.groups[s.kv_heads].size) for s in sites] == [(HEADS, KV_HEADS)] * 2
    dead, sizes = {}, {}
    for site in sites:          # kv group 0 and its query heads 0, 1
        dead[site.kv_heads], dead[site.heads] = [0], [0, 1]
        sizes[site.rep] = HEADS // KV_HEADS
    plant_dead(gm, dead, sizes)
    child = sg.subclone(gm, x, sg.Target(heads=2, kv_heads=1))
    assert sg.count_parameters(child) < sg.count_parameters(gm)
    for inputs in (x, _ids(3, 5, 1)):
        assert relative_error(run(child, inputs), run(gm, inputs)) < 1e-5
    stated = [n.kwargs["output_size"] for n in child.graph.nodes
              if n.target is torch.ops.aten.repeat_interleave.self_int]
    assert stated == [2] * 4
