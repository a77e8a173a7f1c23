"""Subclone a Hugging Face safetensors checkpoint folder without ever holding the parent.

``subclone_checkpoint(folder, out_dir, target, calibration)`` does what ``subclone`` +
``save_hf`` do for a model in memory, with memory bounded by one segment's weights plus the
calibration state (module ``segments``):

1. trace: the class named by ``config.json`` is built with its parameters on the meta device
   (``accelerate.init_empty_weights(include_buffers=False)``: computed buffers such as rotary
   ``inv_freq`` stay real), each parameter then replaced by a *fake* CPU tensor of the
   checkpoint's dtype and shape (checked against the checkpoint's header), and exported. Fake
   rather than meta: ``torch.export`` fakifies the real CPU example inputs, and meta parameters
   would meet CPU inputs in the same op (``embedding(meta, cpu)``) and fail device propagation;
   fake CPU tensors carry no storage and agree with the inputs' device;
2. analysis (``FindResidualBlocksPass``, ``AnalyzeChannelsPass``) needs shapes only;
3. the one pipeline (``api.subclone_passes``) runs on the weightless graph; its
   ``ScoreChannelsPass`` is the in-memory one, handed a ``CheckpointWeights`` source: the
   runner goes segment by segment, each segment's weights read just before it runs — the same
   values node by node, so the scores are bit-identical;
4. the rewrites edit tensors through ``passes.tensor_edits``, which records for every child
   tensor its program: the parent tensor, kept indices, scale steps (``state.TENSOR_ORIGINS``);
5. write: each child tensor is its program replayed — the parent read as its kept slice, the
   steps applied by the functions the in-memory passes apply (so the same bits in every dtype)
   — and streamed into sharded safetensors in a staging folder beside ``out_dir``, with
   ``config.json`` from ``hf_export.child_config``;
   — by the one Hugging Face writer, ``export.hf.write_checked``, the one ``save_hf`` uses: the
   same child gives the same folder, byte for byte;
6. check (``export.hf.check_folder``): the written folder, loaded as its class (or, for a child
   larger than the memory budget, traced with fake weights and run segment by segment from its
   own shards), is compared with the child graph run on the written weights; only then is the
   staging folder renamed to ``out_dir``. Where the class differs from the child by more than a
   tenth of the tolerance, the writer tries the child with the rescale's ε folded into the
   stream's scale as ``save_hf`` does — on a resident copy of the child (``resident_copy``),
   never for a child larger than the memory budget.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch.fx as fx

from subclone_graph.passes import state
from subclone_graph.passes.analysis.segments import BoundaryStore
from subclone_graph.passes.target import Target

from subclone_graph.api import (aligned_target, calibration_batches, check_checkpoint_arguments, phases_steps,
                                run_passes, subclone_passes)
from subclone_graph.checkpoint.files import CheckpointError
from subclone_graph.checkpoint.weightless_parent import CheckpointWeights, resident_copy, weightless_parent
from subclone_graph.progress import Phases
from subclone_graph.tracing import refuse_confined_sizes
from subclone_graph.export.destination import check_destination, staging_folder, write_manifest
from subclone_graph.export.hf.save import write_checked
from subclone_graph.export.hf.write import DEFAULT_SHARD_SIZE
from subclone_graph.runtime import distributed

__all__ = ["subclone_checkpoint", "StreamReport", "CheckpointError", "DEFAULT_SHARD_SIZE", "DEFAULT_MEMORY_BUDGET"]

DEFAULT_MEMORY_BUDGET = 1 * 2**30


@dataclass
class StreamReport:
    """What a streamed subcloning did: where, how long each phase took, how much it read."""
    out_dir: Path
    seconds: dict = field(default_factory=dict)     # trace / calibrate / write / check
    bytes_read: int = 0                             # from the parent's files, in all
    calibration_read: int = 0                       # of which by calibration
    checkpoint_bytes: int = 0                       # the parent's files, in all
    parent_parameters: int = 0
    child_parameters: int = 0
    calibration_bytes: int = 0                      # peak boundary state kept in memory
    spilled_bytes: int = 0
    max_difference: float = 0.0
    calibration_tokens: int = 0                     # tokens this rank calibrated on
    scores: dict = field(default_factory=dict)
    config_changes: list = field(default_factory=list)   # export.hf.ConfigChange: each field, with why


def _child_bytes(gm: fx.GraphModule) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in gm.state_dict(keep_vars=True).values()}.values())


def _calibration_steps(gm: fx.GraphModule, batches) -> int | None:
    """The calibrate phase's steps: segments × batches (one without data; None where the batch
    count is not known ahead: ``api.calibration_batches``)."""
    count = calibration_batches(batches)
    return count if batches is None or count is None else (len(state.LAYERS.need(gm)) + 2) * count


def _parameter_count(gm: fx.GraphModule) -> int:
    return sum(p.numel() for p in {id(p): p for p in gm.parameters()}.values())


def subclone_checkpoint(folder, out_dir, target: Target | None = None, calibration=None, *, example_inputs=None,
                        drop_layers=None, depth: str = "middle", selection: str = "score", rescale: bool = True,
                        shard_size: int = DEFAULT_SHARD_SIZE, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                        spill_dir=None, device="cpu", overwrite: bool = False, progress=None,
                        compute_dtype="auto", fixed_sizes: bool = False) -> StreamReport:
    """Subclone the Hugging Face safetensors checkpoint in ``folder`` into ``out_dir`` (a
    ``from_pretrained`` folder of the parent's class), streaming the parent (module docstring).

    ``calibration``: an iterable of input tuples (None: score by weight magnitude);
    ``example_inputs``: the inputs the trace and the final check use (default: the first
    calibration batch). ``memory_budget``: bytes of boundary values kept in memory before
    spilling to ``spill_dir`` (default: a temporary folder); a child larger than it is checked
    segment by segment, never loaded whole. ``progress`` (``tqdm``, or any callable of its
    signature; ``subclone_graph.progress``) sees the phases trace, calibrate (segments × batches
    steps), rewrite, write and check. ``compute_dtype``: what a half-precision parent's
    calibration computes in (``"auto"``: float32, with the half dtype's matmuls where they are
    measured fast; a dtype; None: its own dtype; ``passes.analysis.compute_dtype``);
    ``fixed_sizes``: accept a parent that traces for fixed input sizes only (``sg.subclone``).
    Returns a ``StreamReport``."""
    target = Target() if target is None else target
    if example_inputs is None:
        calibration = None if calibration is None else list(calibration)
        if not calibration:
            raise ValueError("give example_inputs (or calibration data, whose first batch is used)")
        example_inputs = calibration[0]
    check_checkpoint_arguments(folder, target, drop_layers, depth, calibration, example_inputs)
    out_dir = check_destination(out_dir, overwrite=overwrite, folder=True)
    # this rank's share (all of it in one process); the pass reads it once, the report counts it
    own = None if calibration is None else distributed.shard(calibration)
    store, weights = BoundaryStore(memory_budget, spill_dir), CheckpointWeights()
    phases, steps = Phases(progress), {}
    ticking = None if progress is None else lambda items: phases_steps(items, steps["tick"])

    def pipeline(chosen: Target) -> list:     # the one pipeline: only the weights' source differs
        return subclone_passes(chosen, own, drop_layers, depth, rescale, ticking, selection, device, compute_dtype,
                               weights=weights, store=store)

    passes = pipeline(target)                     # its arguments checked before anything is read
    reader = weights.open(folder)
    report, clock = StreamReport(out_dir), time.perf_counter()
    phases.begin("trace")
    report.checkpoint_bytes = sum(f.stat().st_size for f in reader.files)
    gm = weightless_parent(Path(folder), reader, example_inputs)
    if not fixed_sizes:
        refuse_confined_sizes(gm, state.PARENT_CLASS.need(gm).__name__)
    run_passes(gm, passes[:2])                 # the blocks and the channel graph: shapes only
    passes = passes[:2] + pipeline(aligned_target(gm, target))[2:]   # widths grouped kernels can run
    names = [type(p).__name__ for p in passes]
    report.parent_parameters = _parameter_count(gm)
    report.seconds["trace"], clock = time.perf_counter() - clock, time.perf_counter()
    steps["tick"] = phases.begin("calibrate", _calibration_steps(gm, own))
    run_passes(gm, passes[2:3], ran=names[:2])
    phases.begin("rewrite")
    run_passes(gm, passes[3:], ran=names[:3])
    phases.end()
    report.calibration_tokens = 0 if own is None else own.tokens
    report.calibration_bytes, report.spilled_bytes = store.peak, store.spilled
    report.calibration_read = reader.bytes_read
    report.scores = state.SCORES.need(gm)
    report.child_parameters = _parameter_count(gm)
    report.seconds["calibrate"], clock = time.perf_counter() - clock, time.perf_counter()
    if distributed.rank() != 0:     # rank 0 alone writes; the command line's finish() waits for it
        report.out_dir = None
        return report

    # the same output rules as save_hf (outputs.py): staged, checked, moved into place whole, and
    # an overwrite replaces only a folder this package wrote
    with staging_folder(out_dir.parent) as staging:
        staged = staging / out_dir.name
        phases.begin("write")
        # save_hf's writer: a child larger than the memory budget is checked segment by segment
        # (peak memory of one segment) and is never made resident for the stream-scale fold
        small, checking = _child_bytes(gm) <= memory_budget, []

        def on_check():
            checking.append(time.perf_counter())
            phases.begin("check")

        written, report.max_difference = write_checked(
            gm, staged, out_dir, shard_size, weights=weights, parent_folder=folder, by_segments=not small,
            resident=(lambda: resident_copy(gm, weights)) if small else None, on_check=on_check)
        phases.end()
        done = time.perf_counter()
        report.config_changes, report.bytes_read = written.changes, reader.bytes_read
        report.seconds["write"] = (checking[0] if checking else done) - clock
        report.seconds["check"] = done - (checking[0] if checking else done)
        write_manifest(staged)
        if out_dir.is_dir() and any(out_dir.iterdir()):
            os.replace(out_dir, staging / "old")
        elif out_dir.is_dir():
            out_dir.rmdir()
        os.replace(staged, out_dir)
    return report
