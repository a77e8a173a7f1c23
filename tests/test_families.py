"""Families beyond the core fixtures (``models/hf_families.py``): the same invariants, no family code.

Per family, on a tiny model built from its config:
1. the analysis finds the residual stream (not frozen) and, where the family has attention, one
   attention site per layer;
2. the identity target reproduces the parent at two batch/sequence sizes;
3. a real reduction (width, heads, MLP, depth) runs at another size with the parent's output
   shape, finite outputs, fewer parameters and exactly the asked-for group sizes; dropping one
   layer removes exactly that layer's parameters;
4. planted dead structure — MLP neurons, the last kv group (or head), and residual channels in
   RMSNorm families — all at once, removed by the pipeline, leaves outputs unchanged.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import warnings

import pytest
import torch

import subclone_graph as sg
from subclone_graph.passes import state
from subclone_graph.passes.state import channel_groups
from subclone_graph.models import hf_families, hf_zoo
from subclone_testing import analysed, groups_of, plant_dead, plant_dead_heads, relative_error, run

NAMES = list(hf_families.FAMILIES)
SLOW = {"mamba", "gemma2", "gemma3", "convnext", "deit", "granite", "starcoder2", "stablelm", "gptj", "distilbert"}
PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in NAMES]


def inputs(model, name, batch, seq, seed=0):
    if hf_families.FAMILIES[name].fixed_seq:
        seq = 8
    return hf_zoo.example_inputs(model, batch, seq, seed)


def subclone(name, *args, **kwargs):
    """sg.subclone; a family whose trace pins the sequence (Mamba's loop) accepts its fixed sizes."""
    return sg.subclone(*args, fixed_sizes=hf_families.FAMILIES[name].fixed_seq, **kwargs)


@functools.lru_cache(maxsize=None)
def _parent(name):
    model = hf_families.build(name)
    example = inputs(model, name, 2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # mamba: the fixed-sequence warning is tested in test_inputs
        gm = analysed(model, example)
    return model, example, gm


def parent(name):
    model, example, gm = _parent(name)
    return model, example, copy.deepcopy(gm)


def has_attention(name):
    return "no attention" not in hf_families.FAMILIES[name].note


def test_bloom_heads_shrink_exactly_with_their_alibi_slopes():
    # the ALiBi slopes are computed from an arange over the heads: the arange keeps its length and
    # the child picks the kept heads' slopes after it (rules.shape._arange); a planted dead first
    # head (the kept heads' slopes are not the first ones) is removed exactly
    model, example, gm = parent("bloom")
    assert gm.meta["subclone.attention"] and not groups_of(gm, "frozen")
    heads = groups_of(gm, "heads")
    plant_dead(gm, {g.id: [0] for g in heads})
    checked = [example, inputs(model, "bloom", 3, 5, 7)]
    child = subclone("bloom", gm, example, sg.Target(heads=heads[0].size - 1), calibration=checked)
    assert sg.count_parameters(child) < sg.count_parameters(gm)
    for x in checked:
        assert relative_error(run(child, x), run(gm, x)) < 1e-5


@pytest.mark.parametrize("name", PARAMS)
def test_analysis_finds_stream_and_heads(name):
    _, _, gm = parent(name)
    residual = groups_of(gm, "residual")
    frozen_stream = [g for g in groups_of(gm, "frozen") if g.role == "residual"]
    assert residual and not frozen_stream, gm.meta["subclone.channel_graph"].summary()
    ids = {g for n in gm.graph.nodes for g in channel_groups(n)}
    assert ids <= set(gm.meta["subclone.channel_graph"].groups)       # every channel id is a group
    if has_attention(name):
        assert len(gm.meta["subclone.attention"]) == len(gm.meta["subclone.layers"]) == hf_zoo.LAYERS


@pytest.mark.parametrize("name", PARAMS)
def test_identity_target_reproduces_the_parent(name):
    model, example, gm = parent(name)
    child = subclone(name, gm, example, sg.Target())
    assert sg.count_parameters(child) == sg.count_parameters(model)
    for batch, seq in ((2, 8), (3, 13)):
        x = inputs(model, name, batch, seq, seed=7)
        assert relative_error(run(child, x), run(model, x)) < 1e-5


@pytest.mark.parametrize("name", PARAMS)
def test_real_reduction(name):
    model, example, gm = parent(name)
    family = hf_families.FAMILIES[name]
    calibration = [inputs(model, name, 4, 16, seed=100 + i) for i in range(3)]
    child = subclone(name, gm, example, sg.Target(**family.target), calibration=calibration)
    x = inputs(model, name, 3, 11, seed=5)
    got, want = run(child, x), run(model, x)
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert sg.count_parameters(child) < sg.count_parameters(model)
    graph, sizes = child.meta["subclone.channel_graph"], child.meta["subclone.sizes"]
    target = sg.Target(**family.target)
    for kind, key in (("residual", "hidden"), ("ffn", "ffn"), ("heads", "heads"), ("kv_heads", "kv_heads")):
        if key in family.target and (kind != "kv_heads" or family.gqa):
            for group in (g for g in graph.groups.values() if g.kind == kind):
                assert sizes[group.id] == target.size_of(key, group.size), (kind, group.size)
    assert len(child.meta["subclone.layers"]) == target.size_of("layers", len(gm.meta["subclone.layers"]))


@pytest.mark.parametrize("name", PARAMS)
def test_dropping_a_layer_removes_exactly_its_parameters(name):
    # in-place ops in a dropped layer (Falcon's residual add_) must not keep its weights alive
    model, example, gm = parent(name)
    layers = gm.meta["subclone.layers"]
    child = subclone(name, gm, example, drop_layers=[1])
    prefix = layers[1].key.replace("[", ".").replace("]", "") + "."
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    assert {n for n, _ in child.named_parameters(remove_duplicate=False)} <= names
    assert {n for n, _ in child.named_parameters()} == {n for n, _ in model.named_parameters()
                                                         if not n.startswith(prefix)}


@pytest.mark.parametrize("name", PARAMS)
def test_planted_dead_structure_is_removed_exactly(name):
    model, example, gm = parent(name)
    family = hf_families.FAMILIES[name]
    target = {}
    ffn = groups_of(gm, "ffn")
    if ffn:
        # one relative Target.ffn for every inner width (Mamba's are 128, 8 and 4; an MoE's dense,
        # shared and routed MLPs differ): every other neuron dead in each, half of each kept
        plant_dead(gm, {g.id: list(range(1, g.size, 2)) for g in ffn})
        target["ffn"] = 0.5
    if has_attention(name):
        target["heads"], target["kv_heads"] = plant_dead_heads(gm)
    if family.rms:
        (stream,) = groups_of(gm, "residual")
        dead = [0, 7, 20, stream.size - 1]
        plant_dead(gm, {stream.id: dead})
        target["hidden"] = stream.size - len(dead)
    child = subclone(name, gm, example, sg.Target(**target))
    assert sg.count_parameters(child) < sg.count_parameters(gm)
    for batch, seq in ((2, 8), (3, 13)):
        x = inputs(model, name, batch, seq, seed=7)
        assert relative_error(run(child, x), run(gm, x)) < 1e-4


def _node_state(gm) -> list[dict]:
    return [{k: dataclasses.replace(v, token=0) for k, v in n.meta.items() if k.startswith("subclone.node.")}
            for n in gm.graph.nodes]


def _tensors(gm) -> dict:
    return {k: v.detach().clone() for k, v in gm.state_dict().items()}


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("name", PARAMS)
def test_state_is_owned_analysis_repeats_and_a_grandchild_is_right(name):
    """Analysing twice gives identical node state; subclone leaves its input unchanged; a
    grandchild equals the grandchild made from a metadata-free copy of the child."""
    model, example, gm = parent(name)
    first = _node_state(gm)
    sg.analyze_channels(gm)
    assert _node_state(gm) == first
    family = hf_families.FAMILIES[name]
    child = subclone(name, gm, example, sg.Target(**family.target))
    code, tensors, meta = child.code, _tensors(child), _node_state(child)
    # half of the child's width again (a fraction stays a fraction: of the child's groups now)
    smaller = {k: 0.5 if isinstance(family.target[k], float) else family.target[k] // 2
               for k in ("hidden", "ffn") if k in family.target}
    grandchild = subclone(name, child, example, sg.Target(**smaller))
    assert child.code == code and _same_tensors(_tensors(child), tensors) and _node_state(child) == meta
    clean = copy.deepcopy(child)
    state.clear_from(clean, "blocks")
    reference = subclone(name, clean, example, sg.Target(**smaller))
    assert _same_tensors(_tensors(grandchild), _tensors(reference)) and grandchild.code == reference.code
    x = inputs(model, name, 3, 8, seed=5)
    out = run(grandchild, x)
    # same code and tensors; outputs too, where the model's own runs agree (a routed MoE whose
    # tied router scores scatter in any order does not repeat itself bit for bit)
    if torch.equal(out, run(grandchild, x)):
        assert torch.equal(out, run(reference, x))
