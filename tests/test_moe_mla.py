"""Mixture-of-experts and latent attention (DeepSeek-V3, Qwen3-MoE built from tiny configs).

1. DeepSeek-V3's low-rank query and key/value widths are ``latent`` groups (a norm averages
   over them), not MLP widths: ``Target(ffn=0.5)`` leaves them whole and halves the dense,
   shared and routed MLPs — every other neuron planted dead in each is removed exactly;
2. dead latent-attention heads (the nope, rope and value parts of a head together, the key
   written into a new tensor by ``copy_``) → ``Target(heads=…)`` removes exactly them;
3. a dead channel in every latent → ``Target(latent=…)`` removes it, outputs unchanged (the
   norm over the shrunk latent corrected by √(D/d));
4. the children of 1–3 saved with ``save_hf`` reload as the parent's class and match;
5. a reduced child (hidden, heads, half of every MLP, two layers; DeepSeek-V3 also half of its
   latents) exports to ONNX — the experts' grouped matmuls through ``onnx_moe`` — and
   onnxruntime matches it at the example size and at another batch and sequence length.
"""
from __future__ import annotations


import pytest
import torch

import subclone_graph as sg
from subclone_graph.models import hf_zoo
from subclone_testing import family, groups_of, plant_dead, plant_dead_heads, relative_error, run

pytestmark = pytest.mark.filterwarnings("ignore")


parent = family     # (model, example, a private analysed copy), traced once per session


def unchanged(child, gm, model):
    for batch, seq in ((2, 8), (3, 13)):
        x = hf_zoo.example_inputs(model, batch, seq, 7)
        assert relative_error(run(child, x), run(gm, x)) < 1e-4


def reloads(child, model, folder):
    path = sg.save_hf(child, folder)
    loaded = type(model).from_pretrained(path).eval()
    x = hf_zoo.example_inputs(model, 2, 9, 3)
    assert relative_error(run(loaded, x), run(child, x)) < 1e-4
    return loaded.config


def test_latent_ranks_are_their_own_kind():
    _, _, gm = parent("deepseek_v3")
    assert sorted({g.size for g in groups_of(gm, "latent")}) == [32, 48]
    assert sorted({g.size for g in groups_of(gm, "ffn")}) == [32, 128]


@pytest.mark.parametrize("name", ["deepseek_v3", "qwen3_moe"])
def test_half_of_every_mlp_removes_planted_dead_neurons(name, tmp_path):
    model, example, gm = parent(name)
    ffn = groups_of(gm, "ffn")
    plant_dead(gm, {g.id: list(range(1, g.size, 2)) for g in ffn})
    child = sg.subclone(gm, example, sg.Target(ffn=0.5))
    sizes = child.meta["subclone.sizes"]
    assert all(sizes[g.id] == g.size // 2 for g in ffn)
    assert all(sizes[g.id] == g.size for g in groups_of(gm, "latent"))
    unchanged(child, gm, model)
    config = reloads(child, model, tmp_path / "hf")
    assert config.intermediate_size == 64 and config.moe_intermediate_size == 16


def test_dead_latent_attention_heads_are_removed_exactly(tmp_path):
    model, example, gm = parent("deepseek_v3")
    heads, _ = plant_dead_heads(gm)
    child = sg.subclone(gm, example, sg.Target(heads=heads))
    assert sg.count_parameters(child) < sg.count_parameters(gm)
    unchanged(child, gm, model)
    assert reloads(child, model, tmp_path / "hf").num_attention_heads == heads


def test_a_dead_latent_channel_is_removed_exactly(tmp_path):
    model, example, gm = parent("deepseek_v3")
    latent = groups_of(gm, "latent")
    # its experts run through torch._grouped_mm: widths from fractions are multiples of 4 (float32)
    plant_dead(gm, {g.id: [5, 9, 17, 20] for g in latent})
    child = sg.subclone(gm, example, sg.Target(latent=0.9))      # 48 → 43.2 → 44, 32 → 28.8 → 28
    sizes = child.meta["subclone.sizes"]
    assert sorted({sizes[g.id] for g in latent}) == [28, 44]
    unchanged(child, gm, model)
    config = reloads(child, model, tmp_path / "hf")
    assert (config.q_lora_rank, config.kv_lora_rank) == (44, 28)


@pytest.mark.parametrize("name", ["deepseek_v3", "qwen3_moe"])
def test_onnx_matches_a_reduced_child(name, tmp_path):
    from subclone_graph.export.onnx_export import run_onnx
    import numpy as np

    model, example, gm = parent(name)
    target = sg.Target(hidden=48, heads=2, ffn=0.5, layers=2, latent=0.5 if name == "deepseek_v3" else None)
    child = sg.subclone(gm, example, target)
    path = tmp_path / "child.onnx"
    assert sg.export_onnx(child, example, path) <= 1e-4
    x = hf_zoo.example_inputs(model, 3, 11, 21)
    got = run_onnx(path, list(x))[0]
    assert np.abs(got - run(child, x).numpy()).max() < 1e-4
