"""One neuron order per expert (issue 14): the fused expert tensors of Qwen3-MoE and DeepSeek-V3
(tiny configs of the Hugging Face classes) are scored and sliced expert by expert.

1. the routed experts' MLP width (and the fused gate/up built from it) keeps one order per
   expert; the dense and shared MLPs keep one order (no expert dim);
2. **different** dead neurons planted in different experts (Qwen3-MoE, DeepSeek-V3, Mixtral,
   Qwen2-MoE, GLM4-MoE) (expert ``e``: the neurons ``i`` with
   ``(i + e) % 2 == 1``; dense and shared MLPs: every other one) → ``Target(ffn=0.5)`` removes
   exactly them — each expert keeps other indices — with outputs unchanged (1e-4, float32), scored
   by weight magnitude, and for Qwen3-MoE and DeepSeek-V3 also on calibration data (each row
   counted for its expert);
3. the child is still one fused tensor per projection: ``save_hf`` writes it, the parent's class
   reloads it and matches;
4. the guard: an expert MLP width that also meets a tensor without the expert dim (one scale per
   neuron shared by all experts, spliced into the graph) keeps one order for all experts —
   never a per-expert order the shared tensor could not follow — and its planted dead neurons
   still go exactly;
5. bfloat16: the same per-expert removal on a bfloat16 Qwen3-MoE (calibrated; statistics in
   float64) keeps exactly the alive neurons, stays bfloat16 and matches at bfloat16's tolerance,
   also reloaded from ``save_hf``;
6. the row statistics: ``expert_row_sums`` counts each row for the expert whose offsets hold it.
"""
from __future__ import annotations


import pytest
import torch

import subclone_graph as sg
from subclone_graph.models import hf_families, hf_zoo
from subclone_graph.passes import state
from subclone_graph.passes.analysis.expert_orders import expert_row_sums
from subclone_testing import analysed, family, groups_of, plant_dead, plant_dead_per_expert, relative_error, run

pytestmark = pytest.mark.filterwarnings("ignore")


parent = family     # (model, example, a private analysed copy), traced once per session


def per_expert(gm):
    return [g for g in groups_of(gm, "ffn") if g.experts is not None]


def plant(gm):
    """Different dead neurons in each expert; every other neuron in the other MLPs."""
    graph = gm.meta["subclone.channel_graph"]
    routed = per_expert(gm)
    plant_dead(gm, {g.id: list(range(1, g.size, 2)) for g in groups_of(gm, "ffn") if g.experts is None})
    plant_dead_per_expert(gm, {g.id: [[i for i in range(g.size) if (i + e) % 2 == 1]
                                      for e in range(graph.groups[g.experts].size)] for g in routed})
    return routed


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3"])
def test_routed_experts_keep_one_order_each(name):
    _, _, gm = parent(name)
    graph = gm.meta["subclone.channel_graph"]
    routed = per_expert(gm)
    assert routed and all(g.size == 32 and graph.groups[g.experts].size == 4 for g in routed)
    others = [g for g in groups_of(gm, "ffn") if g.experts is None]
    assert sorted({g.size for g in others}) == ([32, 128] if name == "deepseek_v3" else [128])
    assert all(any("experts" in t for t, _ in g.tensors) for g in routed)


CASES = [(name, False) for name in ("qwen3_moe", "deepseek_v3", "mixtral", "qwen2_moe", "glm4_moe")]
CASES += [("qwen3_moe", True), ("deepseek_v3", True)]


@pytest.mark.parametrize("name,calibrated", CASES)
def test_different_dead_neurons_per_expert_are_removed_exactly(name, calibrated, tmp_path):
    model, example, gm = parent(name)
    routed = plant(gm)
    calibration = [hf_zoo.example_inputs(model, 2, 16, 40 + s) for s in range(3)] if calibrated else None
    child = sg.subclone(gm, example, sg.Target(ffn=0.5), calibration=calibration)
    keep, sizes = child.meta["subclone.keep"], child.meta["subclone.sizes"]
    for g in routed:
        assert sizes[g.id] == g.size // 2
        expected = torch.stack([torch.arange(e % 2, g.size, 2) for e in range(len(keep[g.id]))])
        assert torch.equal(keep[g.id], expected)          # each expert its own alive neurons
    for batch, seq in ((2, 8), (3, 13)):
        x = hf_zoo.example_inputs(model, batch, seq, 7)
        assert relative_error(run(child, x), run(gm, x)) < 1e-4
    if not calibrated:
        path = sg.save_hf(child, tmp_path / "hf")
        loaded = type(model).from_pretrained(path).eval()
        experts = [m for n, m in loaded.named_modules() if n.endswith("mlp.experts")]
        assert sorted({m.down_proj.shape[-1] for m in experts}) == sorted({g.size // 2 for g in routed})
        x = hf_zoo.example_inputs(model, 2, 9, 3)
        assert relative_error(run(loaded, x), run(child, x)) < 1e-4
        assert relative_error(run(loaded, x), run(gm, x)) < 1e-4


def _share_a_scale_across_experts(gm) -> int:
    """Multiply the input of every down grouped matmul by one (inner,) parameter shared by all
    experts; return how many were spliced in."""
    graph = gm.meta["subclone.channel_graph"]
    spliced = 0
    for node in list(gm.graph.nodes):
        rows = state.EXPERT_ROWS.of(node, graph)
        x = node.args[0] if rows is not None else None
        if x is None or graph.groups[state.CHANNELS.of(x, graph).groups[1]].experts is None:
            continue
        name = f"shared_scale_{spliced}"
        gm.register_parameter(name, torch.nn.Parameter(torch.rand(x.meta["val"].shape[1]) + 0.5))
        with gm.graph.inserting_before(node):
            scale = gm.graph.get_attr(name)
            scale.meta["val"] = getattr(gm, name).detach()
            scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (x, scale))
            scaled.meta = {**x.meta}
        node.args = (scaled, *node.args[1:])
        spliced += 1
    gm.recompile()
    return spliced


def test_a_width_shared_across_experts_keeps_one_order():
    model, example, gm = parent("qwen3_moe")
    assert _share_a_scale_across_experts(gm) == 2
    sg.analyze_channels(gm)
    routed = [g for g in groups_of(gm, "ffn") if g.size == 32]
    assert routed and all(g.experts is None for g in routed)
    plant_dead(gm, {g.id: list(range(1, g.size, 2)) for g in groups_of(gm, "ffn")})
    child = sg.subclone(gm, example, sg.Target(ffn=0.5))
    keep = child.meta["subclone.keep"]
    assert all(torch.equal(keep[g.id], torch.arange(0, 32, 2)) for g in routed)
    x = hf_zoo.example_inputs(model, 3, 13, 7)
    assert relative_error(run(child, x), run(gm, x)) < 1e-4


def test_bfloat16_experts_keep_their_own_alive_neurons(tmp_path):
    from subclone_graph.export.tolerance import tolerance_for

    model = hf_families.build("qwen3_moe").to(torch.bfloat16)
    example = hf_zoo.example_inputs(model, 2, 8, 0)
    gm = analysed(model, example)
    routed = plant(gm)
    calibration = [hf_zoo.example_inputs(model, 2, 16, 40 + s) for s in range(3)]
    child = sg.subclone(gm, example, sg.Target(ffn=0.5), calibration=calibration)
    keep = child.meta["subclone.keep"]
    assert all(torch.equal(keep[g.id], torch.stack([torch.arange(e % 2, 32, 2) for e in range(4)])) for g in routed)
    assert {p.dtype for p in child.parameters()} == {torch.bfloat16}
    x = hf_zoo.example_inputs(model, 3, 13, 7)
    assert relative_error(run(child, x).float(), run(gm, x).float()) < tolerance_for(torch.bfloat16)
    loaded = type(model).from_pretrained(sg.save_hf(child, tmp_path / "hf"), dtype=torch.bfloat16).eval()
    assert relative_error(run(loaded, x).float(), run(child, x).float()) < tolerance_for(torch.bfloat16)


def test_expert_row_sums_count_each_row_for_its_expert():
    x = torch.tensor([[1.0, -2.0], [3.0, 4.0], [-5.0, 6.0], [7.0, 8.0], [100.0, 100.0]])
    offsets = torch.tensor([1, 1, 4], dtype=torch.int32)       # expert 1 has no rows; row 4 is past the end
    sums, rows = expert_row_sums(x, 1, offsets)
    assert torch.equal(rows, torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64))
    assert torch.equal(sums, torch.tensor([[1.0, 2.0], [0.0, 0.0], [15.0, 18.0]], dtype=torch.float64))
