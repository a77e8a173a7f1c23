"""Scoring and keep-set rules checked against numbers computed by hand or by an independent
interpreter — the tests that catch one-line slips the equivalence tests let through:

- the residual score is the **sum** over every residual-connected tensor of its mean |x| (every
  block's input and output, and every normalised read of the stream that a weight contracts);
- a LayerNorm's bias gets √(D/d) with its weight;
- keep-sets of factor / concat / per-parent relations on tiny hand-built channel graphs.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx

import subclone_graph as sg
from subclone_graph import models
from subclone_graph.passes import state
from subclone_graph.passes.analysis.channel_graph import ChannelGraph
from subclone_graph.passes.analysis.choose_keep import top_k
from subclone_graph.passes.analysis.keep_sets import derive_keep
from subclone_graph.passes.errors import PassError
from subclone_graph.passes.fx_utils import get_attribute
from subclone_testing import calibration

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


class _Capture(fx.Interpreter):
    def __init__(self, gm, names):
        super().__init__(gm)
        self.names, self.values = names, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = out.detach()
        return out


def test_residual_score_is_the_sum_over_every_residual_tensor():
    model, inputs = models.build("llama_like")
    batches = calibration(model)
    gm = sg.trace(model, inputs)
    sg.analyze_channels(gm)
    sg.ScoreChannelsPass(batches)(gm)
    graph = state.CHANNEL_GRAPH.need(gm)
    residual = next(g for g in graph.groups.values() if g.kind == "residual")
    stream = {name for layer in state.LAYERS.need(gm) for b in layer.blocks for name in (b.add, b.skip)}
    # and every normalised read of the stream: the input of each weight that contracts it
    nodes = {n.name: n for n in gm.graph.nodes}
    reads = {graph.labels[v][0] for v in graph.contracted if graph.find(v) == residual.id
             and graph.labels[v][0] in nodes and nodes[graph.labels[v][0]].op != "get_attr"}
    names = stream | reads
    expected = torch.zeros(residual.size, dtype=torch.float64)
    per_tensor = {name: torch.zeros(residual.size, dtype=torch.float64) for name in names}
    for batch in batches:
        capture = _Capture(gm, names)
        with torch.no_grad():
            capture.run(*batch)
        for name, value in capture.values.items():
            per_tensor[name] += value.abs().double().mean(dim=(0, 1)) / len(batches)
    for vec in per_tensor.values():
        expected += vec
    assert len(stream) >= 2 * len(state.LAYERS.need(gm)) and len(reads) >= len(state.LAYERS.need(gm))
    torch.testing.assert_close(state.SCORES.need(gm)[residual.id], expected, rtol=1e-9, atol=1e-12)


def test_layer_norm_weight_and_bias_both_get_the_factor():
    model, inputs = models.build("gpt_like")                    # LayerNorm with a bias
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.bias.uniform_(0.5, 1.5)                  # a zero bias would hide a missing factor
    child = sg.subclone(model, inputs, sg.Target(hidden=48), calibration(model))
    graph, keep = state.CHANNEL_GRAPH.need(child), state.KEEP.need(child)
    residual = next(g for g in graph.groups.values() if g.kind == "residual")
    kept = keep[residual.id]
    factor = math.sqrt(64 / 48)
    assert state.RESCALE.need(child).factor == pytest.approx(factor)
    checked = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm):
            torch.testing.assert_close(get_attribute(child, f"{name}.weight"), module.weight[kept] * factor)
            torch.testing.assert_close(get_attribute(child, f"{name}.bias"), module.bias[kept] * factor)
            checked += 1
    assert checked >= 3


# ----- keep-sets on hand-built channel graphs -------------------------------------------------------
def _graph(sizes: dict[str, int]):
    graph = ChannelGraph()
    v = {name: graph.fresh(size, name) for name, size in sizes.items()}
    return graph, v


def test_a_factor_keeps_the_kronecker_product():
    graph, v = _graph({"heads": 3, "dim": 4, "proj": 12})
    graph.factor(v["proj"], [v["heads"], v["dim"]], "view")
    graph.solve()
    keep, sizes = derive_keep(graph, {graph.find(v["heads"]): torch.tensor([0, 2])}, {})
    # heads 0 and 2, each with all 4 of its dims: 0..3 and 8..11
    assert keep[graph.find(v["proj"])].tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert sizes[graph.find(v["proj"])] == 8


def test_a_concat_keeps_each_part_at_its_offset():
    graph, v = _graph({"q": 4, "k": 2, "v": 2, "qkv": 8})
    graph.concat(v["qkv"], [v["q"], v["k"], v["v"]], "cat")
    graph.solve()
    keep, _ = derive_keep(graph, {graph.find(v["q"]): torch.tensor([1, 3]), graph.find(v["k"]): torch.tensor([0])}, {})
    # q keeps 1, 3; k keeps 0 (offset 4); v keeps all of 6, 7
    assert keep[graph.find(v["qkv"])].tolist() == [1, 3, 4, 6, 7]


def test_a_decided_concat_passes_its_parts_their_ranges():
    graph, v = _graph({"a": 3, "b": 3, "ab": 6})
    graph.concat(v["ab"], [v["a"], v["b"]], "cat")
    graph.solve()
    keep, _ = derive_keep(graph, {graph.find(v["ab"]): torch.tensor([0, 2, 4])}, {})
    assert keep[graph.find(v["a"])].tolist() == [0, 2]
    assert keep[graph.find(v["b"])].tolist() == [1]


def test_query_heads_kept_per_kv_group_at_the_parents_offsets():
    # 2 kv groups × 3 query heads each; the child keeps 2 per group, different ones per group
    graph, v = _graph({"kv": 2, "rep": 3, "heads": 6})
    graph.factor(v["heads"], [v["kv"], v["rep"]], "view")
    graph.solve()
    heads, kv, rep = graph.find(v["heads"]), graph.find(v["kv"]), graph.find(v["rep"])
    keep, sizes = derive_keep(graph, {kv: torch.tensor([0, 1]), heads: torch.tensor([0, 2, 3, 4])}, {rep: 2})
    assert sizes[heads] == 4 and sizes[rep] == 2
    # an offset by the child's 2 per group instead of the parent's 3 is refused
    with pytest.raises(PassError, match="would keep other channels"):
        derive_keep(graph, {kv: torch.tensor([0, 1]), heads: torch.tensor([0, 1, 2, 3])}, {rep: 2})


def test_top_k_ties_go_to_the_lower_index_and_come_back_in_order():
    assert top_k(torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0]), 2).tolist() == [1, 2]
    assert top_k(torch.tensor([0.5, 0.1, 0.9]), 2).tolist() == [0, 2]
