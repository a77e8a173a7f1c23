"""Equivalence tests of the whole pipeline on every model family we ship.

1. identity target → the parent's outputs;
2. planted dead structure (FFN neurons, heads / kv groups, a whole layer, residual channels in
   RMSNorm models) removed by ``sg.subclone`` with calibration → the parent's outputs, with
   strictly fewer parameters;
3. a real reduction → every parameter has the target's shape, the child runs at other sizes
   and trains.
"""
from __future__ import annotations

import pytest
import torch

import subclone_graph as sg
from subclone_graph import models
from subclone_testing import (GQA, PRE_NORM, RMS_NORM, calibration, groups_of, plant_dead, plant_dead_heads,
                              relative_error, run, traced)

ALL = models.MODEL_NAMES
FAST = ("gpt_like", "llama_like", "vit_like", "torch_encoder", "llama", "gpt2")
SLOW_HF = tuple(name for name in ALL if name not in FAST)
EVERY = [pytest.param(n) for n in FAST] + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW_HF]


def _check_same(parent, child, inputs, model, tol=1e-4):
    """Child and (planted) parent agree at the example size and at another one."""
    for x in (inputs, models.make_inputs(model, 3, 5, seed=7)):
        err = relative_error(run(child, x), run(parent, x))
        assert err < tol, f"relative error {err:.2e}"


def _fresh(name):
    return traced(name)


@pytest.mark.parametrize("name", EVERY)
def test_identity_target_gives_the_same_outputs(name):
    model, inputs, _ = traced(name)
    child = sg.subclone(model, inputs, sg.Target())
    other = models.make_inputs(model, 3, 5)
    for x in (inputs, other):
        torch.testing.assert_close(run(child, x), run(model, x), rtol=1e-5, atol=1e-6)
    assert sg.count_parameters(child) == sg.count_parameters(model)


@pytest.mark.parametrize("name", EVERY)
def test_dead_ffn_neurons_are_removed_exactly(name):
    model, inputs, gm = _fresh(name)
    ffn = groups_of(gm, "ffn")
    assert ffn, "no MLP group found"
    plant_dead(gm, {g.id: [1, 5, g.size - 1] for g in ffn})
    child = sg.subclone(gm, inputs, sg.Target(ffn=ffn[0].size - 3), calibration=calibration(model))
    _check_same(gm, child, inputs, model)
    assert sg.count_parameters(child) < sg.count_parameters(model)


@pytest.mark.parametrize("name", EVERY)
def test_dead_heads_or_kv_groups_are_removed_exactly(name):
    model, inputs, gm = _fresh(name)
    heads, kv_heads = plant_dead_heads(gm)
    child = sg.subclone(gm, inputs, sg.Target(heads=heads, kv_heads=kv_heads), calibration=calibration(model))
    _check_same(gm, child, inputs, model)
    assert sg.count_parameters(child) < sg.count_parameters(model)
    if name in GQA:
        assert heads < kv_heads * 2 + 1 and kv_heads < groups_of(gm, "kv_heads")[0].size


@pytest.mark.parametrize("name", [n for n in EVERY if n.values[0] in PRE_NORM])
def test_a_zeroed_layer_is_dropped_exactly(name):
    model, inputs, gm = _fresh(name)
    layer = gm.meta["subclone.layers"][1]
    with torch.no_grad():
        for fqn, p in gm.named_parameters():
            if fqn.startswith(layer.key + "."):
                p.zero_()
    child = sg.subclone(gm, inputs, calibration=calibration(model), drop_layers=[1])
    _check_same(gm, child, inputs, model)
    assert not any(n.startswith(layer.key + ".") for n, _ in child.named_parameters())
    assert len(child.meta["subclone.layers"]) == len(gm.meta["subclone.layers"]) - 1


@pytest.mark.parametrize("name", [n for n in EVERY if n.values[0] in RMS_NORM])
def test_dead_residual_channels_in_rmsnorm_models_are_removed_exactly(name):
    model, inputs, gm = _fresh(name)
    (residual,) = groups_of(gm, "residual")
    dead = [0, 7, 20, residual.size - 1]
    plant_dead(gm, {residual.id: dead})
    child = sg.subclone(gm, inputs, sg.Target(hidden=residual.size - len(dead)), calibration=calibration(model))
    _check_same(gm, child, inputs, model)
    assert sg.count_parameters(child) < sg.count_parameters(model)


def test_without_rescaling_dead_residual_channels_change_the_outputs():
    # The √(D/d) factor is what makes the RMSNorm case exact: without it the test above fails.
    model, inputs, gm = _fresh("llama_like")
    (residual,) = groups_of(gm, "residual")
    plant_dead(gm, {residual.id: list(range(16))})
    child = sg.subclone(gm, inputs, sg.Target(hidden=residual.size - 16), calibration=calibration(model),
                        rescale=False)
    assert relative_error(run(child, inputs), run(gm, inputs)) > 1e-3


def test_weight_magnitude_scoring_without_calibration_is_reported():
    model, inputs = models.build("llama_like")
    child = sg.subclone(model, inputs, sg.Target(ffn=64))
    assert "weight magnitude" in child.meta["subclone.score_source"]
    assert torch.isfinite(run(child, inputs)).all()
