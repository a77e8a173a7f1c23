"""Half precision through every output: a bfloat16 / float16 parent gives a child of its dtype
that ``save_hf`` writes in that dtype (reloaded and equal at the dtype's tolerance),
``export_onnx`` writes as a graph onnxruntime's CPU provider runs (bfloat16 → float32, float16 →
float16; checked against the child at the dtype's tolerance), and ``save`` round-trips.
"""
from __future__ import annotations

import functools
import json

import onnx
import pytest
import torch

import subclone_graph as sg
from subclone_graph import models
from subclone_graph.export import pt2 as io
from subclone_graph.models import hf_families
from subclone_graph.export.onnx_export import graph_dtype
from subclone_graph.export.tolerance import max_difference, model_dtype, tolerance_for

HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
FAMILIES = ("llama", "qwen2", "gpt2", "bert")
ONNX_FLOAT, ONNX_FLOAT16 = 1, 10      # onnx.TensorProto element types


@functools.lru_cache(maxsize=None)
def _child(name: str, dtype: torch.dtype):
    """(parent, example inputs, child) made once per module: passes and exports leave a child as it was."""
    parent, inputs, target = _parent(name, dtype)
    return parent, inputs, sg.subclone(parent, inputs, target)


def _parent(name: str, dtype: torch.dtype):
    if name == "qwen2":
        model = hf_families.build("qwen2")
        inputs = models.make_inputs(model, 2, 8, seed=0)
    else:
        model, inputs = models.build(name)
    target = sg.Target(hidden=32, ffn=64, heads=2, layers=2, kv_heads=1 if name in ("llama", "qwen2") else None)
    return model.to(dtype), inputs, target


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def test_tolerances_are_ordered_by_precision():
    assert tolerance_for(torch.float32) == 1e-4
    assert tolerance_for(torch.float32) < tolerance_for(torch.float16) < tolerance_for(torch.bfloat16)
    with pytest.raises(ValueError, match="no output tolerance for dtype torch.int64"):
        tolerance_for(torch.int64)


def test_max_difference_sees_nan_and_shape_changes():
    assert max_difference([torch.ones(2)], [torch.tensor([1.0, float("nan")])])[0] == float("inf")
    assert max_difference([torch.ones(2)], [torch.ones(3)])[0] == float("inf")
    assert max_difference([torch.full((2,), 4.0)], [torch.full((2,), 4.5)]) == (0.5, 4.0)


def test_graph_dtype_rule():
    tiny = torch.nn.Linear(2, 2)
    assert graph_dtype(tiny) == torch.float32
    assert graph_dtype(tiny.to(torch.bfloat16)) == torch.float32          # ORT CPU: no bf16 kernels
    assert graph_dtype(tiny.to(torch.float16)) == torch.float16
    assert graph_dtype(tiny.to(torch.float16), torch.float32) == torch.float32
    with pytest.raises(ValueError, match="dtype=torch.bfloat16 is not supported"):
        graph_dtype(tiny, torch.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("dtype_name", list(HALF))
@pytest.mark.parametrize("name", FAMILIES)
def test_half_precision_child_through_every_output(name, dtype_name, tmp_path):
    dtype = HALF[dtype_name]
    parent, inputs, child = _child(name, dtype)
    assert model_dtype(child) == dtype and {p.dtype for p in child.parameters()} == {dtype}
    tol = tolerance_for(dtype)
    ids = models.make_inputs(parent, 3, 11, seed=5)
    with torch.no_grad():
        want = _logits(child(*ids))

    sg.save_hf(child, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["dtype"] == dtype_name
    reloaded = type(parent).from_pretrained(tmp_path / "hf", dtype=dtype).eval()
    assert {p.dtype for p in reloaded.parameters()} == {dtype}
    with torch.no_grad():
        got = _logits(reloaded(*ids))
    diff, scale = max_difference([want], [got])
    assert diff <= tol * scale

    onnx_diff = sg.export_onnx(child, inputs, tmp_path / "child.onnx")
    with torch.no_grad():
        assert onnx_diff <= tol * max_difference([_logits(child(*inputs))], [_logits(child(*inputs))])[1]
    graph = onnx.load(str(tmp_path / "child.onnx"))
    expected_type = ONNX_FLOAT16 if dtype == torch.float16 else ONNX_FLOAT
    assert {o.type.tensor_type.elem_type for o in graph.graph.output} == {expected_type}

    io.save(child, tmp_path / "child.pt2")
    with torch.no_grad():
        loaded = _logits(io.load(tmp_path / "child.pt2")(*ids))
    assert loaded.dtype == dtype and torch.equal(loaded, want)


@pytest.mark.slow
def test_float16_falls_back_to_float32_when_onnxruntime_lacks_a_kernel(tmp_path, monkeypatch):
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    from subclone_graph.export import onnx_export

    parent, inputs, child = _child("gpt2", torch.float16)
    real = onnx_export.run_onnx

    def no_float16(path, tensors):
        if any(i.data_type == ONNX_FLOAT16 for i in onnx.load(str(path)).graph.initializer):
            raise state.NotImplemented("Could not find an implementation for Mul(14) node (float16)")
        return real(path, tensors)

    monkeypatch.setattr(onnx_export, "run_onnx", no_float16)
    sg.export_onnx(child, inputs, tmp_path / "child.onnx")
    assert {o.type.tensor_type.elem_type for o in onnx.load(str(tmp_path / "child.onnx")).graph.output} == {ONNX_FLOAT}
    sg.export_onnx(child, inputs, tmp_path / "forced.onnx", dtype=torch.float32)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
