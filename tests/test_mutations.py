"""Tests written against plausible one-line bugs that the rest of the suite let through.

1. **REAP, not router weight alone.** ``Target(experts=…)`` ranks routed experts by the mean over
   the tokens routed to each of router weight × ‖expert output‖. Experts 1 and 3 of every MoE layer
   are routed *more* often and with *larger* router weights than experts 0 and 2 (their router rows
   are those of 0 and 2 plus a positive logit), but their outputs are zero (their down projection
   zeroed): REAP scores them 0 and ``Target(experts=2)`` keeps exactly 0 and 2. Ranking by router
   weight alone would keep 1 and 3.
2. **Each kept query head belongs to its kept kv group.** With fewer kv groups, the kept groups are
   not the first ones (kv group 0 is planted dead), and the dead query head sits at a different
   place in each kept group: the child keeps exactly the live query heads of kv groups 1 and 2 and
   its outputs equal the parent's. Taking a kept group's query heads from another group's order
   (the group's position among the kept ones, or the first kept group's order) keeps a dead head
   and loses a live one.
"""
from __future__ import annotations

import pytest
import torch
import transformers

import subclone_graph as sg
from subclone_graph import models
from subclone_graph.models import hf_zoo
from subclone_graph.passes import state
from subclone_graph.passes.fx_utils import get_attribute
from subclone_testing import family, groups_of, plant_dead, relative_error, run

pytestmark = pytest.mark.filterwarnings("ignore")


# ----- 1. REAP ------------------------------------------------------------------------------
def _constant_residual_channel(gm) -> None:
    """Residual channel 0 made constant 1: nothing writes it, every norm passes it with gain 1."""
    residual = groups_of(gm, "residual")[0]
    plant_dead(gm, {residual.id: [0]})
    for node in gm.graph.nodes:
        channels = node.meta.get("subclone.node.channels")
        if node.op != "get_attr" or channels is None or residual.id not in channels.groups:
            continue
        tensor = get_attribute(gm, node.target)
        if tensor.dim() == 1 or "embed" in node.target:
            with torch.no_grad():
                tensor[..., 0] = 1.0


def _routed_often_with_zero_output(gm) -> None:
    """Experts 1 and 3: the router rows of 0 and 2 plus a positive logit (read off the constant
    channel), so each is picked whenever its partner is and with a larger weight; their down
    projection zeroed, so their output is 0. Router rows are scaled up so that 0 and 2 still win
    the second place on many tokens."""
    _constant_residual_channel(gm)
    experts = groups_of(gm, "experts")
    routers = {name for g in experts for name, _ in g.tensors if "experts." not in name}
    downs = {name for g in experts for name, _ in g.tensors if name.endswith("down_proj")}
    assert routers and downs
    with torch.no_grad():
        for name in routers:
            router = get_attribute(gm, name)
            router.mul_(10.0)
            router[1], router[3] = router[0], router[2]
            router[[1, 3], 0] = 0.05
        for name in downs:
            get_attribute(gm, name)[[1, 3]] = 0.0


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_experts_routed_often_with_zero_output_are_removed(name):
    model, example, gm = family(name)
    _routed_often_with_zero_output(gm)
    calibration = [hf_zoo.example_inputs(model, 2, 16, 60 + s) for s in range(3)]
    child = sg.subclone(gm, example, sg.Target(experts=2), calibration=calibration)
    keep, scores = state.KEEP.need(child), state.SCORES.need(child)
    experts = groups_of(gm, "experts")
    for g in experts:
        assert float(scores[g.id][1]) == 0.0 and float(scores[g.id][3]) == 0.0, scores[g.id]
        assert float(scores[g.id][0]) > 0.0 and float(scores[g.id][2]) > 0.0, scores[g.id]
        assert keep[g.id].tolist() == [0, 2]
    assert all(p.shape[0] == 2 for n, p in child.named_parameters() if "mlp.experts." in n)


# ----- 2. query heads of kept kv groups -----------------------------------------------------
def _hf_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=72, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=9, num_key_value_heads=3, head_dim=8,
                                      max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(config).eval()


def _hand_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return models.TinyLlama(hidden=72, layers=2, heads=9, kv_heads=3, head_dim=8).eval()


# kv group 0 dead; in group 1 query head 3 (its first), in group 2 query head 8 (its last)
DEAD_HEADS, DEAD_GROUPS = [0, 1, 2, 3, 8], [0]
LIVE_HEADS, LIVE_GROUPS = [4, 5, 6, 7], [1, 2]


@pytest.mark.parametrize("builder", [_hf_llama, _hand_llama], ids=["hf_llama", "hand_llama"])
def test_each_kept_query_head_belongs_to_its_kept_kv_group(builder):
    model = builder()
    inputs = (torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0)),)
    gm = sg.trace(model, inputs)
    sg.analyze_channels(gm)
    sites = state.ATTENTION.need(gm)
    dead = {}
    for site in sites:
        dead[site.heads], dead[site.kv_heads] = DEAD_HEADS, DEAD_GROUPS
    plant_dead(gm, dead, {site.rep: 2 for site in sites})
    child = sg.subclone(gm, inputs, sg.Target(heads=4, kv_heads=2))
    keep = state.KEEP.need(child)
    for site in sites:
        assert keep[site.kv_heads].tolist() == LIVE_GROUPS
        assert keep[site.heads].tolist() == LIVE_HEADS
    for x in (inputs, (torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(4)),)):
        assert relative_error(run(child, x), run(gm, x)) < 1e-4
