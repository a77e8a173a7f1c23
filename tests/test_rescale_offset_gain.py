"""The √(D/d) residual rescale on a norm whose gain is written ``c + w`` (the ``(1 + w)`` RMSNorm).

``RescaleResidualPass`` finds the gain from the graph — an ``add`` of a constant to the weight
that multiplies the normalised value — and folds the factor into the weight so that
``c + w' = factor·(c + w)``: the child keeps the parent's graph, so ``save_hf`` writes weights
the parent's class computes the child with. Checked: dead residual channels planted in a
generated ``(1 + w)`` model are removed with outputs unchanged (no ``mul`` inserted); every
Hugging Face family with that gain saves a shrunk-hidden child that reloads as the parent's class and equals the child, in float32 and
bfloat16. A gain cast before it multiplies (``weight.to(float32) * x``, a decomposed LayerNorm
computing in float32), or a normalised value cast back before its gain (``n(x.float()).type_as(x) *
weight``) takes the factor too.
"""
from __future__ import annotations

import pytest
import torch

import models
import subclone_graph as sg
from models.hf_families import FAMILIES
from random_transformers import Spec, build, inputs
from subclone_graph.passes import state
from subclone_testing import plant_dead, relative_error, run

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

aten = torch.ops.aten


def _float_muls(gm) -> int:
    """``mul`` nodes by a float constant (what an unfolded rescale inserts)."""
    return sum(1 for n in gm.graph.nodes if n.target is aten.mul.Tensor and any(type(a) is float for a in n.args))


@pytest.mark.parametrize("residual", ["pre", "post"])
def test_dead_residual_channels_of_a_one_plus_w_norm_go_with_the_gain_folded(residual):
    spec = Spec(norm="gemma", residual=residual, layers=2)
    example = inputs()
    gm = sg.trace(build(spec), example)
    sg.analyze_channels(gm)
    graph = state.CHANNEL_GRAPH.need(gm)
    stream = next(g for g in graph.groups.values() if g.kind == "residual")
    plant_dead(gm, {stream.id: list(range(24, stream.size))})
    child = sg.subclone(gm, example, sg.Target(hidden=24))
    assert state.RESCALE.need(child).factor == pytest.approx((stream.size / 24) ** 0.5)
    assert _float_muls(child) == _float_muls(gm), "the factor went into a mul, not into the (1 + w) gain"
    for x in (example, inputs(batch=3, seq=5, seed=7)):
        assert relative_error(run(child, x), run(gm, x)) < 1e-5


# the families of models/hf_families.py whose RMSNorm gain is (1 + w)
ONE_PLUS_W = ["gemma", "gemma2", "gemma3"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ONE_PLUS_W)
def test_save_hf_of_a_shrunk_hidden_one_plus_w_child_reloads_equal(name, dtype, tmp_path):
    if dtype is torch.bfloat16 and name != "gemma":
        pytest.skip("bfloat16 matmuls are slow on this CPU: one family carries the dtype check")
    model = FAMILIES[name].build(0).to(dtype)
    with torch.no_grad():         # gains away from their zero init, so that a wrong fold shows
        for param_name, p in model.named_parameters():
            if param_name.endswith("norm.weight"):
                p.normal_(0, 0.3)
    example = models.make_inputs(model)
    child = sg.subclone(model, example, sg.Target(hidden=48))
    assert state.RESCALE.need(child).factor > 1
    path = sg.save_hf(child, tmp_path / "child")
    loaded = type(model).from_pretrained(path, dtype=dtype).eval()
    assert loaded.config.hidden_size == 48
    # Gemma 3's QK-norms read the config's one ε as the stream norms do: the child scaled only the
    # stream norms' ε (by D/d), the reloaded class scales both (~1.6e-5 relative here)
    tolerance = 2e-2 if dtype is torch.bfloat16 else 1e-4 if name == "gemma3" else 1e-5
    assert relative_error(run(loaded, example), run(child, example)) < tolerance


class _CastGainNorm(torch.nn.Module):
    """A decomposed RMSNorm computing in float32 whose gain is cast first: ``weight.to(float32) * x``."""

    def __init__(self, width):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(width))

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight.to(torch.float32) * h


class _TypeAsNorm(torch.nn.Module):
    """An RMSNorm computing in float32 and cast back before its gain: ``n(x.float()).type_as(x) * weight``."""

    def __init__(self, width):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(width))

    def forward(self, x):
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(x) * self.weight


class _CastGainModel(torch.nn.Module):
    def __init__(self, d=32, vocab=40, norm=_CastGainNorm):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.norms = torch.nn.ModuleList(norm(d) for _ in range(2))
        self.mlps = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(d, 48), torch.nn.GELU(),
                                                            torch.nn.Linear(48, d)) for _ in range(2))
        self.final, self.head = norm(d), torch.nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for norm, mlp in zip(self.norms, self.mlps):
            x = x + mlp(norm(x))
        return self.head(self.final(x))


@pytest.mark.parametrize("norm", [_CastGainNorm, _TypeAsNorm])
def test_a_gain_cast_before_it_multiplies_takes_the_factor(norm):
    torch.manual_seed(0)
    example = (torch.randint(0, 40, (2, 8)),)
    gm = sg.trace(_CastGainModel(norm=norm).eval(), example)
    sg.analyze_channels(gm)
    stream = next(g for g in state.CHANNEL_GRAPH.need(gm).groups.values() if g.kind == "residual")
    plant_dead(gm, {stream.id: list(range(24, stream.size))})
    child = sg.subclone(gm, example, sg.Target(hidden=24))
    assert _float_muls(child) == _float_muls(gm), "the factor went into a mul, not into the cast gain"
    for x in (example, (torch.randint(0, 40, (3, 5)),)):
        assert relative_error(run(child, x), run(gm, x)) < 1e-5
