"""Rewrite: each call of an ATen alias as a call of its canonical op (``torch.multiply`` →
``torch.mul``), so that the rules and passes that recognise an op see one name for it.

Identity: an alias has its canonical op's schema and kernel (``passes/rules/aliases.py``), so
``alias(*args, **kwargs) == canonical(*args, **kwargs)`` for every input; the node keeps its
name, arguments, users and metadata (its fake value included), only its target changes. Cases:

1. an out-of-place alias (``multiply.Tensor`` → ``mul.Tensor``);
2. an in-place alias (``multiply_.Tensor`` → ``mul_.Tensor``): the same tensor is written.

Run by the trace, beside ``lower_complex``; a second run changes nothing.
"""
from __future__ import annotations

import torch.fx as fx

from ..errors import PostconditionError
from ..infra import SubclonePass
from ..rules.aliases import ALIASES

__all__ = ["CanonicalAliasesPass", "canonical_aliases"]


class CanonicalAliasesPass(SubclonePass):
    """Every ``call_function`` node whose target is an alias calls its canonical op instead."""

    def run(self, gm: fx.GraphModule) -> bool:
        modified = False
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in ALIASES:
                node.target = ALIASES[node.target]
                modified = True
        return modified

    def ensures(self, graph_module: fx.GraphModule) -> None:
        left = [n.name for n in graph_module.graph.nodes if n.op == "call_function" and n.target in ALIASES]
        if left:
            raise PostconditionError(f"CanonicalAliasesPass: aliases left in the graph: {left[:3]}")


def canonical_aliases(gm: fx.GraphModule) -> fx.GraphModule:
    return CanonicalAliasesPass()(gm).graph_module
