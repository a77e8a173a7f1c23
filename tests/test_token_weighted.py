"""Token-weighted calibration statistics (``passes/analysis/activation_statistics.py``): every token
counts once, across batches and ranks.

1. the same 8 rows given as one batch of 8, as 1 + 7, as 3 + 1 + 4 or as 8 batches of 1 give the
   same scores and the same layer ratios to 1e-12 (a float64 model, so that the forward pass
   itself is exact enough to show it), on a dense model and on a mixture of experts;
2. two gloo ranks, each scoring its own (unequal) share, give the scores and layer ratios of
   one process to 1e-12 — a rank that added its sums but not its counts would fail it;
3. a half-precision model that holds an integer buffer and a float32 buffer still calibrates in
   float32 (the compute dtype is chosen by *any* half tensor, not *all*).
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import subclone_graph as sg
from subclone_graph.api import run_passes, subclone_passes
from subclone_graph.models import TinyLlama, hf_families
from subclone_graph.passes import state
from subclone_graph.passes.analysis import AnalyzeChannelsPass, FindResidualBlocksPass, ScoreChannelsPass

TOLERANCE = 1e-12


def _rows(vocab: int, count: int = 8, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab, (count, seq), generator=torch.Generator().manual_seed(3))


def _analysed(model, example):
    gm = sg.trace(model, example)
    return run_passes(gm, [FindResidualBlocksPass(), AnalyzeChannelsPass()])


def _scored(gm, batches, **options):
    ScoreChannelsPass(batches, **options)(gm)
    return {g: s.clone() for g, s in state.SCORES.need(gm).items()}, state.LAYER_RATIOS.need(gm)


def _assert_close(a, b) -> None:
    (scores_a, ratios_a), (scores_b, ratios_b) = a, b
    assert scores_a.keys() == scores_b.keys()
    for group, score in scores_a.items():
        scale = float(score.abs().max().clamp_min(1e-30))
        assert float((score - scores_b[group]).abs().max()) <= TOLERANCE * scale, group
    assert len(ratios_a) == len(ratios_b) > 0
    assert all(abs(x - y) <= TOLERANCE * max(abs(x), 1e-30) for x, y in zip(ratios_a, ratios_b))


def _splits(rows: torch.Tensor) -> dict[str, list]:
    return {"8": [(rows,)], "1+7": [(rows[:1],), (rows[1:],)], "3+1+4": [(rows[:3],), (rows[3:4],), (rows[4:],)],
            "8x1": [(rows[i:i + 1],) for i in range(len(rows))]}


def test_any_split_of_the_same_rows_gives_the_same_scores_and_layer_ratios():
    torch.manual_seed(0)
    model = TinyLlama().double().eval()
    rows = _rows(model.vocab)
    gm = _analysed(model, (rows[:2],))
    results = {name: _scored(gm, batches) for name, batches in _splits(rows).items()}
    for name, result in results.items():
        _assert_close(results["8"], result)
    # the rows matter: other rows move the scores far beyond the tolerance
    other = _scored(gm, [(_rows(model.vocab).flip(1),)])
    with pytest.raises(AssertionError):
        _assert_close(results["8"], other)


def test_experts_and_their_widths_are_token_weighted_too():
    family = hf_families.FAMILIES["qwen3_moe"]
    model = family.build(0).double().eval()
    rows = _rows(model.config.vocab_size)
    gm = _analysed(model, (rows[:2],))
    groups = state.CHANNEL_GRAPH.need(gm).groups
    assert any(g.kind == "experts" for g in groups.values())          # the per-expert statistics run
    one, split = _scored(gm, _splits(rows)["8"]), _scored(gm, _splits(rows)["3+1+4"])
    _assert_close(one, split)


RANK = textwrap.dedent('''
    import datetime, sys
    import torch, torch.distributed as dist
    import subclone_graph as sg
    from subclone_graph.api import run_passes, subclone_passes
    from subclone_graph.models import TinyLlama
    from subclone_graph.passes import state

    rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    torch.manual_seed(0)
    model = TinyLlama().double().eval()
    rows = torch.load(sys.argv[4])
    batches = [(rows[:3],), (rows[3:4],), (rows[4:],)]     # rank 0: 3 + 4 rows, rank 1: 1 row
    gm = sg.trace(model, (rows[:2],))
    run_passes(gm, subclone_passes(sg.Target(), batches)[:3])
    if rank == 0:
        torch.save((state.SCORES.need(gm), state.LAYER_RATIOS.need(gm)), out)
    dist.barrier()
    dist.destroy_process_group()
''')


@pytest.mark.slow
def test_two_ranks_give_the_scores_and_layer_ratios_of_one_process(tmp_path):
    torch.manual_seed(0)
    model = TinyLlama().double().eval()
    rows = _rows(model.vocab)
    torch.save(rows, tmp_path / "rows.pt")
    one = _scored(_analysed(model, (rows[:2],)), _splits(rows)["3+1+4"])
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    ranks = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / "store"), str(tmp_path / "two.pt"),
                               str(tmp_path / "rows.pt")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in (0, 1)]
    for process in ranks:
        _, err = process.communicate(timeout=420)
        assert process.returncode == 0, err[-3000:]
    scores, ratios = torch.load(tmp_path / "two.pt")
    _assert_close(one, ({g: s for g, s in scores.items()}, ratios))


class _HalfWithOtherBuffers(torch.nn.Module):
    """A bfloat16 model that also holds an integer buffer and a float32 buffer, both used."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = TinyLlama().to(torch.bfloat16).eval()
        self.inner.inv_freq = self.inner.inv_freq.float()             # rotary table kept in float32
        self.register_buffer("shift", torch.zeros((), dtype=torch.long))

    def forward(self, input_ids):
        return self.inner(input_ids + self.shift)


def test_a_half_model_with_integer_and_float32_buffers_calibrates_in_float32():
    model = _HalfWithOtherBuffers()
    rows = _rows(model.inner.vocab, 4)
    gm = _analysed(model, (rows[:2],))
    assert {t.dtype for t in gm.buffers()} >= {torch.long, torch.float32}
    widened = _scored(gm, [(rows,)])                        # compute_dtype float32, the default
    in_bfloat16 = _scored(gm, [(rows,)], compute_dtype=None)
    # the same weights in float32 (bfloat16 widens exactly): what a float32 calibration computes
    exact = _HalfWithOtherBuffers().float()
    reference = _scored(_analysed(exact, (rows[:2],)), [(rows,)])

    def distance(a, b):
        return max(float(((a[0][g] - b[0][g]).abs().max() / b[0][g].abs().max().clamp_min(1e-30))) for g in b[0])

    assert distance(widened, reference) < 1e-5
    assert distance(in_bfloat16, reference) > 1e-3          # the test tells the two dtypes apart
