"""Rewrite: repeat layers to make a deeper child (paper §3). Placeholder until implemented."""
from __future__ import annotations

import torch.fx as fx

from .infra import SubclonePass

__all__ = ["DuplicateLayersPass"]


class DuplicateLayersPass(SubclonePass):
    """Duplicate the layers listed in ``gm.meta["subclone.duplicate"]``."""

    def run(self, gm: fx.GraphModule) -> bool:
        if gm.meta.get("subclone.duplicate"):
            raise NotImplementedError("deepening a model by duplicating layers is not implemented yet")
        return False
