"""Our passes chain with other compilers' passes, and the child goes on through their pipelines.

1. torch's ``PassManager`` runs every subcloning pass between two torch passes (a CSE before,
   a dead-code elimination after), with a lint check after each pass: the child equals
   ``sg.subclone`` with the same arguments;
2. the child goes through ``torch.compile`` (eager and aot_eager backends), through
   ``torch.export.export`` again (and is subcloned once more from the ``ExportedProgram``), and
   through PT2E quantization (torchao's ``prepare_pt2e`` / ``convert_pt2e`` with its
   ``XNNPACKQuantizer``): outputs equal, or close and different for the quantized model;
3. the exported ONNX child goes through onnxscript's optimizer and rewriter and still matches
   the child in onnxruntime.
"""
from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
import torch
import torch.utils._pytree as pytree
from torch.fx.passes.dialect.common.cse_pass import CSEPass, get_CSE_banned_ops
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.infra.pass_manager import PassManager, this_before_that_pass_constraint

import subclone_graph as sg
from subclone_graph import models
from subclone_graph.export.onnx_export import run_onnx
from subclone_graph.tracing import dynamic_shapes_for

SIZES = [(1, 5), (3, 11)]
TARGET = sg.Target(hidden=32, ffn=32, heads=2, kv_heads=1, layers=2)


class CommonSubexpressionPass(PassBase):
    """torch's functional CSEPass, keeping what a new GraphModule would drop: ``gm.meta`` and
    the pytree calling convention (so the module still takes and returns the parent's structure)."""

    def call(self, graph_module):
        result = CSEPass(get_CSE_banned_ops())(graph_module)
        new = result.graph_module
        new.graph._codegen = graph_module.graph._codegen
        new.meta.update(graph_module.meta)
        new.recompile()
        return PassResult(new, result.modified)


class EliminateDeadCodePass(PassBase):
    """fx's dead-code elimination, in place (keeps side-effecting nodes)."""

    def call(self, graph_module):
        modified = graph_module.graph.eliminate_dead_code()
        graph_module.recompile()
        return PassResult(graph_module, modified)


def main_output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else pytree.tree_leaves(out)[0]


def run(module, inputs) -> torch.Tensor:
    with torch.no_grad():
        return main_output(module(*inputs))


def calibration(model) -> list[tuple]:
    return [models.make_inputs(model, 2, 8, seed=40 + i) for i in range(2)]


@functools.lru_cache(maxsize=None)
def subcloned(name: str):
    model, inputs = models.build(name)
    return model, inputs, sg.subclone(model, inputs, TARGET, calibration=calibration(model))


def widths(child) -> list[tuple]:
    """(kind, parent size, child size) of every structural group (ids depend on node names)."""
    graph, sizes = child.meta["subclone.channel_graph"], child.meta["subclone.sizes"]
    return sorted((g.kind, g.size, sizes[i]) for i, g in graph.groups.items()
                  if g.kind in ("residual", "ffn", "heads", "kv_heads", "head_dim"))


def assert_same_outputs(model, a, b, atol=0.0):
    for batch, seq in SIZES:
        inputs = models.make_inputs(model, batch, seq, seed=7)
        got, want = run(a, inputs), run(b, inputs)
        assert got.shape == want.shape
        assert (got - want).abs().max() <= atol


def test_every_pass_runs_in_torchs_pass_manager_beside_torch_passes():
    model, inputs, expected = subcloned("llama")
    ours = sg.subclone_passes(TARGET, calibration(model))
    assert {type(p).__name__ for p in ours} >= {
        "FindResidualBlocksPass", "AnalyzeChannelsPass", "ScoreChannelsPass", "ChooseKeepPass",
        "DropBlocksPass", "KeepChannelsPass", "RescaleResidualPass"}
    cse, dce = CommonSubexpressionPass(), EliminateDeadCodePass()
    order = [cse, *ours, dce]
    manager = PassManager([dce, *reversed(ours), cse], run_checks_after_each_pass=True)
    manager.add_checks(lambda gm: gm.graph.lint())
    for this, that in zip(order, order[1:]):       # the manager sorts the passes back into order
        manager.add_constraint(this_before_that_pass_constraint(this, that))

    traced = sg.trace(model, inputs)
    nodes_before = len(traced.graph.nodes)
    result = manager(traced)
    assert manager.passes == order
    child = result.graph_module
    assert result.modified
    assert len(child.graph.nodes) < nodes_before
    assert type(child(*inputs)) is type(expected(*inputs))              # the parent's output structure
    assert {n: p.shape for n, p in child.named_parameters()} == {n: p.shape for n, p in expected.named_parameters()}
    assert widths(child) == widths(expected)
    assert_same_outputs(model, child, expected)


def test_run_passes_with_a_torch_pass_in_the_list_equals_subclone():
    model, inputs, expected = subcloned("llama_like")
    passes = [CommonSubexpressionPass(), *sg.subclone_passes(TARGET, calibration(model)), EliminateDeadCodePass()]
    child = sg.run_passes(sg.trace(model, inputs), passes)
    assert sg.count_parameters(child) == sg.count_parameters(expected)
    assert_same_outputs(model, child, expected)


@pytest.mark.parametrize("name, backend", [("llama", "eager"), ("llama_like", "aot_eager")])
def test_the_child_compiles(name, backend):
    model, inputs, child = subcloned(name)
    torch._dynamo.reset()
    compiled = torch.compile(child, backend=backend, dynamic=backend == "eager" or None)
    assert_same_outputs(model, compiled, child, atol=1e-5)
    assert type(compiled(*inputs)) is type(child(*inputs))


def test_the_child_exports_again_and_subclones_again():
    model, inputs, child = subcloned("llama")
    program = torch.export.export(child, inputs, dynamic_shapes=dynamic_shapes_for(child, inputs, {}), strict=False)
    assert_same_outputs(model, program.module(), child)
    assert type(program.module()(*inputs)) is type(child(*inputs))
    # Chaining: subcloning the exported child is subcloning the child.
    smaller = sg.Target(ffn=16)
    from_program = sg.subclone(program, inputs, smaller)
    from_child = sg.subclone(child, inputs, smaller)
    assert sg.count_parameters(from_program) == sg.count_parameters(from_child) < sg.count_parameters(child)
    assert_same_outputs(model, from_program, from_child)


def test_pt2e_quantization_of_the_child():
    pt2e = pytest.importorskip("torchao.quantization.pt2e.quantize_pt2e")
    xnnpack = pytest.importorskip("torchao.testing.pt2e._xnnpack_quantizer")
    model, _, child = subcloned("llama_like")
    quantizer = xnnpack.XNNPACKQuantizer().set_global(xnnpack.get_symmetric_quantization_config())
    prepared = pt2e.prepare_pt2e(child, quantizer)
    for seed in range(8):
        prepared(*models.make_inputs(model, 4, 12, seed=60 + seed))
    quantized = pt2e.convert_pt2e(prepared)
    assert any("quantize_per_tensor" in str(n.target) for n in quantized.graph.nodes)
    for batch, seq in SIZES:
        inputs = models.make_inputs(model, batch, seq, seed=7)
        want, got = run(child, inputs), run(quantized, inputs)
        assert 0.0 < float((got - want).abs().max() / want.abs().max()) < 0.1
        assert 0.0 < float((got - want).norm() / want.norm()) < 0.1


def _onnx_nodes(model: onnx.ModelProto) -> int:
    return len(model.graph.node) + sum(len(f.node) for f in model.functions)


def _assert_onnx_matches(path, model, child):
    for batch, seq in SIZES:
        inputs = models.make_inputs(model, batch, seq, seed=7)
        got = run_onnx(path, list(inputs))[0]
        assert np.abs(got - run(child, inputs).numpy()).max() < 1e-4


def test_onnxscript_optimizer_and_rewriter_keep_the_child(tmp_path):
    import onnxscript

    model, inputs, child = subcloned("llama")
    with torch.no_grad():
        program = torch.onnx.export(child, inputs, dynamo=True, optimize=False,
                                    dynamic_shapes=dynamic_shapes_for(child, inputs, {}))
    raw = program.model_proto
    optimized = onnxscript.rewriter.rewrite(onnxscript.optimizer.optimize(raw))
    assert _onnx_nodes(optimized) < _onnx_nodes(raw)
    onnx.checker.check_model(optimized, full_check=True)
    onnx.save(optimized, tmp_path / "optimized.onnx")
    _assert_onnx_matches(tmp_path / "optimized.onnx", model, child)

    sg.export_onnx(child, inputs, tmp_path / "child.onnx")            # already optimised once
    again = onnxscript.optimizer.optimize(onnx.load(tmp_path / "child.onnx"))
    onnx.save(again, tmp_path / "again.onnx")
    _assert_onnx_matches(tmp_path / "again.onnx", model, child)
