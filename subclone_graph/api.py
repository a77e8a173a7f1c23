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

from subclone_graph.passes.analyze_channels import AnalyzeChannelsPass
from subclone_graph.passes.choose_keep import ChooseKeepPass, Target
from subclone_graph.passes.drop_blocks import DropBlocksPass
from subclone_graph.passes.duplicate_layers import DuplicateLayersPass
from subclone_graph.passes.find_blocks import FindResidualBlocksPass
from subclone_graph.passes.infra import PassError, log
from subclone_graph.passes.keep_channels import KeepChannelsPass
from subclone_graph.passes.rescale_residual import RescaleResidualPass
from subclone_graph.passes.score_channels import ScoreChannelsPass

from .tracing import trace

__all__ = ["subclone", "subclone_passes", "run_passes", "Target"]

def subclone_passes(target: Target, calibration=None, drop_layers=None, depth: str = "middle",
                    rescale: bool = True, progress=None, selection: str = "score") -> list:
    """The subcloning pipeline as a flat list of passes (each ``call(gm) -> PassResult``)."""
    passes = [
        FindResidualBlocksPass(),
        AnalyzeChannelsPass(),
        ScoreChannelsPass(calibration, progress=progress),
        ChooseKeepPass(target, drop_layers=drop_layers, depth=depth, selection=selection),
        DropBlocksPass(),
        DuplicateLayersPass(),
        KeepChannelsPass(),
    ]
    if rescale:
        passes.append(RescaleResidualPass())
    return passes


def run_passes(gm: fx.GraphModule, passes: list) -> fx.GraphModule:
    """Run passes in order; a failure names the pass and the ones that ran before it."""
    done = []
    for p in passes:
        try:
            gm = p(gm).graph_module
        except (ValueError, TypeError):
            raise                      # the user's input is wrong: the message says where
        except Exception as error:
            ran = ", ".join(done) or "none"
            raise PassError(f"{type(p).__name__} failed (after: {ran}): {type(error).__name__}: {error}") from error
        done.append(type(p).__name__)
    return gm


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
             example_kwargs: dict | None = None, progress=None) -> fx.GraphModule:
    """Initialise a smaller child from ``model`` (weight subcloning, arXiv 2312.09299).

    ``calibration`` is an iterable of input tuples like ``example_inputs``; without it, channels
    are ranked by weight magnitude. ``depth``: which layers go (``middle``, ``measured`` — the
    smallest ‖f(x)‖/‖x+f(x)‖ on the calibration data —, or ``first`` layers kept); a
    ``Target.layers`` above the parent's duplicates middle layers. ``selection="first"`` or
    ``"uniform"`` picks channels without scores (ablation / weight-selection baselines);
    ``rescale=False`` skips the √(D/d) factor. Returns a ``torch.fx.GraphModule`` with real
    parameters that returns outputs of the parent's structure at any batch and sequence size.
    """
    target = Target() if target is None else target
    _check_arguments(target, drop_layers, depth, calibration)
    if calibration is not None and not isinstance(calibration, (list, tuple)):
        calibration = list(calibration)
    passes = subclone_passes(target, calibration, drop_layers, depth, rescale, progress, selection)
    if isinstance(model, fx.GraphModule):
        with warnings.catch_warnings():     # torch's own pytree deprecation, raised by its deepcopy
            warnings.simplefilter("ignore", FutureWarning)
            model = copy.deepcopy(model)
        _child_becomes_parent(model)
    gm = trace(model, example_inputs, example_kwargs)
    gm = run_passes(gm, passes)
    _check_child(gm, target)
    return gm


def _child_becomes_parent(gm: fx.GraphModule) -> None:
    """A child subcloned again: its own config (the parent's with the child's sizes) becomes the
    parent config, so that ``save_hf`` of the grandchild matches sizes against the right numbers."""
    meta = gm.meta
    if "subclone.parent_config" not in meta or "subclone.sizes" not in meta:
        return
    from .hf_export import HFExportError, child_config
    try:
        meta["subclone.parent_config"] = child_config(gm)
    except HFExportError as error:
        # still a valid parent to subclone; only save_hf of its children is off
        log.warning("the child's config could not be derived (%s): save_hf of its children will refuse", error)
        meta.pop("subclone.parent_config")
    meta.pop("subclone.rescale", None)      # the ε scale is in the derived config now


def _check_child(gm: fx.GraphModule, target: Target) -> None:
    """Postcondition: the child's layer count and widths are what was asked for."""
    graph = gm.meta["subclone.channel_graph"]
    sizes = gm.meta["subclone.sizes"]
    wanted = {"residual": target.hidden, "ffn": target.ffn}
    for group in graph.groups.values():
        want = wanted.get(group.kind)
        if want is not None and sizes[group.id] != want:
            raise PassError(f"child {group.kind} width is {sizes[group.id]}, target was {want}")
    if target.layers is not None and len(gm.meta["subclone.layers"]) != target.layers:
        raise PassError(f"child has {len(gm.meta['subclone.layers'])} layers, target was {target.layers}")
    log.info("child: %d parameters", sum(p.numel() for p in gm.parameters()))


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
