"""The one pass shape: ``call(gm) -> PassResult``, in place, with checked pre/postconditions.

Every pass here is a ``torch.fx.passes.infra.pass_base.PassBase``, so it runs alone, in torch's
``PassManager``, or in any chain with other compilers' passes. All our passes work **in place**
(``in_place = True``): the GraphModule given is the one returned; ``SubclonePass.__call__``
checks that declaration on the result.

- ``requires()`` raises ``PreconditionError`` naming the pass to run first, for every key in
  ``requires_keys`` (``passes/state.py`` owns the keys).
- An analysis pass sets ``clears`` to its stage: before it runs, every key of that stage and of
  later stages is removed from the graph and its nodes (``state.clear_from``), so it never reads
  or appends to what an earlier run left.
- ``ensures()`` runs on the returned module and raises ``PostconditionError``; each rewrite
  states its invariant there.
"""
from __future__ import annotations

import logging

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from . import state
from .errors import PassError, PreconditionError
from .refresh import refresh_meta

__all__ = ["SubclonePass", "log", "refresh_meta"]

log = logging.getLogger("subclone_graph")


class SubclonePass(PassBase):
    """Base of our passes. Subclasses implement ``run(gm) -> bool`` (modified?)."""

    in_place = True
    requires_keys: tuple[state.StateKey, ...] = ()
    clears: str | None = None          # an analysis pass: the stage it (re)writes

    def requires(self, graph_module: fx.GraphModule) -> None:
        for key in self.requires_keys:
            key.need(graph_module)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        log.info("pass %s", type(self).__name__)
        if self.clears is not None:
            state.clear_from(graph_module, self.clears)
        modified = self.run(graph_module)
        if modified:
            graph_module.graph.lint()
            graph_module.recompile()
        return PassResult(graph_module, modified)

    def __call__(self, graph_module: fx.GraphModule) -> PassResult:
        if not isinstance(graph_module, fx.GraphModule):
            raise PreconditionError(f"{type(self).__name__} takes a torch.fx.GraphModule (subclone_graph.trace "
                                    f"makes one), got {type(graph_module).__name__}")
        self.requires(graph_module)
        result = self.call(graph_module)
        if self.in_place and result.graph_module is not graph_module:
            raise PassError(f"{type(self).__name__} declares in_place but returned a new module")
        self.ensures(result.graph_module)
        return result

    def run(self, gm: fx.GraphModule) -> bool:
        raise NotImplementedError
