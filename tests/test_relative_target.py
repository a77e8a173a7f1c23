"""Relative targets: a fraction in (0, 1) keeps that share of every group of its kind.

1. ``Target`` stores a fraction as a float and refuses fractions outside (0, 1);
2. ``relative_size`` rounds to the nearest size (halves up), at least one unit;
3. on a model whose MLPs differ in width, ``Target(ffn=0.5)`` halves each of them and removes
   exactly planted dead neurons (outputs unchanged), while an absolute ``ffn`` is refused with
   the widths present and the fraction suggested;
4. on a GQA model, fractional heads / kv heads / layers resolve to the documented counts and
   equal the absolute target's child exactly;
5. the CLI's size arguments take counts and fractions.
"""
from __future__ import annotations

import argparse

import pytest
import torch

import subclone_graph as sg
from subclone_graph.cli import main as cli
from subclone_graph.passes.target import relative_size
from subclone_testing import analysed, groups_of, plant_dead, relative_error, run


class Block(torch.nn.Module):
    def __init__(self, inner: int):
        super().__init__()
        self.up, self.down = torch.nn.Linear(16, inner), torch.nn.Linear(inner, 16)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class TwoWidths(torch.nn.Module):
    """Two residual MLP blocks of inner widths 32 and 64 (like a dense layer and an expert)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, 16)
        self.blocks = torch.nn.ModuleList([Block(32), Block(64)])
        self.head = torch.nn.Linear(16, 50)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _ids(seed=0, batch=2, seq=6):
    return (torch.randint(0, 50, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


def test_target_accepts_fractions_and_refuses_others():
    assert sg.Target(ffn=0.5).ffn == 0.5 and sg.Target(ffn=64).ffn == 64
    for bad in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="fraction must lie in"):
            sg.Target(hidden=bad)
    with pytest.raises(TypeError):
        sg.Target(heads="2")


def test_relative_size_rounds_to_nearest_with_halves_up():
    assert relative_size(0.5, 5) == 3 and relative_size(0.5, 4) == 2 and relative_size(0.01, 100) == 1
    assert relative_size(0.3, 10, multiple=4) == 4 and relative_size(0.6, 10, multiple=4) == 8
    assert relative_size(0.99, 3) == 3


def test_fraction_halves_every_mlp_and_removes_planted_dead_neurons():
    model = TwoWidths().eval()
    gm = analysed(model, _ids())
    ffn = groups_of(gm, "ffn")
    assert sorted(g.size for g in ffn) == [32, 64]
    plant_dead(gm, {g.id: list(range(0, g.size, 2)) for g in ffn})
    child = sg.subclone(gm, _ids(), sg.Target(ffn=0.5))
    sizes = child.meta["subclone.sizes"]
    assert sorted(sizes[g.id] for g in ffn) == [16, 32]
    x = _ids(seed=3, batch=3, seq=9)
    assert relative_error(run(child, x), run(gm, x)) < 1e-5


def test_absolute_count_on_mixed_widths_is_refused_with_the_widths():
    gm = analysed(TwoWidths().eval(), _ids())
    with pytest.raises(ValueError, match=r"differ in width \(32, 64\).*Target\(ffn=0.5\)"):
        sg.subclone(gm, _ids(), sg.Target(ffn=16))


def test_fractional_heads_and_layers_equal_the_absolute_child():
    torch.manual_seed(0)
    model = sg.models.TinyLlama(hidden=48, layers=4, heads=8, kv_heads=4, head_dim=8).eval()
    example = sg.models.make_inputs(model, 2, 8)
    gm = analysed(model, example)
    # kv: 4 × 0.5 = 2; query heads: 8 × 0.3 = 2.4 → nearest multiple of 2 → 2; layers 4 × 0.5 = 2
    relative = sg.subclone(gm, example, sg.Target(heads=0.3, kv_heads=0.5, layers=0.5, hidden=0.75))
    absolute = sg.subclone(gm, example, sg.Target(heads=2, kv_heads=2, layers=2, hidden=36))
    assert relative.meta["subclone.sizes"] == absolute.meta["subclone.sizes"]
    x = sg.models.make_inputs(model, 3, 7, seed=4)
    assert torch.equal(run(relative, x), run(absolute, x))
    # heads alone: 8 × 0.5 = 4 query heads over the parent's 4 kv heads (one per group)
    half = sg.subclone(gm, example, sg.Target(heads=0.5))
    heads = [half.meta["subclone.sizes"][g.id] for g in groups_of(gm, "heads")]
    assert heads and set(heads) == {4}


def test_cli_size_arguments_take_counts_and_fractions():
    parse = cli._size_argument
    assert parse("64") == 64 and parse("0.5") == 0.5
    for bad in ("1.5", "half", "0"):
        if bad == "0":
            assert parse(bad) == 0       # an absolute 0 is refused by Target, with its message
            continue
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)
