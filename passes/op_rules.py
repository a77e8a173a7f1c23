"""One registry of small per-op rules: how each input dimension flows to each output dimension.

A rule is a function ``rule(ctx)`` registered for one or more op objects
(``torch.ops.aten.view.default``, ``operator.getitem``). It states facts through ``ctx``:
``eq`` (same channel), ``factor`` (merged / split into factors), ``concat`` (laid end to end),
``freeze`` (may not be sliced, with a reason), ``contract``/``produce`` (the in- and
out-features of a weight contraction), ``reduce`` (a reduction over a dimension). A rule whose
op holds literal sizes (view's shape, split's sizes, repeat's counts) names, per literal, the
vertex whose size it is (``literal``), so the rewrite can set every literal from its group.

An op without a rule freezes every dimension it touches, naming the op and its module; it is
never treated as elementwise by default.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from .channel_graph import ChannelGraph, _plain_size

__all__ = ["RULES", "RULES_BY_NAME", "register", "qualified_name", "RuleContext", "apply_rule", "module_path",
           "tensor_shape", "is_weight"]

aten = torch.ops.aten
RULES: dict[object, Callable[["RuleContext"], None]] = {}


# Rules for custom ops of other libraries, keyed by the op's exact qualified name
# ("namespace::name.overload"): the op object exists only once that library has registered it.
RULES_BY_NAME: dict[str, Callable[["RuleContext"], None]] = {}


def register(*ops):
    def wrap(fn):
        for op in ops:
            if isinstance(op, str):
                RULES_BY_NAME[op] = fn
            else:
                RULES[op] = fn
        return fn
    return wrap


def qualified_name(target) -> str | None:
    schema = getattr(target, "_schema", None)
    return None if schema is None else f"{schema.name}.{schema.overload_name or 'default'}"


def tensor_shape(value) -> tuple | None:
    """The shape of a node's tensor value, sizes as ints or sympy expressions (dynamic axes)."""
    if isinstance(value, fx.Node):
        value = value.meta.get("val")
    if isinstance(value, torch.Tensor):
        return tuple(_plain_size(s) for s in value.shape)
    return None


def module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else "<top level>"


_PASS_THROUGH = {
    aten.t.default, aten.transpose.int, aten.permute.default, aten.view.default,
    aten.reshape.default, aten._unsafe_view.default, aten.to.dtype, aten.to.dtype_layout,
    aten.to.device, aten._to_copy.default, aten.alias.default, aten.clone.default,
    aten.contiguous.default, aten.detach.default, aten.numpy_T.default, aten.mT.default,
    aten.mH.default, aten.adjoint.default, aten.matrix_H.default,
}


def is_weight(node) -> bool:
    """True when ``node`` is a module attribute, or a view or cast of one."""
    seen = 0
    while isinstance(node, fx.Node) and seen < 8:
        if node.op == "get_attr":
            return True
        if node.op != "call_function" or node.target not in _PASS_THROUGH:
            return False
        node = node.args[0]
        seen += 1
    return False


class RuleContext:
    """What a rule sees: its node, the channel graph, and small helpers."""

    def __init__(self, node: fx.Node, graph: ChannelGraph) -> None:
        self.node = node
        self.graph = graph
        self.origin = f"{_op_name(node.target)} ({node.name} in {module_path(node)})"

    # arguments
    def arg(self, index: int, name: str, default=None):
        if len(self.node.args) > index:
            return self.node.args[index]
        return self.node.kwargs.get(name, default)

    def tensor_args(self) -> list[fx.Node]:
        flat = [a for a in self.node.args] + list(self.node.kwargs.values())
        out = []
        for a in flat:
            items = a if isinstance(a, (list, tuple)) else [a]
            out.extend(x for x in items if isinstance(x, fx.Node) and tensor_shape(x) is not None)
        return out

    # shapes and vertices
    def shape(self, x) -> tuple | None:
        return tensor_shape(x)

    def out_shape(self, index: int | None = None) -> tuple | None:
        val = self.node.meta.get("val")
        if index is not None:
            val = val[index]
        return tensor_shape(val)

    def v(self, x: fx.Node, dim: int) -> int:
        shape = self.shape(x)
        dim = dim % len(shape)
        return self.graph.vertex((x.name, 0, dim), shape[dim])

    def out(self, dim: int, index: int | None = None) -> int:
        shape = self.out_shape(index)
        dim = dim % len(shape)
        key = (self.node.name, index or 0, dim)
        return self.graph.vertex(key, shape[dim])

    def fresh(self, size, label: str) -> int:
        return self.graph.fresh(size, (self.node.name, label))

    # facts
    def eq(self, a: int, b: int) -> None:
        self.graph.eq(a, b, self.origin)

    def factor(self, whole: int, parts: list[int]) -> None:
        self.graph.factor(whole, parts, self.origin)

    def concat(self, whole: int, parts: list[int]) -> None:
        self.graph.concat(whole, parts, self.origin)

    def freeze(self, v: int, why: str) -> None:
        self.graph.freeze(v, f"{self.origin}: {why}")

    def contract(self, x_dim: int, w_dim: int) -> None:
        self.eq(x_dim, w_dim)
        self.graph.contracted.add(x_dim)

    def produce(self, v: int) -> None:
        self.graph.produced.add(v)

    def reduce(self, x: fx.Node, dims: list[int]) -> None:
        self.node.meta.setdefault("subclone.reduces", []).extend(self.v(x, d) for d in dims)

    def literal(self, arg_index: int, vertices) -> None:
        """Argument ``arg_index`` holds the size of ``vertices`` (a list, or one vertex)."""
        self.node.meta.setdefault("subclone.literals", {})[arg_index] = vertices

    def note(self, key: str, value) -> None:
        self.node.meta[f"subclone.{key}"] = value

    def freeze_all(self, why: str) -> None:
        for x in self.tensor_args():
            for d in range(len(self.shape(x))):
                self.freeze(self.v(x, d), why)
        for index, shape in self.output_shapes():
            for d in range(len(shape)):
                self.freeze(self.out(d, index), why)

    def output_shapes(self) -> list[tuple[int | None, tuple]]:
        val = self.node.meta.get("val")
        if isinstance(val, (list, tuple)):
            return [(i, tensor_shape(t)) for i, t in enumerate(val) if isinstance(t, torch.Tensor)]
        shape = tensor_shape(val)
        return [] if shape is None else [(None, shape)]


def _op_name(target) -> str:
    return getattr(target, "__name__", None) if not isinstance(target, torch._ops.OpOverload) else str(target)


def apply_rule(node: fx.Node, graph: ChannelGraph) -> str | None:
    """Run the rule for ``node``; return the op name when no rule exists (the node is frozen)."""
    ctx = RuleContext(node, graph)
    if node.op != "call_function":
        if node.op == "call_module" and ctx.output_shapes():
            ctx.freeze_all("a submodule call is opaque to the analysis")
            return f"call_module {node.target}"
        return None
    rule = RULES.get(node.target) or RULES_BY_NAME.get(qualified_name(node.target))
    if rule is not None:
        rule(ctx)
        return None
    if not ctx.tensor_args() and not ctx.output_shapes():
        return None      # arithmetic on sizes: touches no channel
    ctx.freeze_all("no rule for this op")
    return _op_name(node.target)
