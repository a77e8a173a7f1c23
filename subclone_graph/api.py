"""The one-call API: ``subclone(model, example_inputs, Target(...), calibration, drop_layers)``.

The pipeline reads like the method (each step a pass, logged by name):
trace → find residual blocks → analyse channels → score → choose → drop layers → keep
channels → rescale √(D/d) → check the child.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.fx as fx

from subclone_graph.passes import state
from subclone_graph.passes.analysis import AnalyzeChannelsPass, ChooseKeepPass, FindResidualBlocksPass, ScoreChannelsPass
from subclone_graph.passes.errors import PassError
from subclone_graph.passes.infra import log
from subclone_graph.passes.rewrite import DropBlocksPass, DuplicateLayersPass, KeepChannelsPass, RescaleResidualPass
from subclone_graph.passes.target import Target

from subclone_graph.runtime import distributed
from subclone_graph.runtime.device import resolve_device
from subclone_graph.runtime.distributed import DistributedError
from subclone_graph.tracing import refuse_confined_sizes, trace

__all__ = ["subclone", "subclone_passes", "run_passes", "Target"]

def subclone_passes(target: Target, calibration=None, drop_layers=None, depth: str = "middle",
                    rescale: bool = True, progress=None, selection: str = "score", device=None,
                    compute_dtype=torch.float32, *, weights=None, store=None) -> list:
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
    return passes


# errors whose type tells the caller what went wrong: re-raised as the same type, the pass named
_KEPT_TYPES = (ValueError, TypeError, PassError, DistributedError)


def run_passes(gm: fx.GraphModule, passes: list) -> fx.GraphModule:
    """Run passes in order; a failure names the pass (and the ones that ran before it for an
    internal error), keeping the error's type for the user's errors and ``PassError``s."""
    done = []
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
    """What the passes cannot see; depth and selection are checked by ChooseKeepPass."""
    if not isinstance(target, Target):
        raise TypeError(f"target must be a subclone_graph.Target, got {type(target).__name__}")
    if drop_layers is not None and target.layers is not None:
        raise ValueError("give either Target.layers or drop_layers, not both")
    if depth == "measured" and calibration is None:
        raise ValueError('depth="measured" needs calibration data: it measures each layer\'s ||f(x)||/||x+f(x)||')


def subclone(model, example_inputs, target: Target | None = None, calibration=None, drop_layers=None, *,
             depth: str = "middle", rescale: bool = True, selection: str = "score",
             example_kwargs: dict | None = None, progress=None, device=None,
             compute_dtype=torch.float32, fixed_sizes: bool = False) -> fx.GraphModule:
    """Initialise a smaller child from ``model`` (weight subcloning, arXiv 2312.09299).

    ``calibration`` is an iterable of input tuples like ``example_inputs``; without it, channels
    are ranked by weight magnitude. ``depth``: which layers go (``middle``, ``measured`` — the
    smallest ‖f(x)‖/‖x+f(x)‖ on the calibration data —, or ``first`` layers kept); a
    ``Target.layers`` above the parent's duplicates middle layers. ``selection="first"`` or
    ``"uniform"`` picks channels without scores (ablation / weight-selection baselines);
    ``rescale=False`` skips the √(D/d) factor. ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``auto``):
    where calibration runs, on a moved copy of the traced graph; the child stays on the CPU.
    ``compute_dtype``: what a half-precision model's calibration computes in (None: its own
    dtype; ``passes.analysis.compute_dtype``); the child keeps the model's dtype. A model whose
    trace torch.export confines to input sizes its eager code is not confined to (a loop over the
    sequence pins it to the traced length) is refused with the guard and where it was raised,
    unless ``fixed_sizes=True`` accepts a child that runs at those sizes only. Under
    ``torch.distributed`` each rank calibrates on its share of the batches and the statistics are
    summed before anything is chosen (``subclone_graph.runtime.distributed``). Returns a
    ``torch.fx.GraphModule`` with real parameters that returns outputs of the parent's structure
    at any batch and sequence size the parent runs at.
    """
    target = Target() if target is None else target
    if calibration is not None and iter(calibration) is calibration:
        calibration = list(calibration)     # a one-shot iterator; a re-iterable (a Shard, a TokenStream) streams
    passes = subclone_passes(target, calibration, drop_layers, depth, rescale, progress, selection, device,
                             compute_dtype)
    if isinstance(model, fx.GraphModule):
        with warnings.catch_warnings():     # torch's own pytree deprecation, raised by its deepcopy
            warnings.simplefilter("ignore", FutureWarning)
            model = copy.deepcopy(model)
        _child_becomes_parent(model)
    gm = trace(model, example_inputs, example_kwargs)
    if not fixed_sizes:
        refuse_confined_sizes(gm, (state.PARENT_CLASS.get(gm) or type(model)).__name__)
    gm = run_passes(gm, passes)
    log.info("child: %d parameters", count_parameters(gm))
    return gm


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
