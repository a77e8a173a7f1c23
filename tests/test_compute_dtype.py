"""Calibration of half-precision parents in float32 (``passes.analysis.compute_dtype``).

1. a bfloat16 or float16 model calibrated in float32 (the default) scores what a float64
   calibration of the same graph scores, to 1e-5; ``compute_dtype=None`` calibrates in the
   model's dtype, over 100× further off — the option is honoured;
2. the streamed path calibrates a bfloat16 or float16 checkpoint in float32 too and gets the in-memory
   scores bit for bit, computing only what the statistics read (no output head);
3. the model given is not changed (its weights stay bfloat16, none replaced);
4. an in-place op writes into its own half-precision tensor, not into a wide copy; a gather
   reads the stored table and widens only its result.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import subclone_graph as sg
from subclone_graph.models import hf_zoo
from subclone_graph.passes import state
from subclone_graph.passes.analysis import ScoreChannelsPass
from subclone_graph.passes.analysis.compute_dtype import call_widened, gather_only_attributes
from subclone_testing import analysed

aten = torch.ops.aten


def _scores(model, batches, **options):
    gm = analysed(model, batches[0])
    ScoreChannelsPass(batches, **options)(gm)
    return state.SCORES.need(gm)


def _model_and_batches(dtype=torch.bfloat16):
    model = hf_zoo.llama(0).to(dtype).eval()
    return model, [hf_zoo.example_inputs(model, 2, 8, seed=s) for s in range(2)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_calibrated_in_float32_is_float64_accurate_and_none_keeps_the_half_dtype(dtype):
    model, batches = _model_and_batches(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wide = _scores(model, batches)
        exact = _scores(model, batches, compute_dtype=torch.float64)
        narrow = _scores(model, batches, compute_dtype=None)
    assert set(wide) == set(exact) == set(narrow)
    for group in exact:
        torch.testing.assert_close(wide[group], exact[group], rtol=1e-5, atol=1e-8)
    def error(scores):
        return max(float(((scores[g] - exact[g]).abs() / exact[g].abs().clamp_min(1e-12)).max()) for g in exact)
    assert error(narrow) > 100 * error(wide), f"compute_dtype=None must calibrate in {dtype}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_streamed_half_scores_equal_the_in_memory_ones(dtype, tmp_path):
    model, batches = _model_and_batches(dtype)
    model.save_pretrained(tmp_path / "parent", max_shard_size="20KB")
    target = sg.Target(hidden=32, ffn=64, heads=2, kv_heads=1, layers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # as a user loads it: the folder does not keep the zoo model's attention choice
        model = type(model).from_pretrained(tmp_path / "parent").eval()
        in_memory = _scores(model, batches)
        report = sg.subclone_checkpoint(tmp_path / "parent", tmp_path / "child", target, batches)
    assert set(report.scores) == set(in_memory)
    assert all(torch.equal(report.scores[g], in_memory[g]) for g in in_memory)


def test_the_model_given_is_unchanged():
    model, batches = _model_and_batches()
    before = {name: (t.dtype, t.data_ptr(), t.clone()) for name, t in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sg.subclone(model, batches[0], sg.Target(hidden=32, ffn=64), calibration=batches)
    after = model.state_dict()
    for name, (dtype, pointer, value) in before.items():
        assert after[name].dtype == dtype and after[name].data_ptr() == pointer
        assert torch.equal(after[name], value), name


def test_in_place_ops_write_their_own_tensor_and_gathers_read_the_table():
    target = torch.zeros(3, dtype=torch.bfloat16)
    call_widened(aten.copy_.default, (target, torch.ones(3)), {}, torch.float32)
    assert target.dtype == torch.bfloat16 and torch.equal(target, torch.ones(3, dtype=torch.bfloat16))
    table = torch.randn(5, 4, dtype=torch.bfloat16)
    rows = call_widened(aten.embedding.default, (table, torch.tensor([4, 0])), {},
                        torch.float32)
    assert rows.dtype == torch.float32 and torch.equal(rows, table.float()[[4, 0]])
    made = call_widened(aten.full.default, ([2], 1.5), {"dtype": torch.bfloat16}, torch.float32)
    assert made.dtype == torch.float32


def test_a_table_only_gathered_is_never_widened():
    model = hf_zoo.qwen3(0).to(torch.bfloat16).eval()          # untied: the output head is its own weight
    gm = analysed(model, hf_zoo.example_inputs(model, 2, 8))
    narrow = gather_only_attributes(gm)
    assert any(t.endswith("embed_tokens.weight") for t in narrow)
    assert not any(t.endswith(("q_proj.weight", "lm_head.weight")) for t in narrow)


def test_subclone_passes_its_compute_dtype_to_the_scoring():
    model, batches = _model_and_batches()
    target = sg.Target(hidden=32, ffn=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for dtype in (None, torch.float64):
            child = sg.subclone(model, batches[0], target, calibration=batches, compute_dtype=dtype)
            expected = _scores(model, batches, compute_dtype=dtype)
            assert all(torch.equal(state.SCORES.need(child)[g], expected[g]) for g in expected)
            assert next(child.parameters()).dtype == torch.bfloat16       # the child keeps the model's dtype
