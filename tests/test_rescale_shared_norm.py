"""The √(D/d) residual rescale on a norm whose weight several norms share (one layer applied
several times in a loop, one norm module reused).

``RescaleResidualPass`` scales a shared weight once when every use of it is the gain (or bias)
of a norm over the shrunk stream taking the same factor: the child keeps the parent's graph (no
``mul`` inserted), so a class loading its weights computes the child. Checked: planted-dead
residual channels removed with outputs unchanged and no ``mul`` inserted, for an RMSNorm shared
by a looped layer (removing zero channels is exact under RMSNorm only); for a LayerNorm (gain and
bias) shared so, the child equals the child of the same model with one norm per application; a
weight also read by something else than a norm keeps the inserted ``mul``.
"""
from __future__ import annotations

import copy

import pytest
import torch
from subclone_testing import plant_dead, relative_error, run
from torch import nn

import subclone_graph as sg
from subclone_graph.passes import state

aten = torch.ops.aten
VOCAB, D, FFN = 40, 32, 48


def _float_muls(gm) -> int:
    """``mul`` nodes by a float constant (what an unfolded rescale inserts)."""
    return sum(1 for n in gm.graph.nodes if n.target is aten.mul.Tensor and any(type(a) is float for a in n.args))


class Looped(nn.Module):
    """One pre-norm layer applied ``cycles`` times; ``unshared``: one copy of its norm per application."""

    def __init__(self, cycles=3, norm="rms", gain_elsewhere=False):
        super().__init__()
        self.cycles, self.gain_elsewhere = cycles, gain_elsewhere
        self.embed = nn.Embedding(VOCAB, D)
        self.norm = nn.LayerNorm(D) if norm == "layer" else nn.RMSNorm(D)
        self.up, self.down = nn.Linear(D, FFN), nn.Linear(FFN, D)
        self.final = nn.LayerNorm(D) if norm == "layer" else nn.RMSNorm(D)
        self.head = nn.Linear(D, VOCAB)
        self.copies = None
        with torch.no_grad():           # gains and biases away from 1 and 0, so that a lost factor shows
            for p in self.norm.parameters():
                p.normal_(1, 0.3)

    def unshared(self):
        model = copy.deepcopy(self)
        model.copies = nn.ModuleList(copy.deepcopy(self.norm) for _ in range(self.cycles))
        return model

    def forward(self, ids):
        x = self.embed(ids)
        for cycle in range(self.cycles):
            norm = self.norm if self.copies is None else self.copies[cycle]
            x = x + self.down(torch.relu(self.up(norm(x))))
        if self.gain_elsewhere:       # the gain read as something else than a norm's weight
            x = x + self.norm.weight
        return self.head(self.final(x))


EXAMPLE, OTHER = (torch.randint(0, VOCAB, (2, 8)),), (torch.randint(0, VOCAB, (3, 5)),)


def _dead_stream_child(model, hidden=24, exact=True):
    gm = sg.trace(model.eval(), EXAMPLE)
    sg.analyze_channels(gm)
    stream = next(g for g in state.CHANNEL_GRAPH.need(gm).groups.values() if g.kind == "residual")
    plant_dead(gm, {stream.id: list(range(hidden, stream.size))})
    child = sg.subclone(gm, EXAMPLE, sg.Target(hidden=hidden))
    for x in (EXAMPLE, OTHER) if exact else ():
        assert relative_error(run(child, x), run(gm, x)) < 1e-5
    return gm, child


def test_a_norm_shared_by_a_looped_layer_takes_the_factor_in_its_weight():
    torch.manual_seed(0)
    gm, child = _dead_stream_child(Looped())
    assert state.RESCALE.need(child).factor == pytest.approx((D / 24) ** 0.5)
    assert _float_muls(child) == _float_muls(gm), "the factor went into a mul, not into the shared weight"
    scaled = dict(child.named_parameters())["norm.weight"]
    kept = dict(gm.named_parameters())["norm.weight"][:24]
    assert torch.allclose(scaled, kept * (D / 24) ** 0.5, rtol=1e-6), "scaled once, not once per use"


def test_a_layer_norm_shared_by_a_looped_layer_gives_the_child_of_one_norm_per_application():
    torch.manual_seed(0)
    model = Looped(norm="layer")
    shared_gm, shared = _dead_stream_child(model, exact=False)
    unshared_gm, unshared = _dead_stream_child(model.unshared(), exact=False)
    assert _float_muls(shared) == _float_muls(shared_gm), "the factor went into a mul, not into the shared weight"
    for x in (EXAMPLE, OTHER):
        assert relative_error(run(shared_gm, x), run(unshared_gm, x)) < 1e-6
        assert relative_error(run(shared, x), run(unshared, x)) < 1e-6


def test_a_shared_gain_read_elsewhere_keeps_the_inserted_mul():
    torch.manual_seed(0)
    gm, child = _dead_stream_child(Looped(cycles=2, gain_elsewhere=True))
    assert _float_muls(child) == _float_muls(gm) + 2, "one mul per use of the shared norm"


class Weightless(nn.Module):
    """Pre-norm layers whose RMSNorm has no weight of its own (``F.rms_norm(x, (d,))``); the
    final norm's output is also added to a bias-free read that is not a ``linear`` when ``mixed``."""

    def __init__(self, mixed=False):
        super().__init__()
        self.mixed = mixed
        self.embed = nn.Embedding(VOCAB, D)
        self.ups = nn.ModuleList(nn.Linear(D, FFN) for _ in range(2))
        self.downs = nn.ModuleList(nn.Linear(FFN, D) for _ in range(2))
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        for up, down in zip(self.ups, self.downs):
            x = x + down(torch.relu(up(torch.nn.functional.rms_norm(x, (D,), eps=1e-6))))
        out = torch.nn.functional.rms_norm(x, (D,), eps=1e-6)
        return self.head(out) + (out.sum(-1, keepdim=True) if self.mixed else 0)


def test_a_norm_without_weight_read_only_by_linears_scales_their_weights():
    torch.manual_seed(0)
    gm, child = _dead_stream_child(Weightless())
    assert _float_muls(child) == _float_muls(gm), "the factor went into a mul, not into the reading weights"
    up = dict(child.named_parameters())["ups.0.weight"]
    assert torch.allclose(up, dict(gm.named_parameters())["ups.0.weight"][:, :24] * (D / 24) ** 0.5, rtol=1e-6)


def test_a_norm_without_weight_read_otherwise_keeps_the_inserted_mul():
    torch.manual_seed(0)
    gm, child = _dead_stream_child(Weightless(mixed=True))
    assert _float_muls(child) == _float_muls(gm) + 1, "the final norm's read by a sum needs the mul"
    assert len(state.RESCALE.need(child).inserted) == 1, "recorded, for save_hf's refusal to name"
