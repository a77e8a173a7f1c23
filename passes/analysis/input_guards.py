"""The guards ``torch.export`` put on the sizes of a traced model's inputs that confine it to sizes
its eager parent is not confined to.

Tracing keeps batch and sequence axes dynamic (``subclone_graph.tracing``), but a model's code can
make export specialise or bound them: a Python loop over the sequence pins it to the traced length
(``input_ids.size()[1] == 16``); a slice at a fixed position, or code that branches on the length,
bounds it (``>= 12``, ``<= 11``). The traced graph — and every child made from it — then refuses
other sizes at run time, although the parent ran them. Each guard on one input axis is tried at
every size from 2 (export's least dynamic size) to 64; it confines the axis when it rejects some
of them — a pinned length, a raised least length, a window, a divisibility — except when it
only rejects every size above some bound: a learned position table bounds the parent in the same
place (``<= max_position_embeddings``). A guard that holds at every size (``Mod(s·(2s−1), s) == 0``,
which export did not simplify) is no confinement. Relations between two inputs' axes (a decoder
as long as its encoder) are not reported. Each finding names the guard and where it was raised,
the inputs that axis sizes, and the sizes it rejects (``trace`` runs the eager model at some of
them: a limit the model has itself is no confinement of the trace). ``allowed_sizes(guards)``: per
confined input axis, the sizes from 2 to 64 that none of the guards rejects — where a child
traced with fixed sizes can still be run (another batch at a pinned length; another multiple of 4).

``input_guards(gm)`` reads the shape environment of the fake values torch.export left on the
placeholders; a graph without them (not traced by torch.export) has none to report.
"""
from __future__ import annotations

import re

import torch
import torch.fx as fx

__all__ = ["input_guards", "InputGuard", "allowed_sizes"]

# the sizes a guard is tried at: torch.export specialises 0 and 1, so a dynamic axis starts at 2
SIZES = tuple(range(2, 65))


class InputGuard:
    """One confined input axis: ``axis`` (``input_ids.size()[1]``), ``guard`` (the condition),
    ``where`` (the source location export recorded for it), ``inputs`` (every input axis that
    symbol sizes: ``(input name, dim)``) and ``failing`` (the sizes from 2 to 64 it rejects)."""

    def __init__(self, axis: str, guard: str, where: str, inputs: tuple = (), failing: tuple = ()) -> None:
        self.axis, self.guard, self.where, self.inputs, self.failing = axis, guard, where, inputs, failing

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


def _axis_name(source_name: str) -> str:
    # "L['input_ids'].size()[1]" -> "input_ids.size()[1]"
    return re.sub(r"L\['([^']+)'\]", r"\1", source_name)


def _input_axis(source_name: str) -> tuple[str, int] | None:
    match = re.fullmatch(r"L\['([^']+)'\]\.size\(\)\[(\d+)\]", source_name)
    return None if match is None else (match.group(1), int(match.group(2)))


def _input_symbols(env) -> dict:
    """symbol -> (readable axis name, ((input, dim), ...)) for the symbols that size an input."""
    found = {}
    for symbol, sources in env.var_to_sources.items():
        axes = tuple(a for a in (_input_axis(s.name) for s in sources) if a is not None)
        if axes:
            found[symbol] = (_axis_name(sources[0].name), axes)
    return found


def _readable(expr, names: dict) -> str:
    text = str(expr)
    for symbol, (name, _) in sorted(names.items(), key=lambda kv: -len(str(kv[0]))):
        text = re.sub(rf"\b{re.escape(str(symbol))}\b", name, text)
    return re.sub(r"^Eq\((.*), (.*)\)$", r"\1 == \2", text)


def _failing_sizes(expr, symbol) -> list[int] | None:
    """The sizes in ``SIZES`` the guard rejects; None when it cannot be evaluated."""
    failing = []
    for n in SIZES:
        try:
            holds = bool(expr.subs({symbol: n}))
        except ZeroDivisionError:       # the guard divides by a size that is 0 at n: n cannot run
            holds = False
        except (TypeError, ValueError):
            return None
        if not holds:
            failing.append(n)
    return failing


def _confines(failing: list[int] | None) -> bool:
    """A guard confines unless it holds everywhere, or rejects only every size above some bound."""
    if failing is None:
        return True
    return bool(failing) and failing != list(range(failing[0], SIZES[-1] + 1))


def input_guards(gm: fx.GraphModule) -> list[InputGuard]:
    """The input axes the traced ``gm`` is confined on (module docstring), one entry per guard."""
    env = _shape_env(gm)
    if env is None:
        return []
    names = _input_symbols(env)
    found: list[InputGuard] = []
    tried: dict = {}                    # one expression guards many ops: try each once
    for guard in env.guards:
        symbols = list(guard.expr.free_symbols)
        if len(symbols) != 1 or symbols[0] not in names:
            continue        # a relation between axes, or none of the inputs'
        (symbol,) = symbols
        if guard.expr not in tried:
            tried[guard.expr] = _failing_sizes(guard.expr, symbol)
        failing = tried[guard.expr]
        if _confines(failing):
            axis, inputs = names[symbol]
            found.append(InputGuard(axis, _readable(guard.expr, names), str(guard.sloc).strip("() "), inputs,
                                    tuple(failing or ())))
    return found


def allowed_sizes(guards) -> dict[tuple[str, int], tuple[int, ...]]:
    """``(input name, dim) -> the sizes from 2 to 64 no guard on that axis rejects``, for every
    input axis one of ``guards`` confines (a guard that could not be evaluated leaves only the
    traced size, which the caller knows: an empty tuple)."""
    allowed: dict[tuple[str, int], set[int]] = {}
    for guard in guards:
        rejected = set(guard.failing) if guard.failing else set(SIZES)
        for axis in guard.inputs:
            allowed[axis] = allowed.get(axis, set(SIZES)) - rejected
    return {axis: tuple(sorted(sizes)) for axis, sizes in allowed.items()}
