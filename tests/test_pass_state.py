"""The pass state (``passes/state.py``): no stale metadata, no mutated parents, right grandchildren.

Each test here failed on the code before the state module:
- a grandchild appended a second vertex to the child's shared ``reduces`` list (the child changed,
  the grandchild's √(D/d) used a stale id: outputs off by 3.6);
- ``DropBlocksPass`` left erased attention sites (and layers naming erased inputs) behind;
- a broadcast ``(1, 1, h) + (b, s, h)`` counted as a residual add;
- ``save_hf`` matched sizes by value only, so a head count and a head dim of the same parent
  size collided.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import subclone_graph as sg
from subclone_graph import models
from subclone_graph.passes import state
from subclone_graph.passes.analysis.find_blocks import find_layers
from subclone_graph.passes.errors import PreconditionError, StaleStateError
from subclone_testing import run

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

CHILD = sg.Target(hidden=48, layers=3)
GRANDCHILD = sg.Target(hidden=32, layers=2, heads=2, kv_heads=1)


def snapshot(gm) -> dict:
    """Everything of a GraphModule a pass could change: tensors, code, metadata."""
    return {
        "tensors": {k: v.detach().clone() for k, v in gm.state_dict().items()},
        "code": gm.code,
        "node_meta": [{k: repr(v) for k, v in n.meta.items() if k.startswith("subclone")} for n in gm.graph.nodes],
        "graph_meta": sorted(k for k in gm.meta if k.startswith("subclone")),
    }


def assert_same_snapshot(a: dict, b: dict) -> None:
    assert a["code"] == b["code"]
    assert a["node_meta"] == b["node_meta"]
    assert a["graph_meta"] == b["graph_meta"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for name in a["tensors"]:
        assert torch.equal(a["tensors"][name], b["tensors"][name]), name


def node_state(gm) -> list[dict]:
    return [{k: dataclasses.replace(v, token=0) for k, v in n.meta.items() if k.startswith("subclone")}
            for n in gm.graph.nodes]


def metadata_free_copy(gm):
    """A deep copy of ``gm`` with every subclone key gone from its nodes (graph keys kept: the
    example inputs and the parent's class and config are what a fresh trace would give)."""
    clean = copy.deepcopy(gm)
    state.clear_from(clean, "blocks")
    for node in clean.graph.nodes:
        assert not any(k.startswith("subclone") for k in node.meta)
    return clean


def test_subclone_leaves_its_graph_module_unchanged_and_the_grandchild_is_right():
    model, inputs = models.build("llama_like")
    child = sg.subclone(model, inputs, CHILD)
    before = snapshot(child)
    grandchild = sg.subclone(child, inputs, GRANDCHILD)
    assert_same_snapshot(snapshot(child), before)
    reference = sg.subclone(metadata_free_copy(child), inputs, GRANDCHILD)
    assert grandchild.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in grandchild.state_dict().items():
        assert torch.equal(tensor, reference.state_dict()[name]), name
    assert torch.equal(run(grandchild, inputs), run(reference, inputs))
    # the √(D/d) of the grandchild is the residual's 48 → 32 alone
    assert state.RESCALE.need(grandchild).eps_scale == pytest.approx(48 / 32)


def test_subclone_leaves_an_exported_program_unchanged():
    model, inputs = models.build("llama_like")
    program = torch.export.export(model, inputs, strict=False)
    tensors = {k: v.clone() for k, v in program.state_dict.items()}
    code = program.graph_module.code
    sg.subclone(program, inputs, CHILD)
    assert program.graph_module.code == code
    assert all(torch.equal(v, tensors[k]) for k, v in program.state_dict.items())
    assert not any(k.startswith("subclone") for n in program.graph.nodes for k in n.meta)


def test_subclone_leaves_a_module_unchanged():
    model, inputs = models.build("llama_like")
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    sg.subclone(model, inputs, CHILD)
    assert all(torch.equal(v, tensors[k]) for k, v in model.state_dict().items())


def test_analysing_twice_gives_identical_metadata():
    model, inputs = models.build("llama_like")
    gm = sg.trace(model, inputs)
    sg.analyze_channels(gm)
    first = node_state(gm)
    summary = state.CHANNEL_GRAPH.need(gm).summary(all_groups=True)
    sg.analyze_channels(gm)
    # the same ids and facts again; only the token (the name of the run) is new
    assert node_state(gm) == first
    assert state.CHANNEL_GRAPH.need(gm).summary(all_groups=True) == summary


def test_drop_blocks_prunes_attention_sites_and_renames_layer_inputs():
    model, inputs = models.build("llama_like")          # 4 layers
    child = sg.subclone(model, inputs, sg.Target(layers=2))
    sites = state.ATTENTION.need(child)
    names = {n.name for n in child.graph.nodes}
    assert len(sites) == 2 and all(site.node in names for site in sites)
    assert [site.layer for site in sites] == [0, 1]
    layers = state.LAYERS.need(child)
    assert all(layer.input in names and layer.output in names for layer in layers)
    # the layers the child's state names are the layers a fresh analysis finds
    assert [(layer.input, layer.output) for layer in layers] == \
        [(layer.input, layer.output) for layer in find_layers(child)]


class BroadcastAdd(nn.Module):
    """``x + mean over batch and positions of f(x)``: a (1, 1, h) + (b, s, h) add reading a weight,
    which is not a residual block."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 11)

    def forward(self, ids):
        x = self.embed(ids)
        x = x + self.proj(x).mean(dim=(0, 1), keepdim=True)
        return self.head(x)


def test_a_broadcast_add_is_not_a_residual_block():
    model = BroadcastAdd().eval()
    gm = sg.trace(model, (torch.randint(0, 11, (2, 5)),))
    assert find_layers(gm) == []


def test_node_state_of_another_analysis_is_refused():
    model, inputs = models.build("llama_like")
    gm = sg.trace(model, inputs)
    sg.analyze_channels(gm)
    other = copy.deepcopy(gm)
    sg.analyze_channels(other)            # a new channel graph with a new token
    node = next(n for n in gm.graph.nodes if state.REDUCES.has(n))
    with pytest.raises(StaleStateError, match="another channel graph"):
        state.REDUCES.of(node, state.CHANNEL_GRAPH.need(other))


def test_a_missing_key_names_the_pass_to_run_first():
    model, inputs = models.build("llama_like")
    gm = sg.trace(model, inputs)
    with pytest.raises(PreconditionError, match="run FindResidualBlocksPass first"):
        sg.AnalyzeChannelsPass()(gm)


def test_the_child_stores_its_target_and_its_size_changes():
    model, inputs = models.build("llama_like")
    target = sg.Target(hidden=48, ffn=64, heads=2, kv_heads=1)
    child = sg.subclone(model, inputs, target)
    assert state.TARGET.need(child) == target
    by_kind: dict[str, set] = {}
    for change in state.SIZE_CHANGES.need(child):
        by_kind.setdefault(change.kind, set()).add((change.parent, change.child))
    assert by_kind["residual"] == {(64, 48)}
    assert by_kind["ffn"] == {(128, 64)}
    assert by_kind["heads"] == {(4, 2)}
    assert by_kind["kv_heads"] == {(2, 1)}
    assert by_kind["head_dim"] == {(16, 16)}


def test_pipelines_doc_holds_the_state_table():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "PIPELINES.md").read_text(encoding="utf-8")
    assert state.pipeline_table() in doc


def test_graph_and_node_keys_never_share_a_name():
    names = [key.name for key in state.KEYS]
    assert len(names) == len(set(names))
    assert all(k.name.startswith("subclone.node.") == (k.scope == "node") for k in state.KEYS)


def test_run_passes_names_the_pass_and_keeps_the_users_error_type():
    model, inputs = models.build("llama_like")
    gm = sg.trace(model, inputs)
    passes = sg.subclone_passes(sg.Target(hidden=10_001))      # above the parent's 64, not a multiple of it
    with pytest.raises(ValueError, match=r"^ChooseKeepPass: Target.hidden=10001 cannot grow a width of 64"):
        sg.run_passes(gm, passes)

