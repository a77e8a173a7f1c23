"""The full recipe's options ("full recipe" issue), on the 4-layer hand-written Llama.

1. depth: ``middle`` drops the middle layers, ``measured`` drops the layer with the smallest
   ‖f(x)‖/‖x+f(x)‖ on calibration data (a planted dead layer) and needs calibration, ``first``
   keeps the first layers — each checked by the surviving parameter names and by outputs equal
   to the parent module run with only the kept layers;
2. determinism: two runs give bit-identical state dicts and identical graph code;
3. selection: ``first`` keeps indices 0..k-1, ``uniform`` k evenly spaced ones — checked by
   comparing sliced weights with the parent's slices;
4. rescale: norm weights are the parent's slices, times √(D/d) with ``rescale=True``.
"""
from __future__ import annotations

import copy
import functools
import math
import re

import pytest
import torch

import subclone_graph as sg
from subclone_graph.models import build, make_inputs

TOL = dict(rtol=1e-5, atol=1e-5)
SIZES = [(1, 5), (3, 11)]


@functools.lru_cache(maxsize=None)
def _traced():
    model, inputs = build("llama_like")
    with torch.no_grad():                          # norm weights that are not all ones
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(len(name))) + 0.5)
    return model, inputs, sg.trace(model, inputs)


@pytest.fixture
def llama():
    """(module, example inputs, a fresh copy of its traced graph)."""
    model, inputs, gm = _traced()
    return model, inputs, copy.deepcopy(gm)


def calibration(model, count=3):
    return [make_inputs(model, 2, 8, seed=10 + i) for i in range(count)]


def kept_layers(child) -> set[int]:
    return {int(m.group(1)) for n, _ in child.named_parameters() for m in [re.match(r"layers\.(\d+)\.", n)] if m}


def with_layers(model, keep):
    ref = copy.deepcopy(model)
    ref.layers = torch.nn.ModuleList([ref.layers[i] for i in keep])
    return ref


def assert_same_outputs(child, reference):
    for batch, seq in SIZES:
        x = make_inputs(reference, batch, seq, seed=batch)
        with torch.no_grad():
            torch.testing.assert_close(child(*x), reference(*x), **TOL)


# --- 1. depth --------------------------------------------------------------------------------

@pytest.mark.parametrize("layers, depth, kept", [
    (2, "middle", {0, 3}), (3, "middle", {0, 1, 3}), (1, "middle", {0}),
    (2, "first", {0, 1}), (3, "first", {0, 1, 2}),
])
def test_depth_keeps_the_expected_layers(llama, layers, depth, kept):
    model, inputs, gm = llama
    child = sg.subclone(gm, inputs, sg.Target(layers=layers), depth=depth)
    assert len(child.meta["subclone.layers"]) == layers
    assert kept_layers(child) == kept
    assert_same_outputs(child, with_layers(model, sorted(kept)))


def test_measured_depth_drops_the_planted_dead_layer(llama):
    model, inputs, gm = llama
    with torch.no_grad():
        for name in ("layers.1.attn.o_proj.weight", "layers.1.mlp.down_proj.weight"):
            gm.get_parameter(name).zero_()
    child = sg.subclone(gm, inputs, sg.Target(layers=3), calibration(model), depth="measured")
    assert kept_layers(child) == {0, 2, 3}
    ratios = child.meta["subclone.layer_ratios"]
    assert len(ratios) == 4 and all(math.isfinite(r) for r in ratios)
    assert ratios[1] < 1e-7
    assert min(ratios[0], ratios[2], ratios[3]) > 1e-3
    for batch, seq in SIZES:
        x = make_inputs(model, batch, seq, seed=batch)
        with torch.no_grad():
            torch.testing.assert_close(child(*x), gm(*x), **TOL)
    middle = sg.subclone(gm, inputs, sg.Target(layers=3), depth="middle")
    assert kept_layers(middle) == {0, 1, 3}            # the criterion, not the default, chose


def test_measured_depth_needs_calibration(llama):
    model, inputs, gm = llama
    with pytest.raises(ValueError, match="calibration"):
        sg.subclone(gm, inputs, sg.Target(layers=3), depth="measured")


# --- 2. determinism --------------------------------------------------------------------------

def test_two_runs_are_bit_identical():
    model, inputs, _ = _traced()
    target = sg.Target(hidden=32, layers=3, heads=2, kv_heads=1, ffn=64)
    a = sg.subclone(model, inputs, target, calibration(model, 2), depth="measured")
    b = sg.subclone(model, inputs, target, calibration(model, 2), depth="measured")
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and sa
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name
    assert a.code == b.code
    x = make_inputs(model, 2, 7)
    assert torch.equal(a(*x), b(*x))


# --- 3. selection ----------------------------------------------------------------------------

def _parent_weights(gm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in gm.named_parameters()}


def test_selection_first_keeps_the_first_indices(llama):
    model, inputs, gm = llama
    parent = _parent_weights(gm)
    child = sg.subclone(gm, inputs, sg.Target(hidden=32, ffn=64, heads=2, kv_heads=1),
                        selection="first", rescale=False)
    weights = dict(child.named_parameters())
    torch.testing.assert_close(weights["embed.weight"], parent["embed.weight"][:, :32], rtol=0, atol=0)
    for i in range(4):
        p = f"layers.{i}."
        assert torch.equal(weights[p + "mlp.gate_proj.weight"], parent[p + "mlp.gate_proj.weight"][:64, :32])
        assert torch.equal(weights[p + "mlp.down_proj.weight"], parent[p + "mlp.down_proj.weight"][:32, :64])
        assert torch.equal(weights[p + "attn.q_proj.weight"], parent[p + "attn.q_proj.weight"][:32, :32])
        assert torch.equal(weights[p + "attn.k_proj.weight"], parent[p + "attn.k_proj.weight"][:16, :32])
        assert torch.equal(weights[p + "attn.o_proj.weight"], parent[p + "attn.o_proj.weight"][:32, :32])


def test_selection_uniform_keeps_evenly_spaced_indices(llama):
    model, inputs, gm = llama
    parent = _parent_weights(gm)
    child = sg.subclone(gm, inputs, sg.Target(hidden=32, ffn=64), selection="uniform", rescale=False)
    hidden = torch.tensor([round(i * 63 / 31) for i in range(32)])
    ffn = torch.tensor([round(i * 127 / 63) for i in range(64)])
    assert hidden[0] == 0 and hidden[-1] == 63 and set(hidden.diff().tolist()) == {2, 3}
    assert ffn[0] == 0 and ffn[-1] == 127 and set(ffn.diff().tolist()) == {2, 3}
    weights = dict(child.named_parameters())
    assert torch.equal(weights["embed.weight"], parent["embed.weight"][:, hidden])
    for i in range(4):
        p = f"layers.{i}.mlp."
        assert torch.equal(weights[p + "gate_proj.weight"], parent[p + "gate_proj.weight"][ffn][:, hidden])
        assert torch.equal(weights[p + "down_proj.weight"], parent[p + "down_proj.weight"][hidden][:, ffn])


# --- 4. rescale ------------------------------------------------------------------------------

@pytest.mark.parametrize("rescale, factor", [(False, 1.0), (True, math.sqrt(64 / 32))])
def test_rescale_multiplies_norm_weights_by_sqrt_width_ratio(llama, rescale, factor):
    model, inputs, gm = llama
    parent = _parent_weights(gm)
    child = sg.subclone(gm, inputs, sg.Target(hidden=32), selection="first", rescale=rescale)
    weights = dict(child.named_parameters())
    norms = [n for n in parent if n.endswith("norm.weight")]
    assert len(norms) == 9
    for name in norms:
        assert not torch.allclose(parent[name], torch.ones_like(parent[name]))
        torch.testing.assert_close(weights[name], parent[name][:32] * factor, rtol=1e-6, atol=0)
    assert torch.equal(weights["layers.0.attn.q_proj.weight"], parent["layers.0.attn.q_proj.weight"][:, :32])
