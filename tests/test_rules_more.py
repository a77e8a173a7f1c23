"""Rules for index / index_put / index_add, pad, the transpose aliases, broadcast_to, and repeat
with a computed count: each in a small hand-written residual model.

Each model checks (a) the groups: the op freezes only the dims it must, so the residual stream
(and the heads) stay prunable, and (b) numbers: the identity target gives the same outputs,
a real reduction runs at another batch / sequence size, and planted dead residual channels
are removed with the outputs unchanged.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from subclone_testing import plant_dead, relative_error, run
from torch import nn

import subclone_graph as sg
from subclone_graph.passes.state import channel_groups

torch.manual_seed(0)
VOCAB, D, FFN, HEADS, KV, HEAD_DIM = 40, 32, 64, 4, 2, 8


def _analysed(model, inputs):
    gm = sg.trace(model, inputs)
    return gm, sg.analyze_channels(gm)


def _built(model_class, inputs):
    """(model, inputs, traced graph, channel graph) for a module fixture."""
    torch.manual_seed(0)
    model = model_class().eval()
    return model, inputs, *_analysed(model, inputs)


def _kinds(graph, kind):
    return [g for g in graph.groups.values() if g.kind == kind]


def _node(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def _group(gm, graph, node, dim):
    return graph.groups[channel_groups(node)[dim]]


class Mlp(nn.Module):
    def __init__(self, d=D, f=FFN):
        super().__init__()
        self.up, self.down = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        return self.down(F.relu(self.up(x)))


# --------------------------------------------------------------------------------------------
# 1. index / index_put / index_add: token gathers of a mixture-of-experts layer
# --------------------------------------------------------------------------------------------
class RoutedLayer(nn.Module):
    """Routes tokens: gathers them (``flat[order]``), runs an MLP on the gathered tokens and
    writes the results back (``index_put``, or ``index_add``); then shuffles tokens within each
    sequence (``h[rows, perm]``: two index tensors broadcast to (batch, seq)) before a linear."""

    def __init__(self, add: bool):
        super().__init__()
        self.add = add
        self.norm1, self.norm2 = nn.RMSNorm(D), nn.RMSNorm(D)
        self.router, self.expert, self.mixer = nn.Linear(D, 1), Mlp(), nn.Linear(D, D)

    def forward(self, x):
        batch, seq, _ = x.shape
        flat = self.norm1(x).reshape(-1, D)
        order = torch.argsort(self.router(flat).squeeze(-1))
        y = self.expert(flat[order])                                # aten.index.Tensor
        if self.add:
            back = torch.zeros_like(flat).index_add(0, order, y)
        else:
            back = torch.zeros_like(flat).index_put((order,), y)
        x = x + back.view(batch, seq, D)
        h = self.norm2(x)
        perm = torch.argsort(h.sum(-1), dim=-1)                     # (batch, seq)
        rows = torch.arange(batch, device=x.device)[:, None]        # (batch, 1)
        return x + self.mixer(h[rows, perm])


class Routed(nn.Module):
    def __init__(self, layers=2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(RoutedLayer(add=i % 2 == 1) for i in range(layers))
        self.norm, self.head = nn.RMSNorm(D), nn.Linear(D, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def _ids(batch, seq, seed):
    return (torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


def _check_model(model, inputs, calib, target, other=(3, 11), make=_ids):
    """Identity child equals the parent; a reduced child runs at another size."""
    other_inputs = make(*other, 7)
    same = sg.subclone(model, inputs, sg.Target())
    for x in (inputs, other_inputs):
        assert relative_error(run(same, x), run(model, x)) < 1e-5
    child = sg.subclone(model, inputs, target, calibration=calib)
    out = run(child, other_inputs)
    assert out.shape == run(model, other_inputs).shape and torch.isfinite(out).all()
    assert sg.count_parameters(child) < sg.count_parameters(model)
    return child


def _check_dead_residual(model, inputs, make=_ids, dead=(0, 5, D - 1)):
    gm, graph = _analysed(model, inputs)
    (residual,) = _kinds(graph, "residual")
    plant_dead(gm, {residual.id: list(dead)})
    calib = [make(2, 8, 100 + i) for i in range(2)]
    child = sg.subclone(gm, inputs, sg.Target(hidden=residual.size - len(dead)), calibration=calib)
    for x in (inputs, make(3, 5, 7)):
        assert relative_error(run(child, x), run(gm, x)) < 1e-4


@pytest.fixture(scope="module")
def routed():
    return _built(Routed, _ids(2, 8, 0))


def test_a_token_gather_freezes_only_the_gathered_dim(routed):
    _, _, gm, graph = routed
    assert not gm.meta["subclone.unknown_ops"]
    (residual,) = _kinds(graph, "residual")
    assert residual.size == D and residual.reason is None
    assert len(_kinds(graph, "ffn")) == 2 and not _kinds(graph, "frozen")
    gathers = _node(gm, torch.ops.aten.index.Tensor)
    assert len(gathers) == 4
    for node in gathers:
        x = node.args[0]
        assert _group(gm, graph, node, -1) is _group(gm, graph, x, -1) is residual
        assert _group(gm, graph, x, 0).reason is not None       # the dim the indices point into
    # the index tensors' dims are the output's token dims (two broadcast index tensors: (b, 1), (b, s))
    shuffle = gathers[1]
    rows, perm = shuffle.args[1]
    assert graph.find(channel_groups(perm)[1]) == graph.find(channel_groups(shuffle)[1])
    assert graph.find(channel_groups(rows)[0]) == graph.find(channel_groups(shuffle)[0])
    for op in (torch.ops.aten.index_put.default, torch.ops.aten.index_add.default):
        (node,) = _node(gm, op)
        values = node.args[2] if op is torch.ops.aten.index_put.default else node.args[3]
        assert _group(gm, graph, node, 1) is _group(gm, graph, values, 1) is residual


def test_a_token_gather_model_subclones(routed):
    model, inputs, _, _ = routed
    calib = [_ids(4, 8, 100 + i) for i in range(3)]
    child = _check_model(model, inputs, calib, sg.Target(hidden=16, ffn=32))
    assert child.get_parameter("layers.0.expert.up.weight").shape == (32, 16)
    assert child.get_parameter("layers.1.mixer.weight").shape == (16, 16)


def test_dead_residual_channels_read_through_token_gathers_are_removed_exactly(routed):
    model, inputs, _, _ = routed
    _check_dead_residual(model, inputs)


class Indexed(nn.Module):
    """One index pattern on x: (batch, 5, 6, 7); every static dim has its own size."""

    def __init__(self, pattern):
        super().__init__()
        self.pattern = pattern
        self.register_buffer("i3", torch.tensor([0, 2, 1]))
        self.register_buffer("i4", torch.tensor([3, 0, 1, 2]))

    def forward(self, x):
        return self.pattern(self, x).sum()


INDEX_PATTERNS = {
    "one": lambda m, x: x[:, :, m.i3],                        # (b, 5, 3, 7)
    "two_broadcast": lambda m, x: x[:, m.i3[:, None], m.i4],  # (b, 3, 4, 7): index shapes (3, 1), (4,)
    "gap": lambda m, x: x[m.i3[:1], :, m.i4],                 # (4, 5, 7): the index dims move first
    "mask": lambda m, x: x[x.sum((2, 3)) > 0],                # a boolean mask over (b, 5)
}


@pytest.mark.parametrize("pattern", INDEX_PATTERNS)
def test_index_rule_dim_by_dim(pattern):
    gm, graph = _analysed(Indexed(INDEX_PATTERNS[pattern]), (torch.randn(2, 5, 6, 7),))
    (node,) = _node(gm, torch.ops.aten.index.Tensor)
    x, indices = node.args
    g = lambda n, dim: _group(gm, graph, n, dim)
    if pattern in ("gap", "mask"):                 # cannot be told without the index values
        assert all(g(x, d).reason for d in (1, 2, 3))
        return
    indexed = {"one": [2], "two_broadcast": [1, 2]}[pattern]
    for d in (1, 2, 3):
        assert (g(x, d).reason is not None) == (d in indexed)
    assert g(node, 3) is g(x, 3) and g(node, 0) is g(x, 0)
    if pattern == "one":
        assert g(node, 1) is g(x, 1) and g(node, 2) is g(indices[2], 0)
    else:
        assert g(node, 1) is g(indices[1], 0) and g(node, 2) is g(indices[2], 0)
        assert g(node, 1).size == 3 and g(node, 2).size == 4


# --------------------------------------------------------------------------------------------
# 2. a relative-position table read by index, pads: a windowed image model
# --------------------------------------------------------------------------------------------
GRID = 4


def _relative_index(grid):
    coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + grid - 1
    return (rel[..., 0] * (2 * grid - 1) + rel[..., 1]).flatten()


class WindowLayer(nn.Module):
    """Attention with a relative-position bias gathered from a table (``table[index]``:
    (49, heads)); a token mixer that pads the 4×4 grid (constant and replicate), never the
    channels; an MLP."""

    def __init__(self):
        super().__init__()
        self.register_buffer("rel_index", _relative_index(GRID))
        self.table = nn.Parameter(torch.randn((2 * GRID - 1) ** 2, HEADS) * 0.5)
        self.qkv, self.proj = nn.Linear(D, 3 * HEADS * HEAD_DIM), nn.Linear(HEADS * HEAD_DIM, D)
        self.mix, self.mlp = nn.Linear(D, D), Mlp()
        self.norm1, self.norm2, self.norm3 = nn.RMSNorm(D), nn.RMSNorm(D), nn.RMSNorm(D)

    def attention(self, h):
        b, n, _ = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        bias = self.table[self.rel_index].view(n, n, HEADS).permute(2, 0, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, HEADS * HEAD_DIM))

    def mixer(self, h):
        b = h.shape[0]
        grid = h.view(b, GRID, GRID, D)
        shifted = F.pad(grid, (0, 0, 0, 1, 0, 1))[:, 1:, 1:] - grid      # pads rows and columns
        pooled = F.avg_pool2d(F.pad(grid.permute(0, 3, 1, 2), (1, 1, 1, 1), mode="replicate"), 3, 1)
        return self.mix((shifted + pooled.permute(0, 2, 3, 1)).reshape(b, GRID * GRID, D))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        x = x + self.mixer(self.norm2(x))
        return x + self.mlp(self.norm3(x))


class WindowNet(nn.Module):
    def __init__(self, layers=2, classes=10):
        super().__init__()
        self.patch = nn.Conv2d(3, D, 2, stride=2)
        self.layers = nn.ModuleList(WindowLayer() for _ in range(layers))
        self.norm, self.head = nn.RMSNorm(D), nn.Linear(D, classes)

    def forward(self, images):
        x = self.patch(images).flatten(2).transpose(1, 2)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x).mean(1))


def _images(batch, seq, seed):
    return (torch.randn(batch, 3, 2 * GRID, 2 * GRID, generator=torch.Generator().manual_seed(seed)),)


@pytest.fixture(scope="module")
def window():
    return _built(WindowNet, _images(2, 0, 0))


def test_a_position_table_and_pads_leave_channels_and_heads_prunable(window):
    _, _, gm, graph = window
    assert not gm.meta["subclone.unknown_ops"]
    assert not _kinds(graph, "frozen"), [g.reason for g in _kinds(graph, "frozen")]
    (residual,) = _kinds(graph, "residual")
    heads = _kinds(graph, "heads")
    assert len(heads) == 2 and all(g.size == HEADS for g in heads)
    tables = {name: g for g in heads for name, dim in g.tensors if name.endswith("table") and dim == 1}
    assert len(tables) == 2
    pads = _node(gm, torch.ops.aten.pad.default)
    assert len(pads) == 4
    for node in pads:
        channel = 1 if node.args[2:3] == ("replicate",) else 3
        assert _group(gm, graph, node, channel) is residual is _group(gm, graph, node.args[0], channel)
        padded = [d for d in range(4) if d not in (0, channel)]
        assert all("padded" in _group(gm, graph, node, d).reason for d in padded)


def test_a_windowed_model_subclones(window):
    model, inputs, _, _ = window
    calib = [_images(4, 0, 100 + i) for i in range(3)]
    child = _check_model(model, inputs, calib, sg.Target(hidden=16, heads=2, ffn=32), make=_images)
    assert child.get_parameter("layers.0.table").shape == ((2 * GRID - 1) ** 2, 2)
    assert child.get_parameter("layers.1.qkv.weight").shape == (3 * 2 * HEAD_DIM, 16)


def test_dead_residual_channels_through_pads_are_removed_exactly(window):
    model, inputs, _, _ = window
    _check_dead_residual(model, inputs, make=_images)


class Padded(nn.Module):
    def __init__(self, op, width):
        super().__init__()
        self.embed, self.mlp, self.head, self.op = nn.Embedding(VOCAB, D), Mlp(), nn.Linear(width, VOCAB), op

    def forward(self, ids):
        x = self.embed(ids)
        x = x + self.mlp(x)
        return self.head(self.op(x))


PAD_CASES = {   # (op, head width, channels padded)
    "pad_channels": (lambda x: F.pad(x, (1, 1)), D + 2, True),
    "constant_pad_nd_channels": (lambda x: torch.constant_pad_nd(x, [0, 2, 0, 0]), D + 2, True),
    "constant_pad_nd_tokens": (lambda x: torch.constant_pad_nd(x, [0, 0, 1, 0]), D, False),
    "reflect_tokens": (lambda x: F.pad(x.transpose(1, 2), (2, 1), mode="reflect").transpose(1, 2), D, False),
}


@pytest.mark.parametrize("case", PAD_CASES)
def test_a_pad_freezes_the_padded_dims_only(case):
    op, width, channels_padded = PAD_CASES[case]
    gm, graph = _analysed(Padded(op, width), _ids(2, 8, 0))
    if channels_padded:
        (frozen,) = _kinds(graph, "frozen")
        assert frozen.role == "residual" and "padded dim" in frozen.reason
    else:
        (residual,) = _kinds(graph, "residual")
        assert not _kinds(graph, "frozen")
        (node,) = [n for n in gm.graph.nodes if n.target in (torch.ops.aten.pad.default,
                                                              torch.ops.aten.constant_pad_nd.default)]
        channel = node.meta["val"].shape.index(D)
        assert _group(gm, graph, node, channel) is residual is _group(gm, graph, node.args[0], channel)
        assert "padded dim" in _group(gm, graph, node, 1 if channel == 2 else 2).reason


# --------------------------------------------------------------------------------------------
# 3 + 4. transpose aliases, broadcast_to (a GQA repeat), repeat by a computed count (ALiBi-like)
# --------------------------------------------------------------------------------------------
class AliasLayer(nn.Module):
    """GQA attention whose kv heads are repeated with ``broadcast_to``, an ALiBi-like bias made
    with ``slopes.repeat(batch, 1, 1)`` (a count computed in the graph), and the transpose
    aliases (``.mT``, ``.mH``, ``adjoint``, ``.T``) on activations; an MLP."""

    def __init__(self):
        super().__init__()
        self.q, self.kv = nn.Linear(D, HEADS * HEAD_DIM), nn.Linear(D, 2 * KV * HEAD_DIM)
        self.o, self.mlp = nn.Linear(HEADS * HEAD_DIM, D), Mlp()
        self.norm1, self.norm2 = nn.RMSNorm(D), nn.RMSNorm(D)
        self.register_buffer("slopes", torch.tensor([2.0 ** -(i + 1) for i in range(HEADS)]))

    def attention(self, h):
        b, s, _ = h.shape
        q = self.q(h).view(b, s, HEADS, HEAD_DIM).transpose(1, 2)
        k, v = self.kv(h).view(b, s, 2, KV, HEAD_DIM).permute(2, 0, 3, 1, 4)
        k = k.mT.mH.mT.mH                       # (b, kv, s, hd) there and back: aten.mT / aten.mH
        rep = HEADS // KV
        k, v = [t[:, :, None].broadcast_to(b, KV, rep, s, HEAD_DIM).reshape(b, HEADS, s, HEAD_DIM) for t in (k, v)]
        alibi = self.slopes.view(HEADS, 1, 1).repeat(b, 1, 1).view(b, HEADS, 1, 1)
        distance = torch.arange(s, device=h.device, dtype=h.dtype)
        mask = alibi * (distance[None, :] - distance[:, None]).abs().neg()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        flat = out.transpose(1, 2).reshape(b * s, HEADS * HEAD_DIM)
        return self.o(torch.adjoint(flat.T).view(b, s, HEADS * HEAD_DIM))   # numpy_T, adjoint

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AliasNet(nn.Module):
    def __init__(self, layers=2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(AliasLayer() for _ in range(layers))
        self.norm, self.head = nn.RMSNorm(D), nn.Linear(D, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


@pytest.fixture(scope="module")
def alias():
    return _built(AliasNet, _ids(2, 8, 0))


def test_transpose_aliases_and_broadcast_to_are_permutations_and_a_gqa_repeat(alias):
    _, _, gm, graph = alias
    assert not gm.meta["subclone.unknown_ops"]
    assert not _kinds(graph, "frozen"), [g.reason for g in _kinds(graph, "frozen")]
    assert len(_kinds(graph, "residual")) == 1 and len(_kinds(graph, "ffn")) == 2
    sites = gm.meta["subclone.attention"]
    assert len(sites) == 2 and all(s.rep is not None for s in sites)
    assert all(graph.groups[s.kv_heads].size == KV and graph.groups[s.heads].size == HEADS for s in sites)
    aten = torch.ops.aten
    seen = set()
    for node in gm.graph.nodes:
        if node.target in (aten.mT.default, aten.mH.default, aten.adjoint.default, aten.numpy_T.default):
            seen.add(node.target)
            ins, outs = channel_groups(node.args[0]), channel_groups(node)
            order = list(range(len(ins)))[::-1] if node.target is aten.numpy_T.default else \
                list(range(len(ins) - 2)) + [len(ins) - 1, len(ins) - 2]
            assert [graph.find(outs[d]) for d in range(len(outs))] == [graph.find(ins[d]) for d in order]
    assert seen == {aten.mT.default, aten.mH.default, aten.adjoint.default, aten.numpy_T.default}
    assert len(_node(gm, aten.broadcast_to.default)) == 4


def test_a_repeat_by_a_computed_count_stores_no_node_and_the_graph_deep_copies(alias):
    _, _, gm, graph = alias
    (repeat, *_) = _node(gm, torch.ops.aten.repeat.default)
    assert isinstance(repeat.args[1][0], torch.fx.Node)         # the batch size, computed in the graph
    assert not any(isinstance(s, torch.fx.Node) for s in graph.sizes)
    slopes = [g for g in graph.groups.values() for name, dim in g.tensors if name.endswith("slopes")]
    assert len(slopes) == 2 and all(g.kind == "heads" for g in slopes)
    copied = copy.deepcopy(gm)
    assert len(copied.meta["subclone.channel_graph"].sizes) == len(graph.sizes)


def test_an_aliased_gqa_model_subclones(alias):
    model, inputs, _, _ = alias
    calib = [_ids(4, 8, 100 + i) for i in range(3)]
    child = _check_model(model, inputs, calib, sg.Target(hidden=16, heads=2, kv_heads=1, ffn=32))
    assert child.get_buffer("layers.0.slopes").shape == (2,)
    assert child.get_parameter("layers.1.kv.weight").shape == (2 * HEAD_DIM, 16)


def test_dead_residual_channels_through_aliases_are_removed_exactly(alias):
    model, inputs, _, _ = alias
    _check_dead_residual(model, inputs)


class AliasMlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Parameter(torch.randn(FFN, D) / math.sqrt(D))
        self.down = nn.Parameter(torch.randn(D, FFN) / math.sqrt(FFN))

    def forward(self, x):
        return x + F.relu(x @ self.up.mT) @ self.down.T


class WeightThroughAlias(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.layers, self.head = nn.Embedding(VOCAB, D), nn.ModuleList([AliasMlp()]), nn.Linear(D, VOCAB)

    def forward(self, ids):
        return self.head(self.layers[0](self.embed(ids)))


def test_a_weight_read_through_a_transpose_alias_is_a_weight():
    _, graph = _analysed(WeightThroughAlias(), _ids(2, 8, 0))
    assert len(_kinds(graph, "residual")) == 1 and len(_kinds(graph, "ffn")) == 1
