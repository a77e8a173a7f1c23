"""Fewer routed experts (``Target.experts``, issue 14) on tiny configs of the Hugging Face classes.

1. the expert dim of the fused expert tensors, the router's rows and any per-expert bias are one
   ``experts`` group (linked through the routing: top-k indices → histogram → grouped-matmul offsets);
2. dead experts — the router never picks them: a very negative score correction (DeepSeek-V3,
   GLM4-MoE), or a router row reading a residual channel planted constant (Qwen3-MoE, Mixtral) —
   score 0 by the REAP criterion (calibrated) and ``Target(experts=2)`` removes exactly them:
   outputs unchanged (1e-4, float32); the histogram's bins and last index follow the new count;
3. ``save_hf``: the parent's class reloads the child with the new expert count in its config and
   matches;
4. keeping fewer experts than the router's top-k is refused with one line naming the top-k;
5. ONNX: a child with fewer experts (and one neuron order per expert) matches it in onnxruntime.
"""
from __future__ import annotations


import pytest
import torch

import subclone_graph as sg
from subclone_graph.models import hf_zoo
from subclone_graph.passes.fx_utils import get_attribute
from subclone_testing import family, groups_of, plant_dead, relative_error, run

pytestmark = pytest.mark.filterwarnings("ignore")
DEAD = (1, 3)
EXPERT_COUNT = {"deepseek_v3": "n_routed_experts", "glm4_moe": "n_routed_experts", "qwen3_moe": "num_experts",
                "mixtral": "num_local_experts"}


parent = family     # (model, example, a private analysed copy), traced once per session


def _never_routed(gm) -> None:
    """Make the router of every MoE layer never pick the experts in ``DEAD``."""
    graph = gm.meta["subclone.channel_graph"]
    routers = {name for g in groups_of(gm, "experts") for name, _ in g.tensors if "experts." not in name}
    biases = [name for name in routers if get_attribute(gm, name).dim() == 1]
    with torch.no_grad():
        if biases:                  # a score correction only used to choose: very negative = never chosen
            for name in biases:
                get_attribute(gm, name)[list(DEAD)] = -1e4
            return
        # no bias: residual channel 0 made constant 1 (nothing reads or writes it, every norm passes
        # it), and the dead experts' router rows read only it, very negatively
        residual = next(g for g in groups_of(gm, "residual"))
        plant_dead(gm, {residual.id: [0]})
        for node in gm.graph.nodes:
            channels = node.meta.get("subclone.node.channels")
            if node.op != "get_attr" or channels is None or residual.id not in channels.groups:
                continue
            tensor = get_attribute(gm, node.target)
            if tensor.dim() == 1 or "embed" in node.target:
                tensor[..., 0] = 1.0            # norm gains and the embedding: channel 0 is 1
        for name in routers:
            router = get_attribute(gm, name)
            router[list(DEAD)] = 0.0
            router[list(DEAD), 0] = -1e4
    assert graph.groups


@pytest.mark.parametrize("name", ["deepseek_v3", "glm4_moe", "qwen3_moe", "mixtral"])
def test_dead_experts_are_removed_exactly(name, tmp_path):
    model, example, gm = parent(name)
    experts = groups_of(gm, "experts")
    assert experts and all(g.size == 4 for g in experts)
    _never_routed(gm)
    calibration = [hf_zoo.example_inputs(model, 2, 16, 40 + s) for s in range(3)]
    child = sg.subclone(gm, example, sg.Target(experts=0.5), calibration=calibration)
    keep, scores = child.meta["subclone.keep"], child.meta["subclone.scores"]
    for g in experts:
        assert torch.equal(keep[g.id], torch.tensor([0, 2]))
        assert all(float(scores[g.id][d]) == 0.0 for d in DEAD) and all(float(scores[g.id][a]) > 0 for a in (0, 2))
    assert all(p.shape[0] == 2 for n, p in child.named_parameters() if "mlp.experts." in n)
    for batch, seq in ((2, 8), (3, 13)):
        x = hf_zoo.example_inputs(model, batch, seq, 7)
        assert relative_error(run(child, x), run(gm, x)) < 1e-4
    loaded = type(model).from_pretrained(sg.save_hf(child, tmp_path / "hf")).eval()
    assert getattr(loaded.config, EXPERT_COUNT[name]) == 2 and loaded.config.num_experts_per_tok == 2
    x = hf_zoo.example_inputs(model, 2, 9, 3)
    assert relative_error(run(loaded, x), run(gm, x)) < 1e-4


def test_fewer_experts_than_the_top_k_is_refused():
    _, example, gm = parent("qwen3_moe")
    with pytest.raises(ValueError) as error:
        sg.subclone(gm, example, sg.Target(experts=1))
    message = str(error.value)
    assert "\n" not in message and "Target.experts=1" in message and "top 2" in message and "keep at least 2" in message


def test_onnx_matches_a_child_with_fewer_experts(tmp_path):
    import numpy as np

    from subclone_graph.export.onnx_export import run_onnx

    model, example, gm = parent("qwen3_moe")
    child = sg.subclone(gm, example, sg.Target(experts=0.5, ffn=0.5))
    assert all(p.shape[0] == 2 for n, p in child.named_parameters() if "mlp.experts." in n)
    path = tmp_path / "child.onnx"
    assert sg.export_onnx(child, example, path) <= 1e-4
    x = hf_zoo.example_inputs(model, 3, 11, 21)
    assert np.abs(run_onnx(path, list(x))[0] - run(child, x).numpy()).max() < 1e-4
