"""Experts dispatched by advanced indexing over the expert dim (the gpt-oss form), with an
interleaved gate/up (``h[:, 0::2]``, ``h[:, 1::2]``), on a small hand-written mixture of experts:

1. ``bias[sorted_expert_ids]`` — a per-expert tensor indexed by the router's sorted top-k picks —
   relates its expert dim to the router's output dim (the values point there), as the grouped
   matmul's offsets do: nothing freezes, the MLP width and the experts are groups to shrink;
2. the strided slices ``0::2`` / ``1::2`` of the fused gate/up are one factor (gate i and up i are
   neuron i): every other neuron planted dead, in every expert, is removed exactly;
3. an expert the router never picks, planted dead, is removed by ``Target.experts`` with the
   outputs unchanged (router rows, expert tensors and per-expert biases sliced together).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from subclone_testing import groups_of, plant_dead, relative_error, run
from torch import nn

import subclone_graph as sg

VOCAB, D, E, K, FFN = 40, 32, 4, 2, 16


def grouped_mm(x, w, offsets):
    """transformers' portable grouped matmul (a custom op; torch's own needs bfloat16 on the CPU)."""
    import transformers.integrations.moe  # noqa: F401  (registers the op)
    return torch.ops.transformers.grouped_mm_fallback(x, w, offsets)


class IndexedExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(D, E)
        self.gate_up = nn.Parameter(torch.randn(E, D, 2 * FFN) / D ** 0.5)
        self.gate_up_bias = nn.Parameter(torch.randn(E, 2 * FFN) * 0.1)
        self.down = nn.Parameter(torch.randn(E, FFN, D) / FFN ** 0.5)
        self.down_bias = nn.Parameter(torch.randn(E, D) * 0.1)

    def forward(self, x):
        b, s, d = x.shape
        flat = x.reshape(-1, d)
        weights, ids = torch.topk(self.router(flat), K, dim=-1)
        weights, ids = weights.softmax(-1).reshape(-1), ids.reshape(-1)
        sorted_ids, order = torch.sort(ids)
        rows = flat[order // K]
        offsets = torch.histc(sorted_ids.float(), bins=E, min=0, max=E - 1).cumsum(0).to(torch.int32)
        h = grouped_mm(rows, self.gate_up, offsets) + self.gate_up_bias[sorted_ids]
        h = F.silu(h[:, 0::2]) * h[:, 1::2]
        out = grouped_mm(h, self.down, offsets) + self.down_bias[sorted_ids]
        out = out * weights[order].unsqueeze(-1)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.shape[0])
        return out[inverse].view(-1, K, d).sum(1).view(b, s, d)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(D), nn.RMSNorm(D)
        self.mix, self.experts = nn.Linear(D, D), IndexedExperts()

    def forward(self, x):
        x = x + self.mix(self.norm1(x))
        return x + self.experts(self.norm2(x))


class Model(nn.Module):
    def __init__(self, layers=2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(Layer() for _ in range(layers))
        self.norm, self.head = nn.RMSNorm(D), nn.Linear(D, VOCAB, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def _ids(batch, seq, seed):
    return (torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


@pytest.fixture()
def parent():
    torch.manual_seed(0)
    model, inputs = Model().eval(), _ids(2, 8, 0)
    gm = sg.trace(model, inputs)
    sg.analyze_channels(gm)
    return model, inputs, gm


def test_indexed_experts_and_interleaved_halves_stay_prunable(parent):
    _, _, gm = parent
    assert not gm.meta["subclone.unknown_ops"]
    frozen = [g.reason for g in groups_of(gm, "frozen")]
    assert not frozen, frozen
    assert sorted(g.size for g in groups_of(gm, "ffn")) == [FFN, FFN]
    assert len(groups_of(gm, "experts")) == 2


def test_planted_dead_neurons_of_every_expert_are_removed_exactly(parent):
    model, inputs, gm = parent
    same = sg.subclone(gm, inputs, sg.Target())
    for x in (inputs, _ids(3, 5, 7)):
        assert relative_error(run(same, x), run(model, x)) < 1e-6
    plant_dead(gm, {g.id: list(range(1, FFN, 2)) for g in groups_of(gm, "ffn")})
    checked = [inputs, _ids(3, 5, 7)]
    child = sg.subclone(gm, inputs, sg.Target(ffn=0.5), calibration=checked)
    assert child.get_parameter("layers.0.experts.gate_up").shape == (E, D, FFN)
    assert child.get_parameter("layers.0.experts.gate_up_bias").shape == (E, FFN)
    for x in checked:
        assert relative_error(run(child, x), run(gm, x)) < 1e-5


def test_an_expert_never_routed_to_is_removed_exactly(parent):
    _, inputs, gm = parent
    with torch.no_grad():
        for i in range(2):
            gm.get_parameter(f"layers.{i}.experts.router.bias")[E - 1] = -1e4      # never picked
    checked = [inputs, _ids(3, 5, 7)]
    child = sg.subclone(gm, inputs, sg.Target(experts=E - 1), calibration=checked)
    assert child.get_parameter("layers.0.experts.router.weight").shape == (E - 1, D)
    assert child.get_parameter("layers.0.experts.down_bias").shape == (E - 1, D)
    for x in checked:
        assert relative_error(run(child, x), run(gm, x)) < 1e-5
