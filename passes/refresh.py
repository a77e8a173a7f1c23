"""``refresh_meta``: every node's ``meta["val"]`` recomputed after a rewrite changed shapes.

The graph's values carry symbolic batch and sequence sizes, and propagating fake tensors with
symbolic sizes is slow (every size and stride is a sympy expression that each meta kernel
reasons about): it was most of a subclone's time. A rewrite that slices channels changes only
the *static* sizes, so the refresh first propagates **static** fake tensors at the placeholders'
size hints (about half the CPU time), then gives each new value its symbolic sizes back from
the old value of the same node (``_symbolic``), for sizes and strides alike:

- what was static takes the new static value;
- what was symbolic keeps its expression where the expression's value at the hints is the new
  value; else an expression ``c · m`` (m a product of symbols, as ``batch · heads`` whose heads
  were cut) becomes ``c' · m``, with ``c'`` read from the new value;
- a stride of a size-1 dim (any stride is valid there) is the static kernel's.

A value that cannot be given its symbols so (another kind of expression, a node without an old
value that is not size arithmetic, another structure), or a graph the static propagation cannot
run (a data-dependent size), falls back to propagating symbolic fake tensors through the whole
graph — the slow path, as before. The sizes are the symbolic path's (``tests/test_refresh_meta.py``);
a stride may be the layout the static kernel picks at the hints.
"""
from __future__ import annotations

import operator

import sympy
import torch
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils import _pytree as pytree

from .errors import PreconditionError

__all__ = ["refresh_meta"]


class _AttributesAsFake(FakeTensorProp):
    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor):
            return self._mode.from_tensor(value, static_shapes=True)
        return value


_SIZE_ARITHMETIC = {operator.mul, operator.add, operator.sub, operator.floordiv}


class _Unrebuildable(Exception):
    """A value the static propagation cannot give symbolic sizes back to."""


def refresh_meta(gm: fx.GraphModule, symbolic: bool = False) -> str:
    """Recompute every node's ``meta["val"]`` after a rewrite changed shapes.

    Dynamic axes stay symbolic: the placeholders' own fake values are the inputs. Returns the
    path taken, ``"static"`` or ``"symbolic"`` (forced by ``symbolic=True``)."""
    inputs = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode([v for v in inputs if isinstance(v, torch.Tensor)])
    if mode is None:
        raise PreconditionError("placeholders carry no fake values: trace the model with subclone_graph.trace first")
    if not symbolic and mode.shape_env is not None and _refresh_static(gm, inputs, mode):
        return "static"
    _refresh_symbolic(gm, inputs, mode)
    return "symbolic"


def _refresh_symbolic(gm: fx.GraphModule, inputs: list, mode: FakeTensorMode) -> None:
    # symbolic-size meta kernels (baddbmm's expand) need the python dispatcher, as export had
    with enable_python_dispatcher():
        _AttributesAsFake(gm, mode).propagate_dont_convert_inputs(*inputs)


def _refresh_static(gm: fx.GraphModule, inputs: list, mode: FakeTensorMode) -> bool:
    """The fast path; False (nothing changed) where it cannot give every node its value."""
    old = {node: node.meta.get("val") for node in gm.graph.nodes}
    static_mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        static_inputs = [_static_twin(value, static_mode) for value in inputs]
        for node in gm.graph.nodes:
            node.meta.pop("val", None)
        _AttributesAsFake(gm, static_mode).propagate_dont_convert_inputs(*static_inputs)
        new = {node: node.meta.get("val") for node in gm.graph.nodes}
        rebuilt = {}
        with mode:
            for node in gm.graph.nodes:
                if node.op == "placeholder" or new[node] is None:
                    rebuilt[node] = old[node]       # as the symbolic propagation leaves them
                elif node.op == "output":
                    rebuilt[node] = fx.node.map_arg(node.args[0], lambda arg: rebuilt[arg])
                elif old[node] is None and node.op == "call_function" and node.target in _SIZE_ARITHMETIC:
                    # a size computed anew by the rewrite (``batch * heads`` with fewer heads)
                    rebuilt[node] = node.target(*fx.node.map_arg(node.args, lambda arg: rebuilt[arg]))
                    if _hint(rebuilt[node]) != new[node]:
                        raise _Unrebuildable(node.name)
                elif old[node] is None:
                    raise _Unrebuildable(node.name)
                else:
                    rebuilt[node] = _rebuild(old[node], new[node], mode)
    except Exception:           # a data-dependent size, an op without a static kernel, a value it cannot rebuild
        _set_values(old)
        return False
    _set_values(rebuilt)
    return True


def _set_values(values: dict) -> None:
    for node, value in values.items():
        if value is None:
            node.meta.pop("val", None)
        else:
            node.meta["val"] = value


def _hint(size) -> int:
    return size.node.hint if isinstance(size, torch.SymInt) else int(size)


def _static_twin(value, static_mode: FakeTensorMode):
    if isinstance(value, torch.Tensor):
        if value.is_sparse or any(isinstance(s, torch.SymInt) and s.node.hint is None for s in value.shape):
            raise _Unrebuildable("placeholder")
        with static_mode:
            return torch.empty_strided(_hints(value.shape), _hints(value.stride()), dtype=value.dtype, device=value.device,
                                       requires_grad=value.requires_grad)
    if isinstance(value, torch.SymInt):
        return _hint(value)
    return value


def _rebuild(old, new, mode: FakeTensorMode):
    old_leaves = pytree.tree_leaves(old)
    new_leaves, new_spec = pytree.tree_flatten(new)
    if len(old_leaves) != len(new_leaves):          # (a list where the trace had an immutable_list)
        raise _Unrebuildable("structure")
    leaves = [_rebuild_leaf(o, n, mode) for o, n in zip(old_leaves, new_leaves)]
    return pytree.tree_unflatten(leaves, new_spec)


def _rebuild_leaf(old, new, mode: FakeTensorMode):
    if isinstance(new, torch.Tensor):
        if not isinstance(old, torch.Tensor) or old.dim() != new.dim() or old.is_sparse or new.is_sparse:
            raise _Unrebuildable("tensor")
        if (old.dtype == new.dtype and old.device == new.device and old.requires_grad == new.requires_grad
                and _hints(old.shape) == list(new.shape) and _hints(old.stride()) == list(new.stride())):
            return old                          # untouched by the rewrite
        sizes = [_symbolic(o, n, mode) for o, n in zip(old.shape, new.shape)]
        # a dim of size 1 may have any stride: the static kernel's
        strides = [n if size == 1 else _symbolic(o, n, mode)
                   for o, n, size in zip(old.stride(), new.stride(), new.shape)]
        meta = torch.empty_strided(sizes, strides, dtype=new.dtype, device="meta", requires_grad=new.requires_grad)
        return FakeTensor(mode, meta, new.device)
    if isinstance(new, int) and not isinstance(new, bool) and isinstance(old, torch.SymInt):
        return _symbolic(old, new, mode)
    if isinstance(old, (torch.SymFloat, torch.SymBool)) and old.node.hint == new:
        return old
    if isinstance(new, (torch.SymInt, torch.SymFloat, torch.SymBool, torch.Tensor)) or \
            isinstance(old, (torch.SymInt, torch.SymFloat, torch.SymBool, torch.Tensor)):
        raise _Unrebuildable("leaf")
    return new


def _hints(sizes) -> list[int]:
    return [_hint(s) for s in sizes]


def _symbolic(old, new: int, mode: FakeTensorMode):
    """``new`` (a static size or stride) as an expression in the old one's symbols: the old
    expression where its value is ``new``; else, for ``c · m`` (m a product of symbols, the
    shape every size and stride of a channel rewrite has: ``batch · heads · head_dim``),
    ``c' · m`` with the same m."""
    if not isinstance(old, torch.SymInt):
        return new
    hint = _hint(old)
    if hint == new:
        return old
    expression = old.node.expr
    if mode.shape_env.bound_sympy(expression).is_singleton():
        return new                              # a constant in disguise: Min(64, 64·s) where s ≥ 2
    coefficient, monomial = expression.as_coeff_Mul()
    if not coefficient.is_Integer or hint is None:
        raise _Unrebuildable(f"size {old.node.expr}")
    monomial_hint = hint // int(coefficient)
    if monomial_hint == 0 or new % monomial_hint:
        raise _Unrebuildable(f"size {old.node.expr}")
    if not all(factor.is_Symbol or factor.is_Pow and factor.base.is_Symbol and factor.exp.is_Integer
               for factor in monomial.as_ordered_factors()):
        raise _Unrebuildable(f"size {old.node.expr}")
    return mode.shape_env.create_symintnode(sympy.Integer(new // monomial_hint) * monomial, hint=new)
