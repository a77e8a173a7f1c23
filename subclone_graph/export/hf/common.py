"""What every part of the Hugging Face writer shares: its error, the pass state it needs, quiet
transformers, and the child's outputs compared with a model's."""
from __future__ import annotations

import contextlib

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from subclone_graph.passes import state as pass_state

__all__ = ["HFExportError", "required", "quiet_transformers", "example_inputs", "tensor_outputs", "outputs",
           "max_output_difference"]


class HFExportError(RuntimeError):
    """The child cannot be written as its parent's class, or the written model differs from it."""


def required(child: fx.GraphModule, key: pass_state.StateKey):
    if not hasattr(child, "meta") or not key.has(child):
        raise HFExportError(f"the child's {key.name} is missing: save_hf needs a child made by "
                            "subclone_graph.subclone from a Hugging Face model")
    return key.get(child)


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load reports and progress bars while models are built and saved."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def example_inputs(child: fx.GraphModule) -> tuple:
    inputs = required(child, pass_state.EXAMPLE_INPUTS)
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def tensor_outputs(out) -> dict:
    """Tensor outputs by key (a ModelOutput / dict), else by position."""
    if isinstance(out, dict):
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    return dict(enumerate(x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)))


def outputs(module, inputs: tuple) -> dict:
    with torch.no_grad():
        return tensor_outputs(module(*inputs))


def max_output_difference(expected: dict, got: dict) -> float:
    if not expected or any(k not in got or got[k].shape != v.shape for k, v in expected.items()):
        return float("inf")
    return max(float((got[k].float() - v.float()).abs().max()) for k, v in expected.items())
