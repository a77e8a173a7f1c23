"""Calibration of half-precision parents in float32 (``passes.analysis.compute_dtype``).

1. a bfloat16 or float16 model calibrated in float32 scores what a float64 calibration of the
   same graph scores, to 1e-5; ``compute_dtype=None`` calibrates in the model's dtype, over 100×
   further off — the option is honoured;
2. the streamed path calibrates a bfloat16 or float16 checkpoint as the in-memory one does (the
   default, "auto") and gets the in-memory scores bit for bit, computing only what the
   statistics read (no output head);
3. the model given is not changed (its weights stay bfloat16, none replaced);
4. an in-place op writes into its own half-precision tensor, not into a wide copy; a gather
   reads the stored table and widens only its result;
5. "auto" (the default): the rule takes measured matmul rates, so it is tested here with the
   rates of a CPU with bfloat16 matrix units (AMX: float32 ≈ 260, bfloat16 ≈ 1,070 GFLOP/s), of
   one without (≈ 160 / 4 GFLOP/s) and of a GPU injected: bfloat16 matmuls (float32 elsewhere)
   only where they are at least ``FAST_FACTOR`` × float32; a float32 model runs as it is; the
   measurement itself is short and cached per process, and on a CPU without bfloat16
   instructions (no AMX, no avx512_bf16) the real measurement picks float32;
6. with bfloat16 matmuls (a ``Precision`` with ``matmul``): a matmul reads its operands in
   bfloat16 — the stored weights as they are, never widened — and returns float32; the scores
   stay within bfloat16 rounding of a float64 calibration, and the streamed path gets the
   in-memory scores bit for bit.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import subclone_graph as sg
from subclone_graph.models import hf_zoo
from subclone_graph.passes import state
from subclone_graph.passes.analysis import ScoreChannelsPass
from subclone_graph.passes.analysis import compute_dtype
from subclone_graph.passes.analysis.compute_dtype import (FAST_FACTOR, Precision, call_widened, choose_precision,
                                                           matmul_rate, narrow_attributes,
                                                           resolve_precision)
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
        wide = _scores(model, batches, compute_dtype=torch.float32)
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
    narrow = narrow_attributes(gm, torch.float32)
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


AMX = {torch.float32: 260e9, torch.bfloat16: 1070e9}          # measured on a 2-core Sapphire Rapids VM
NO_BF16_UNITS = {torch.float32: 160e9, torch.bfloat16: 4e9}    # this project's AMD EPYC (AVX2) VMs
GPU = {torch.float32: 50e12, torch.bfloat16: 700e12}


def test_auto_picks_bfloat16_matmuls_only_where_they_are_measured_fast():
    assert choose_precision(torch.bfloat16, AMX) == Precision(torch.float32, torch.bfloat16)
    assert choose_precision(torch.bfloat16, GPU) == Precision(torch.float32, torch.bfloat16)
    assert choose_precision(torch.bfloat16, NO_BF16_UNITS) == Precision(torch.float32)
    # the threshold: just below FAST_FACTOR × float32 stays float32
    rates = {torch.float32: 100e9, torch.bfloat16: FAST_FACTOR * 100e9 * 0.99}
    assert choose_precision(torch.bfloat16, rates) == Precision(torch.float32)
    assert resolve_precision("auto", {torch.bfloat16, torch.long}, rates=AMX) == Precision(torch.float32, torch.bfloat16)
    assert resolve_precision("auto", {torch.float16}, rates={torch.float32: 1.0, torch.float16: 0.1}) == \
        Precision(torch.float32)
    # a model with no half-precision tensor runs as it is, whatever the rates; explicit choices are kept
    assert resolve_precision("auto", {torch.float32, torch.long}, rates=AMX) == Precision(None)
    assert resolve_precision(torch.float64, {torch.bfloat16}) == Precision(torch.float64)
    assert resolve_precision(None, {torch.bfloat16}) == Precision(None)
    # a device that cannot be measured (meta) computes in float32 throughout
    assert resolve_precision("auto", {torch.bfloat16}, device="meta") == Precision(torch.float32)


def test_the_measurement_is_short_and_cached(monkeypatch):
    monkeypatch.setattr(compute_dtype, "_RATES", {})
    import time
    start = time.perf_counter()
    rates = {d: matmul_rate(d) for d in (torch.float32, torch.bfloat16)}
    assert time.perf_counter() - start < 3.0 and all(r > 0 for r in rates.values())
    start = time.perf_counter()
    assert matmul_rate(torch.float32) == rates[torch.float32]          # cached: not measured again
    assert time.perf_counter() - start < 0.01


def _cpu_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


@pytest.mark.skipif(not _cpu_flags() or bool(_cpu_flags() & {"amx_bf16", "avx512_bf16"}),
                    reason="needs a CPU without bfloat16 instructions")
def test_auto_picks_float32_on_a_cpu_without_bfloat16_units(monkeypatch):
    # measured, not injected: a loaded AVX2 machine once chose bfloat16 matmuls (3 against 1.4
    # GFLOP/s at 128 × 128, where a float32 product waited for its threads) at 0.8 against 35
    for _ in range(3):
        monkeypatch.setattr(compute_dtype, "_RATES", {})
        assert resolve_precision("auto", {torch.bfloat16}) == Precision(torch.float32)


def test_bad_compute_dtype_is_one_line():
    with pytest.raises(ValueError, match="compute_dtype"):
        ScoreChannelsPass([], compute_dtype="float32")
    with pytest.raises(ValueError, match="compute_dtype"):
        ScoreChannelsPass([], compute_dtype=torch.int8)


def test_a_matmul_in_bfloat16_reads_the_stored_weight_and_returns_float32():
    x, weight = torch.randn(3, 8), torch.randn(5, 8, dtype=torch.bfloat16)
    mixed = Precision(torch.float32, torch.bfloat16)
    out = call_widened(aten.linear.default, (x, weight), {}, mixed)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.nn.functional.linear(x.bfloat16(), weight).float())
    # elementwise ops still run in float32
    assert call_widened(aten.add.Tensor, (x, weight[:3]), {}, mixed).dtype == torch.float32
    model = hf_zoo.qwen3(0).to(torch.bfloat16).eval()
    gm = analysed(model, hf_zoo.example_inputs(model, 2, 8))
    kept = narrow_attributes(gm, mixed)
    assert any(t.endswith("q_proj.weight") for t in kept) and any(t.endswith("embed_tokens.weight") for t in kept)
    assert not any(t.endswith("norm.weight") for t in kept)     # a norm's gain is read elementwise: widened


def _with_rates(monkeypatch, rates):
    monkeypatch.setattr(compute_dtype, "_RATES", {("cpu", d): r for d, r in rates.items()})


def test_auto_with_fast_bfloat16_calibrates_in_mixed_precision(monkeypatch, tmp_path):
    model, batches = _model_and_batches(torch.bfloat16)
    _with_rates(monkeypatch, AMX)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mixed = _scores(model, batches)                              # "auto", with AMX's rates
        exact = _scores(model, batches, compute_dtype=torch.float64)
        wide = _scores(model, batches, compute_dtype=torch.float32)
        narrow = _scores(model, batches, compute_dtype=None)
    def error(scores):
        return max(float(((scores[g] - exact[g]).abs() / exact[g].abs().clamp_min(1e-12)).max()) for g in exact)
    # bfloat16 matmul inputs: between float32 (all exact but the sums) and bfloat16 throughout
    assert error(wide) < error(mixed) < 0.05 and error(mixed) < error(narrow)
    model.save_pretrained(tmp_path / "parent", max_shard_size="20KB")
    target = sg.Target(hidden=32, ffn=64, heads=2, kv_heads=1, layers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = type(model).from_pretrained(tmp_path / "parent").eval()
        in_memory = _scores(model, batches)
        report = sg.subclone_checkpoint(tmp_path / "parent", tmp_path / "child", target, batches)
    assert all(torch.equal(report.scores[g], in_memory[g]) for g in in_memory)
