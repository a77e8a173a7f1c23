"""Analysis passes: they only write metadata (``passes/state.py``) and return ``modified=False``.

``FindResidualBlocksPass`` → ``AnalyzeChannelsPass`` (channel graph from the op rules) →
``ScoreChannelsPass`` → ``ChooseKeepPass``.
"""
from .analyze_channels import AnalyzeChannelsPass, analyze_channels
from .channel_graph import ChannelGraph, ChannelGroup, Relation
from .choose_keep import ChooseKeepPass
from .find_blocks import FindResidualBlocksPass, find_layers
from .score_channels import ScoreChannelsPass

__all__ = ["FindResidualBlocksPass", "AnalyzeChannelsPass", "ScoreChannelsPass", "ChooseKeepPass",
           "ChannelGraph", "ChannelGroup", "Relation", "analyze_channels", "find_layers"]
