"""A real reduction: exact target shapes, other batch/sequence sizes, and training.

Target: half the hidden width, half the MLP, half the heads (and kv heads), one layer less.
"""
from __future__ import annotations

import re

import pytest
import torch

import subclone_graph as sg
from subclone_graph import models
from subclone_testing import GQA, calibration, output_tensor, run

D = 16  # head dim of every fixture model

# parameter name -> expected shape after Target(hidden=32, ffn=64, heads=2, kv_heads=1 | 2, layers=parent-1)
EXPECTED = {
    "llama": {
        "model.embed_tokens.weight": (97, 32), "model.layers.0.self_attn.q_proj.weight": (2 * D, 32),
        "model.layers.0.self_attn.k_proj.weight": (1 * D, 32), "model.layers.0.self_attn.v_proj.weight": (1 * D, 32),
        "model.layers.0.self_attn.o_proj.weight": (32, 2 * D), "model.layers.0.mlp.gate_proj.weight": (64, 32),
        "model.layers.0.mlp.up_proj.weight": (64, 32), "model.layers.0.mlp.down_proj.weight": (32, 64),
        "model.layers.0.input_layernorm.weight": (32,), "model.norm.weight": (32,),
    },
    "phi3": {
        "model.layers.0.self_attn.qkv_proj.weight": (2 * D + 2 * D, 32),
        "model.layers.0.self_attn.o_proj.weight": (32, 2 * D),
        "model.layers.0.mlp.gate_up_proj.weight": (2 * 64, 32), "model.layers.0.mlp.down_proj.weight": (32, 64),
    },
    "gpt2": {
        "transformer.wte.weight": (97, 32), "transformer.wpe.weight": (64, 32),
        "transformer.h.0.attn.c_attn.weight": (32, 3 * 2 * D), "transformer.h.0.attn.c_attn.bias": (3 * 2 * D,),
        "transformer.h.0.attn.c_proj.weight": (2 * D, 32), "transformer.h.0.mlp.c_fc.weight": (32, 64),
        "transformer.h.0.mlp.c_proj.weight": (64, 32), "transformer.h.0.ln_1.bias": (32,),
    },
    "torch_encoder": {
        "embed.weight": (97, 32), "encoder.layers.0.self_attn.in_proj_weight": (3 * 2 * D, 32),
        "encoder.layers.0.self_attn.in_proj_bias": (3 * 2 * D,), "encoder.layers.0.self_attn.out_proj.weight": (32, 2 * D),
        "encoder.layers.0.linear1.weight": (64, 32), "encoder.layers.0.linear2.weight": (32, 64),
    },
    "vit_like": {
        "patch_embed.weight": (32, 3, 8, 8), "cls_token": (1, 1, 32), "pos_embed": (1, 17, 32),
        "blocks.0.attn.q.weight": (2 * D, 32), "blocks.0.mlp.fc1.weight": (64, 32), "head.weight": (10, 32),
    },
    "llama_like": {
        "embed.weight": (97, 32), "layers.0.input_norm.weight": (32,), "layers.0.attn.q_proj.weight": (2 * D, 32),
        "layers.0.attn.k_proj.weight": (D, 32), "layers.0.attn.v_proj.weight": (D, 32),
        "layers.0.attn.o_proj.weight": (32, 2 * D), "layers.0.post_attn_norm.weight": (32,),
        "layers.0.mlp.gate_proj.weight": (64, 32), "layers.0.mlp.up_proj.weight": (64, 32),
        "layers.0.mlp.down_proj.weight": (32, 64),
    },
    "gpt_like": {
        "blocks.0.ln1.weight": (32,), "blocks.0.ln1.bias": (32,), "blocks.0.attn.qkv.weight": (3 * 2 * D, 32),
        "blocks.0.attn.qkv.bias": (3 * 2 * D,), "blocks.0.attn.proj.weight": (32, 2 * D), "blocks.0.attn.proj.bias": (32,),
        "blocks.0.mlp.fc.weight": (64, 32), "blocks.0.mlp.fc.bias": (64,), "blocks.0.mlp.proj.weight": (32, 64),
    },
    "qwen3": {
        "model.embed_tokens.weight": (97, 32), "model.layers.0.self_attn.q_proj.weight": (2 * D, 32),
        "model.layers.0.self_attn.k_proj.weight": (D, 32), "model.layers.0.self_attn.v_proj.weight": (D, 32),
        "model.layers.0.self_attn.o_proj.weight": (32, 2 * D), "model.layers.0.self_attn.q_norm.weight": (D,),
        "model.layers.0.self_attn.k_norm.weight": (D,), "model.layers.0.mlp.gate_proj.weight": (64, 32),
        "model.layers.0.mlp.down_proj.weight": (32, 64), "model.layers.0.input_layernorm.weight": (32,),
    },
    "mistral": {
        "model.embed_tokens.weight": (97, 32), "model.layers.0.self_attn.q_proj.weight": (2 * D, 32),
        "model.layers.0.self_attn.k_proj.weight": (D, 32), "model.layers.0.self_attn.v_proj.weight": (D, 32),
        "model.layers.0.self_attn.o_proj.weight": (32, 2 * D), "model.layers.0.mlp.up_proj.weight": (64, 32),
        "model.layers.0.mlp.down_proj.weight": (32, 64), "model.layers.0.post_attention_layernorm.weight": (32,),
    },
    "bert": {
        "bert.embeddings.word_embeddings.weight": (97, 32), "bert.embeddings.position_embeddings.weight": (64, 32),
        "bert.embeddings.token_type_embeddings.weight": (2, 32), "bert.embeddings.LayerNorm.bias": (32,),
        "bert.encoder.layer.0.attention.self.query.weight": (2 * D, 32),
        "bert.encoder.layer.0.attention.self.value.bias": (2 * D,),
        "bert.encoder.layer.0.attention.output.dense.weight": (32, 2 * D),
        "bert.encoder.layer.0.intermediate.dense.weight": (64, 32), "bert.encoder.layer.0.output.dense.weight": (32, 64),
    },
    "vit": {
        "vit.embeddings.cls_token": (1, 1, 32), "vit.embeddings.position_embeddings": (1, 17, 32),
        "vit.embeddings.patch_embeddings.projection.weight": (32, 3, 8, 8),
        "vit.layers.0.attention.q_proj.weight": (2 * D, 32), "vit.layers.0.attention.k_proj.bias": (2 * D,),
        "vit.layers.0.attention.o_proj.weight": (32, 2 * D), "vit.layers.0.layernorm_before.weight": (32,),
    },
}
SLOW = ("bert", "vit", "qwen3", "mistral", "vit_like", "gpt_like", "torch_encoder")
NAMES = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in models.MODEL_NAMES]


def _target(name, gm_layers):
    kv = 1 if name in GQA else 2
    return sg.Target(hidden=32, ffn=64, heads=2, kv_heads=kv, layers=gm_layers - 1)


def _reduce(name):
    model, inputs = models.build(name)
    gm = sg.trace(model, inputs)
    sg.FindResidualBlocksPass()(gm)
    layers = len(gm.meta["subclone.layers"])
    child = sg.subclone(gm, inputs, _target(name, layers), calibration=calibration(model))
    return model, inputs, child, layers


@pytest.mark.parametrize("name", NAMES)
def test_real_reduction_has_the_target_shapes_and_runs_at_other_sizes(name):
    model, inputs, child, layers = _reduce(name)
    params = dict(child.named_parameters(remove_duplicate=False))
    for fqn, shape in EXPECTED[name].items():
        assert tuple(params[fqn].shape) == shape, fqn
    for fqn, param in params.items():       # the layers not listed: same shapes as the listed layer's
        listed = re.sub(r"\.\d+\.", ".0.", fqn, count=1)
        if listed != fqn and listed in EXPECTED[name]:
            assert tuple(param.shape) == EXPECTED[name][listed], fqn
    assert len(child.meta["subclone.layers"]) == layers - 1
    assert sg.count_parameters(child) < sg.count_parameters(model) / 2
    for batch, seq in ((1, 3), (4, 13)):
        x = models.make_inputs(model, batch, seq, seed=3)
        y, y_parent = run(child, x), run(model, x)
        assert y.shape == y_parent.shape and torch.isfinite(y).all()


def test_tied_embedding_stays_one_tensor():
    model, inputs, child, _ = _reduce("llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tied = [n for n, p in child.named_parameters(remove_duplicate=False)
            if p is child.get_parameter("lm_head.weight")]
    assert len(tied) == 2 and child.get_parameter("lm_head.weight").shape == (97, 32)


def test_norms_carry_the_sqrt_scale_and_other_weights_are_slices():
    model, inputs, child, _ = _reduce("llama")
    keep = child.meta["subclone.keep"]
    residual = next(g for g in child.meta["subclone.channel_graph"].groups.values() if g.kind == "residual")
    kept = keep[residual.id]
    parent_norm = model.model.norm.weight.detach()[kept]
    torch.testing.assert_close(child.get_parameter("model.norm.weight").detach(), parent_norm * (64 / 32) ** 0.5)
    torch.testing.assert_close(child.get_parameter("model.embed_tokens.weight").detach(),
                               model.model.embed_tokens.weight.detach()[:, kept])


@pytest.mark.parametrize("name", [n if n in ("llama", "gpt2", "vit_like") else pytest.param(n, marks=pytest.mark.slow)
                                  for n in models.MODEL_NAMES])
def test_twenty_optimizer_steps_lower_the_loss(name):
    model, inputs, child, _ = _reduce(name)
    child.train()
    torch.manual_seed(0)
    x = models.make_inputs(model, 4, 12, seed=11)
    logits = output_tensor(child(*x))
    targets = torch.randint(0, logits.shape[-1], logits.shape[:-1])
    optimizer = torch.optim.AdamW(child.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(output_tensor(child(*x)).flatten(0, -2), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(p.grad is not None for p in child.parameters() if p.requires_grad)


def test_the_child_takes_train_and_eval_like_any_module():
    model, inputs, child, _ = _reduce("llama")
    reference = run(child, inputs)
    assert child.train() is child and child.training
    assert child.eval() is child and not child.training
    torch.testing.assert_close(run(child, inputs), reference)
