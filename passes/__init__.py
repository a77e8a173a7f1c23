"""Graph passes of subclone-graph; each is a ``PassBase`` with ``call(gm) -> PassResult``.

Layout: ``state`` (every metadata key, typed, with its writer and readers), ``errors``,
``infra`` (the pass base), ``fx_utils`` (shared fx helpers), ``target`` (``Target``),
``rules/`` (the per-ATen-op rules), ``analysis/`` (write metadata only: ``FindResidualBlocksPass``,
``AnalyzeChannelsPass``, ``ScoreChannelsPass``, ``ChooseKeepPass``) and ``rewrite/`` (read it:
``DropBlocksPass``, ``DuplicateLayersPass``, ``KeepChannelsPass``, ``RescaleResidualPass``,
``MoveToDevicePass``).

Names are imported on first use (PEP 562), as in the package above: ``passes.target`` (the
``Target`` the command line parses) is importable without torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the submodule that defines it
_EXPORTS = {
    "FindResidualBlocksPass": "analysis", "AnalyzeChannelsPass": "analysis", "ScoreChannelsPass": "analysis",
    "ChooseKeepPass": "analysis", "analyze_channels": "analysis",
    "DropBlocksPass": "rewrite", "DuplicateLayersPass": "rewrite", "KeepChannelsPass": "rewrite",
    "RescaleResidualPass": "rewrite", "MoveToDevicePass": "rewrite",
    "Target": "target",
    "PassError": "errors", "PreconditionError": "errors", "PostconditionError": "errors", "StaleStateError": "errors",
}

__all__ = [
    "FindResidualBlocksPass", "AnalyzeChannelsPass", "ScoreChannelsPass", "ChooseKeepPass",
    "DropBlocksPass", "DuplicateLayersPass", "KeepChannelsPass", "RescaleResidualPass", "MoveToDevicePass",
    "Target", "analyze_channels", "PassError", "PreconditionError", "PostconditionError", "StaleStateError",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # what the names are, for readers and type checkers
    from .analysis import AnalyzeChannelsPass, ChooseKeepPass, FindResidualBlocksPass, ScoreChannelsPass, analyze_channels
    from .errors import PassError, PostconditionError, PreconditionError, StaleStateError
    from .rewrite import DropBlocksPass, DuplicateLayersPass, KeepChannelsPass, MoveToDevicePass, RescaleResidualPass
    from .target import Target
