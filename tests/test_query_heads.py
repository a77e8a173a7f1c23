"""Fewer query heads per kv group (``heads = kv_heads × k``, ``k`` ≤ the parent's ratio).

Planted-dead invariance: in every kv group the same number of query heads are zeroed (different
ones in different groups, so an offset by the child's heads-per-group instead of the parent's
keeps a live head and the outputs change); ``Target(heads=kv_heads × k)`` must remove exactly
them and leave the outputs unchanged. An omitted ``kv_heads`` keeps the parent's kv heads.
"""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

import subclone_graph as sg
from subclone_graph import models
from subclone_graph.passes import state
from subclone_testing import count_heads, plant_dead, relative_error, run

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def hf_llama(heads: int, kv_heads: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=8,
                                      max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(config).eval()


def hand_llama(heads: int, kv_heads: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return models.TinyLlama(hidden=48, layers=2, heads=heads, kv_heads=kv_heads, head_dim=8).eval()


def _inputs(seed=0, batch=2, seq=8):
    return (torch.randint(0, 97, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


def _plant_dead_query_heads(gm, per_group_kept: int) -> list[list[int]]:
    """Zero all but ``per_group_kept`` query heads in each kv group: group g keeps the heads
    starting at offset g (mod ratio), so the survivors sit at different places in each group."""
    graph = state.CHANNEL_GRAPH.need(gm)
    dead, sizes, kept_by_site = {}, {}, []
    for site in state.ATTENTION.need(gm):
        n_heads, n_kv = graph.groups[site.heads].size, graph.groups[site.kv_heads].size
        ratio = n_heads // n_kv
        kept = [g * ratio + (g + r) % ratio for g in range(n_kv) for r in range(per_group_kept)]
        dead[site.heads] = [h for h in range(n_heads) if h not in kept]
        sizes[site.rep] = per_group_kept
        kept_by_site.append(sorted(kept))
    plant_dead(gm, dead, sizes)
    return kept_by_site


BUILDERS = {"hf_llama": hf_llama, "hand_llama": hand_llama}


@pytest.mark.parametrize("builder", sorted(BUILDERS))
@pytest.mark.parametrize("heads,kv_heads,k", [(8, 2, 1), (8, 2, 2), (8, 2, 3), (6, 2, 2), (6, 3, 1)])
def test_dead_query_heads_inside_groups_are_removed_exactly(builder, heads, kv_heads, k):
    model = BUILDERS[builder](heads, kv_heads)
    inputs = _inputs()
    gm = sg.trace(model, inputs)
    sg.analyze_channels(gm)
    kept = _plant_dead_query_heads(gm, k)
    before = run(gm, inputs)
    child = sg.subclone(gm, inputs, sg.Target(heads=kv_heads * k, kv_heads=kv_heads))
    assert count_heads(child) == [(kv_heads * k, kv_heads)] * 2
    assert relative_error(run(child, inputs), before) < 1e-4
    other = _inputs(seed=3, batch=3, seq=5)
    assert relative_error(run(child, other), run(gm, other)) < 1e-4
    # the kept query heads are exactly the live ones, at the parent's offsets
    keep = state.KEEP.need(child)
    sites = state.ATTENTION.need(child)
    assert [keep[site.heads].tolist() for site in sites] == kept


@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_omitted_kv_heads_keeps_the_parents_count(builder):
    model = BUILDERS[builder](6, 2)
    inputs = _inputs()
    child = sg.subclone(model, inputs, sg.Target(heads=4))        # 4 = 2 kv heads × 2
    assert count_heads(child) == [(4, 2)] * 2
    child = sg.subclone(model, inputs, sg.Target(heads=2))        # 2 = 2 × 1, not 1 kv head
    assert count_heads(child) == [(2, 2)] * 2
    child = sg.subclone(model, inputs, sg.Target(kv_heads=1))     # heads=None keeps 3 per group
    assert count_heads(child) == [(3, 1)] * 2


def test_heads_that_do_not_fit_the_groups_are_refused_with_the_rule():
    model = hand_llama(6, 2)
    with pytest.raises(ValueError, match=r"heads must be kv_heads × \(1\.\.3\)"):
        sg.subclone(model, _inputs(), sg.Target(heads=5))
    with pytest.raises(ValueError, match=r"heads must be kv_heads × \(1\.\.3\)"):
        sg.subclone(model, _inputs(), sg.Target(heads=4, kv_heads=1))


def test_fewer_query_heads_per_group_saves_as_hf_and_trains():
    model = hf_llama(8, 2)
    inputs = _inputs()
    child = sg.subclone(model, inputs, sg.Target(heads=4, kv_heads=2))
    reference = copy.deepcopy(child)
    out = child(*inputs).logits
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in child.parameters() if p.requires_grad)
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        sg.save_hf(reference, f"{folder}/hf")
        loaded = transformers.LlamaForCausalLM.from_pretrained(f"{folder}/hf")
        assert loaded.config.num_attention_heads == 4 and loaded.config.num_key_value_heads == 2
