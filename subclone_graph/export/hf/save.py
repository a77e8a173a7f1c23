"""Save a child as a Hugging Face model directory that its parent's class loads back.

``save_hf(child, out_dir)`` writes the folder with the one writer (``write.py``: the shards,
``config.json``, the generation config and the tokenizer) and checks it (``check.check_folder``)
before anything reaches ``out_dir``: ``type(parent).from_pretrained(out_dir)`` is a model of the
parent's class whose outputs equal the child's. A streamed child (``subclone_checkpoint``) is
written by the same writer, so one child gives one folder, byte for byte.

The invariant: the saved model computes what the child computes, in the child's dtype (max
|difference| ≤ ``tolerance.tolerance_for(dtype)`` × max(1, max |output|) on the child's
``state.EXAMPLE_INPUTS``). Nothing about a model family is known here; every decision is made
by building the parent class and looking at it (``config.py``: which config fields hold the
child's sizes; ``weights.py``: the names; ``embedding_scale.py``: a scale the class derives).

1. staging: the folder is written into a staging folder beside ``out_dir``
   (``destination.staging_folder``), with a manifest of what it wrote;
2. check: the written folder, run as its class segment by segment, is compared with the child;
   on a mismatch the staging folder is removed and the error gives the max difference. A child
   whose graph holds what the class cannot express — a √(D/d) ``mul`` that
   ``RescaleResidualPass`` inserted after a norm without its own weight — fails here, not silently.
   Where the class differs by more than rounding and the stream's norms carry the rescale's
   ε·D/d (a class whose norms' ε is a constant, or one field that a norm over another width
   reads too), the child with that ε folded into the stream's scale (``stream_scale.py``) is
   written and checked too, and the closer folder kept;
3. the staging folder is renamed to ``out_dir``. ``out_dir`` is checked before any work
   (``destination.check_destination``): an existing empty folder is written into; a non-empty
   one is replaced only with ``overwrite`` and only if it holds nothing but what ``save_hf``
   wrote there (its manifest); a regular file is never replaced.

A child subcloned again is a parent whose config is its own derived one (``subclone`` puts
``child_config(child)`` in its copy's ``state.PARENT_CONFIG``), so a grandchild saves too.

Needs the child's pass state (``passes/state.py``): ``PARENT_CLASS``, ``PARENT_CONFIG``,
``SIZE_CHANGES``, ``LAYERS``, ``EXAMPLE_INPUTS`` and ``PARENT_LAYER_COUNT`` (``RESCALE`` when the
stream shrank).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch.fx as fx

from subclone_graph.export.destination import check_destination, staging_folder, write_manifest
from subclone_graph.export.hf.common import HFExportError
from subclone_graph.export.hf.stream_scale import fold_stream_scale
from subclone_graph.export.hf.check import check_folder
from subclone_graph.export.hf.write import DEFAULT_SHARD_SIZE, write_folder
from subclone_graph.export.tolerance import model_dtype, tolerance_for

__all__ = ["save_hf", "SavedFolder", "write_checked"]


class SavedFolder(type(Path())):
    """The folder written (a ``Path``), with what the writer reports: ``config_changes`` (every
    config field that differs from the parent's, with why) and ``max_difference``."""

    config_changes: list = []
    max_difference: float = 0.0


def save_hf(child: fx.GraphModule, out_dir, *, tokenizer=None, overwrite: bool = False,
            shard_size: int = DEFAULT_SHARD_SIZE) -> SavedFolder:
    """Write ``child`` as a ``from_pretrained`` directory of its parent's class; return its path
    (a ``SavedFolder``: a ``Path`` carrying ``config_changes`` and ``max_difference``).

    The checkpoint has the child's dtype; the generation config and the tokenizer come from the
    parent's folder when the parent was loaded from one (``tokenizer``: save that one instead).
    Raises ``FileExistsError`` if ``out_dir`` is a file, or a non-empty folder without
    ``overwrite``, or one holding files ``save_hf`` did not write; ``HFExportError`` (leaving
    nothing behind) if the child cannot be expressed as the parent's class or the written
    model's outputs differ from the child's by more than ``tolerance_for(child's dtype)`` ×
    max(1, max |output|), on the example inputs or on them at another batch and sequence length.
    """
    out_dir = check_destination(out_dir, overwrite=overwrite, folder=True)
    with staging_folder(out_dir.parent) as staging:
        staged = staging / out_dir.name
        written, difference = write_checked(child, staged, out_dir, shard_size, tokenizer)
        write_manifest(staged)
        if out_dir.is_dir() and any(out_dir.iterdir()):
            os.replace(out_dir, staging / "old")
        elif out_dir.is_dir():
            out_dir.rmdir()
        os.replace(staged, out_dir)
    saved = SavedFolder(out_dir)
    saved.config_changes, saved.max_difference = written.changes, difference
    return saved


def write_checked(child, staged: Path, out_dir: Path, shard_size: int, tokenizer=None, *, weights=None,
                  parent_folder=None, by_segments: bool = False, resident=None, on_check=None):
    """The written folder and its max difference: the one writer of both paths (``save_hf`` and
    the streamed ``subclone_checkpoint``, whose ``weights`` read the checkpoint). Where the class
    differs from the child by more than a tenth of the tolerance — more than any correct
    re-implementation's rounding: a real difference, such as a class that cannot take the
    rescale's ε·D/d, that another batch or length could push over the tolerance — and the
    stream's norms carry that ε, the same child with the ε folded into the stream's scale
    (``stream_scale``) is written too, and the closer of the two is kept; the first error is
    raised if both differ. The fold runs the child, so it needs its weights in memory: a child
    whose weights are read on demand gives ``resident()`` (a copy holding them), or None where
    it may not be loaded whole (then no fold is tried). ``on_check()`` is called as the check of
    the first folder begins (a progress phase)."""
    staged.mkdir()
    try:
        written = write_folder(child, staged, weights, shard_size=shard_size, parent_folder=parent_folder,
                               tokenizer=tokenizer)
        if on_check is not None:
            on_check()
        difference, first = check_folder(child, staged, written, out_dir, by_segments=by_segments), None
    except HFExportError as error:
        written, difference, first = None, float("inf"), error
    scale = max([1.0] + [float(v.abs().max()) for v in written.reference.values() if v.numel()]) if written else 1.0
    folded = None
    if difference > tolerance_for(model_dtype(child)) * scale / 10:     # only then is the child read whole
        source = child if weights is None else (resident() if resident is not None else None)
        folded = fold_stream_scale(source) if source is not None else None
    if folded is None:
        if first is not None:
            raise first
        return written, difference
    other = staged.with_name(staged.name + ".folded")
    other.mkdir()
    try:
        folded_written = write_folder(folded, other, shard_size=shard_size, parent_folder=parent_folder,
                                      tokenizer=tokenizer)
        folded_difference = check_folder(folded, other, folded_written, out_dir)
    except HFExportError as error:
        shutil.rmtree(other)
        if first is not None:
            raise first from error
        return written, difference
    if folded_difference >= difference:
        shutil.rmtree(other)
        return written, difference
    shutil.rmtree(staged)
    os.replace(other, staged)
    return folded_written, folded_difference
