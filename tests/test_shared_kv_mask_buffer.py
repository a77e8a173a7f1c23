"""Multi-query attention (one key/value head ``expand``ed to every query head) beside a boolean
causal-mask buffer sliced to the sequence length — two constructs of GPT-style code models.

1. The mask buffer is a weight of the graph with no magnitude: scoring by weight magnitude (no
   calibration) passes it over, so ``Target()`` reproduces the parent (it crashed taking |x| of
   a bool tensor).
2. Planted-dead FFN neurons and query heads (their query rows and output columns zeroed; the
   shared key/value head untouched) are removed exactly by weight-magnitude scores.
3. A calibrated subclone cannot see such a head dead: its output mixes the shared values, never
   zero. The sweep's ``dead`` check (``models/family_checks.py``) therefore does not plant heads
   that share their values (``planting.heads_share_values``), and passes on the FFN alone;
   heads of ordinary multi-head attention are still planted.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import subclone_graph as sg
from subclone_graph import models
from subclone_graph.models import family_checks
from subclone_graph.models.planting import heads_share_values
from subclone_graph.passes import state
from subclone_testing import plant_dead, relative_error, run

VOCAB, HIDDEN, HEADS, FFN, MAX_POS = 61, 32, 4, 64, 40


class MultiQueryAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head_dim = HIDDEN // HEADS
        self.c_attn = nn.Linear(HIDDEN, HIDDEN + 2 * self.head_dim)        # q, one k head, one v head
        self.c_proj = nn.Linear(HIDDEN, HIDDEN)
        # one row more than the positions the model embeds: torch.export guards the slice at
        # the buffer's full length, a length this model never runs at
        causal = torch.tril(torch.ones(MAX_POS, MAX_POS, dtype=torch.bool))
        self.register_buffer("causal", causal.view(1, 1, MAX_POS, MAX_POS), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).split((HIDDEN, self.head_dim, self.head_dim), dim=-1)
        q = q.view(b, t, HEADS, self.head_dim).transpose(1, 2)
        k = k.unsqueeze(1).expand(b, HEADS, t, self.head_dim)
        v = v.unsqueeze(1).expand(b, HEADS, t, self.head_dim)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        masked = torch.tensor(torch.finfo(scores.dtype).min, dtype=scores.dtype)
        scores = torch.where(self.causal[:, :, :t, :t], scores, masked)
        y = scores.softmax(-1) @ v
        return self.c_proj(y.transpose(1, 2).reshape(b, t, HIDDEN))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(HIDDEN), MultiQueryAttention(), nn.LayerNorm(HIDDEN)
        self.mlp = nn.Sequential(nn.Linear(HIDDEN, FFN), nn.GELU(), nn.Linear(FFN, HIDDEN))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class MultiQueryLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wte, self.wpe = nn.Embedding(VOCAB, HIDDEN), nn.Embedding(MAX_POS - 1, HIDDEN)
        self.blocks = nn.ModuleList([Block() for _ in range(2)])
        self.ln_f, self.lm_head = nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(torch.arange(input_ids.shape[1]))[None]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _inputs(batch: int, seq: int, seed: int = 0) -> tuple:
    return (torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


@pytest.fixture(scope="module")
def model():
    return MultiQueryLM().eval()


def test_identity_without_calibration_passes_over_the_bool_mask(model):
    child = sg.subclone(model, _inputs(2, 8), sg.Target())
    for x in (_inputs(2, 8), _inputs(3, 5, seed=1)):
        assert relative_error(run(child, x), run(model, x)) < 1e-6
    assert state.SCORE_SOURCE.get(child).startswith("weight magnitude")


def test_dead_query_heads_sharing_one_kv_head_are_removed_exactly_by_weight_magnitude(model):
    x = _inputs(2, 8)
    gm = sg.trace(model, x)
    sg.analyze_channels(gm)
    graph = state.CHANNEL_GRAPH.need(gm)
    sites = state.ATTENTION.need(gm)
    assert len(sites) == 2 and all(heads_share_values(gm, s) and graph.groups[s.heads].size == HEADS for s in sites)
    ffn = [g for g in graph.groups.values() if g.kind == "ffn"]
    dead = {g.id: list(range(1, g.size, 2)) for g in ffn}
    dead.update({s.heads: [1] for s in sites})          # not the last: an order slip keeps it
    plant_dead(gm, dead)
    child = sg.subclone(gm, x, sg.Target(ffn=0.5, heads=HEADS - 1))
    assert sg.count_parameters(child) < sg.count_parameters(gm)
    assert [state.KEEP.need(child)[s.heads].tolist() for s in sites] == [[0, 2, 3]] * 2
    for inputs in (x, _inputs(3, 5, seed=1)):
        assert relative_error(run(child, inputs), run(gm, inputs)) < 1e-5
    # the shared key/value rows are all still there: only query rows went
    rows = [p.shape[0] for n, p in child.named_parameters() if n.endswith("c_attn.weight")]
    assert rows == [HIDDEN - HIDDEN // HEADS + 2 * (HIDDEN // HEADS)] * 2


def test_the_sweeps_dead_check_plants_no_heads_that_share_their_values(model):
    outcomes = family_checks.run_checks(model, lambda b, s, seed: _inputs(b, s, seed), checks=("trace", "dead"))
    dead = outcomes[-1]
    assert dead.status == "ok", dead
    assert dead.detail == "ffn neurons (heads not planted: one key/value head shared by all)"


def test_multi_head_attention_heads_do_not_share_values():
    torch.manual_seed(0)
    gpt = models.TinyGPT(vocab=61, hidden=32, layers=2, heads=4, ffn=64, max_pos=32).eval()
    gm = sg.trace(gpt, _inputs(2, 8))
    sg.analyze_channels(gm)
    assert [heads_share_values(gm, s) for s in state.ATTENTION.need(gm)] == [False, False]


def test_a_calibrated_child_keeps_query_rows_and_output_columns_of_the_same_heads(model):
    # which heads a calibrated child keeps is the scores' choice (the test above: a planted head
    # is not dead to them); the query rows and output columns it keeps must be the same heads'
    x = _inputs(2, 8)
    child = sg.subclone(model, x, sg.Target(heads=2), calibration=[_inputs(4, 16, seed=i) for i in range(2)])
    sites = state.ATTENTION.need(child)
    params = dict(child.named_parameters())
    head_dim = HIDDEN // HEADS
    for index, (block, site) in enumerate(zip(model.blocks, sites)):
        rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in state.KEEP.need(child)[site.heads]])
        c_attn = next(p for n, p in params.items() if n.endswith(f"{index}.attn.c_attn.weight")
                      or n.endswith(f"{index}_attn_c_attn_weight"))
        c_proj = next(p for n, p in params.items() if n.endswith(f"{index}.attn.c_proj.weight")
                      or n.endswith(f"{index}_attn_c_proj_weight"))
        assert torch.equal(c_attn[: len(rows)], block.attn.c_attn.weight[rows])
        assert torch.equal(c_attn[len(rows):], block.attn.c_attn.weight[HIDDEN:])      # the shared k, v
        assert torch.equal(c_proj, block.attn.c_proj.weight[:, rows])
    assert run(child, _inputs(3, 5, seed=1)).shape == (3, 5, VOCAB)
