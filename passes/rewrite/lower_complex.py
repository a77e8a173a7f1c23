"""Rewrite: complex arithmetic as pairs of real tensors, so that the channel analysis and the
ONNX exporter see only real ops.

Rotary embeddings written with complex numbers (``view_as_complex(q.reshape(..., -1, 2)) *
freqs_cis`` then ``view_as_real(...).flatten(3)``) have no channel rule (the heads they touch
froze) and no ONNX translation. A complex value ``z`` is carried as ``(re, im)``, two real
tensors of ``z``'s shape, and each op on it is rewritten by one of these identities:

1. ``polar(r, θ)`` → ``(r·cos θ, r·sin θ)``;
2. ``view_as_complex(x)`` → ``(x[..., 0], x[..., 1])``; ``complex(a, b)`` → ``(a, b)``;
3. an op that moves or copies elements (``unsqueeze``, ``slice``, ``view`` / ``reshape`` — as
   ``reshape``: a part is a strided view —, ``expand``, ``permute``, ``clone``, ``cat``, ``to``
   with the complex dtype replaced by its real one, ...) → the same op on each part;
4. ``z·w`` → ``(a·c − b·d, a·d + b·c)``; ``z·r`` for a real tensor or number ``r`` → ``(a·r, b·r)``;
   ``z ± w`` → ``(a ± c, b ± d)``, a real operand joining ``re`` only; ``−z``; ``conj(z)`` →
   ``(a, −b)``;
5. ``view_as_real(z)`` → ``stack([re, im], -1)``; ``real(z)`` → ``re``; ``imag(z)`` → ``im``;
   ``abs(z)`` → ``sqrt(re² + im²)``;
6. ``_assert_tensor_metadata(z, dtype=complex)``: dropped (a check of the traced dtype, which no
   value has any more).

The arithmetic is the one torch's complex kernels do (a product of complex float32 values is the
same four float32 products and two sums), so outputs agree to float rounding.

Anything else on a complex value — another op, a complex input, output or attribute — leaves
the graph as it was: ``lower_complex`` then returns the op and module that stopped it, for a
caller to freeze (the channel analysis names the op) or refuse (``export_onnx``).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from ..infra import SubclonePass

__all__ = ["LowerComplexPass", "lower_complex", "complex_blocker", "has_complex_values"]

aten = torch.ops.aten

_ALIKE = {aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.slice.Tensor,
          aten.select.int, aten.reshape.default, aten.expand.default, aten.permute.default, aten.transpose.int,
          aten.clone.default, aten.alias.default, aten.contiguous.default, aten.flatten.using_ints,
          aten.unflatten.int, aten.repeat.default, aten.repeat_interleave.self_int, aten.index.Tensor,
          aten.t.default, aten.detach.default}
_AS_RESHAPE = {aten.view.default, aten._unsafe_view.default}
_TO = {aten.to.dtype_layout, aten.to.dtype, aten._to_copy.default, aten.to.device}
_DROPPED = {aten._assert_tensor_metadata.default}


def _is_complex(value) -> bool:
    return isinstance(value, fx.Node) and isinstance(value.meta.get("val"), torch.Tensor) and \
        value.meta["val"].is_complex()


def has_complex_values(gm: fx.GraphModule) -> bool:
    """Whether any value of ``gm`` is complex (what ``lower_complex`` would rewrite)."""
    return any(_is_complex(n) for n in gm.graph.nodes)


def _where(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    module = list(stack.values())[-1][0] if stack else ""
    return f"{node.target} ({node.name}{' in ' + module if module else ''})"


class _Lowering:
    """The parts of each complex node, made beside it in one walk of the graph."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm, self.graph = gm, gm.graph
        self.parts: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}
        values = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
        self.mode = detect_fake_mode([v for v in values if isinstance(v, torch.Tensor)])
        self.node: fx.Node | None = None

    def call(self, target, *args, **kwargs) -> fx.Node:
        """A node computing ``target(*args, **kwargs)`` before the node being rewritten, with its
        fake value and the original's module stack."""
        new = self.graph.call_function(target, args, kwargs)
        new.meta.update({k: v for k, v in self.node.meta.items() if k not in ("val", "tensor_meta")})
        value = lambda a: a.meta["val"] if isinstance(a, fx.Node) else a  # noqa: E731
        with self.mode if self.mode is not None else torch.no_grad():
            new.meta["val"] = target(*fx.node.map_aggregate(args, value), **fx.node.map_aggregate(kwargs, value))
        return new

    def real_of(self, value):
        """``value`` (a real operand) unchanged, or None where it is complex."""
        return None if _is_complex(value) else value

    def rewrite(self, node: fx.Node):
        """The parts of ``node`` (or its real replacement), or None where no identity applies."""
        self.node = node
        target, args, kwargs = node.target, node.args, node.kwargs
        if target is aten.polar.default:
            r, theta = args
            return self.call(aten.mul.Tensor, r, self.call(aten.cos.default, theta)), \
                self.call(aten.mul.Tensor, r, self.call(aten.sin.default, theta))
        if target is aten.view_as_complex.default:
            return self.call(aten.select.int, args[0], -1, 0), self.call(aten.select.int, args[0], -1, 1)
        if target is aten.complex.default:
            return args[0], args[1]
        if any(_is_complex(a) and a not in self.parts for a in node.all_input_nodes):
            return None
        if target in _ALIKE or target in _AS_RESHAPE or target in _TO:
            return self._alike(node)
        if target is aten.cat.default and all(_is_complex(a) for a in args[0]):
            return tuple(self.call(target, [self.parts[a][i] for a in args[0]], *args[1:], **kwargs) for i in (0, 1))
        if target in (aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor) and len(args) == 2 and not kwargs:
            return self._arithmetic(target, *args)
        if target is aten.neg.default:
            return tuple(self.call(target, p) for p in self.parts[args[0]])
        if target in (aten.conj.default, aten._conj.default, aten.conj_physical.default):
            re, im = self.parts[args[0]]
            return re, self.call(aten.neg.default, im)
        return self._real_result(node)

    def _alike(self, node: fx.Node):
        if not _is_complex(node) or not _is_complex(node.args[0]) or any(_is_complex(a) for a in node.all_input_nodes[1:]):
            return None
        target = aten.reshape.default if node.target in _AS_RESHAPE else node.target
        kwargs = dict(node.kwargs)
        args = list(node.args)
        if node.target in _TO:
            kwargs = {k: v.to_real() if isinstance(v, torch.dtype) else v for k, v in kwargs.items()}
            args = [a.to_real() if isinstance(a, torch.dtype) else a for a in args]
        return tuple(self.call(target, part, *args[1:], **kwargs) for part in self.parts[node.args[0]])

    def _arithmetic(self, target, x, y):
        if not _is_complex(x):      # r·z, r + z: one complex operand, put it first
            if target is aten.sub.Tensor:
                re, im = self.parts[y]
                return self.call(target, x, re), self.call(aten.neg.default, im)
            x, y = y, x
        a, b = self.parts[x]
        if not _is_complex(y):
            if target is aten.mul.Tensor:
                return self.call(target, a, y), self.call(target, b, y)
            return self.call(target, a, y), b
        c, d = self.parts[y]
        if target is aten.mul.Tensor:
            mul = aten.mul.Tensor
            return (self.call(aten.sub.Tensor, self.call(mul, a, c), self.call(mul, b, d)),
                    self.call(aten.add.Tensor, self.call(mul, a, d), self.call(mul, b, c)))
        return self.call(target, a, c), self.call(target, b, d)

    def _real_result(self, node: fx.Node):
        """A real value (or a dropped check) read off one complex operand: a single replacement."""
        target, args = node.target, node.args
        if target in _DROPPED:
            return ()
        if not args or not _is_complex(args[0]) or any(_is_complex(a) for a in node.all_input_nodes[1:]):
            return None
        re, im = self.parts[args[0]]
        if target is aten.view_as_real.default:
            return self.call(aten.stack.default, [re, im], -1)
        if target is aten.real.default:
            return re
        if target is aten.imag.default:
            return im
        if target is aten.abs.default:
            squares = self.call(aten.add.Tensor, self.call(aten.mul.Tensor, re, re), self.call(aten.mul.Tensor, im, im))
            return self.call(aten.sqrt.default, squares)
        if target is aten.sym_size.int:
            return self.call(target, re, *args[1:])
        return None


def complex_blocker(gm: fx.GraphModule) -> str:
    """The first op on a complex value that ``lower_complex`` has no identity for, as ``op (node in
    module)``; "" when there is none (or no complex value at all)."""
    return _lower(gm, dry_run=True)


def _lower(gm: fx.GraphModule, dry_run: bool) -> str:
    nodes = list(gm.graph.nodes)
    touched = [n for n in nodes if _is_complex(n) or any(_is_complex(a) for a in n.all_input_nodes)]
    if not touched:
        return ""
    for node in touched:
        if node.op != "call_function" or node.target is operator.getitem:
            return _where(node) if node.op != "output" else f"a complex output ({node.name})"
    lowering, replaced = _Lowering(gm), {}
    for node in touched:
        with gm.graph.inserting_before(node):
            result = lowering.rewrite(node)
        if result is None:
            blocker = _where(node)
            _undo(gm, nodes)
            return blocker
        if _is_complex(node):
            lowering.parts[node] = result
        else:
            replaced[node] = result
    if dry_run:
        _undo(gm, nodes)
        return ""
    for node, result in replaced.items():
        if result != ():
            node.replace_all_uses_with(result)
    for node in reversed(touched):
        gm.graph.erase_node(node)
    old = set(nodes)
    made = [n for n in gm.graph.nodes if n not in old]
    for node in reversed(made):       # a part no identity read (the imaginary half of a real())
        if not node.users:
            gm.graph.erase_node(node)
    return ""


def _undo(gm: fx.GraphModule, nodes: list) -> None:
    """Erase every node made since ``nodes`` was listed (the graph as it was)."""
    kept = set(nodes)
    for node in reversed(list(gm.graph.nodes)):
        if node not in kept:
            gm.graph.erase_node(node)


def lower_complex(gm: fx.GraphModule) -> str:
    """Rewrite ``gm``'s complex arithmetic in place (module docstring). Returns "" when every complex
    value was lowered (or there was none), else the op and module that stopped it (``gm`` unchanged)."""
    blocker = _lower(gm, dry_run=False)
    if not blocker:
        gm.recompile()
    return blocker


class LowerComplexPass(SubclonePass):
    """``lower_complex`` as a pass: modified when there were complex values and all were lowered."""

    def run(self, gm: fx.GraphModule) -> bool:
        had = any(_is_complex(n) for n in gm.graph.nodes)
        return had and not lower_complex(gm)
