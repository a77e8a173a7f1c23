"""Tiny randomly initialised Hugging Face ``transformers`` models (fixtures).

Every factory seeds torch (``torch.manual_seed(seed)``), builds the model from
a config (no download), requests ``attn_implementation="sdpa"`` and returns it
in eval mode.  Sizes: vocab 97, hidden 64, 3 layers, 4 attention heads
(head_dim 16).

Factories: ``gpt2``, ``bert``, ``vit``, ``llama``, ``qwen3``, ``mistral``,
``phi3`` (all listed in ``HF_FACTORIES``).  ``example_inputs(model)`` makes a
positional-args tuple: ``(input_ids,)`` for text models and
``(pixel_values,)`` for vision models.  ``export_kwargs(model)`` gives the
keyword arguments to pass alongside them (``{"use_cache": False}`` for the
models whose ``forward`` accepts ``use_cache``).

Config adjustments (all exercised with ``torch.export.export(...,
strict=False)`` and dynamic ``Dim("batch", min=1, max=64)`` /
``Dim("seq", min=2, max=64)``):

* special token ids are set inside the tiny vocab (GPT-2 defaults to 50256,
  Phi-3 uses ``pad_token_id=32000`` which would break ``nn.Embedding``'s
  ``padding_idx``).
* ``head_dim=16`` is set explicitly for the Llama-family configs (their
  defaults are 128, independent of ``hidden_size``).
* GPT-2 ``n_positions=64`` and BERT ``max_position_embeddings=64`` bound the
  sequence length, so ``seq`` max must stay <= 64.
* Mistral's ``sliding_window`` (default 4096) is set to ``None``: with
  ``seq <= 64`` it never triggers anyway and it keeps the attention mask
  identical to Llama's.
* ViT exports with a dynamic batch only (image size is fixed at 32).
* dropout probabilities are 0 (eval mode disables dropout anyway).
"""

import inspect

import torch
import transformers

__all__ = ["gpt2", "bert", "vit", "llama", "qwen3", "mistral", "phi3",
           "HF_FACTORIES", "example_inputs", "export_kwargs", "is_vision"]

VOCAB = 97
HIDDEN = 64
LAYERS = 3
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
FFN = 128
MAX_POS = 64


def _finish(model: torch.nn.Module) -> torch.nn.Module:
    return model.eval()


def _build(model_cls, config_cls, seed: int, **cfg):
    torch.manual_seed(seed)
    config = config_cls(**cfg)
    config._attn_implementation = "sdpa"
    return _finish(model_cls(config))


def gpt2(seed: int = 0) -> torch.nn.Module:
    """GPT2LMHeadModel: n_embd 64, 4 heads, 3 layers, 64 positions, n_inner 256."""
    return _build(
        transformers.GPT2LMHeadModel, transformers.GPT2Config, seed,
        vocab_size=VOCAB, n_embd=HIDDEN, n_head=HEADS, n_layer=LAYERS,
        n_positions=MAX_POS, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)


def bert(seed: int = 0) -> torch.nn.Module:
    """BertForMaskedLM: hidden 64, 4 heads, 3 layers, intermediate 128."""
    return _build(
        transformers.BertForMaskedLM, transformers.BertConfig, seed,
        vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS,
        num_hidden_layers=LAYERS, intermediate_size=FFN,
        max_position_embeddings=MAX_POS, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=0)


def vit(seed: int = 0) -> torch.nn.Module:
    """ViTForImageClassification: 32x32 image, patch 8, hidden 64, 3 layers."""
    return _build(
        transformers.ViTForImageClassification, transformers.ViTConfig, seed,
        image_size=32, patch_size=8, num_channels=3, hidden_size=HIDDEN,
        num_attention_heads=HEADS, num_hidden_layers=LAYERS,
        intermediate_size=FFN, num_labels=10, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)


def _decoder_cfg(**extra):
    cfg = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS,
               num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
               num_hidden_layers=LAYERS, intermediate_size=FFN,
               max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
               pad_token_id=0)
    cfg.update(extra)
    return cfg


def llama(seed: int = 0) -> torch.nn.Module:
    """LlamaForCausalLM: GQA 4/2 heads, 3 layers, tied embeddings."""
    return _build(transformers.LlamaForCausalLM, transformers.LlamaConfig,
                  seed, **_decoder_cfg(tie_word_embeddings=True))


def qwen3(seed: int = 0) -> torch.nn.Module:
    """Qwen3ForCausalLM: head_dim 16, GQA 4/2 heads (q/k RMSNorm per head)."""
    return _build(transformers.Qwen3ForCausalLM, transformers.Qwen3Config,
                  seed, **_decoder_cfg(tie_word_embeddings=False))


def mistral(seed: int = 0) -> torch.nn.Module:
    """MistralForCausalLM: GQA 4/2 heads, sliding window disabled."""
    return _build(transformers.MistralForCausalLM, transformers.MistralConfig,
                  seed, **_decoder_cfg(sliding_window=None))


def phi3(seed: int = 0) -> torch.nn.Module:
    """Phi3ForCausalLM: fused ``qkv_proj`` and ``gate_up_proj``; GQA 4/2."""
    return _build(transformers.Phi3ForCausalLM, transformers.Phi3Config,
                  seed, **_decoder_cfg(original_max_position_embeddings=256,
                                       resid_pdrop=0.0, embd_pdrop=0.0))


HF_FACTORIES = {
    "gpt2": gpt2,
    "bert": bert,
    "vit": vit,
    "llama": llama,
    "qwen3": qwen3,
    "mistral": mistral,
    "phi3": phi3,
}


def is_vision(model: torch.nn.Module) -> bool:
    """True when ``forward`` takes ``pixel_values`` rather than ``input_ids``."""
    return "pixel_values" in inspect.signature(model.forward).parameters


def export_kwargs(model: torch.nn.Module) -> dict:
    """Keyword args for export: ``{"use_cache": False}`` where accepted."""
    if "use_cache" in inspect.signature(model.forward).parameters:
        return {"use_cache": False}
    return {}


def example_inputs(model: torch.nn.Module, batch: int = 2, seq: int = 8,
                   seed: int = 0) -> tuple:
    """``(input_ids,)`` for text models, ``(pixel_values,)`` for vision."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    if is_vision(model):
        size = cfg.image_size
        return (torch.randn(batch, cfg.num_channels, size, size, generator=g),)
    return (torch.randint(0, cfg.vocab_size, (batch, seq), generator=g),)
