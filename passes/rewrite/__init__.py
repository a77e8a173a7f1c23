"""Rewrite passes: they read the analysis' metadata and change the graph and its tensors, in
place, each checking its invariant on the result (``ensures()``).

``DropBlocksPass`` → ``DuplicateLayersPass`` → ``KeepChannelsPass`` → ``RescaleResidualPass`` →
``ScaleClonedReadsPass`` (a grown width's reads divided by its copies);
``MoveToDevicePass`` moves a child to another device; ``LowerComplexPass`` (run by the trace)
rewrites complex arithmetic as pairs of real tensors, ``CanonicalAliasesPass`` (run by the trace)
calls each ATen alias's canonical op (``multiply`` → ``mul``).
"""
from .canonical_aliases import CanonicalAliasesPass, canonical_aliases
from .drop_blocks import DropBlocksPass, drop_blocks
from .duplicate_layers import DuplicateLayersPass, duplicate_layers
from .keep_channels import KeepChannelsPass, keep_channels
from .lower_complex import LowerComplexPass, lower_complex
from .move_to_device import MoveToDevicePass, move_to_device
from .rescale_residual import RescaleResidualPass, rescale_residual
from .scale_cloned_reads import ScaleClonedReadsPass, scale_cloned_reads

__all__ = ["CanonicalAliasesPass", "canonical_aliases", "DropBlocksPass", "DuplicateLayersPass", "KeepChannelsPass", "RescaleResidualPass", "ScaleClonedReadsPass",
           "MoveToDevicePass", "LowerComplexPass", "drop_blocks", "duplicate_layers", "keep_channels", "lower_complex", "move_to_device",
           "rescale_residual", "scale_cloned_reads"]
