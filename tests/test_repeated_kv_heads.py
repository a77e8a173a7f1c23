"""Grouped-query attention whose keys and values are repeated whole (``k.repeat(1, r, 1, 1)``):
query head ``i · n_kv + g`` reads kv head ``g`` — the repeat is the outer factor of the query
heads, not the inner one of ``repeat_interleave`` / ``expand`` (``AttentionSite.rep_outer``).

1. the analysis names the kv heads by the key before its repeat, and the repeat as the outer part;
2. planted dead kv groups (every query head reading them) are removed exactly;
3. a planted dead repeat (the same one in every kv group) is removed exactly: the child's
   ``repeat`` literal follows;
4. where the repeat is frozen (its rows are routed by ``index_add``, as a mixture of attention
   experts routes a token's top-k slots), fewer query heads per kv group are refused in one line
   naming the op, while whole kv groups still go.

Without ``rep_outer`` the outer factor would be taken for the kv heads: the child would keep query
heads that read the removed kv groups.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from subclone_testing import plant_dead, relative_error, run
from torch import nn

import subclone_graph as sg

VOCAB, D, KV, REP, HEAD_DIM = 40, 32, 4, 2, 8


def _ids(batch, seq, seed):
    return (torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


class RepeatedKeys(nn.Module):
    def __init__(self, routed=False):
        super().__init__()
        self.routed = routed
        self.q = nn.Linear(D, REP * KV * HEAD_DIM)
        self.kv = nn.Linear(D, 2 * KV * HEAD_DIM)
        self.out = nn.Linear(REP * KV * HEAD_DIM, D)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x)
        if self.routed:     # each token's REP slots written back row by row, to the rows an index names
            rows = q.reshape(b * s * REP, KV * HEAD_DIM)
            order = torch.arange(rows.shape[0], device=x.device)
            q = torch.zeros_like(rows).index_add(0, order, rows).view(b, s, REP, -1)
        q = q.view(b, s, REP * KV, HEAD_DIM).transpose(1, 2)
        k, v = (t.view(b, s, KV, HEAD_DIM).transpose(1, 2) for t in self.kv(x).chunk(2, dim=-1))
        y = F.scaled_dot_product_attention(q, k.repeat(1, REP, 1, 1), v.repeat(1, REP, 1, 1), is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, s, -1))


class Model(nn.Module):
    def __init__(self, routed=False):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.norms = nn.ModuleList(nn.RMSNorm(D) for _ in range(3))
        self.attn = nn.ModuleList(RepeatedKeys(routed) for _ in range(2))
        self.head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for norm, attn in zip(self.norms, self.attn):
            x = x + attn(norm(x))
        return self.head(self.norms[-1](x))


def _analysed(routed=False):
    torch.manual_seed(0)
    model, inputs = Model(routed).eval(), _ids(2, 8, 0)
    gm = sg.trace(model, inputs)
    sg.analyze_channels(gm)
    return model, inputs, gm


@pytest.fixture()
def parent():
    return _analysed()


def _checked(gm, inputs, target, parent_gm):
    checked = [inputs, _ids(3, 5, 7)]
    child = sg.subclone(gm, inputs, target, calibration=checked + [_ids(4, 16, 100)])
    for x in checked:
        assert relative_error(run(child, x), run(parent_gm, x)) < 1e-5
    return child


def test_the_kv_heads_are_the_keys_before_their_repeat(parent):
    _, _, gm = parent
    graph = gm.meta["subclone.channel_graph"]
    for site in gm.meta["subclone.attention"]:
        assert site.rep_outer
        assert (graph.groups[site.kv_heads].size, graph.groups[site.rep].size) == (KV, REP)
        assert graph.groups[site.kv_heads].kind == "kv_heads"


def test_planted_dead_kv_groups_are_removed_exactly(parent):
    _, inputs, gm = parent
    dead = [0, 2]          # not the last ones: the kept ones are 1 and 3, each read by heads g and g + KV
    for site in gm.meta["subclone.attention"]:
        plant_dead(gm, {site.kv_heads: dead, site.heads: [i * KV + g for i in range(REP) for g in dead]},
                   {site.rep: REP})
    child = _checked(gm, inputs, sg.Target(kv_heads=KV - 2, heads=REP * (KV - 2)), gm)
    assert child.get_parameter("attn.0.kv.weight").shape == (2 * (KV - 2) * HEAD_DIM, D)
    assert child.get_parameter("attn.0.q.weight").shape == (REP * (KV - 2) * HEAD_DIM, D)


def test_a_planted_dead_repeat_is_removed_exactly(parent):
    _, inputs, gm = parent
    for site in gm.meta["subclone.attention"]:
        plant_dead(gm, {site.rep: [0]})        # query heads 0 .. KV - 1: repeat 0 of every kv group
    child = _checked(gm, inputs, sg.Target(kv_heads=KV, heads=KV), gm)
    assert child.get_parameter("attn.0.q.weight").shape == (KV * HEAD_DIM, D)
    assert child.get_parameter("attn.0.kv.weight").shape == (2 * KV * HEAD_DIM, D)
    repeats = [n.args[1] for n in child.graph.nodes if n.target is torch.ops.aten.repeat.default]
    assert repeats and all(list(r)[1] == 1 for r in repeats)


def test_a_routed_repeat_is_refused_in_one_line_and_whole_kv_groups_still_go():
    model, inputs, gm = _analysed(routed=True)
    with pytest.raises(ValueError) as error:
        sg.subclone(gm, inputs, sg.Target(kv_heads=KV, heads=KV))
    message = str(error.value)
    assert "\n" not in message and "Target.heads cannot shrink this model" in message
    assert "aten.index_add.default" in message and "the index values point into this dim" in message
    for site in gm.meta["subclone.attention"]:
        plant_dead(gm, {site.kv_heads: [1], site.heads: [i * KV + 1 for i in range(REP)]}, {site.rep: REP})
    _checked(gm, inputs, sg.Target(kv_heads=KV - 1, heads=REP * (KV - 1)), gm)
