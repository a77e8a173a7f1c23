"""subclone-graph: initialise a small transformer from a big pretrained one, on its fx graph.

    import subclone_graph as sg
    child = sg.subclone(model, example_inputs, sg.Target(hidden=..., layers=..., heads=...,
                        kv_heads=..., ffn=...), calibration=batches)
    sg.export_onnx(child, example_inputs, "child.onnx")
"""
from subclone_graph.passes.analyze_channels import AnalyzeChannelsPass, analyze_channels
from subclone_graph.passes.channel_graph import ChannelGraph, ChannelGroup
from subclone_graph.passes.choose_keep import ChooseKeepPass, Target
from subclone_graph.passes.drop_blocks import DropBlocksPass
from subclone_graph.passes.duplicate_layers import DuplicateLayersPass
from subclone_graph.passes.find_blocks import FindResidualBlocksPass
from subclone_graph.passes.infra import PassError
from subclone_graph.passes.keep_channels import KeepChannelsPass
from subclone_graph.passes.move_to_device import MoveToDevicePass, move_to_device
from subclone_graph.passes.rescale_residual import RescaleResidualPass
from subclone_graph.passes.score_channels import ScoreChannelsPass

from .api import count_parameters, run_passes, subclone, subclone_passes
from .hf_export import HFExportError, save_hf
from .io import load, save
from .onnx_export import OnnxExportError, OnnxMismatchError, export_onnx
from .tolerance import tolerance_for
from .tracing import TraceError, trace

__all__ = [
    "subclone", "Target", "trace", "export_onnx", "save", "load", "save_hf", "HFExportError",
    "OnnxExportError", "OnnxMismatchError", "tolerance_for",
    "count_parameters", "subclone_passes", "move_to_device",
    "run_passes", "analyze_channels", "ChannelGraph", "ChannelGroup", "PassError", "TraceError",
    "FindResidualBlocksPass", "AnalyzeChannelsPass", "ScoreChannelsPass", "ChooseKeepPass",
    "DropBlocksPass", "DuplicateLayersPass", "KeepChannelsPass", "RescaleResidualPass",
    "MoveToDevicePass",
]
