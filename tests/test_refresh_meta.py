"""``refresh_meta``'s fast path (static propagation at the size hints, symbolic sizes given back)
gives every node the sizes the symbolic propagation gives, on children whose channels, heads
(also merged with the batch, ``batch·heads``) and MLP were cut; and it falls back to the
symbolic propagation where it cannot run."""
from __future__ import annotations

import copy

import pytest
import torch

import subclone_graph as sg
from subclone_graph import models
from subclone_graph.passes.refresh import refresh_meta
from subclone_testing import run

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def sizes(gm) -> dict:
    """Every node's value as text: the shapes (symbolic expressions included), dtypes, devices."""
    def describe(value):
        if isinstance(value, torch.Tensor):
            return tuple(str(s) for s in value.shape), value.dtype, value.device
        return str(value)
    return {node.name: [describe(v) for v in torch.utils._pytree.tree_leaves(node.meta.get("val"))]
            for node in gm.graph.nodes}


@pytest.mark.parametrize("name, target", [
    ("llama_like", sg.Target(hidden=0.5, ffn=0.5, heads=0.5, kv_heads=0.5)),
    ("gpt_like", sg.Target(hidden=0.5, ffn=0.5, heads=0.5)),
    ("torch_encoder", sg.Target(hidden=0.5, heads=0.5)),         # nn.MultiheadAttention: batch·heads
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fast_refresh_gives_the_symbolic_sizes(name, target, dtype):
    model, example = models.build(name)
    model = model.to(dtype)
    gm = sg.trace(model, example)
    child = sg.subclone(gm, example, target)
    fast = sizes(child)
    assert any("s" in str(shape) for node in fast.values() for shape in node)     # symbolic sizes kept

    again = copy.deepcopy(child)
    assert refresh_meta(again) == "static"
    slow = copy.deepcopy(child)
    assert refresh_meta(slow, symbolic=True) == "symbolic"
    assert fast == sizes(slow) == sizes(again)

    # and the sizes are the ones the child computes at another batch and sequence length
    other = models.make_inputs(model, 3, 5, seed=1)
    assert torch.isfinite(run(child, other).float()).all()


def test_a_graph_the_static_path_cannot_run_is_refreshed_symbolically():
    class Gather(torch.nn.Module):          # nonzero: a data-dependent size, no static fake kernel
        def forward(self, x):
            return x[x > 0].sum() * torch.ones(x.shape[0])

    example = (torch.randn(4, 3),)
    gm = torch.export.export(Gather(), example, dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    before = sizes(gm)
    assert refresh_meta(gm) == "symbolic"
    after = sizes(gm)
    assert after.pop("output") and before.pop("output") == ["None"]      # the propagation gives the output its value
    assert after == before
