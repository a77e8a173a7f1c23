"""DuplicateLayersPass: a deeper child repeats layers (Target.layers above the parent's).

Checked on a hand-written Llama, a hand-written GPT (LayerNorm, biases, fused qkv) and the
Hugging Face Llama: the exact layer count; the exact parameter increase; outputs equal to the
parent module run with the same layers repeated; exact preservation when the duplicated
layers' branches are planted to output zero; distinct, trainable copies; width + depth
together; and the pass itself (modified flag, node counts, names, metadata, repeats, errors).
"""
from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch

import subclone_graph as sg
from subclone_graph.passes.state import channel_groups
from subclone_graph.models import build, export_kwargs, make_inputs
from subclone_graph.passes.analysis import AnalyzeChannelsPass
from subclone_graph.passes.rewrite.duplicate_layers import DuplicateLayersPass, duplicate_layers
from subclone_graph.passes.analysis.find_blocks import FindResidualBlocksPass, find_layers
from subclone_graph.passes.fx_utils import in_module
from subclone_graph.passes.errors import PassError

MODELS = ["llama_like", "gpt_like", "llama"]
SIZES = [(1, 5), (3, 11)]
TOL = dict(rtol=1e-5, atol=1e-5)


@functools.lru_cache(maxsize=None)
def traced(name: str):
    """(module, example inputs, traced parent): tracing costs seconds, so once per model."""
    model, inputs = build(name)
    return model, inputs, sg.trace(model, inputs)


@pytest.fixture(params=MODELS)
def parent(request):
    """(name, module, example inputs, traced parent, its layer keys). Tests do not change
    the traced parent: ``sg.subclone`` copies a GraphModule before rewriting it."""
    model, inputs, gm = traced(request.param)
    keys = [layer.key for layer in find_layers(gm)]
    return request.param, model, inputs, gm, keys


def logits(out) -> torch.Tensor:
    out = getattr(out, "logits", out)
    return out[0] if isinstance(out, (tuple, list)) else out


def planned_duplicates(gm, target) -> list[int]:
    """The parent layers ChooseKeepPass plans to duplicate (the first four passes of the API)."""
    planned = sg.run_passes(copy.deepcopy(gm), sg.subclone_passes(target)[:4])
    return list(planned.meta["subclone.duplicate"])


def layer_params(gm, key: str) -> dict[str, torch.nn.Parameter]:
    return {n[len(key) + 1:]: p for n, p in gm.named_parameters() if n.startswith(key + ".")}


def copy_sources(child, parent_keys) -> dict[str, str]:
    """{copy's key: parent key it copies}: a copy follows its source (or the source's copy)."""
    keys = [layer.key for layer in child.meta["subclone.layers"]]
    sources: dict[str, str] = {}
    for i, key in enumerate(keys):
        if key not in parent_keys:
            sources[key] = sources.get(keys[i - 1], keys[i - 1])
    return sources


def zero_branches(gm, indices) -> list[str]:
    """Plant zeros in the output projection (weight and bias) closing each residual branch of
    these layers (o_proj/down_proj, attn.proj/mlp.proj): each such pre-norm layer is identity."""
    layers, nodes = find_layers(gm), {n.name: n for n in gm.graph.nodes}
    zeroed = []
    with torch.no_grad():
        for index in indices:
            for block in layers[index].blocks:
                for arg in nodes[block.branch].args[1:]:
                    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
                        gm.get_parameter(arg.target).zero_()
                        zeroed.append(arg.target)
    return zeroed


def repeated_reference(model, keys, order):
    """The parent module with its layer list replaced by layers ``order`` (repeats allowed)."""
    ref = copy.deepcopy(model)
    container = keys[0].rpartition(".")[0]
    items = ref.get_submodule(container)
    owner, _, name = container.rpartition(".")
    setattr(ref.get_submodule(owner) if owner else ref, name, torch.nn.ModuleList([items[i] for i in order]))
    config = getattr(ref, "config", None)
    if config is not None:
        config.num_hidden_layers = len(order)
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = [config.layer_types[i] for i in order]
    return ref


def test_deeper_child_has_exactly_the_asked_layers_and_parameters(parent):
    name, model, inputs, gm, keys = parent
    target = sg.Target(layers=len(keys) + 2)
    child = sg.subclone(gm, inputs, target)
    layers = child.meta["subclone.layers"]
    assert len(layers) == len(keys) + 2
    assert len({layer.key for layer in layers}) == len(keys) + 2
    assert child.meta["subclone.duplicate"] == ()
    sources = copy_sources(child, set(keys))
    duplicated = planned_duplicates(gm, target)
    assert sorted(keys.index(s) for s in sources.values()) == duplicated
    added = sum(p.numel() for i in duplicated for p in layer_params(gm, keys[i]).values())
    assert added > 0
    assert sg.count_parameters(child) == sg.count_parameters(gm) + added
    for key in sources:
        assert child.get_submodule(key) is not None
    for batch, seq in SIZES:
        out = logits(child(*make_inputs(model, batch, seq)))
        assert out.shape == logits(model(*make_inputs(model, batch, seq), **export_kwargs(model))).shape
        assert out.shape[:2] == (batch, seq)
        assert torch.isfinite(out).all()


def test_deeper_child_computes_each_duplicated_layer_twice(parent):
    name, model, inputs, gm, keys = parent
    target = sg.Target(layers=len(keys) + 2)
    duplicated = planned_duplicates(gm, target)
    child = sg.subclone(gm, inputs, target)
    order = sorted(list(range(len(keys))) + duplicated)
    ref = repeated_reference(model, keys, order)
    for batch, seq in SIZES:
        x = make_inputs(model, batch, seq, seed=3)
        with torch.no_grad():
            expected, plain = logits(ref(*x, **export_kwargs(model))), logits(model(*x, **export_kwargs(model)))
            got = logits(child(*x))
        torch.testing.assert_close(got, expected, **TOL)
        assert (got - plain).abs().max() > 1e-3         # the repeated layers do change the output


def test_duplicating_zero_branch_layers_preserves_outputs(parent):
    name, model, inputs, gm, keys = parent
    target = sg.Target(layers=len(keys) + 2)
    planted = copy.deepcopy(gm)
    duplicated = planned_duplicates(planted, target)
    zeroed = zero_branches(planted, duplicated)
    assert len(zeroed) >= 2 * len(set(duplicated))
    child = sg.subclone(planted, inputs, target)
    assert len(child.meta["subclone.layers"]) == len(keys) + 2
    for copy_key in copy_sources(child, set(keys)):
        zero = [p for n, p in layer_params(child, copy_key).items() if p.abs().sum() == 0]
        assert len(zero) >= 2                     # the planted zeros were copied too
    for batch, seq in SIZES:
        x = make_inputs(model, batch, seq, seed=5)
        with torch.no_grad():
            torch.testing.assert_close(logits(child(*x)), logits(planted(*x)), **TOL)


def test_duplicated_parameters_are_distinct_and_train_apart(parent):
    name, model, inputs, gm, keys = parent
    child = sg.subclone(gm, inputs, sg.Target(layers=len(keys) + 1))
    sources = copy_sources(child, set(keys))
    assert len(sources) == 1
    (copy_key, source_key), = sources.items()
    copies, originals = layer_params(child, copy_key), layer_params(child, source_key)
    assert copies.keys() == originals.keys() and copies
    for suffix, p in copies.items():
        q = originals[suffix]
        assert p is not q and p.data_ptr() != q.data_ptr()
        assert isinstance(p, torch.nn.Parameter) and p.requires_grad
        assert torch.equal(p, q)
    before = {k: p.detach().clone() for k, p in originals.items()}
    optimizer = torch.optim.SGD(list(copies.values()), lr=0.5)
    logits(child(*make_inputs(model, 2, 6))).square().mean().backward()
    optimizer.step()
    assert any(not torch.equal(copies[k], before[k]) for k in copies)
    for k, p in originals.items():
        assert torch.equal(p, before[k])


def test_depth_and_width_together(parent):
    name, model, inputs, gm, keys = parent
    child = sg.subclone(gm, inputs, sg.Target(layers=len(keys) + 1, hidden=32, ffn=64))
    assert len(child.meta["subclone.layers"]) == len(keys) + 1
    sources = copy_sources(child, set(keys))
    assert len(sources) == 1
    for copy_key, source_key in sources.items():
        copies, originals = layer_params(child, copy_key), layer_params(child, source_key)
        assert copies.keys() == originals.keys()
        for suffix, p in copies.items():
            assert p.shape == originals[suffix].shape
            assert torch.equal(p, originals[suffix])    # sliced and rescaled the same way
            if p.dim() == 2:                              # every layer matrix touches the stream
                assert p.numel() < gm.get_parameter(f"{source_key}.{suffix}").numel()
    for batch, seq in SIZES:
        out = logits(child(*make_inputs(model, batch, seq)))
        assert out.shape[:2] == (batch, seq) and torch.isfinite(out).all()


def test_layer_norm_parent_shrinks_hidden_without_duplication():
    """Isolates the failure of ``test_depth_and_width_together[gpt_like]`` (a core bug, not
    this pass): ``rules_compute._layer_norm`` does not mark ``normalized_shape`` as a literal,
    so ``KeepChannelsPass`` leaves ``layer_norm(x, [64], w[32], b[32])``."""
    model, inputs, gm = traced("gpt_like")
    child = sg.subclone(gm, inputs, sg.Target(hidden=32))
    norms = [n for n in child.graph.nodes if n.target is torch.ops.aten.layer_norm.default]
    assert len(norms) == 9 and all(list(n.args[1]) == [32] for n in norms)
    out = child(*make_inputs(model, 2, 6))
    assert out.shape == (2, 6, 97) and torch.isfinite(out).all()


# --- the pass alone -------------------------------------------------------------------------

@pytest.fixture
def analysed():
    model, inputs, gm = traced("llama_like")
    gm = copy.deepcopy(gm)
    FindResidualBlocksPass()(gm)
    AnalyzeChannelsPass()(gm)
    return model, gm


def test_pass_copies_exactly_the_layer_and_its_metadata(analysed):
    model, parent_gm = analysed
    gm = copy.deepcopy(parent_gm)
    own = [n for n in gm.graph.nodes if in_module(n, "layers.1")]
    params = layer_params(gm, "layers.1")
    before = len(gm.graph.nodes)
    gm.meta["subclone.duplicate"] = [1]
    result = DuplicateLayersPass()(gm)
    assert result.modified and result.graph_module is gm
    assert len(gm.graph.nodes) == before + len(own) + len(params)
    assert [layer.key for layer in gm.meta["subclone.layers"]] == \
        ["layers.0", "layers.1", "layers.4", "layers.2", "layers.3"]
    assert [layer.index for layer in gm.meta["subclone.layers"]] == list(range(5))
    assert gm.meta["subclone.duplicate"] == ()
    assert isinstance(gm.get_submodule("layers.4.attn.q_proj"), torch.nn.Module)
    copied = [n for n in gm.graph.nodes if in_module(n, "layers.4")]
    assert len(copied) == len(own)
    for old, new in zip(own, copied):
        assert new.target == old.target
        assert channel_groups(new) == channel_groups(old)
        assert new.meta["val"].shape == old.meta["val"].shape
        paths = [path for path, _ in new.meta["nn_module_stack"].values()]
        assert all("layers.1" not in path for path in paths)
    again = DuplicateLayersPass()(gm)
    assert not again.modified and len(gm.graph.nodes) == before + len(own) + len(params)


def test_repeated_index_chains_copies(analysed):
    model, parent_gm = analysed
    gm = duplicate_layers(copy.deepcopy(parent_gm), [2, 0, 2])
    assert [layer.key for layer in gm.meta["subclone.layers"]] == \
        ["layers.0", "layers.4", "layers.1", "layers.2", "layers.5", "layers.6", "layers.3"]
    ref = repeated_reference(model, [f"layers.{i}" for i in range(4)], [0, 0, 1, 2, 2, 2, 3])
    for batch, seq in SIZES:
        x = make_inputs(model, batch, seq, seed=7)
        with torch.no_grad():
            torch.testing.assert_close(gm(*x), ref(*x), **TOL)


def test_pass_rejects_bad_plans(analysed):
    model, parent_gm = analysed
    with pytest.raises(PassError, match="layer 4 does not exist"):
        duplicate_layers(copy.deepcopy(parent_gm), [4])
    gm = copy.deepcopy(parent_gm)
    gm.meta["subclone.layers"] = tuple(dataclasses.replace(layer, key=None) for layer in gm.meta["subclone.layers"])
    with pytest.raises(PassError, match="no module path"):
        duplicate_layers(gm, [0])
