"""ATen aliases and in-place twins of elementwise ops, on a small hand-written model that uses them:

1. an alias (``torch.multiply``, ``torch.divide``, ``torch.subtract``, ``torch.clip``) is rewritten
   by the trace as its canonical op (``mul``, ``div``, ``sub``, ``clamp``), so the rules and the
   passes that recognise an op see it: a hand-written RMSNorm through ``torch.multiply`` /
   ``torch.divide`` is a norm the rescale corrects, and planted dead residual channels go exactly;
2. an elementwise op the sweep found without a rule (``acos``: an angular similarity of queries and
   keys) keeps the heads prunable;
3. an in-place twin of an elementwise op (``scores.masked_fill_(mask, value)`` with a number or a
   0-dim tensor, ``clamp_``, ``sigmoid_``) flows dims as the op: the heads and the MLP stay
   prunable, and planted dead heads and neurons are removed exactly;
4. the alias table itself: each pair's schemas agree argument by argument, and the rewrite is a
   pass whose second run changes nothing;
5. a graph torch.export made, given to the trace, is rewritten on a copy: the caller's graph keeps
   its aliases.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from subclone_testing import groups_of, plant_dead, plant_dead_heads, relative_error, run
from torch import nn

import subclone_graph as sg
from subclone_graph.passes.rewrite.canonical_aliases import CanonicalAliasesPass
from subclone_graph.passes.rules import RULES
from subclone_graph.passes.rules.aliases import ALIASES

VOCAB, D, FFN, HEADS, HEAD_DIM = 40, 32, 48, 4, 8
aten = torch.ops.aten


def _ids(batch, seq, seed):
    return (torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


class AliasNorm(nn.Module):
    """RMSNorm written with aliases: x / sqrt(mean x² + ε), times a gain."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(D))

    def forward(self, x):
        scale = torch.sqrt(torch.multiply(x, x).mean(-1, keepdim=True) + 1e-6)
        return torch.multiply(torch.divide(x, scale), self.weight)


class MaskedAttention(nn.Module):
    """Attention by hand: the causal mask written into the scores in place."""

    def __init__(self, tensor_fill):
        super().__init__()
        self.qkv, self.out = nn.Linear(D, 3 * HEADS * HEAD_DIM), nn.Linear(HEADS * HEAD_DIM, D)
        self.gate = nn.Parameter(torch.rand(HEADS, 1, 1) + 0.5)
        self.register_buffer("fill", torch.tensor(-1e4) if tensor_fill else None, persistent=False)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        scores = torch.multiply(q @ k.transpose(-1, -2), HEAD_DIM ** -0.5)
        scores = 4.0 - torch.arccos(torch.tanh(scores))          # an angular similarity (acos)
        mask = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
        scores.masked_fill_(mask, -1e4 if self.fill is None else self.fill)
        y = torch.multiply(scores.softmax(-1) @ v, self.gate)
        return self.out(y.transpose(1, 2).reshape(b, s, HEADS * HEAD_DIM))


class GatedMlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(D, FFN), nn.Linear(D, FFN), nn.Linear(FFN, D)

    def forward(self, x):
        g = self.gate(x).clamp_(-3.0, 3.0)
        h = torch.multiply(torch.subtract(g, 0.5).sigmoid_(), torch.clip(self.up(x), -4.0, 4.0))
        return self.down(h)


class Layer(nn.Module):
    def __init__(self, tensor_fill):
        super().__init__()
        self.norm1, self.norm2 = AliasNorm(), AliasNorm()
        self.attn, self.mlp = MaskedAttention(tensor_fill), GatedMlp()

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(Layer(tensor_fill=i % 2 == 1) for i in range(2))
        self.norm, self.head = AliasNorm(), nn.Linear(D, VOCAB, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


@pytest.fixture(scope="module")
def parent():
    torch.manual_seed(0)
    model, inputs = Model().eval(), _ids(2, 8, 0)
    gm = sg.trace(model, inputs)
    sg.analyze_channels(gm)
    return model, inputs, gm


def test_aliases_are_their_canonical_ops_and_in_place_twins_have_rules(parent):
    _, _, gm = parent
    ops = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert not ops & set(ALIASES), ops & set(ALIASES)
    assert {aten.mul.Tensor, aten.div.Tensor, aten.sub.Tensor, aten.clamp.default, aten.masked_fill_.Scalar,
            aten.masked_fill_.Tensor, aten.clamp_.default, aten.sigmoid_.default, aten.acos.default} <= ops
    assert not gm.meta["subclone.unknown_ops"]
    assert not groups_of(gm, "frozen")
    assert len(groups_of(gm, "ffn")) == 2 and len(groups_of(gm, "residual")) == 1
    assert len(gm.meta["subclone.attention"]) == 2


def test_identity_and_planted_dead_neurons_and_heads(parent):
    model, inputs, gm = parent
    same = sg.subclone(gm, inputs, sg.Target())
    for x in (inputs, _ids(3, 5, 7)):
        assert relative_error(run(same, x), run(model, x)) < 1e-6
    plant_dead(gm, {g.id: list(range(1, FFN, 2)) for g in groups_of(gm, "ffn")})
    heads, kv_heads = plant_dead_heads(gm)
    checked = [inputs, _ids(3, 5, 7)]
    child = sg.subclone(gm, inputs, sg.Target(ffn=0.5, heads=heads, kv_heads=kv_heads),
                        calibration=checked + [_ids(4, 16, 100)])
    assert child.get_parameter("layers.0.mlp.up.weight").shape == (FFN // 2, D)
    assert child.get_parameter("layers.1.attn.gate").shape == (HEADS - 1, 1, 1)
    for x in checked:
        assert relative_error(run(child, x), run(gm, x)) < 1e-5


def test_a_norm_written_with_aliases_is_rescaled_when_the_stream_shrinks():
    torch.manual_seed(1)
    model, inputs = Model().eval(), _ids(2, 8, 0)
    gm = sg.trace(model, inputs)
    sg.analyze_channels(gm)
    (stream,) = groups_of(gm, "residual")
    plant_dead(gm, {stream.id: [0, 5, D - 1]})
    checked = [inputs, _ids(3, 5, 7)]
    child = sg.subclone(gm, inputs, sg.Target(hidden=D - 3), calibration=checked)
    assert child.get_parameter("norm.weight").shape == (D - 3,)
    for x in checked:
        assert relative_error(run(child, x), run(gm, x)) < 1e-5


def test_each_alias_has_its_canonical_schema_and_a_rule():
    for alias, canonical in ALIASES.items():
        a, c = alias._schema, canonical._schema
        assert [(x.name, str(x.type), x.alias_info is not None and x.alias_info.is_write) for x in a.arguments] == \
            [(x.name, str(x.type), x.alias_info is not None and x.alias_info.is_write) for x in c.arguments], alias
        assert [str(r.type) for r in a.returns] == [str(r.type) for r in c.returns], alias
        assert canonical in RULES, canonical


def test_the_rewrite_is_a_pass_whose_second_run_changes_nothing():
    class Tiny(nn.Module):
        def forward(self, x):
            return torch.multiply(torch.true_divide(x, 2.0), torch.negative(x)), torch.greater(x, 0), \
                torch.concatenate([x, x], dim=-1)

    x = torch.randn(2, 3)
    program = torch.export.export(Tiny(), (x,))
    gm = program.module()
    aliases = {aten.multiply.Tensor, aten.true_divide.Tensor, aten.negative.default, aten.greater.Scalar,
               aten.concatenate.default}
    assert aliases <= {n.target for n in gm.graph.nodes}
    expected = gm(x)
    assert CanonicalAliasesPass()(gm).modified
    assert {aten.mul.Tensor, aten.div.Tensor, aten.neg.default, aten.gt.Scalar, aten.cat.default} <= \
        {n.target for n in gm.graph.nodes}
    assert not aliases & {n.target for n in gm.graph.nodes}
    assert not CanonicalAliasesPass()(gm).modified
    assert all(torch.equal(a, b) for a, b in zip(gm(x), expected))


def test_the_callers_exported_graph_keeps_its_aliases():
    torch.manual_seed(0)
    model = Model().eval()
    theirs = torch.export.export(model, _ids(2, 8, 0), strict=False,
                                 dynamic_shapes=({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},)).module()
    before = [(n.name, n.target) for n in theirs.graph.nodes]
    assert any(n.target in ALIASES for n in theirs.graph.nodes)
    gm = sg.trace(theirs, _ids(2, 8, 0))
    assert gm is not theirs and not any(n.target in ALIASES for n in gm.graph.nodes)
    assert [(n.name, n.target) for n in theirs.graph.nodes] == before
    assert relative_error(run(gm, _ids(3, 13, 5)), run(model, _ids(3, 13, 5))) < 1e-6
