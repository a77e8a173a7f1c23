"""Tests for the tiny fixture models in ``models/`` (the model zoo).

Hand-written models are checked for output shape, finiteness, deterministic
construction and ``torch.export`` (strict=False, dynamic batch/seq) parity at
two input sizes.  The Hugging Face models are checked for shape/finiteness;
one HF causal LM (llama) is also exported, the rest are exported only when
``SUBCLONE_SLOW_TESTS=1`` (each export costs a few seconds).
"""


import pytest
import torch
from torch.export import export

from subclone_graph import models as zoo

HAND = ["gpt_like", "llama_like", "vit_like", "torch_encoder"]
HF = list(zoo.HF_FACTORIES)
# The other HF exports are compared with eager models by test_core's identity tests.
HF_EXPORT = ["llama"]

# name -> (expected output shape given batch b and seq s)
EXPECTED = {
    "gpt_like": lambda b, s: (b, s, 97),
    "llama_like": lambda b, s: (b, s, 97),
    "vit_like": lambda b, s: (b, 10),
    "torch_encoder": lambda b, s: (b, 5),
    "gpt2": lambda b, s: (b, s, 97),
    "bert": lambda b, s: (b, s, 97),
    "vit": lambda b, s: (b, 10),
    "llama": lambda b, s: (b, s, 97),
    "qwen3": lambda b, s: (b, s, 97),
    "mistral": lambda b, s: (b, s, 97),
    "phi3": lambda b, s: (b, s, 97),
}


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def _check_export(name, sizes=((1, 3), (5, 17))):
    model, args = zoo.build(name)
    kwargs = zoo.export_kwargs(model)
    ep = export(model, args, kwargs=kwargs,
                dynamic_shapes=zoo.dynamic_shapes(model), strict=False)
    gm = ep.module()
    for batch, seq in sizes:
        inputs = zoo.make_inputs(model, batch, seq, seed=123)
        with torch.no_grad():
            eager = _logits(model(*inputs, **kwargs))
            exported = _logits(gm(*inputs, **kwargs))
        assert exported.shape == eager.shape == EXPECTED[name](batch, seq)
        torch.testing.assert_close(exported, eager, rtol=1e-5, atol=1e-6)
    return ep


def test_names_cover_everything():
    assert set(zoo.MODEL_NAMES) == set(EXPECTED)
    assert set(zoo.HF_FACTORIES) == {"gpt2", "bert", "vit", "llama", "qwen3",
                                     "mistral", "phi3"}


@pytest.mark.parametrize("name", HAND + HF)
def test_forward_shape_and_finite(name):
    model, args = zoo.build(name, batch=3, seq=11)
    assert not model.training
    with torch.no_grad():
        out = _logits(model(*args, **zoo.export_kwargs(model)))
    assert out.shape == EXPECTED[name](3, 11)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.abs().sum() > 0


@pytest.mark.parametrize("name", HAND + ["llama", "phi3"])
def test_deterministic_construction(name):
    a, _ = zoo.build(name, seed=7)
    b, _ = zoo.build(name, seed=7)
    c, _ = zoo.build(name, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_tiny_llama_tied_weights():
    model, _ = zoo.build("llama_like")
    assert model.lm_head.weight is model.embed.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # deduplicated by named_parameters


def test_hf_llama_tied_weights():
    model = zoo.HF_FACTORIES["llama"]()
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_hand_written_structure():
    gpt, _ = zoo.build("gpt_like")
    assert len(gpt.blocks) == 4
    assert gpt.blocks[0].attn.qkv.out_features == 3 * 64
    assert gpt.lm_head.weight is not gpt.wte.weight
    llama, _ = zoo.build("llama_like")
    assert len(llama.layers) == 4
    attn = llama.layers[0].attn
    assert attn.q_proj.out_features == 64 and attn.k_proj.out_features == 32
    assert attn.q_proj.bias is None
    vit, _ = zoo.build("vit_like")
    assert vit.pos_embed.shape == (1, 17, 64)
    assert vit.cls_token.shape == (1, 1, 64)


def test_hf_phi3_fused_projections():
    model = zoo.HF_FACTORIES["phi3"]()
    layer = model.model.layers[0]
    assert layer.self_attn.qkv_proj.out_features == (4 + 2 * 2) * 16
    assert layer.mlp.gate_up_proj.out_features == 2 * 128


@pytest.mark.parametrize("name", HAND)
def test_hand_written_export_matches_eager(name):
    ep = _check_export(name)
    targets = {n.target for n in ep.module().graph.nodes
               if n.op == "call_function"}
    assert torch.ops.aten.scaled_dot_product_attention.default in targets


def test_vision_export_batch_only():
    model, args = zoo.build("vit_like")
    spec = zoo.dynamic_shapes(model)
    assert list(spec) == ["pixel_values"] and list(spec["pixel_values"]) == [0]


@pytest.mark.parametrize("name", HF_EXPORT)
def test_hf_export_matches_eager(name):
    _check_export(name)
