"""subclone-graph: initialise a small transformer from a big pretrained one, on its fx graph.

    import subclone_graph as sg
    child = sg.subclone(model, example_inputs, sg.Target(hidden=..., layers=..., heads=...,
                        kv_heads=..., ffn=...), calibration=batches)
    sg.export_onnx(child, example_inputs, "child.onnx")
    sg.subclone_checkpoint("parent_hf/", "child_hf/", sg.Target(...), calibration=batches)  # streamed
"""
from subclone_graph.passes import (AnalyzeChannelsPass, ChooseKeepPass, DropBlocksPass, DuplicateLayersPass,
                                   FindResidualBlocksPass, KeepChannelsPass, MoveToDevicePass, PassError,
                                   PostconditionError, PreconditionError, RescaleResidualPass, ScaleClonedReadsPass,
                                   ScoreChannelsPass, StaleStateError, Target, Times, analyze_channels)
from subclone_graph.passes.analysis.channel_graph import ChannelGraph, ChannelGroup
from subclone_graph.passes.rewrite.move_to_device import move_to_device

from .api import count_parameters, run_passes, subclone, subclone_passes
from .hf_export import HFExportError, save_hf
from .io import load, save
from .checkpoint import CheckpointError
from .onnx_export import OnnxExportError, OnnxMismatchError, export_onnx
from .streaming import StreamReport, subclone_checkpoint
from .tolerance import tolerance_for
from .tracing import TraceError, trace

__all__ = [
    "subclone", "Target", "Times", "trace", "export_onnx", "save", "load", "save_hf", "HFExportError",
    "OnnxExportError", "OnnxMismatchError", "tolerance_for",
    "count_parameters", "subclone_passes", "move_to_device",
    "run_passes", "analyze_channels", "ChannelGraph", "ChannelGroup", "PassError", "PreconditionError",
    "PostconditionError", "StaleStateError", "TraceError",
    "FindResidualBlocksPass", "AnalyzeChannelsPass", "ScoreChannelsPass", "ChooseKeepPass",
    "DropBlocksPass", "DuplicateLayersPass", "KeepChannelsPass", "RescaleResidualPass",
    "ScaleClonedReadsPass", "MoveToDevicePass", "subclone_checkpoint", "StreamReport", "CheckpointError",
]
