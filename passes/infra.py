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

import torch
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from . import state
from .errors import PassError, PreconditionError

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


class _AttributesAsFake(FakeTensorProp):
    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor):
            return self._mode.from_tensor(value, static_shapes=True)
        return value


def refresh_meta(gm: fx.GraphModule) -> None:
    """Recompute every node's ``meta["val"]`` after a rewrite changed shapes.

    Runs the graph on the placeholders' own fake values (so dynamic axes stay symbolic)."""
    inputs = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode([v for v in inputs if isinstance(v, torch.Tensor)])
    if mode is None:
        raise PreconditionError("placeholders carry no fake values: trace the model with subclone_graph.trace first")
    # symbolic-size meta kernels (baddbmm's expand) need the python dispatcher, as export had
    with enable_python_dispatcher():
        _AttributesAsFake(gm, mode).propagate_dont_convert_inputs(*inputs)
