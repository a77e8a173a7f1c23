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
3. calibration: the statistics of ``ScoreChannelsPass`` (its ``ActivationStatistics`` and
   ``watch_list``), gathered segment by segment with each segment's weights read just before
   it runs — the same values node by node, so the scores are bit-identical;
4. the rewrite passes run on the weightless graph; ``track_origin`` records for every child
   tensor its parent tensor, kept indices and scale factors (``state.TENSOR_ORIGINS``);
5. write: each child tensor is read from the parent as its kept slice, cut, scaled in the
   parent's dtype (the same ops as the in-memory passes, so the same bits) and streamed into
   sharded safetensors in a staging folder beside ``out_dir``, with ``config.json`` from
   ``hf_export.child_config``;
6. check: the child graph is run segment by segment with the *written* weights (the
   reference), the staging folder is loaded with ``from_pretrained`` and its outputs on the
   example inputs compared; only then is the staging folder renamed to ``out_dir``.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx

from subclone_graph.passes import state
from subclone_graph.passes.analysis import AnalyzeChannelsPass, ChooseKeepPass, FindResidualBlocksPass
from subclone_graph.passes.fx_utils import get_attribute
from subclone_graph.passes.rewrite import DropBlocksPass, DuplicateLayersPass, KeepChannelsPass, RescaleResidualPass
from subclone_graph.passes.state import TensorOrigin
from subclone_graph.passes.target import Target
from subclone_graph.passes.analysis.score_channels import (ActivationStatistics, calibration_dtype, combine_profiles,
                                                           flat_inputs, output_watch_list, row_watch_list, watch_list,
                                                           weight_profiles)

from .api import run_passes
from . import distributed
from .checkpoint import CheckpointError, CheckpointReader
from .device import resolve_device, to_device
from .outputs import check_destination, staging_folder, write_manifest
from .segments import BoundaryStore, run_segments
from .stream_convert import ConvertingReader
from .stream_parent import is_fake, weightless_parent
from .stream_write import check_written, write_child
from .tracing import refuse_confined_sizes

__all__ = ["subclone_checkpoint", "StreamReport", "CheckpointError", "DEFAULT_SHARD_SIZE", "DEFAULT_MEMORY_BUDGET"]

DEFAULT_SHARD_SIZE = 2 * 2**30
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


def _fetcher(gm: fx.GraphModule, read, device=None):
    """``fetch(targets)`` for ``run_segments``: real attributes as they are, fake ones read,
    requiring grad as the parameter they stand for (either moved to ``device`` when given)."""
    def fetch(targets):
        values = {}
        for target in targets:
            value = get_attribute(gm, target)
            grad = is_fake(value) and value.requires_grad and value.is_floating_point()
            value = read(target) if is_fake(value) else value
            value = value if device is None else value.to(device)
            # as the in-memory parameter: aten.matmul picks its algorithm (fold the batch or
            # not) by whether an operand requires grad, even under no_grad — other bits
            values[target] = value.requires_grad_() if grad else value
        return values
    return fetch


def _calibrate(gm, reader, keys, calibration, store, tick, device, compute_dtype) -> None:
    graph, layers = state.CHANNEL_GRAPH.need(gm), state.LAYERS.need(gm)
    moved = None if device.type == "cpu" else device
    batches = [to_device(flat_inputs(gm, batch, i), device) for i, batch in enumerate(calibration)]
    if sum(distributed.gather_counts(len(batches))) == 0:
        raise ValueError("calibration: no batches given (pass None to score by weight magnitude)")
    statistics = ActivationStatistics(watch_list(gm, graph, layers), layers, row_watch_list(gm, graph),
                                      output_watch_list(gm, graph))
    inputs = {layer.output: layer for layer in layers}

    def observe(node, value, env):
        statistics.record(node.name, value)
        if node.name in inputs:
            layer = inputs[node.name]
            statistics.record_layer(layer.index, env[layer.input], value)

    # only what the statistics read runs: not the output head's logits, for one
    wanted = statistics.names()
    fetch = _fetcher(gm, lambda t: reader.read(keys[t]), moved)
    with torch.no_grad():
        run_segments(gm, batches, fetch, store, observe, tick, moved, calibration_dtype(gm, compute_dtype), wanted)
    statistics.all_reduce()        # data-parallel calibration: every rank's share summed before choosing
    state.LAYER_RATIOS.set(gm, statistics.layer_ratios())
    state.SCORES.set(gm, combine_profiles(graph, statistics.profiles(gm)))
    state.SCORE_SOURCE.set(gm, "mean |activation| on calibration data")


def _score_by_weights(gm, reader, keys) -> None:
    graph = state.CHANNEL_GRAPH.need(gm)

    def tensor_of(node):
        value = get_attribute(gm, node.target)
        return reader.read(keys[node.target]) if is_fake(value) else value

    state.SCORES.set(gm, combine_profiles(graph, weight_profiles(gm, graph, tensor_of)))
    state.SCORE_SOURCE.set(gm, "weight magnitude (no calibration data)")


def _start_origins(gm: fx.GraphModule, keys: dict) -> None:
    origins = {}
    for name, tensor in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        if is_fake(tensor) and id(tensor) not in origins:
            origins[id(tensor)] = (tensor, TensorOrigin(keys[name]))
    state.TENSOR_ORIGINS.set(gm, origins)


def _ticker(progress, total: int):
    if progress is None:
        return None, lambda: None
    bar = progress(range(total))
    if hasattr(bar, "update"):          # tqdm: its iterator shows its count only when it refreshes
        return bar, lambda: bar.update(1)
    steps = iter(bar)
    return bar, lambda: next(steps, None)


def _parameter_count(gm: fx.GraphModule) -> int:
    return sum(p.numel() for p in {id(p): p for p in gm.parameters()}.values())


def subclone_checkpoint(folder, out_dir, target: Target | None = None, calibration=None, *, example_inputs=None,
                        drop_layers=None, depth: str = "middle", selection: str = "score", rescale: bool = True,
                        shard_size: int = DEFAULT_SHARD_SIZE, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                        spill_dir=None, device="cpu", overwrite: bool = False, progress=None,
                        compute_dtype=torch.float32, fixed_sizes: bool = False) -> StreamReport:
    """Subclone the Hugging Face safetensors checkpoint in ``folder`` into ``out_dir`` (a
    ``from_pretrained`` folder of the parent's class), streaming the parent (module docstring).

    ``calibration``: an iterable of input tuples (None: score by weight magnitude);
    ``example_inputs``: the inputs the trace and the final check use (default: the first
    calibration batch). ``memory_budget``: bytes of boundary values kept in memory before
    spilling to ``spill_dir`` (default: a temporary folder). ``progress(iterable)`` wraps the
    segments × batches steps (e.g. ``tqdm``). ``compute_dtype``: what a half-precision parent's
    calibration computes in (None: its own dtype; ``passes.analysis.compute_dtype``);
    ``fixed_sizes``: accept a parent that traces for fixed input sizes only (``sg.subclone``).
    Returns a ``StreamReport``."""
    device = resolve_device(device)
    target = Target() if target is None else target
    if drop_layers is not None and target.layers is not None:
        raise ValueError("give either Target.layers or drop_layers, not both")
    if depth == "measured" and calibration is None:
        raise ValueError('depth="measured" needs calibration data: it measures each layer\'s ||f(x)||/||x+f(x)||')
    out_dir = check_destination(out_dir, overwrite=overwrite, folder=True)
    if example_inputs is None:
        calibration = None if calibration is None else list(calibration)
        if not calibration:
            raise ValueError("give example_inputs (or calibration data, whose first batch is used)")
        example_inputs = calibration[0]
    # this rank's share (all of it in one process), listed: every segment runs every batch
    own = None if calibration is None else distributed.shard(calibration)
    calibration = None if own is None else list(own)
    report, clock = StreamReport(out_dir), time.perf_counter()
    report.calibration_tokens = 0 if own is None else own.tokens
    reader = ConvertingReader(CheckpointReader(folder))
    report.checkpoint_bytes = sum(f.stat().st_size for f in reader.files)
    gm, keys = weightless_parent(Path(folder), reader, example_inputs)
    if not fixed_sizes:
        refuse_confined_sizes(gm, state.PARENT_CLASS.need(gm).__name__)
    run_passes(gm, [FindResidualBlocksPass(), AnalyzeChannelsPass()])
    report.parent_parameters = _parameter_count(gm)
    report.seconds["trace"], clock = time.perf_counter() - clock, time.perf_counter()

    segments = len(state.LAYERS.need(gm)) + 2
    bar, tick = _ticker(progress, segments * len(calibration or ()))
    store = BoundaryStore(memory_budget, spill_dir)
    if calibration is None:
        _score_by_weights(gm, reader, keys)
    else:
        _calibrate(gm, reader, keys, calibration, store, tick, device, compute_dtype)
    if bar is not None and hasattr(bar, "close"):
        bar.close()
    report.calibration_bytes, report.spilled_bytes = store.peak, store.spilled
    report.calibration_read = reader.bytes_read
    report.scores = state.SCORES.need(gm)
    _start_origins(gm, keys)
    passes = [ChooseKeepPass(target, drop_layers=drop_layers, depth=depth, selection=selection),
              DropBlocksPass(), DuplicateLayersPass(), KeepChannelsPass()]
    run_passes(gm, passes + ([RescaleResidualPass()] if rescale else []))
    report.child_parameters = _parameter_count(gm)
    report.seconds["calibrate"], clock = time.perf_counter() - clock, time.perf_counter()
    if distributed.rank() != 0:     # rank 0 alone writes; the command line's finish() waits for it
        report.out_dir = None
        return report

    # the same output rules as save_hf (outputs.py): staged, checked, moved into place whole, and
    # an overwrite replaces only a folder this package wrote
    with staging_folder(out_dir.parent) as staging:
        staged = staging / out_dir.name
        staged.mkdir()
        _, expected = write_child(gm, reader, staged, shard_size)
        report.bytes_read = reader.bytes_read
        report.seconds["write"], clock = time.perf_counter() - clock, time.perf_counter()
        report.max_difference = check_written(gm, staged, expected, out_dir)
        report.seconds["check"] = time.perf_counter() - clock
        write_manifest(staged)
        if out_dir.is_dir() and any(out_dir.iterdir()):
            os.replace(out_dir, staging / "old")
        elif out_dir.is_dir():
            out_dir.rmdir()
        os.replace(staged, out_dir)
    return report
