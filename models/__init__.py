"""Tiny transformer models used as test fixtures for ``subclone_graph``.

Hand-written pure-PyTorch models (``TinyGPT``, ``TinyLlama``, ``TinyViT``,
``TinyEncoderClassifier``) and tiny randomly initialised Hugging Face models
(``HF_FACTORIES``).  ``build(name)`` returns ``(model, example_inputs)`` for
any of ``MODEL_NAMES``; ``make_inputs(model, batch, seq)`` makes fresh
inputs of another size; ``export_kwargs(model)`` and ``dynamic_shapes(model)``
give the matching ``kwargs`` / ``dynamic_shapes`` for
``torch.export.export(model, example_inputs, kwargs=...,
dynamic_shapes=..., strict=False)``.
"""

import torch
from torch.export import Dim

from .gpt_like import TinyGPT
from .hf_zoo import HF_FACTORIES, example_inputs, export_kwargs, is_vision
from .llama_like import TinyLlama
from .torch_encoder import TinyEncoderClassifier
from .vit_like import TinyViT

__all__ = ["TinyGPT", "TinyLlama", "TinyViT", "TinyEncoderClassifier",
           "HF_FACTORIES", "HAND_WRITTEN", "MODEL_NAMES", "build",
           "example_inputs", "export_kwargs", "dynamic_shapes", "is_vision",
           "make_inputs"]

HAND_WRITTEN = {
    "gpt_like": TinyGPT,
    "llama_like": TinyLlama,
    "vit_like": TinyViT,
    "torch_encoder": TinyEncoderClassifier,
}

MODEL_NAMES = tuple(HAND_WRITTEN) + tuple(HF_FACTORIES)


def _hand_inputs(model: torch.nn.Module, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, TinyViT):
        shape = (batch, model.channels, model.image, model.image)
        return (torch.randn(*shape, generator=g),)
    return (torch.randint(0, model.vocab, (batch, seq), generator=g),)


def make_inputs(model: torch.nn.Module, batch: int = 2, seq: int = 8,
                seed: int = 0) -> tuple:
    """Example positional inputs for any model built by ``build``."""
    if isinstance(model, tuple(HAND_WRITTEN.values())):
        return _hand_inputs(model, batch, seq, seed)
    return example_inputs(model, batch, seq, seed)


def build(name: str, seed: int = 0, batch: int = 2, seq: int = 8):
    """Return ``(model, example_inputs)``: eval-mode model, seeded weights."""
    if name in HAND_WRITTEN:
        torch.manual_seed(seed)
        model = HAND_WRITTEN[name]().eval()
    elif name in HF_FACTORIES:
        model = HF_FACTORIES[name](seed=seed)
    else:
        raise KeyError(f"unknown model {name!r}; choose from {MODEL_NAMES}")
    return model, make_inputs(model, batch, seq, seed)


def dynamic_shapes(model: torch.nn.Module, max_batch: int = 64,
                   max_seq: int = 64) -> dict:
    """``dynamic_shapes`` for ``torch.export``: batch (and seq for text)."""
    batch = Dim("batch", min=1, max=max_batch)
    vision = isinstance(model, TinyViT) or (
        not isinstance(model, tuple(HAND_WRITTEN.values()))
        and is_vision(model))
    if vision:
        spec = {"pixel_values": {0: batch}}
    else:
        spec = {"input_ids": {0: batch, 1: Dim("seq", min=2, max=max_seq)}}
    for key in export_kwargs(model):
        spec[key] = None
    return spec
