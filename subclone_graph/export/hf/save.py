"""Save a child as a Hugging Face model directory that its parent's class loads back.

``save_hf(child, out_dir)`` writes ``config.json`` and ``model.safetensors`` (plus the
tokenizer, when given) such that ``type(parent).from_pretrained(out_dir)`` is a model of the
parent's class whose outputs equal the child's. It checks exactly that before returning.

The invariant: the saved model computes what the child computes, in the child's dtype (max
|difference| ≤ ``tolerance.tolerance_for(dtype)`` × max(1, max |output|) on
the child's ``state.EXAMPLE_INPUTS``). Nothing about a model family is known here;
every decision is made by building the parent class and looking at it:

1. weights: the child's state dict, each layer's module path renumbered by its position
   (``x.layers.0, x.layers.2`` → ``x.layers.0, x.layers.1``; a duplicated layer takes the
   index of where it runs); a name the class ties to another (an output head tied to the
   embedding) takes the one tensor the child has under either name; a tensor of the class the child
   has in no layer at all (never read by its graph: a decoder-only run's cross-attention, an
   unused pooler) keeps the class's initialisation;
2. config: a copy of the parent's. Each top-level integer equal to the parent size of a
   residual / ffn / latent / heads / kv_heads / head_dim group, or to the parent's layer count, is a
   candidate for the matching child size. A ``quantization_config`` is dropped: the child's
   weights are plain floating tensors (a GGUF parent is dequantised when loaded), so the saved
   checkpoint loads as an ordinary, trainable float model; ``dtype`` is the child's. Which
   candidates change is decided by building the class on the meta device and comparing its
   parameter shapes with the child's (a coordinate search over the candidates; an integer
   left ``None`` in the parent, like a width derived from another, may be set too when shapes
   need it). A change that leaves the
   shapes alone is kept only if it brings the outputs closer to the child's (``n_head`` must
   follow the width; a token id that happens to equal a width must not). A float field whose
   value times ``state.RESCALE``'s ε scale is a literal of the child's graph (the ε of a
   norm over a shrunk residual, see ``RescaleResidualPass``) is a candidate too. A top-level
   list with one entry per parent layer keeps the entries of the child's layers;
3. the class is built from that config in the child's dtype, loads the weights with
   ``strict=True`` (so ties stay ties) and is saved with ``save_pretrained`` into a staging
   folder beside ``out_dir`` (``outputs.staging_folder``), with a manifest of what it wrote;
4. the staging directory is loaded back with ``from_pretrained`` (in the child's dtype) and
   compared with the child;
   on a mismatch it is removed and the error gives the max difference. A child whose graph
   holds what the class cannot express — a √(D/d) ``mul`` that ``RescaleResidualPass``
   inserted after a norm without its own weight — fails here, not silently;
5. the staging directory is renamed to ``out_dir``. ``out_dir`` is checked before any work
   (``outputs.check_destination``): an existing empty folder is written into; a non-empty one
   is replaced only with ``overwrite`` and only if it holds nothing but what ``save_hf`` wrote
   there (its manifest); a regular file is never replaced.

A child subcloned again is a parent whose config is its own derived one (``subclone`` puts
``child_config(child)`` in its copy's ``state.PARENT_CONFIG``), so a grandchild saves too.

Needs the child's pass state (``passes/state.py``): ``PARENT_CLASS``, ``PARENT_CONFIG``,
``SIZE_CHANGES``, ``LAYERS``, ``EXAMPLE_INPUTS`` and ``PARENT_LAYER_COUNT`` (``RESCALE`` when the
stream shrank). The parent → child size of every group comes from ``SIZE_CHANGES``, which
``ChooseKeepPass`` wrote; what is searched is only which config field holds which of them.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch.fx as fx

from subclone_graph.passes import state as pass_state

from subclone_graph.export.destination import check_destination, staging_folder, write_manifest
from subclone_graph.export.hf.common import HFExportError, example_inputs, outputs, quiet_transformers, required
from subclone_graph.export.hf.config import child_config
from subclone_graph.export.hf.embedding_scale import fold_embedding_scale
from subclone_graph.export.hf.weights import child_state_dict, fitted, load_fitted
from subclone_graph.export.tolerance import max_difference, model_dtype, tolerance_for

__all__ = ["save_hf"]


def _write(child: fx.GraphModule, staging: Path, tokenizer) -> None:
    state = child_state_dict(child)
    config = child_config(child, state)
    config.dtype = model_dtype(child)          # config.json's dtype: the child's, not the parent's
    cls = required(child, pass_state.PARENT_CLASS)
    with quiet_transformers():
        model = cls(config).to(config.dtype).eval()
        load_fitted(model, state)
        fold_embedding_scale(child, model, example_inputs(child))
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    write_manifest(staging)


def _check(child: fx.GraphModule, staging: Path, rtol: float, out_dir: Path) -> float:
    cls, dtype = required(child, pass_state.PARENT_CLASS), model_dtype(child)
    with quiet_transformers():
        loaded = cls.from_pretrained(staging, dtype=dtype).eval()
    if type(loaded) is not cls:
        raise HFExportError(f"{staging} loads as {type(loaded).__name__}, not {cls.__name__}; nothing written to {out_dir}")
    if model_dtype(loaded) != dtype:
        raise HFExportError(f"the saved {cls.__name__} loads as {model_dtype(loaded)}, not the child's {dtype}; "
                            f"nothing written to {out_dir}")
    expected, got = outputs(child, example_inputs(child)), outputs(loaded, example_inputs(child))
    if set(expected) - set(got):
        raise HFExportError(f"the saved {cls.__name__} lacks the child's outputs {sorted(set(expected) - set(got))}; "
                            f"nothing written to {out_dir}")
    diff, scale = max_difference(list(expected.values()), [got[k] for k in expected])
    if not diff <= rtol * scale:
        raise HFExportError(f"the saved {cls.__name__} differs from the child by {diff:.3g} (> {rtol:g} × {scale:.3g}): the child "
                            "computes something the class cannot express (e.g. a √(D/d) multiply inserted after a "
                            f"norm without its own weight; subclone with rescale=False); nothing written to {out_dir}")
    return diff


def save_hf(child: fx.GraphModule, out_dir, *, tokenizer=None, overwrite: bool = False,
            rtol: float | None = None) -> Path:
    """Write ``child`` as a ``from_pretrained`` directory of its parent's class; return its path.

    The checkpoint has the child's dtype. Raises ``FileExistsError`` if ``out_dir`` is a file, or
    a non-empty folder without ``overwrite``, or one holding files ``save_hf`` did not write;
    ``HFExportError`` (leaving nothing behind) if the child cannot be expressed as the parent's
    class or the reloaded model's outputs differ from the child's by more than ``rtol`` (default
    ``tolerance_for(child's dtype)``) × max(1, max |output|).
    """
    out_dir = check_destination(out_dir, overwrite=overwrite, folder=True)
    rtol = tolerance_for(model_dtype(child)) if rtol is None else rtol
    with staging_folder(out_dir.parent) as staging:
        staged = staging / out_dir.name
        staged.mkdir()
        _write(child, staged, tokenizer)
        _check(child, staged, rtol, out_dir)
        if out_dir.is_dir() and any(out_dir.iterdir()):
            os.replace(out_dir, staging / "old")
        elif out_dir.is_dir():
            out_dir.rmdir()
        os.replace(staged, out_dir)
        return out_dir
