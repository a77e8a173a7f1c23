"""More tiny Hugging Face families, built from configs (random weights, no download), for the
checks of ``tests/test_families.py``: what the analysis must handle beyond the core fixtures.

Each entry: ``FAMILIES[name] = Family(build, gqa, rms, target, note)``; ``build(seed)`` returns
an eval-mode model; inputs come from ``hf_zoo.example_inputs``. Sizes follow ``hf_zoo``
(hidden 64, 4 heads, head_dim 16, 3 layers, MLP 128, vocab 97). ``target`` is a real reduction
the family supports (a fraction where its groups of one kind differ in width); ``rms``: its stream norms are RMSNorms (dead residual channels are then
removable exactly); ``fixed_seq``: the family's code specialises the sequence length.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import transformers as T

from .hf_zoo import FFN, HEAD_DIM, HEADS, HIDDEN, KV_HEADS, LAYERS, VOCAB

__all__ = ["FAMILIES", "Family", "build"]

GQA_TARGET = {"hidden": 48, "heads": 2, "kv_heads": 1, "ffn": 64, "layers": 2}
MHA_TARGET = {"hidden": 48, "heads": 2, "ffn": 64, "layers": 2}
_TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


@dataclass
class Family:
    build: Callable[[int], torch.nn.Module]
    gqa: bool
    rms: bool
    target: dict = field(default_factory=dict)
    note: str = ""
    fixed_seq: bool = False


def _model(model_cls, config, seed: int, attention: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(seed)
    config._attn_implementation = attention
    if hasattr(config, "num_experts_per_tok"):
        config._experts_implementation = "grouped_mm"     # the exportable one (eager experts branch on data)
    return model_cls(config).eval()


def _decoder(**extra) -> dict:
    cfg = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
           "num_hidden_layers": LAYERS, "intermediate_size": FFN, "max_position_embeddings": 64,
           "attention_dropout": 0.0, **_TOKENS}
    cfg.update(extra)
    return cfg


def _family(model_cls, config_cls, config: dict, attention: str = "sdpa"):
    return lambda seed=0: _model(model_cls, config_cls(**config), seed, attention)


FAMILIES = {
    "gemma": Family(_family(T.GemmaForCausalLM, T.GemmaConfig, _decoder(head_dim=HEAD_DIM)), True, True, GQA_TARGET,
                    "(1 + w) RMSNorm gain, scaled embedding"),
    "gemma2": Family(_family(T.Gemma2ForCausalLM, T.Gemma2Config,
                             _decoder(head_dim=HEAD_DIM, sliding_window=4, query_pre_attn_scalar=16), "eager"),
                     True, True, GQA_TARGET, "eager attention (two matmuls), logit soft-capping, sandwich norms"),
    "gemma3": Family(_family(T.Gemma3ForCausalLM, T.Gemma3TextConfig,
                             _decoder(head_dim=HEAD_DIM, sliding_window=4, query_pre_attn_scalar=16,
                                      layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
                     True, True, GQA_TARGET, "QK-norm per head, local/global layers"),
    "qwen2": Family(_family(T.Qwen2ForCausalLM, T.Qwen2Config, _decoder()), True, True, GQA_TARGET, "q/k/v biases"),
    "olmo2": Family(_family(T.Olmo2ForCausalLM, T.Olmo2Config, _decoder()), True, True, GQA_TARGET,
                    "QK-norm over the whole heads·head_dim projection, post-norms"),
    "cohere": Family(_family(T.CohereForCausalLM, T.CohereConfig, _decoder(logit_scale=0.5)), True, False, GQA_TARGET,
                     "parallel attention and MLP, LayerNorm without bias"),
    "gpt_neox": Family(_family(T.GPTNeoXForCausalLM, T.GPTNeoXConfig,
                               {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_attention_heads": HEADS,
                                "num_hidden_layers": LAYERS, "intermediate_size": FFN, "max_position_embeddings": 64,
                                "partial_rotary_factor": 0.25, "attention_dropout": 0.0, "hidden_dropout": 0.0,
                                "use_parallel_residual": True, **_TOKENS}),
                       False, False, MHA_TARGET, "fused per-head-interleaved QKV, parallel residual, partial rotary"),
    "phi": Family(_family(T.PhiForCausalLM, T.PhiConfig,
                          _decoder(num_key_value_heads=HEADS, partial_rotary_factor=0.5, resid_pdrop=0.0,
                                   embd_pdrop=0.0)), False, False, MHA_TARGET, "parallel block, partial rotary"),
    "stablelm": Family(_family(T.StableLmForCausalLM, T.StableLmConfig,
                               _decoder(partial_rotary_factor=0.25, hidden_dropout=0.0)), True, False, GQA_TARGET),
    "starcoder2": Family(_family(T.Starcoder2ForCausalLM, T.Starcoder2Config,
                                 _decoder(residual_dropout=0.0, embedding_dropout=0.0, sliding_window=None)),
                         True, False, GQA_TARGET, "biased LayerNorm, GELU MLP"),
    "granite": Family(_family(T.GraniteForCausalLM, T.GraniteConfig,
                              _decoder(embedding_multiplier=12.0, residual_multiplier=0.22,
                                       attention_multiplier=0.0625, logits_scaling=8.0)),
                      True, True, GQA_TARGET, "residual, embedding and logit multipliers"),
    "gptj": Family(_family(T.GPTJForCausalLM, T.GPTJConfig,
                           {"vocab_size": VOCAB, "n_embd": HIDDEN, "n_head": HEADS, "n_layer": LAYERS,
                            "n_positions": 64, "rotary_dim": 8, "n_inner": FFN, "resid_pdrop": 0.0,
                            "embd_pdrop": 0.0, "attn_pdrop": 0.0, **_TOKENS}),
                   False, False, MHA_TARGET, "parallel block, interleaved rotary"),
    "opt": Family(_family(T.OPTForCausalLM, T.OPTConfig,
                          {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_attention_heads": HEADS,
                           "num_hidden_layers": LAYERS, "ffn_dim": FFN, "word_embed_proj_dim": HIDDEN,
                           "max_position_embeddings": 64, "dropout": 0.0, "attention_dropout": 0.0, **_TOKENS}),
                  False, False, MHA_TARGET, "the MLP works on the stream flattened to (b·s, h)"),
    "falcon": Family(_family(T.FalconForCausalLM, T.FalconConfig,
                             {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_attention_heads": HEADS,
                              "num_kv_heads": KV_HEADS, "num_hidden_layers": LAYERS, "new_decoder_architecture": True,
                              "ffn_hidden_size": FFN, "hidden_dropout": 0.0, "attention_dropout": 0.0,
                              "max_position_embeddings": 64, **_TOKENS}),
                     True, False, GQA_TARGET, "weights read as x @ W.T, fused grouped QKV, in-place residual add"),
    "bloom": Family(_family(T.BloomForCausalLM, T.BloomConfig,
                            {"vocab_size": VOCAB, "hidden_size": HIDDEN, "n_head": HEADS, "n_layer": LAYERS,
                             "hidden_dropout": 0.0, "attention_dropout": 0.0, **_TOKENS}, "eager"),
                    False, False, {"hidden": 48, "ffn": 64, "layers": 2},
                    "no attention heads to shrink: heads merged with the batch (b·h, s, d), "
                    "ALiBi slopes from an arange over the heads"),
    "mixtral": Family(_family(T.MixtralForCausalLM, T.MixtralConfig,
                              _decoder(head_dim=HEAD_DIM, num_local_experts=4, num_experts_per_tok=2,
                                       sliding_window=None)),
                      True, True, GQA_TARGET, "mixture of experts: token routing, grouped expert matmuls"),
    "qwen2_moe": Family(_family(T.Qwen2MoeForCausalLM, T.Qwen2MoeConfig,
                                _decoder(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                         shared_expert_intermediate_size=128, decoder_sparse_step=1)),
                        True, True, {**GQA_TARGET, "ffn": 0.5}, "routed experts and a gated shared expert"),
    "qwen3_moe": Family(_family(T.Qwen3MoeForCausalLM, T.Qwen3MoeConfig,
                                _decoder(head_dim=HEAD_DIM, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[0])),
                        True, True, {**GQA_TARGET, "ffn": 0.5},
                        "a dense first MLP (128), routed experts (32), QK-norm"),
    "deepseek_v3": Family(_family(T.DeepseekV3ForCausalLM, T.DeepseekV3Config,
                                  _decoder(num_key_value_heads=HEADS, moe_intermediate_size=32, n_routed_experts=4,
                                           num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
                                           first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48,
                                           qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)),
                          False, True, {**MHA_TARGET, "heads": 2, "ffn": 0.5},
                          "latent attention (MLA: low-rank q and kv, a shared rope key written by copy_), "
                          "a dense first MLP, sigmoid-routed experts with a score correction, a shared expert"),
    "glm4_moe": Family(_family(T.Glm4MoeForCausalLM, T.Glm4MoeConfig,
                               _decoder(head_dim=HEAD_DIM, moe_intermediate_size=32, n_routed_experts=4,
                                        num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
                                        first_k_dense_replace=1)),
                       True, True, {**GQA_TARGET, "ffn": 0.5},
                       "an MoE with a shared expert beside its routed ones, a dense first MLP, partial rotary"),
    "gpt2_eager": Family(_family(T.GPT2LMHeadModel, T.GPT2Config,
                                 {"vocab_size": VOCAB, "n_embd": HIDDEN, "n_head": HEADS, "n_layer": LAYERS,
                                  "n_positions": 64, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                                  "bos_token_id": VOCAB - 1, "eos_token_id": VOCAB - 1}, "eager"),
                         False, False, MHA_TARGET, "eager attention, Conv1D projections"),
    "llama_eager": Family(_family(T.LlamaForCausalLM, T.LlamaConfig, _decoder(head_dim=HEAD_DIM), "eager"),
                          True, True, GQA_TARGET, "eager attention with repeated kv heads"),
    "roberta": Family(_family(T.RobertaForMaskedLM, T.RobertaConfig,
                              {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_attention_heads": HEADS,
                               "num_hidden_layers": LAYERS, "intermediate_size": FFN, "max_position_embeddings": 66,
                               "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                               "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}),
                      False, False, MHA_TARGET, "post-norm encoder"),
    "distilbert": Family(_family(T.DistilBertForMaskedLM, T.DistilBertConfig,
                                 {"vocab_size": VOCAB, "dim": HIDDEN, "n_heads": HEADS, "n_layers": LAYERS,
                                  "hidden_dim": FFN, "max_position_embeddings": 64, "dropout": 0.0,
                                  "attention_dropout": 0.0, "pad_token_id": 0}),
                         False, False, MHA_TARGET, "post-norm encoder"),
    "deit": Family(_family(T.DeiTForImageClassificationWithTeacher, T.DeiTConfig,
                           {"image_size": 32, "patch_size": 8, "num_channels": 3, "hidden_size": HIDDEN,
                            "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "intermediate_size": FFN,
                            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "num_labels": 10}),
                   False, False, MHA_TARGET, "class and distillation tokens, two heads"),
    "convnext": Family(_family(T.ConvNextForImageClassification, T.ConvNextConfig,
                               {"num_channels": 3, "patch_size": 4, "num_stages": 2, "hidden_sizes": [32, 64],
                                "depths": [2, 2], "image_size": 32, "drop_path_rate": 0.0, "num_labels": 10,
                                # the default 1e-6 would hide every MLP branch from the dead-structure checks
                                "layer_scale_init_value": 1.0}, "eager"),
                       False, False, {"hidden": 0.75, "ffn": 0.5, "layers": 3}, "a CNN: depthwise convolutions, no attention"),
    "mamba": Family(_family(T.MambaForCausalLM, T.MambaConfig,
                            {"vocab_size": VOCAB, "hidden_size": HIDDEN, "state_size": 8, "num_hidden_layers": LAYERS,
                             "expand": 2, "conv_kernel": 4, "use_mambapy": False, **_TOKENS}, "eager"),
                    False, True, {"hidden": 48, "layers": 2}, "no attention; a Python loop over the sequence",
                    fixed_seq=True),
}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    return FAMILIES[name].build(seed)
