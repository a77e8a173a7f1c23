"""Rules the family sweep asked for, each on a small hand-written model that shows the construct:

1. ``torch.min(x, other)`` / ``torch.max(x, other)`` (a clamped activation): elementwise, so the
   MLP stays prunable and planted dead neurons are removed exactly;
2. ``reshape_as`` / ``view_as`` / ``expand_as`` in attention: each out dim is ``other``'s, so the
   heads stay prunable and planted dead heads are removed exactly;
3. an even split (``chunk``) whose pieces would otherwise fall into groups of different sizes (one
   piece joins the residual stream, the other an MLP): the pieces are tied, so the child's even
   split still cuts where its pieces end; planted dead residual channels are removed exactly; a
   split with a shorter last piece is frozen with the reason;
4. a convolution with a string padding (``padding="valid"``, ``aten.conv2d.padding``) relates its
   channels as any convolution: a patch embedding's output is the stream, which shrinks exactly;
5. an empty tensor in a ``cat`` (a stack of layer states begun as ``x.new_zeros(b, s, 0, D)``) has
   the others' sizes off the cat dim: its literal width follows the stream, which shrinks exactly;
6. a ``gather`` by computed indices (a relative-position bias table per head, gathered along its
   buckets): its other dims flow through, so the heads stay prunable and dead heads go exactly;
7. sliding windows (``unfold``: a short convolution over the positions per channel): the channels
   flow through, so an MLP's dead inner neurons go exactly.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from subclone_testing import groups_of, plant_dead, plant_dead_heads, relative_error, run
from torch import nn

import subclone_graph as sg
from subclone_graph.passes.state import channel_groups

VOCAB, D, FFN, HEADS, HEAD_DIM = 40, 32, 48, 4, 8


def _ids(batch, seq, seed):
    return (torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


class ClampedMlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, FFN), nn.Linear(FFN, D)
        self.ceiling = nn.Parameter(torch.full((FFN,), 0.7))

    def forward(self, x):
        h = F.relu(self.up(x))
        h = torch.min(h, self.ceiling) + 0.1 * torch.max(h, 0.5 * self.ceiling)
        return self.down(h)


class AsAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(D, 3 * HEADS * HEAD_DIM), nn.Linear(HEADS * HEAD_DIM, D)
        self.gate = nn.Parameter(torch.ones(HEADS, 1, 1))

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y * self.gate.expand_as(y[0])              # a per-head gate shaped as the output
        merged = y.transpose(1, 2).reshape(b, s, HEADS * HEAD_DIM)
        return self.out(merged.view_as(merged).reshape_as(q.transpose(1, 2).flatten(2)))


class Layer(nn.Module):
    def __init__(self, split):
        super().__init__()
        self.split = split
        self.norm1, self.norm2 = nn.RMSNorm(D), nn.RMSNorm(D)
        self.attn, self.mlp = AsAttention(), ClampedMlp()
        # the split layer: one projection, chunked into a residual update and an MLP input
        self.proj, self.down = nn.Linear(D, 2 * D, bias=False), nn.Linear(D, D, bias=False)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        if self.split:
            update, inner = self.proj(self.norm2(x)).chunk(2, dim=-1)
            x = x + update + self.down(F.relu(inner))
        return x


class Model(nn.Module):
    def __init__(self, split=False, layers=2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(Layer(split) for _ in range(layers))
        self.norm, self.head = nn.RMSNorm(D), nn.Linear(D, VOCAB, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def _parent(split):
    torch.manual_seed(0)
    model, inputs = Model(split).eval(), _ids(2, 8, 0)
    gm = sg.trace(model, inputs)
    sg.analyze_channels(gm)
    return model, inputs, gm


@pytest.fixture(scope="module")
def parent():
    return _parent(False)


def test_min_max_other_and_as_ops_keep_the_mlp_and_heads_prunable(parent):
    _, _, gm = parent
    assert not gm.meta["subclone.unknown_ops"]
    assert not groups_of(gm, "frozen")
    assert len(groups_of(gm, "ffn")) == 2 and len(gm.meta["subclone.attention"]) == 2
    ops = {n.target for n in gm.graph.nodes}
    aten = torch.ops.aten
    assert {aten.min.other, aten.max.other, aten.expand_as.default, aten.reshape_as.default,
            aten.view_as.default} <= ops


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
    assert child.get_parameter("layers.0.mlp.ceiling").shape == (FFN // 2,)
    assert child.get_parameter("layers.0.attn.gate").shape == (HEADS - 1, 1, 1)
    for x in checked:
        assert relative_error(run(child, x), run(gm, x)) < 1e-5


def test_even_split_pieces_are_tied_and_the_child_splits_where_they_end():
    model, inputs, gm = _parent(True)
    assert not groups_of(gm, "frozen")
    (residual,) = groups_of(gm, "residual")
    chunks = [n for n in gm.graph.nodes if n.target is torch.ops.aten.chunk.default]
    assert len(chunks) == 2
    for node in chunks:       # both pieces of the projection's chunk are the stream's channels
        assert {channel_groups(piece)[-1] for piece in node.users} == {residual.id}
    plant_dead(gm, {residual.id: [0, 5, D - 1]})
    checked = [inputs, _ids(3, 5, 7)]
    child = sg.subclone(gm, inputs, sg.Target(hidden=D - 3), calibration=checked)
    assert child.get_parameter("layers.0.proj.weight").shape == (2 * (D - 3), D - 3)
    for x in checked:
        assert relative_error(run(child, x), run(gm, x)) < 1e-5


class UnevenChunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.up = nn.Embedding(VOCAB, D), nn.Linear(D, 5)
        self.down, self.head = nn.Linear(3, D), nn.Linear(D, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        a, b = self.up(x).chunk(2, dim=-1)         # pieces of 3 and 2
        return self.head(x + self.down(F.relu(a)) + b.sum(-1, keepdim=True))


def test_an_uneven_split_is_frozen_with_the_reason():
    inputs = _ids(2, 8, 0)
    gm = sg.trace(UnevenChunk().eval(), inputs)
    sg.analyze_channels(gm)
    reasons = [g.reason for g in gm.meta["subclone.channel_graph"].groups.values() if g.reason]
    assert any("aten.chunk" in r and "shorter last piece" in r for r in reasons), reasons


class PatchModel(nn.Module):
    """Images → patches by a convolution with ``padding="valid"`` → residual MLP layers."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, D, kernel_size=4, stride=4, padding="valid")
        self.layers = nn.ModuleList(nn.Sequential(nn.RMSNorm(D), nn.Linear(D, FFN), nn.ReLU(), nn.Linear(FFN, D))
                                    for _ in range(2))
        self.head = nn.Linear(D, 10)

    def forward(self, images):
        x = self.patch(images).flatten(2).transpose(1, 2)
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x.mean(1))


def test_a_convolution_with_a_string_padding_keeps_the_stream_prunable():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 16, 16)
    gm = sg.trace(PatchModel().eval(), (images,))
    sg.analyze_channels(gm)
    assert not gm.meta["subclone.unknown_ops"] and not groups_of(gm, "frozen")
    (stream,) = groups_of(gm, "residual")
    plant_dead(gm, {stream.id: [0, 3, D - 1]})
    checked = [(images,), (torch.randn(3, 3, 16, 16),)]
    child = sg.subclone(gm, (images,), sg.Target(hidden=D - 3), calibration=checked)
    assert child.get_parameter("patch.weight").shape == (D - 3, 3, 4, 4)
    for x in checked:
        assert relative_error(run(child, x), run(gm, x)) < 1e-5


class BlockStatesModel(nn.Module):
    """Each layer's output is stacked onto the states of the layers before it, a stack begun empty
    as ``x.new_zeros(b, s, 0, D)``; the head reads a learned mix of the stack (an attention over
    block residuals)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(nn.Sequential(nn.RMSNorm(D), nn.Linear(D, FFN), nn.ReLU(), nn.Linear(FFN, D))
                                    for _ in range(2))
        self.mix = nn.Parameter(torch.tensor([0.3, 0.7]))
        self.norm, self.head = nn.RMSNorm(D), nn.Linear(D, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        b, s, _ = x.shape
        states = x.new_zeros(b, s, 0, D)
        for layer in self.layers:
            x = x + layer(x)
            states = torch.cat([states, x.unsqueeze(-2)], dim=-2)
        return self.head(self.norm((states * self.mix[:, None]).sum(-2)))


def test_an_empty_tensor_in_a_cat_follows_the_others_off_the_cat_dim():
    # the empty start of the stack has the stream's width: joined to the stream, its literal D
    # is rewritten with it (not joined, the child's cat met a 32-wide and a 29-wide state)
    torch.manual_seed(0)
    inputs = _ids(2, 8, 0)
    gm = sg.trace(BlockStatesModel().eval(), inputs)
    sg.analyze_channels(gm)
    assert not gm.meta["subclone.unknown_ops"] and not groups_of(gm, "frozen")
    (stream,) = groups_of(gm, "residual")
    (empty,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.new_zeros.default]
    assert channel_groups(empty)[-1] == stream.id
    plant_dead(gm, {stream.id: [0, 5, D - 1]})
    checked = [inputs, _ids(3, 5, 7)]
    child = sg.subclone(gm, inputs, sg.Target(hidden=D - 3), calibration=checked)
    assert child.get_parameter("head.weight").shape == (VOCAB, D - 3)
    for x in checked:
        assert relative_error(run(child, x), run(gm, x)) < 1e-5


class RelativeBiasAttention(nn.Module):
    """Eager attention plus a per-head bias looked up by relative distance: a (heads, buckets) table
    gathered along its buckets by one bucket map expanded over the heads."""

    def __init__(self, buckets=6):
        super().__init__()
        self.buckets = buckets
        self.qkv, self.out = nn.Linear(D, 3 * HEADS * HEAD_DIM), nn.Linear(HEADS * HEAD_DIM, D)
        self.table = nn.Parameter(torch.randn(HEADS, buckets))

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        positions = torch.arange(s, device=x.device)
        bucket = (positions[None, :] - positions[:, None]).abs().clamp(0, self.buckets - 1)
        logits = self.table[None, :, None, :].expand(b, HEADS, s, self.buckets)
        bias = logits.gather(-1, bucket.expand(b, HEADS, s, s))
        scores = q @ k.transpose(-1, -2) * HEAD_DIM ** -0.5 + bias
        y = scores.softmax(-1) @ v
        return self.out(y.transpose(1, 2).reshape(b, s, HEADS * HEAD_DIM))


class RelativeBiasModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.norms = nn.ModuleList(nn.RMSNorm(D) for _ in range(2))
        self.layers = nn.ModuleList(RelativeBiasAttention() for _ in range(2))
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        for norm, layer in zip(self.norms, self.layers):
            x = x + layer(norm(x))
        return self.head(x)


def test_a_gather_by_computed_indices_keeps_its_other_dims_prunable():
    # the bias table's heads are the attention's heads: gathered along the buckets only, so planted
    # dead heads (their table rows too) go exactly; the buckets dim, read by computed indices, freezes
    torch.manual_seed(0)
    inputs = _ids(2, 8, 0)
    gm = sg.trace(RelativeBiasModel().eval(), inputs)
    sg.analyze_channels(gm)
    assert len(gm.meta["subclone.attention"]) == 2 and not gm.meta["subclone.unknown_ops"]
    reasons = [g.reason for g in gm.meta["subclone.channel_graph"].groups.values() if g.reason]
    assert any("gather reads computed indices" in r for r in reasons), reasons
    heads, kv_heads = plant_dead_heads(gm)
    checked = [inputs, _ids(3, 5, 7)]
    child = sg.subclone(gm, inputs, sg.Target(heads=heads, kv_heads=kv_heads), calibration=checked)
    assert child.get_parameter("layers.0.table").shape == (HEADS - 1, 6)
    for x in checked:
        assert relative_error(run(child, x), run(gm, x)) < 1e-5


class WindowMlp(nn.Module):
    """An MLP whose inner channels each run a causal short convolution over the positions, written
    as sliding windows (``unfold``) times a per-channel kernel."""

    def __init__(self, kernel=3):
        super().__init__()
        self.kernel = kernel
        self.norm, self.up, self.down = nn.RMSNorm(D), nn.Linear(D, FFN), nn.Linear(FFN, D)
        self.taps = nn.Parameter(torch.randn(FFN, kernel))

    def forward(self, x):
        h = F.relu(self.up(self.norm(x))).transpose(1, 2)                     # (b, ffn, s)
        windows = F.pad(h, (self.kernel - 1, 0)).unfold(-1, self.kernel, 1)    # (b, ffn, s, kernel)
        return x + self.down((windows * self.taps[:, None, :]).sum(-1).transpose(1, 2))


class WindowModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, D), nn.Linear(D, VOCAB)
        self.layers = nn.ModuleList(WindowMlp() for _ in range(2))

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_sliding_windows_keep_their_channels_prunable():
    torch.manual_seed(0)
    inputs = _ids(2, 8, 0)
    gm = sg.trace(WindowModel().eval(), inputs)
    sg.analyze_channels(gm)
    assert not gm.meta["subclone.unknown_ops"] and len(groups_of(gm, "ffn")) == 2
    plant_dead(gm, {g.id: list(range(1, FFN, 2)) for g in groups_of(gm, "ffn")})
    checked = [inputs, _ids(3, 5, 7)]
    # (unfold needs as many positions as its window: the trace keeps that guard, hence fixed_sizes)
    child = sg.subclone(gm, inputs, sg.Target(ffn=0.5), calibration=checked + [_ids(4, 16, 100)], fixed_sizes=True)
    assert child.get_parameter("layers.0.taps").shape == (FFN // 2, 3)
    for x in checked:
        assert relative_error(run(child, x), run(gm, x)) < 1e-5
