"""One registry of small per-op rules: how each input dimension flows to each output dimension.

A rule is a function ``rule(ctx)`` registered for one or more op objects
(``torch.ops.aten.view.default``, ``operator.getitem``). It states facts through ``ctx``:
``eq`` (same channel), ``factor`` (merged / split into factors), ``concat`` (laid end to end),
``freeze`` (may not be sliced, with a reason), ``contract``/``produce`` (the in- and
out-features of a weight contraction), ``contract_values`` (a contraction of two activations),
``reduce`` (a reduction over a dimension), ``pick_kept`` (values that depend on the length: the
length stays, the kept indices are picked after the node). A rule whose
op holds literal sizes (view's shape, split's sizes, repeat's counts) names, per literal, the
vertex whose size it is (``literal``), so the rewrite can set every literal from its group.

An op without a rule freezes every dimension it touches, naming the op and its module; it is
never treated as elementwise by default.

Index values. An op whose output holds indices into a dim (``topk``'s second output) says so
(``point``); ops that keep values (views, casts, ``sort``'s values, ``getitem``) pass that on; an
op that reads them knowing what they index (a histogram over that dim, a ``gather`` along it)
says so (``read_pointer``). Any other op reading them freezes the dim they index: its indices
would be read as plain numbers, which slicing the dim would silently change.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx

from .. import state
from ..analysis.channel_graph import ChannelGraph
from ..fx_utils import module_path, tensor_arguments, tensor_shape, weight_attribute

__all__ = ["RULES", "RULES_BY_NAME", "register", "qualified_name", "RuleContext", "apply_rule", "is_weight"]

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


def is_weight(node) -> bool:
    """True when ``node`` is a module attribute, or a view or cast of one."""
    return weight_attribute(node) is not None


class RuleContext:
    """What a rule sees: its node, the channel graph, and small helpers."""

    def __init__(self, node: fx.Node, graph: ChannelGraph) -> None:
        self.node = node
        self.graph = graph
        self.origin = f"{_op_name(node.target)} ({node.name} in {module_path(node)})"
        # what the rule states about its node, written to node.meta once it is done (never
        # appended to a value an earlier analysis left there)
        self.literals: dict[int | str, object] = {}
        self.reduced: list[int] = []
        self.slice_parts: tuple[int, int, int] | None = None
        self.attention: tuple[int, int, int] | None = None
        self.expert_rows: tuple | None = None
        self.contracted: list[tuple[int, int]] = []     # (activation vertex, other operand's vertex)
        self.pointers_read: set[str] = set()
        self.picked: tuple[int, int] | None = None      # (vertex, dim): see ``pick_kept``

    # arguments
    def arg(self, index: int, name: str, default=None):
        if len(self.node.args) > index:
            return self.node.args[index]
        return self.node.kwargs.get(name, default)

    def tensor_args(self) -> list[fx.Node]:
        return tensor_arguments(self.node)

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
        """``x_dim`` of an activation is summed against ``w_dim`` of a weight (its in-features)."""
        self.eq(x_dim, w_dim)
        self.graph.contracted.add(x_dim)
        self.contracted.append((x_dim, w_dim))

    def contract_values(self, a_dim: int, b_dim: int) -> None:
        """Two activations are summed over these dims (``q·kᵀ``): no weight to correct."""
        self.eq(a_dim, b_dim)
        self.contracted.append((a_dim, b_dim))

    def produce(self, v: int) -> None:
        self.graph.produced.add(v)

    def reduce(self, x: fx.Node, dims: list[int]) -> None:
        self.reduced.extend(self.v(x, d) for d in dims)

    def literal(self, arg_index: int | str, vertices) -> None:
        """Argument ``arg_index`` (a position, or a keyword-only argument's name) holds the size of
        ``vertices`` (a list, or one vertex)."""
        self.literals[arg_index] = tuple(vertices) if isinstance(vertices, list) else vertices

    def slice_of(self, before: int, inside: int, after: int) -> None:
        """The node is a slice of ``concat(before, inside, after)``: its bounds follow their sizes."""
        self.slice_parts = (before, inside, after)

    def attention_op(self, heads: int, kv_heads: int, head_dim: int) -> None:
        """The node is an attention op over these vertices (query heads, kv heads, head dim)."""
        self.attention = (heads, kv_heads, head_dim)

    def pick_kept(self, dim: int) -> None:
        """The output's values along ``dim`` depend on its length (an ``arange``): the node keeps
        the parent's length and the child reads the kept indices of that dim's group, picked right
        after it — the values a constant tensor of the parent's would give, sliced."""
        self.picked = (self.out(dim), dim)

    def point(self, out_index: int, vertex: int) -> None:
        """Output ``out_index`` holds indices into the dim ``vertex``."""
        self.graph.pointers[(self.node.name, out_index)] = vertex

    def pointer(self, x) -> int | None:
        """The dim whose indices the values of ``x`` are, if they are."""
        return self.graph.pointers.get((x.name, 0)) if isinstance(x, fx.Node) else None

    def read_pointer(self, x: fx.Node) -> None:
        """The rule reads the index values of ``x`` as indices into their dim."""
        self.pointers_read.add(x.name)

    def rows_by_expert(self, x: fx.Node, offsets: fx.Node, experts: int, channels: list[int]) -> None:
        """The rows of ``x`` are sorted by expert (``offsets[e]`` ends expert ``e``'s rows) and each
        is multiplied by its expert's matrix, whose dim ``experts`` picks the expert: the
        ``channels`` of that matrix may keep another order in each expert."""
        self.expert_rows = (x.name, offsets.name, experts, self.v(x, 0), tuple(channels))

    def commit(self) -> None:
        token = self.graph.token
        if self.literals:
            state.LITERALS.set(self.node, state.NodeLiterals(token, dict(self.literals)))
        if self.reduced:
            state.REDUCES.set(self.node, state.NodeReduces(token, tuple(self.reduced)))
        if self.slice_parts is not None:
            state.SLICE_PARTS.set(self.node, state.NodeSliceParts(token, *self.slice_parts))
        if self.attention is not None:
            state.ATTENTION_OP.set(self.node, state.NodeAttention(token, *self.attention))
        if self.expert_rows is not None:
            state.EXPERT_ROWS.set(self.node, state.NodeExpertRows(token, *self.expert_rows))
        if self.contracted:
            state.CONTRACTS.set(self.node, self._contracts(token))
        if self.picked is not None:
            state.PICKS.set(self.node, state.NodePick(token, *self.picked))

    def _contracts(self, token: int) -> "state.NodeContracts":
        """The contraction's record: the weight operand is the other side's node when that node
        is a weight (``is_weight``) on every contracted pair, else ``None``."""
        names = [a.name for a in self.tensor_args()]
        sides = {self.graph.labels[x][0] for x, _ in self.contracted}
        others = {self.graph.labels[w][0] for _, w in self.contracted}
        operand = names.index(sides.pop()) if len(sides) == 1 and not sides & others else None
        other = others.pop() if len(others) == 1 else None
        weight = names.index(other) if other in names and is_weight(self.tensor_args()[names.index(other)]) else None
        dims = tuple(self.graph.labels[w][2] for _, w in self.contracted) if weight is not None else ()
        return state.NodeContracts(token, tuple(x for x, _ in self.contracted), operand, weight, dims)

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
        ctx.commit()
        _follow_pointers(ctx)
        return None
    if not ctx.tensor_args() and not ctx.output_shapes():
        return None      # arithmetic on sizes: touches no channel
    ctx.freeze_all("no rule for this op")
    _follow_pointers(ctx)
    return _op_name(node.target)


# ops whose output holds the values of their first argument (moved, cast or sorted, output 0)
VALUE_KEEPING = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.to.dtype,
                 aten._to_copy.default, aten.clone.default, aten.alias.default, aten.contiguous.default,
                 aten.sort.default, aten.flatten.using_ints, aten.reshape_as.default, aten.view_as.default}
# ops that look at a tensor's metadata only
METADATA_ONLY = {aten._assert_tensor_metadata.default, aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int}


def _follow_pointers(ctx: RuleContext) -> None:
    """Pass index values on through value-keeping ops; freeze the dim indexed by values any other
    op reads without saying so (module docstring, index values)."""
    node, graph = ctx.node, ctx.graph
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        source = graph.pointers.get((node.args[0].name, node.args[1]))
        if source is not None:
            graph.pointers[(node.name, 0)] = source
        return
    first = node.args[0] if node.args else None
    if node.target in VALUE_KEEPING and ctx.pointer(first) is not None:
        graph.pointers[(node.name, 0)] = ctx.pointer(first)
        return
    if node.target in METADATA_ONLY:
        return
    for x in ctx.tensor_args():
        if ctx.pointer(x) is not None and x.name not in ctx.pointers_read:
            graph.freeze(ctx.pointer(x), f"{ctx.origin}: reads indices into this dim as plain values")