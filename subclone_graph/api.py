"""The one-call API: ``subclone(model, example_inputs, Target(...), calibration, drop_layers)``.

The pipeline reads like the method (each step a pass, logged by name):
trace → find residual blocks → analyse channels → score → choose → drop layers → keep
channels → rescale √(D/d) → divide the reads of grown widths → check the child.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import warnings

import torch
import torch.fx as fx

from subclone_graph.passes import state
from subclone_graph.passes.analysis import AnalyzeChannelsPass, ChooseKeepPass, FindResidualBlocksPass, ScoreChannelsPass
from subclone_graph.passes.errors import PassError
from subclone_graph.passes.infra import log
from subclone_graph.passes.rewrite import (DropBlocksPass, DuplicateLayersPass, KeepChannelsPass, RescaleResidualPass,
                                           ScaleClonedReadsPass)
from subclone_graph.passes.target import WIDTH_FIELDS, Target, is_fraction

from subclone_graph.progress import Phases
from subclone_graph.runtime import distributed
from subclone_graph.runtime.device import resolve_device
from subclone_graph.runtime.distributed import DistributedError, world_size
from subclone_graph.tracing import refuse_confined_sizes, trace

__all__ = ["subclone", "subclone_passes", "run_passes", "Target", "check_inputs", "check_token_ids", "check_drop_layers",
           "check_checkpoint_arguments", "aligned_target", "calibration_batches", "phases_steps",
           "grouped_kernel_multiple"]

def subclone_passes(target: Target, calibration=None, drop_layers=None, depth: str = "middle",
                    rescale: bool = True, progress=None, selection: str = "score", device=None,
                    compute_dtype="auto", *, weights=None, store=None,
                    grow_noise_db: float | None = None) -> list:
    """The subcloning pipeline as a flat list of passes (each ``call(gm) -> PassResult``).

    One pipeline whatever the weights' source: ``weights`` (default: the traced model's own
    tensors) is where calibration reads them — a checkpoint reader for ``subclone_checkpoint``,
    with ``store`` the boundary values' budget. Under ``torch.distributed`` the pass scores this
    rank's share of ``calibration`` and adds every rank's statistics (``distributed.all_reduce_sums``)."""
    _check_arguments(target, drop_layers, depth, calibration)
    own = None if calibration is None else distributed.shard(calibration)
    passes = [
        FindResidualBlocksPass(),
        AnalyzeChannelsPass(),
        ScoreChannelsPass(own, progress=progress, device=None if device is None else resolve_device(device),
                          compute_dtype=compute_dtype,
                          weights=weights, reduce=distributed.all_reduce_sums, store=store),
        ChooseKeepPass(target, drop_layers=drop_layers, depth=depth, selection=selection),
        DropBlocksPass(),
        DuplicateLayersPass(),
        KeepChannelsPass(),
    ]
    if rescale:
        passes.append(RescaleResidualPass())
    passes.append(ScaleClonedReadsPass(noise_snr_db=grow_noise_db))
    return passes


# errors whose type tells the caller what went wrong: re-raised as the same type, the pass named
_KEPT_TYPES = (ValueError, TypeError, PassError, DistributedError)


def run_passes(gm: fx.GraphModule, passes: list, ran: tuple = ()) -> fx.GraphModule:
    """Run passes in order; a failure names the pass (and the ones that ran before it for an
    internal error — ``ran`` names those run by an earlier call), keeping the error's type for
    the user's errors and ``PassError``s."""
    done = list(ran)
    for p in passes:
        try:
            gm = p(gm).graph_module
        except Exception as error:
            raise _naming(error, type(p).__name__, done) from error
        done.append(type(p).__name__)
    return gm


def _naming(error: Exception, name: str, done: list[str]) -> Exception:
    if isinstance(error, _KEPT_TYPES):
        message = str(error) if str(error).startswith(name) else f"{name}: {error}"
        try:
            return type(error)(message)
        except Exception:      # an exception type with another constructor
            pass
    ran = ", ".join(done) or "none"
    return PassError(f"{name} failed (after: {ran}): {type(error).__name__}: {error}")


def _check_arguments(target, drop_layers, depth, calibration) -> None:
    """What the passes cannot see; depth and selection are checked by ChooseKeepPass, the
    inputs by ``check_inputs``."""
    if not isinstance(target, Target):
        raise TypeError(f"target must be a subclone_graph.Target, got {type(target).__name__}")
    check_drop_layers(drop_layers)
    if drop_layers is not None and target.layers is not None:
        raise ValueError("give either Target.layers or drop_layers, not both")
    if depth == "measured" and calibration is None:
        raise ValueError('depth="measured" needs calibration data: it measures each layer\'s ||f(x)||/||x+f(x)||')
    if isinstance(calibration, (list, tuple)) and not calibration:
        raise ValueError("calibration: no batches given (pass None to score by weight magnitude)")


def subclone(model, example_inputs, target: Target | None = None, calibration=None, drop_layers=None, *,
             depth: str = "middle", rescale: bool = True, selection: str = "score",
             example_kwargs: dict | None = None, progress=None, device=None,
             compute_dtype="auto", grow_noise_db: float | None = None,
             fixed_sizes: bool = False) -> fx.GraphModule:
    """Initialise a smaller child from ``model`` (weight subcloning, arXiv 2312.09299).

    ``calibration`` is an iterable of input tuples like ``example_inputs``; without it, channels
    are ranked by weight magnitude. ``depth``: which layers go (``middle``, ``measured`` — the
    smallest ‖f(x)‖/‖x+f(x)‖ on the calibration data —, or ``first`` layers kept); a
    ``Target.layers`` above the parent's duplicates middle layers. ``selection="first"`` or
    ``"uniform"`` picks channels without scores (ablation / weight-selection baselines);
    ``rescale=False`` skips the √(D/d) factor. A target above the parent's size grows that width
    by cloning, exactly (HyperCloning); ``grow_noise_db`` adds the paper's symmetry-breaking noise
    at that signal-to-noise ratio in dB, cancelling over the copies (``ScaleClonedReadsPass``). ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``auto``):
    where calibration runs, on a moved copy of the traced graph; the child stays on the CPU.
    ``compute_dtype``: what a half-precision model's calibration computes in: ``"auto"`` (float32,
    with the half dtype's matmuls where this machine runs them fast), a dtype, or None (its own
    dtype; ``passes.analysis.compute_dtype``); the child keeps the model's dtype. A model whose
    trace torch.export confines to input sizes its eager code is not confined to (a loop over the
    sequence pins it to the traced length) is refused with the guard and where it was raised,
    unless ``fixed_sizes=True`` accepts a child that runs at those sizes only. Under
    ``torch.distributed`` each rank calibrates on its share of the batches and the statistics are
    summed before anything is chosen (``subclone_graph.runtime.distributed``). ``progress``
    (``tqdm``, or any callable of its signature; ``subclone_graph.progress``) sees the phases
    ``trace``, ``calibrate`` (a step per batch) and ``rewrite``. Bad input — token ids outside
    the vocabulary, floats where ids go, ``drop_layers`` that are not layer indices — is a
    one-line ``ValueError`` / ``TypeError`` before anything runs. Returns a
    ``torch.fx.GraphModule`` with real parameters that returns outputs of the parent's
    structure at any batch and sequence size the parent runs at.
    """
    target = Target() if target is None else target
    if calibration is not None and iter(calibration) is calibration:
        calibration = list(calibration)     # a one-shot iterator; a re-iterable (a Shard, a TokenStream) streams
    _check_arguments(target, drop_layers, depth, calibration)     # before the trace: a mistake costs no minutes
    check_inputs(model, example_inputs, "example_inputs")
    if isinstance(calibration, (list, tuple)):
        for index, batch in enumerate(calibration):
            check_inputs(model, batch, f"calibration batch {index}")
    resolve_device(device)                  # an unavailable device fails before tracing
    phases, steps = Phases(progress), {}
    calibration_steps = None if progress is None else lambda batches: phases_steps(batches, steps["tick"])
    if isinstance(model, fx.GraphModule):
        with warnings.catch_warnings():     # torch's own pytree deprecation, raised by its deepcopy
            warnings.simplefilter("ignore", FutureWarning)
            model = copy.deepcopy(model)
        _child_becomes_parent(model)
    with phases("trace"):                   # the trace and the analysis (which no option changes)
        gm = trace(model, example_inputs, example_kwargs)
        if not fixed_sizes:
            refuse_confined_sizes(gm, (state.PARENT_CLASS.get(gm) or type(model)).__name__)
        gm = run_passes(gm, subclone_passes(target)[:2])
    passes = subclone_passes(aligned_target(gm, target), calibration, drop_layers, depth, rescale, calibration_steps,
                             selection, device, compute_dtype, grow_noise_db=grow_noise_db)
    names = [type(p).__name__ for p in passes]
    with phases("calibrate", calibration_batches(calibration)) as steps["tick"]:
        gm = run_passes(gm, passes[2:3], ran=names[:2])
    with phases("rewrite"):
        gm = run_passes(gm, passes[3:], ran=names[:3])
    log.info("child: %d parameters", count_parameters(gm))
    return gm


def _grouped_matmuls() -> tuple:
    """The grouped expert matmul ops: ``aten._grouped_mm`` and transformers' CPU fallback of it
    (registered when transformers' mixture-of-experts code is imported)."""
    ops = [torch.ops.aten._grouped_mm.default]
    try:
        ops.append(torch.ops.transformers.grouped_mm_fallback.default)
    except (AttributeError, RuntimeError):
        pass
    return tuple(ops)


def grouped_kernel_multiple(gm: fx.GraphModule) -> int:
    """How many elements make the 16 bytes ``torch._grouped_mm`` needs every stride to be a
    multiple of, for the narrowest weight a grouped expert matmul of ``gm`` reads (1: none)."""
    ops, sizes = _grouped_matmuls(), []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in ops and len(node.args) > 1:
            value = getattr(node.args[1], "meta", {}).get("val")
            if isinstance(value, torch.Tensor):
                sizes.append(value.element_size())
    return max(1, 16 // min(sizes)) if sizes else 1


def aligned_target(gm: fx.GraphModule, target: Target) -> Target:
    """``target`` with the rounding grouped expert kernels need: a model whose experts run
    through ``torch._grouped_mm`` (Hugging Face's kernel, also on reload) needs every width it
    reads to be a multiple of 16 bytes (4 float32 or 8 bfloat16 elements), or the child cannot
    be run by its class. Widths from fractions are rounded so (``Target.multiple_of``, or the
    least common multiple with the one given); an absolute width that is not such a multiple
    is refused in one line."""
    multiple = grouped_kernel_multiple(gm)
    if multiple == 1:
        return target
    for name in WIDTH_FIELDS:
        value = getattr(target, name)
        if isinstance(value, int) and value % multiple:
            low = max(multiple, value - value % multiple)
            raise ValueError(f"Target.{name}={value}: this model's expert matmuls (torch._grouped_mm) need widths "
                             f"that are multiples of {multiple} (16 bytes); give {low} or {low + multiple}")
    given = target.multiple_of or 1
    if given % multiple == 0 or not any(is_fraction(getattr(target, n)) for n in WIDTH_FIELDS):
        return target
    rounded = given * multiple // math.gcd(given, multiple)
    log.info("widths from fractions rounded to multiples of %d (torch._grouped_mm needs 16-byte strides)", rounded)
    return dataclasses.replace(target, multiple_of=rounded)


def phases_steps(batches, tick):
    """The calibration batches, one ``tick`` after each (the ``calibrate`` phase's steps)."""
    for batch in batches:
        yield batch
        tick()


def calibration_batches(calibration) -> int | None:
    """The calibrate phase's batch count: 1 without data (one step: weight magnitude), else the
    batches given; None where it is not known ahead — a rank's share, or a stream (a
    ``TokenStream``, or a ``Shard`` of one) counted as it is read."""
    if calibration is None:
        return 1
    if world_size() > 1:
        return None
    try:
        return len(calibration)
    except TypeError:
        return None


def check_drop_layers(drop_layers) -> None:
    """``drop_layers``: None or an iterable of whole layer indices (each checked against the
    model's layers by ``ChooseKeepPass``)."""
    if drop_layers is None:
        return
    if isinstance(drop_layers, (str, bytes)) or not hasattr(drop_layers, "__iter__"):
        raise TypeError(f"drop_layers={drop_layers!r}: expected a list of layer indices, like drop_layers=[5] "
                        "(or None)")
    for index in drop_layers:
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise TypeError(f"drop_layers={list(drop_layers)!r}: {index!r} is not a layer index (a whole number)")


def check_inputs(model, inputs, what: str) -> None:
    """Token ids that the model's input embedding cannot look up — an integer id outside its
    vocabulary, or floats where it takes ids — named in one line (the model tells its
    vocabulary through ``get_input_embeddings``; other models are not checked here)."""
    embeddings = getattr(model, "get_input_embeddings", None)
    try:
        table = embeddings() if callable(embeddings) else None
    except (NotImplementedError, AttributeError):
        table = None
    check_token_ids(inputs, getattr(table, "num_embeddings", None), what, type(model).__name__)


def check_token_ids(inputs, vocab: int | None, what: str, owner: str = "the model") -> None:
    """``check_inputs`` for a model known by its vocabulary size only (a checkpoint's config)."""
    first = inputs[0] if isinstance(inputs, (tuple, list)) and inputs else inputs
    if not isinstance(vocab, int) or not isinstance(first, torch.Tensor) or not first.numel():
        return
    if first.is_floating_point() or first.is_complex() or first.dtype == torch.bool:
        raise TypeError(f"{what}: the first input is {str(first.dtype)[6:]}, but {owner} takes "
                        f"token ids (integers in 0..{vocab - 1})")
    low, high = int(first.min()), int(first.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"{what} holds token id {high if high >= vocab else low}, outside the model's "
                         f"vocabulary 0..{vocab - 1}")


def check_checkpoint_arguments(folder, target, drop_layers, depth, calibration, example_inputs) -> None:
    """``subclone_checkpoint``'s arguments, checked as ``subclone``'s are (one line each, before
    anything is read): the target, ``drop_layers``, the depth, and token ids against the
    vocabulary ``config.json`` states."""
    import json
    from pathlib import Path

    _check_arguments(target, drop_layers, depth, calibration)
    config = Path(folder) / "config.json"
    try:
        vocab = json.loads(config.read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return                      # the checkpoint reader names a missing or broken config
    check_token_ids(example_inputs, vocab, "example_inputs", config.parent.name)
    if isinstance(calibration, (list, tuple)):
        for index, batch in enumerate(calibration):
            check_token_ids(batch, vocab, f"calibration batch {index}", config.parent.name)


def _child_becomes_parent(gm: fx.GraphModule) -> None:
    """A child subcloned again: its own config (the parent's with the child's sizes) becomes the
    parent config, so that ``save_hf`` of the grandchild matches sizes against the right numbers."""
    if not state.PARENT_CONFIG.has(gm) or not state.SIZES.has(gm):
        return
    from subclone_graph.export.hf import HFExportError, child_config
    try:
        state.PARENT_CONFIG.set(gm, child_config(gm))
    except HFExportError as error:
        # still a valid parent to subclone; only save_hf of its children is off
        log.warning("the child's config could not be derived (%s): save_hf of its children will refuse", error)
        state.PARENT_CONFIG.clear(gm)
    # the analysis of the grandchild clears the rest (the ε scale is in the derived config now)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
