"""Constructs the hand-picked families never showed (issue 11), each on a generated model.

1. Heads merged into the batch before ``bmm`` (``(b, h, s, d) → (b·h, s, d)``) and einsum
   attention: heads and kv groups shrink; planted-dead heads go with outputs unchanged (1e-4),
   at the example size and at another batch and sequence size (the literal ``b * h`` is rewritten).
2. A channel-mixing op in the MLP: the refusal names the op and the module that froze the group.
3. A constant list index on a channel dim that is a slice in disguise (``qkv[..., [-2]]``): the
   dim shrinks; a constant index that is no slice stays frozen, with its reason.
"""
from __future__ import annotations

import copy

import pytest
import torch

import subclone_graph as sg
from random_transformers import Spec, build, inputs
from subclone_testing import analysed, count_heads, plant_dead, plant_dead_heads, relative_error, run

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _dead_heads_go_exactly(spec: Spec) -> None:
    model, example = build(spec), inputs()
    gm = analysed(model, example)
    heads, kv_heads = plant_dead_heads(gm)
    before = run(gm, example)
    child = sg.subclone(gm, example, sg.Target(heads=heads, kv_heads=kv_heads))
    assert count_heads(child) == [(heads, kv_heads)] * spec.layers
    assert relative_error(run(child, example), before) < 1e-4
    other = inputs(batch=3, seq=5, seed=1)
    assert relative_error(run(child, other), run(gm, other)) < 1e-4


@pytest.mark.parametrize("attention", ["bmm", "einsum"])
@pytest.mark.parametrize("kv,repeat", [("mha", "interleave"), ("gqa", "interleave"), ("gqa", "expand"),
                                       ("mqa", "expand")])
def test_merged_batch_and_einsum_attention_shrink_heads_exactly(attention, kv, repeat):
    _dead_heads_go_exactly(Spec(attention=attention, kv=kv, repeat=repeat, positions="rotary"))


def test_merged_batch_attention_with_alibi_bias_per_head():
    _dead_heads_go_exactly(Spec(attention="bmm", kv="gqa", positions="alibi"))


@pytest.mark.parametrize("mixer,mlp,op", [("mlp_cumsum", "plain", "aten.cumsum.default"),
                                          ("mlp_sort", "gated", "aten.sort.default"),
                                          ("mlp_fft", "fused", "aten.fft_rfft.default")])
def test_a_channel_mixing_op_in_the_mlp_is_named_in_the_refusal(mixer, mlp, op):
    model, example = build(Spec(mixer=mixer, mlp=mlp, layers=1)), inputs()
    with pytest.raises(ValueError) as raised:
        sg.subclone(model, example, sg.Target(ffn=24))
    message = str(raised.value)
    assert "Target.ffn=24" in message and op in message and "layers.0.mlp" in message
    assert "\n" not in message


@pytest.mark.parametrize("kv", ["gqa", "mqa"])
def test_a_constant_consecutive_index_is_a_slice_and_its_heads_shrink(kv):
    # qkv[..., [-2], :] picks the key of each kv group in an interleaved (Falcon-like) layout
    _dead_heads_go_exactly(Spec(qkv="interleaved", repeat="index", kv=kv, heads=4 if kv == "mqa" else 6,
                                head_dim=4))


class _PicksChannels(torch.nn.Module):
    def __init__(self, picked: list[int]) -> None:
        super().__init__()
        self.up, self.down, self.picked = torch.nn.Linear(8, 6), torch.nn.Linear(len(picked), 8), picked

    def forward(self, x):
        return x + self.down(self.up(x)[..., self.picked])


class _Layers(torch.nn.Module):
    def __init__(self, picked: list[int]) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([_PicksChannels(picked)])

    def forward(self, x):
        return self.layers[0](x)


@pytest.mark.parametrize("picked,sliceable", [([2, 3, 4], True), ([-3, -2, -1], True), ([0, 2, 4], False),
                                              ([3, 2], False), ([1, 1], False)])
def test_only_a_consecutive_constant_index_is_sliceable(picked, sliceable):
    torch.manual_seed(0)
    model, example = _Layers(picked).eval(), (torch.randn(2, 5, 8),)
    gm = analysed(model, example)
    graph = gm.meta["subclone.channel_graph"]
    up = next(g for g in graph.groups.values() if ("layers.0.up.weight", 0) in g.tensors)
    if not sliceable:
        assert "index values point into this dim" in (up.reason or "")
        return
    assert up.reason is None
    picked = next(g for g in graph.groups.values() if g.kind == "ffn")
    assert picked.size == 3 and ("layers.0.down.weight", 1) in picked.tensors
    plant_dead(gm, {picked.id: [1]})
    child = sg.subclone(gm, example, sg.Target(ffn=2))
    assert child.get_submodule("layers.0.up").weight.shape == (5, 8)
    assert relative_error(run(child, example), run(gm, example)) < 1e-5


def test_dropping_a_layer_of_a_post_norm_model():
    # found by the generator: a decomposed post-norm reads the layer's last add twice, so the
    # layer's output was taken at the add and the dropped layer's norm (and its MLP) stayed
    model, example = build(Spec(norm="gemma", residual="post", head_dim=4, layers=2)), inputs()
    child = sg.subclone(model, example, sg.Target(layers=1))
    reference = copy.deepcopy(model)
    reference.layers = torch.nn.ModuleList([reference.layers[0]])
    other = inputs(batch=3, seq=5, seed=1)
    assert torch.equal(run(child, other), run(reference, other))
