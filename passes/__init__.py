"""Graph passes of subclone-graph; each is a ``PassBase`` with ``call(gm) -> PassResult``.

Layout: ``state`` (every metadata key, typed, with its writer and readers), ``errors``,
``infra`` (the pass base), ``fx_utils`` (shared fx helpers), ``target`` (``Target``),
``rules/`` (the per-ATen-op rules), ``analysis/`` (write metadata only: ``FindResidualBlocksPass``,
``AnalyzeChannelsPass``, ``ScoreChannelsPass``, ``ChooseKeepPass``) and ``rewrite/`` (read it:
``DropBlocksPass``, ``DuplicateLayersPass``, ``KeepChannelsPass``, ``RescaleResidualPass``,
``MoveToDevicePass``).
"""
from .analysis import (AnalyzeChannelsPass, ChooseKeepPass, FindResidualBlocksPass, ScoreChannelsPass,
                       analyze_channels)
from .errors import PassError, PostconditionError, PreconditionError, StaleStateError
from .rewrite import DropBlocksPass, DuplicateLayersPass, KeepChannelsPass, MoveToDevicePass, RescaleResidualPass
from .target import Target

__all__ = [
    "FindResidualBlocksPass", "AnalyzeChannelsPass", "ScoreChannelsPass", "ChooseKeepPass",
    "DropBlocksPass", "DuplicateLayersPass", "KeepChannelsPass", "RescaleResidualPass", "MoveToDevicePass",
    "Target", "analyze_channels", "PassError", "PreconditionError", "PostconditionError", "StaleStateError",
]
