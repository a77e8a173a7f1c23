"""Analysis fixes the family sweep asked for, each on a small hand-written model that shows the
construct:

1. a reshape between a token dim merged with channels and another such merge (``(b, s·32, 3) →
   (b, 2·s, 48)``: an "unroll" of tokens into channels) refines into an atom whose size sympy
   computes from the dynamic sizes (``32·s / 2·s = 16``): that size is an ``int``, so the group it
   lands in is static (a sympy number reached ``torch.arange`` and crashed the choice);
2. a stage transition (a layer whose first part projects the stream to another width and is no
   residual block) cannot be dropped: a one-line refusal naming the layer, not a half-removed
   layer; a layer that is a block as a whole still drops exactly;
3. heads paired across two halves (differential attention: ``o1, o2 = y.chunk(2, heads)``,
   ``o1 - λ·o2``): the heads group is ``cat(p, p)`` of one group of pairs, so whole pairs are
   kept (the best by their summed scores) and a dead pair goes exactly; where a repeat of the
   values also groups the heads by kv head, the two orders conflict: a one-line refusal, and the
   rest of the target shrinks (both were a ``PassError`` of the choice);
4. a reshape whose sizes do not divide (a chunked attention's padded length viewed as chunks,
   ``(b, h, S, d) → (b, h, S // 4, 4, d)``) freezes only the dims between the leading and trailing
   dims both shapes share: the heads stay free, and planted dead heads go exactly (the heads were
   frozen: ``Target.heads`` refused);
5. two streams through one stack of layers (global tokens beside the sequence): the last layer's
   update of the stream nothing reads is dead code, no block (it was the layer's output, and
   removing another layer erased it: a crash of DropBlocksPass' postcondition); removing a layer
   that carries the second stream on is refused in one line before anything changes.
"""
from __future__ import annotations

import re

import pytest
import sympy
import torch
import torch.nn.functional as F
from subclone_testing import groups_of, plant_dead, plant_dead_heads, relative_error, run
from torch import nn

import subclone_graph as sg

VOCAB, D, FFN, HEADS, HEAD_DIM = 40, 32, 48, 4, 8


def _ids(batch, seq, seed):
    return (torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


class UnrolledMlp(nn.Module):
    """An MLP whose 96 hidden channels are unrolled with the tokens and rolled back."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, 96), nn.Linear(96, D)
        self.mix, self.ff = nn.Linear(48, 48), nn.Linear(D, FFN)
        self.ff_down = nn.Linear(FFN, D)

    def forward(self, x):
        b, s, _ = x.shape
        h = self.up(x).reshape(b, s * 32, 3)
        h = self.mix(F.gelu(h.reshape(b, 2 * s, 48)))      # atoms 2·s, 16, 3: 16 is sympy's 32·s / 2·s
        y = self.down(h.reshape(b, s, 96))
        return y + self.ff_down(F.relu(self.ff(x)))


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.mlp = nn.RMSNorm(D), UnrolledMlp()

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class UnrollNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(Layer() for _ in range(2))
        self.norm, self.head = nn.RMSNorm(D), nn.Linear(D, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def test_a_size_sympy_computes_is_an_int_and_the_unrolled_model_subclones():
    torch.manual_seed(0)
    model, inputs = UnrollNet().eval(), _ids(2, 8, 0)
    gm = sg.trace(model, inputs)
    sg.analyze_channels(gm)
    graph = gm.meta["subclone.channel_graph"]
    sizes = graph.sizes + [g.size for g in graph.groups.values()]
    assert not [s for s in sizes if isinstance(s, sympy.Basic) and s.is_number]
    same = sg.subclone(gm, inputs, sg.Target())          # crashed: arange(sympy.Integer)
    checked = [inputs, _ids(3, 5, 7)]
    for x in checked:
        assert relative_error(run(same, x), run(model, x)) < 1e-6
    ffn = [g for g in groups_of(gm, "ffn") if g.size == FFN]
    assert len(ffn) == 2
    plant_dead(gm, {g.id: list(range(1, FFN, 2)) for g in ffn})
    child = sg.subclone(gm, inputs, sg.Target(ffn=0.5), calibration=checked + [_ids(4, 16, 100)])
    assert child.get_parameter("layers.0.mlp.ff.weight").shape == (FFN // 2, D)
    for x in checked:
        assert relative_error(run(child, x), run(gm, x)) < 1e-5


class Mlp(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        return self.down(F.relu(self.up(x)))


class StageLayer(nn.Module):
    """A residual layer; ``widen``: its first part projects the stream to twice the width and
    adds a branch (a stage transition: ``proj(x) + lift(f(x))`` — no block)."""

    def __init__(self, width, widen):
        super().__init__()
        self.widen, out = widen, 2 * width if widen else width
        self.norm, self.norm2 = nn.RMSNorm(width), nn.RMSNorm(out)
        self.proj, self.branch = (nn.Linear(width, out), Mlp(width)) if widen else (None, None)
        self.lift = nn.Linear(width, out) if widen else None
        self.mlp = Mlp(out)

    def forward(self, x):
        if self.widen:
            h = self.norm(x)
            x = self.proj(h) + self.lift(self.branch(h))
        return x + self.mlp(self.norm2(x))


class StageNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList([StageLayer(D, False), StageLayer(D, True), StageLayer(2 * D, False)])
        self.head = nn.Linear(2 * D, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_a_layer_that_changes_the_stream_is_not_removed_and_says_so_in_one_line():
    torch.manual_seed(0)
    model, inputs = StageNet().eval(), _ids(2, 8, 0)
    gm = sg.trace(model, inputs)
    sg.analyze_channels(gm)
    assert len(gm.meta["subclone.layers"]) == 3
    with pytest.raises(ValueError) as error:        # the middle one: a PostconditionError of DropBlocksPass before
        sg.subclone(gm, inputs, sg.Target(layers=2))
    assert re.fullmatch(
        r"ChooseKeepPass: Target\.layers: layer 1 \(layers\.1\) cannot be removed: its first part changes the stream "
        r"\(s\d+×s\d+×32 → s\d+×s\d+×64\) and is no residual block; keep it \(drop_layers=\[\.\.\.\] names layers "
        r"that can go\)", str(error.value)), str(error.value)
    assert "\n" not in str(error.value)
    # a layer that is a residual block as a whole goes: the child is the parent without it
    gm.get_parameter("layers.2.mlp.down.weight").data.zero_()
    gm.get_parameter("layers.2.mlp.down.bias").data.zero_()
    child = sg.subclone(gm, inputs, sg.Target(), drop_layers=[2])
    assert not any(name.startswith("layers.2.") for name, _ in child.named_parameters())
    for x in (inputs, _ids(3, 6, 7)):
        assert relative_error(run(child, x), run(gm, x)) < 1e-6


class PairedAttention(nn.Module):
    """Differential-style attention: head ``i`` and head ``i + HEADS/2`` are combined, the
    output's heads are ``cat(p, p)`` of one group of pairs (``chunk`` then ``o1 - λ·o2``)."""

    def __init__(self, grouped=False):
        super().__init__()
        self.grouped = grouped
        self.q, self.k, self.v = (nn.Linear(D, HEADS * HEAD_DIM) for _ in range(3))
        self.lam = nn.Parameter(torch.tensor(0.3))
        self.out = nn.Linear(HEADS // 2 * HEAD_DIM, D)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, HEADS, HEAD_DIM).transpose(1, 2) for p in (self.q, self.k, self.v))
        if self.grouped:        # the values' halves each repeated back to every head (a repeat: kv grouping)
            v = v[:, : HEADS // 2].repeat(1, 2, 1, 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        first, second = y.chunk(2, dim=1)
        y = first - self.lam * second
        return self.out(y.transpose(1, 2).reshape(b, s, HEADS // 2 * HEAD_DIM))


class PairedLayer(nn.Module):
    def __init__(self, grouped):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(D), nn.RMSNorm(D)
        self.attn, self.mlp = PairedAttention(grouped), Mlp(D)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PairedNet(nn.Module):
    def __init__(self, grouped=False):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(PairedLayer(grouped) for _ in range(2))
        self.norm, self.head = nn.RMSNorm(D), nn.Linear(D, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def test_heads_that_pair_across_two_halves_keep_whole_pairs_and_dead_pairs_go_exactly():
    torch.manual_seed(0)
    model, inputs = PairedNet().eval(), _ids(2, 8, 0)
    gm = sg.trace(model, inputs)
    sg.analyze_channels(gm)
    same = sg.subclone(gm, inputs, sg.Target())
    checked = [inputs, _ids(3, 5, 7)]
    for x in checked:
        assert relative_error(run(same, x), run(model, x)) < 1e-6
    for i in range(2):          # pair 1 (heads 1 and 3) dead: its values are zero
        v = gm.get_submodule(f"layers.{i}.attn.v")
        for head in (1, 3):
            v.weight.data[head * HEAD_DIM:(head + 1) * HEAD_DIM] = 0
            v.bias.data[head * HEAD_DIM:(head + 1) * HEAD_DIM] = 0
    child = sg.subclone(gm, inputs, sg.Target(heads=2), calibration=checked + [_ids(4, 16, 100)])
    # was a PassError: the heads' top-2 did not keep whole pairs
    assert child.get_parameter("layers.0.attn.q.weight").shape == (2 * HEAD_DIM, D)
    assert child.get_parameter("layers.0.attn.out.weight").shape == (D, HEAD_DIM)
    for x in checked:
        assert relative_error(run(child, x), run(gm, x)) < 1e-5
    with pytest.raises(ValueError, match=r"^ChooseKeepPass: Target.heads: .* a multiple of 2, not 3$"):
        sg.subclone(gm, inputs, sg.Target(heads=3))


def test_paired_heads_also_grouped_by_a_repeat_of_the_values_refuse_in_one_line():
    torch.manual_seed(0)
    model, inputs = PairedNet(grouped=True).eval(), _ids(2, 8, 0)
    gm = sg.trace(model, inputs)
    sg.analyze_channels(gm)
    with pytest.raises(ValueError) as error:
        sg.subclone(gm, inputs, sg.Target(heads=0.5, kv_heads=0.5))
    assert str(error.value) == (
        "ChooseKeepPass: Target.heads cannot shrink this model: aten.chunk.default (chunk in layers.0.attn) makes "
        "its 4 heads 2 copies of one group of heads (head i pairs with head i + 2) and its attention also groups "
        "them by key/value head; the two orders cannot both be kept")
    child = sg.subclone(gm, inputs, sg.Target(hidden=0.5, ffn=0.5))       # the rest still shrinks
    assert child.get_parameter("layers.0.attn.q.weight").shape == (HEADS * HEAD_DIM, D // 2)


class ChunkedAttention(nn.Module):
    """Attention whose queries are mixed within chunks of 4 tokens (the sequence padded to a
    multiple of 4, viewed as chunks: ``(b, h, S, d) → (b, h, S // 4, 4, d)`` with ``S`` a padded
    length sympy cannot divide), as a chunked linear attention does."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(D, HEADS * HEAD_DIM) for _ in range(3))
        self.out = nn.Linear(HEADS * HEAD_DIM, D)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, HEADS, HEAD_DIM).transpose(1, 2) for p in (self.q, self.k, self.v))
        pad = (4 - s % 4) % 4 + 4                # at least two chunks: one would be a size export guards
        chunks = F.pad(q, (0, 0, 0, pad)).reshape(b, HEADS, -1, 4, HEAD_DIM)
        mixed = (chunks * torch.linspace(0.5, 1.0, 4)[:, None]).sum(3, keepdim=True).expand_as(chunks)
        q = q + 0.1 * mixed.reshape(b, HEADS, -1, HEAD_DIM)[:, :, :s]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, s, HEADS * HEAD_DIM))


class ChunkedNet(PairedNet):
    def __init__(self):
        super().__init__()
        for layer in self.layers:
            layer.attn = ChunkedAttention()


def test_an_undivided_reshape_freezes_only_the_dims_between_the_ends_both_shapes_share():
    torch.manual_seed(0)
    model, inputs = ChunkedNet().eval(), _ids(2, 8, 0)
    gm = sg.trace(model, inputs)
    sg.analyze_channels(gm)
    graph = gm.meta["subclone.channel_graph"]
    frozen = [g for g in graph.groups.values() if g.reason and "do not divide" in g.reason]
    assert frozen and all(not g.static for g in frozen)        # the padded sequence only
    sites = gm.meta["subclone.attention"]
    assert len(sites) == 2 and all(graph.groups[s.heads].reason is None for s in sites)
    checked = [inputs, _ids(3, 5, 7)]
    heads, kv_heads = plant_dead_heads(gm)          # was refused: the heads were frozen by the reshape
    child = sg.subclone(gm, inputs, sg.Target(heads=heads, kv_heads=kv_heads),
                        calibration=checked + [_ids(4, 16, 100)])
    assert child.get_parameter("layers.0.attn.q.weight").shape == ((HEADS - 1) * HEAD_DIM, D)
    for x in checked + [_ids(2, 7, 3)]:
        assert relative_error(run(child, x), run(gm, x)) < 1e-5


class TwoStreamLayer(nn.Module):
    """Carries two streams: ``x`` reads ``g`` (as global tokens do), ``g`` goes on by itself."""

    def __init__(self):
        super().__init__()
        self.norm, self.norm_g = nn.RMSNorm(D), nn.RMSNorm(D)
        self.mlp, self.mlp_g, self.read = Mlp(D), Mlp(D), nn.Linear(D, D)

    def forward(self, x, g):
        x = x + self.mlp(self.norm(x) + self.read(g))
        g = g + self.mlp_g(self.norm_g(g))
        return x, g


class TwoStreamNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.embed_g = nn.Embedding(VOCAB, D), nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(TwoStreamLayer() for _ in range(3))
        self.norm, self.head = nn.RMSNorm(D), nn.Linear(D, VOCAB)

    def forward(self, ids):
        x, g = self.embed(ids), self.embed_g(ids)
        for layer in self.layers:
            x, g = layer(x, g)
        return self.head(self.norm(x))          # the last layer's update of g is dead code


def test_a_dead_add_is_no_block_and_a_layer_carrying_a_second_stream_on_refuses_in_one_line():
    torch.manual_seed(0)
    model, inputs = TwoStreamNet().eval(), _ids(2, 8, 0)
    gm = sg.trace(model, inputs)
    sg.analyze_channels(gm)
    layers = gm.meta["subclone.layers"]
    nodes = {n.name: n for n in gm.graph.nodes}
    assert len(layers) == 3
    assert len(layers[2].blocks) == 1 and nodes[layers[2].output].users      # its g update was the output: dead
    with pytest.raises(ValueError) as error:          # a PostconditionError of DropBlocksPass before
        sg.subclone(gm, inputs, sg.Target(), drop_layers=[2])
    assert re.fullmatch(r"DropBlocksPass: Target\.layers: layer 2 \(layers\.2\) cannot be removed: add_\d+, the stream of "
                        r"layer 1 \(layers\.1\), is read only by the dropped layers \(they carry a second stream on\); "
                        r"leave Target\.layers and drop_layers unset", str(error.value)), str(error.value)
    child = sg.subclone(gm, inputs, sg.Target(ffn=0.5))     # the rest still subclones
    assert child.get_parameter("layers.2.mlp.up.weight").shape == (D, D)
