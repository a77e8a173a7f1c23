"""The guards ``torch.export`` put on the sizes of a traced model's inputs that confine it to sizes
its eager parent is not confined to.

Tracing keeps batch and sequence axes dynamic (``subclone_graph.tracing``), but a model's code can
make export specialise or bound them: a Python loop over the sequence pins it to the traced length
(``input_ids.size()[1] == 16``); a slice at a fixed position, or code that branches on the length,
bounds it (``>= 12``, ``<= 11``). The traced graph — and every child made from it — then refuses
other sizes at run time, although the parent ran them. What is reported, per input axis:

1. a pinned axis: a guard that makes it equal to a constant;
2. a raised lower bound: its range starts above 2 (export's own least dynamic size);
3. a bounded window: a lower bound above 2 together with an upper bound.

An upper bound alone is not reported: a learned position table bounds the parent in the same
place (``<= max_position_embeddings``). Relations between two inputs' axes (a decoder as long as
its encoder) are not reported either. Each finding names the guard and where it was raised.

``input_guards(gm)`` reads the shape environment of the fake values torch.export left on the
placeholders; a graph without them (not traced by torch.export) has none to report.
"""
from __future__ import annotations

import re

import sympy
import torch
import torch.fx as fx

__all__ = ["input_guards", "InputGuard"]

_LEAST_DYNAMIC = 2      # torch.export specialises sizes 0 and 1; a dynamic axis starts at 2


class InputGuard:
    """One confined input axis: ``axis`` (``input_ids.size()[1]``), ``guard`` (the condition) and
    ``where`` (the source location export recorded for it)."""

    def __init__(self, axis: str, guard: str, where: str) -> None:
        self.axis, self.guard, self.where = axis, guard, where

    def __str__(self) -> str:
        return f"{self.guard} (raised at {self.where})" if self.where else self.guard

    def __repr__(self) -> str:
        return f"InputGuard({self.axis!r}, {self.guard!r}, {self.where!r})"


def _shape_env(gm: fx.GraphModule):
    for node in gm.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(value, torch.Tensor):
            for size in value.shape:
                if isinstance(size, torch.SymInt):
                    return size.node.shape_env
    return None


def _axis_name(source_names: list[str]) -> str:
    # "L['input_ids'].size()[1]" -> "input_ids.size()[1]"
    name = source_names[0] if source_names else "?"
    return re.sub(r"L\['([^']+)'\]", r"\1", name)


def _input_symbols(env) -> dict:
    return {symbol: _axis_name([s.name for s in sources]) for symbol, sources in env.var_to_sources.items()
            if sources and any(".size()[" in s.name for s in sources)}


def _readable(expr, names: dict) -> str:
    text = str(expr)
    for symbol, name in sorted(names.items(), key=lambda kv: -len(str(kv[0]))):
        text = re.sub(rf"\b{re.escape(str(symbol))}\b", name, text)
    return re.sub(r"^Eq\((.*), (.*)\)$", r"\1 == \2", text)


def input_guards(gm: fx.GraphModule) -> list[InputGuard]:
    """The input axes the traced ``gm`` is confined on (module docstring), one entry per guard."""
    env = _shape_env(gm)
    if env is None:
        return []
    names = _input_symbols(env)
    found: list[InputGuard] = []
    for guard in env.guards:
        symbols = [s for s in guard.expr.free_symbols if s in names]
        if len(symbols) != 1 or len(guard.expr.free_symbols) != 1:
            continue        # a relation between axes, or none of the inputs'
        (symbol,) = symbols
        bounds = env.var_to_range.get(symbol)
        pinned = isinstance(guard.expr, sympy.Eq)
        raised = bounds is not None and bounds.lower > _LEAST_DYNAMIC
        if pinned or raised:
            found.append(InputGuard(names[symbol], _readable(guard.expr, names), str(guard.sloc).strip("() ")))
    return found
