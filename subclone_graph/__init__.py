"""subclone-graph: initialise a small transformer from a big pretrained one, on its fx graph.

    import subclone_graph as sg
    child = sg.subclone(model, example_inputs, sg.Target(hidden=..., layers=..., heads=...,
                        kv_heads=..., ffn=...), calibration=batches)
    sg.export_onnx(child, example_inputs, "child.onnx")
    sg.subclone_checkpoint("parent_hf/", "child_hf/", sg.Target(...), calibration=batches)  # streamed

The package's folders are its architecture:

- ``passes/`` (installed as ``subclone_graph.passes``): the compiler passes, the op rules and the
  pass state; it imports nothing else of this package;
- ``api.py``, ``tracing.py``: the one-call pipeline and the trace;
- ``export/``: the child as ``.pt2``, ONNX or a Hugging Face folder, checked, written whole;
- ``checkpoint/``: a safetensors checkpoint folder read and written tensor by tensor, and the
  streamed subcloning of a parent larger than memory;
- ``runtime/``: where and how calibration runs (device, ranks, segment by segment);
- ``data/``: calibration and evaluation data;
- ``cli/``: the ``subclone`` command line;
- ``models/`` (installed as ``subclone_graph.models``): tiny fixtures and the demo.

Names are imported on first use (PEP 562), so ``import subclone_graph`` — and the command
line's ``--help`` — do not pay for torch and transformers until something needs them.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the module that defines it
_EXPORTS = {
    "subclone": "api", "subclone_passes": "api", "run_passes": "api", "count_parameters": "api",
    "trace": "tracing", "TraceError": "tracing",
    "save_hf": "export.hf", "HFExportError": "export.hf",
    "save": "export.pt2", "load": "export.pt2",
    "export_onnx": "export.onnx_export", "OnnxExportError": "export.onnx_export",
    "OnnxMismatchError": "export.onnx_export",
    "tolerance_for": "export.tolerance",
    "subclone_checkpoint": "checkpoint.streamed", "StreamReport": "checkpoint.streamed",
    "CheckpointError": "checkpoint.files",
    "Target": "passes", "analyze_channels": "passes", "PassError": "passes", "PreconditionError": "passes",
    "PostconditionError": "passes", "StaleStateError": "passes",
    "FindResidualBlocksPass": "passes", "AnalyzeChannelsPass": "passes", "ScoreChannelsPass": "passes",
    "ChooseKeepPass": "passes", "DropBlocksPass": "passes", "DuplicateLayersPass": "passes",
    "KeepChannelsPass": "passes", "RescaleResidualPass": "passes", "MoveToDevicePass": "passes",
    "ChannelGraph": "passes.analysis.channel_graph", "ChannelGroup": "passes.analysis.channel_graph",
    "move_to_device": "passes.rewrite.move_to_device",
}
_SUBPACKAGES = ("passes", "models", "export", "checkpoint", "runtime", "data", "cli")

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBPACKAGES))


if TYPE_CHECKING:  # what the names are, for readers and type checkers
    from subclone_graph.api import count_parameters, run_passes, subclone, subclone_passes
    from subclone_graph.checkpoint.files import CheckpointError
    from subclone_graph.checkpoint.streamed import StreamReport, subclone_checkpoint
    from subclone_graph.export.hf import HFExportError, save_hf
    from subclone_graph.export.onnx_export import OnnxExportError, OnnxMismatchError, export_onnx
    from subclone_graph.export.pt2 import load, save
    from subclone_graph.export.tolerance import tolerance_for
    from subclone_graph.passes import (AnalyzeChannelsPass, ChooseKeepPass, DropBlocksPass, DuplicateLayersPass,
                                       FindResidualBlocksPass, KeepChannelsPass, MoveToDevicePass, PassError,
                                       PostconditionError, PreconditionError, RescaleResidualPass,
                                       ScoreChannelsPass, StaleStateError, Target, analyze_channels)
    from subclone_graph.passes.analysis.channel_graph import ChannelGraph, ChannelGroup
    from subclone_graph.passes.rewrite.move_to_device import move_to_device
    from subclone_graph.tracing import TraceError, trace
