"""Graph passes of subclone-graph; each is a ``PassBase`` with ``call(gm) -> PassResult``.

Analysis (write metadata only): ``FindResidualBlocksPass``, ``AnalyzeChannelsPass``,
``ScoreChannelsPass``, ``ChooseKeepPass``. Rewrites (read it): ``DropBlocksPass``,
``DuplicateLayersPass``, ``KeepChannelsPass``, ``RescaleResidualPass``.
"""
from .analyze_channels import AnalyzeChannelsPass, analyze_channels
from .choose_keep import ChooseKeepPass, Target
from .drop_blocks import DropBlocksPass
from .duplicate_layers import DuplicateLayersPass
from .find_blocks import FindResidualBlocksPass
from .keep_channels import KeepChannelsPass
from .rescale_residual import RescaleResidualPass
from .score_channels import ScoreChannelsPass

__all__ = [
    "FindResidualBlocksPass", "AnalyzeChannelsPass", "ScoreChannelsPass", "ChooseKeepPass",
    "DropBlocksPass", "DuplicateLayersPass", "KeepChannelsPass", "RescaleResidualPass", "Target", "analyze_channels",
]
