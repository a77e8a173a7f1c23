"""Grouped (mixture-of-experts) matmuls in ONNX: ``subclone_graph.export.onnx_grouped_mm``.

1. ``subclone_graph::grouped_mm`` equals transformers' reference kernel bit for bit in float32
   (empty experts, rows no expert owns) and ``aten._grouped_mm`` in bfloat16;
2. ``portable_grouped_mm`` on a traced mixture-of-experts model (float32: transformers' op;
   bfloat16: ``aten._grouped_mm``) replaces every grouped matmul, leaves the given graph as it
   was, shares its parameters, and computes the same outputs (1e-5, two input sizes);
3. the ONNX translation in onnxruntime matches torch to 1e-5 at several row counts (dynamic),
   with empty experts and unowned tail rows;
4. dead-code elimination keeps an in-place write into a view whose base is read later (the
   latent-attention key assembled by ``copy_`` into slices of ``new_empty``) and still removes
   a write nothing reads.
ONNX parity of reduced Qwen3-MoE and DeepSeek-V3 children: ``tests/test_moe_mla.py``.
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch

import subclone_graph as sg
from subclone_graph.export import onnx_grouped_mm as onnx_moe
from subclone_graph.models import hf_families, hf_zoo
from subclone_graph.export.onnx_export import run_onnx
from subclone_graph.passes.rewrite.drop_blocks import eliminate_dead_code
from subclone_testing import relative_error, run

pytestmark = pytest.mark.filterwarnings("ignore")

# (rows, expert of each row); experts 1 (first case) and 0, 2 (second) own no row; ids past the
# last expert are rows no expert owns (histc drops them): their output is zero.
ROUTES = [(7, [0, 0, 2, 2, 2, 3, 3]), (9, [1, 1, 1, 1, 3, 3, 3, 3, 3]), (5, [0, 1, 1, 7, 9])]


def offsets(ids: list[int], experts: int = 4) -> torch.Tensor:
    counts = torch.histc(torch.tensor(ids, dtype=torch.float32), bins=experts, min=0, max=experts - 1)
    return torch.cumsum(counts, 0, dtype=torch.int32)


def fallback():
    import transformers.integrations.moe  # noqa: F401 — registers transformers::grouped_mm_fallback
    return torch.ops.transformers.grouped_mm_fallback


@pytest.mark.parametrize("rows, ids", ROUTES)
def test_the_portable_op_is_the_reference_kernel(rows, ids):
    torch.manual_seed(rows)
    x, weight, offs = torch.randn(rows, 6), torch.randn(4, 6, 5), offsets(ids)
    expected = fallback()(x, weight, offs=offs)
    got = onnx_moe.grouped_mm(x, weight, offs)
    assert torch.equal(got, expected)
    assert not got[int(offs[-1]):].any()
    x16, w16 = torch.randn(rows, 8).bfloat16(), torch.randn(4, 8, 8).bfloat16()   # aten: 16-byte strides
    owned = int(offs[-1])                                            # aten leaves unowned rows unset
    reference = torch._grouped_mm(x16, w16, offs=offs)[:owned].float()
    assert relative_error(onnx_moe.grouped_mm(x16, w16, offs)[:owned].float(), reference) < 1e-2


@functools.lru_cache(maxsize=None)
def traced(dtype: torch.dtype):
    model = hf_families.build("qwen3_moe").to(dtype)
    example = hf_zoo.example_inputs(model, 2, 8, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, sg.trace(model, example)


def targets(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("dtype, op", [(torch.float32, "transformers.grouped_mm_fallback.default"),
                                       (torch.bfloat16, "aten._grouped_mm.default")])
def test_the_rewrite_is_equivalent_and_leaves_the_model_alone(dtype, op):
    model, gm = traced(dtype)
    before = targets(gm)
    portable = onnx_moe.portable_grouped_mm(gm)
    assert targets(gm) == before and before.count(op) == 4              # 2 expert layers × (gate_up, down)
    after = targets(portable)
    assert op not in after and after.count("subclone_graph.grouped_mm.default") == 4
    assert len(after) == len(before)
    shared = {p.data_ptr() for p in gm.parameters()}
    assert all(p.data_ptr() in shared for p in portable.parameters())
    for batch, seq in ((2, 8), (3, 13)):
        x = hf_zoo.example_inputs(model, batch, seq, 5)
        assert relative_error(run(portable, x).float(), run(gm, x).float()) < 1e-5
    assert onnx_moe.portable_grouped_mm(portable) is portable         # nothing left to replace


class Experts(torch.nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op
        self.weight = torch.nn.Parameter(torch.randn(4, 6, 5))

    def forward(self, x, ids):
        counts = torch.histc(ids.float(), bins=4, min=0, max=3)
        return self.op(x, self.weight, torch.cumsum(counts, 0, dtype=torch.int32))


@pytest.mark.parametrize("which", ["portable", "transformers"])
def test_the_translation_matches_torch_in_onnxruntime(which, tmp_path):
    torch.manual_seed(0)
    op = torch.ops.subclone_graph.grouped_mm if which == "portable" else fallback()
    module = Experts(op).eval()
    path = tmp_path / "experts.onnx"
    rows = torch.export.Dim("rows", min=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(7, 6), torch.tensor(ROUTES[0][1])), str(path), dynamo=True,
                          dynamic_shapes=({0: rows}, {0: rows}), verbose=False,
                          custom_translation_table=onnx_moe.translation_table())
    for count, ids in ROUTES:
        x, ids = torch.randn(count, 6), torch.tensor(ids)
        got = run_onnx(path, [x, ids])[0]
        assert got.shape == (count, 5)
        assert np.abs(got - module(x, ids).detach().numpy()).max() < 1e-5


class AssembledKey(torch.nn.Module):
    """A key written into a new tensor by ``copy_`` into two slices, and a dead in-place write."""

    def __init__(self):
        super().__init__()
        self.nope, self.rope = torch.nn.Linear(8, 12), torch.nn.Linear(8, 4)

    def forward(self, x):
        nope = self.nope(x).view(x.shape[0], x.shape[1], 3, 4).transpose(1, 2)
        rope = self.rope(x)[:, None].expand(-1, 3, -1, -1)
        key = nope.new_empty(*nope.shape[:-1], 8)
        key[..., :4].copy_(nope)
        key[..., 4:].copy_(rope)
        scratch = x.clone()
        scratch[:, :1].mul_(2.0)                        # read by nothing
        return key * 2


def test_dead_code_keeps_writes_into_a_view_that_is_read():
    torch.manual_seed(0)
    module, x = AssembledKey().eval(), torch.randn(2, 5, 8)
    gm = sg.trace(module, (x,))
    assert targets(gm).count("aten.copy_.default") == 2 and "aten.mul_.Tensor" in targets(gm)
    eliminate_dead_code(gm)
    gm.recompile()
    assert targets(gm).count("aten.copy_.default") == 2
    assert "aten.mul_.Tensor" not in targets(gm) and "aten.clone.default" not in targets(gm)
    other = torch.randn(3, 7, 8)
    assert torch.equal(gm(other), module(other))


def test_a_bfloat16_expert_child_exports_as_float32(tmp_path):
    """A bfloat16 parent traces its experts to ``aten._grouped_mm``, which only traces in
    bfloat16; ``export_onnx`` widens the child to a float32 graph and still exports it."""
    import onnx

    model, gm = traced(torch.bfloat16)
    example = hf_zoo.example_inputs(model, 2, 8, 0)
    child = sg.subclone(gm, example, sg.Target(ffn=0.5, layers=2))
    assert "aten._grouped_mm.default" in targets(child)
    path = tmp_path / "child.onnx"
    assert sg.export_onnx(child, example, path) <= 3e-2
    graph = onnx.load(str(path)).graph
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    x = hf_zoo.example_inputs(model, 3, 11, 21)
    assert relative_error(torch.from_numpy(run_onnx(path, list(x))[0]), run(child, x).float()) < 3e-2


def test_a_graph_without_grouped_matmuls_is_returned_as_it_is():
    gm = sg.trace(AssembledKey().eval(), (torch.randn(2, 5, 8),))
    assert onnx_moe.portable_grouped_mm(gm) is gm
