"""Shared helpers for the equivalence tests: outputs, planting dead structure, comparisons.

Planting uses the parent's own channel analysis only to *find* the tensors that touch a
channel; the tests then check numerically that removing the planted channels changes
nothing — a wrong grouping or index map makes the dead structure not dead, and fails.
"""
from __future__ import annotations

import copy
import functools
import warnings

import torch

import subclone_graph as sg
from subclone_graph import models
from subclone_graph.models.planting import (groups_of, output_tensor, plant_dead, plant_dead_heads,  # noqa: F401
                                           plant_dead_per_expert, relative_error, run)

PRE_NORM = ("gpt_like", "llama_like", "vit_like", "torch_encoder", "gpt2", "vit", "llama", "qwen3", "mistral", "phi3")
RMS_NORM = ("llama_like", "llama", "qwen3", "mistral", "phi3")
GQA = ("llama_like", "llama", "qwen3", "mistral", "phi3")


def calibration(model, batches: int = 3, batch: int = 2, seq: int = 8) -> list[tuple]:
    return [models.make_inputs(model, batch, seq, seed=100 + i) for i in range(batches)]


def analysed(model, inputs):
    gm = sg.trace(model, inputs)
    sg.analyze_channels(gm)
    return gm


@functools.lru_cache(maxsize=None)
def _traced(name: str):
    model, inputs = models.build(name)
    return model, inputs, analysed(model, inputs)


def traced(name: str):
    """(model, example inputs, an analysed traced copy of it): the tracing is done once per
    model and session; the GraphModule returned is a private copy to plant things in."""
    model, inputs, gm = _traced(name)
    return model, inputs, copy.deepcopy(gm)


@functools.lru_cache(maxsize=None)
def _family(name: str):
    from subclone_graph.models import hf_families, hf_zoo

    model = hf_families.build(name)
    example = hf_zoo.example_inputs(model, 2, 8, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, example, analysed(model, example)


def family(name: str):
    """``traced`` for a family of ``models/hf_families.py`` (example inputs: 2 × 8 tokens)."""
    model, example, gm = _family(name)
    return model, example, copy.deepcopy(gm)


def count_heads(child) -> list[tuple[int, int]]:
    """(query heads, kv heads) of every attention site of a child, from its pass state."""
    sizes = child.meta["subclone.sizes"]
    return [(sizes[site.heads], sizes[site.kv_heads]) for site in child.meta["subclone.attention"]]
