"""Shared helpers on fx graphs, module paths, sizes and attribute tensors (one copy of each).

- module paths: ``module_paths(node)`` (the ``nn_module_stack``, outermost first),
  ``module_path(node)`` (the innermost), ``container_item(path)`` (the index of a path that is an
  item of a ``ModuleList`` / ``Sequential``: ``model.layers.3`` or ``layers[3]``), ``layer_key``
  (the innermost such path holding a node), ``in_module(node, path)``, ``attribute_path``
  (``a.b[3]`` → ``a.b.3``, the spelling ``get_submodule`` takes);
- sizes: ``plain_size`` (an int, or a sympy expression for a dynamic axis; never a SymInt or a
  Node), ``same_size``, ``divides``, ``quotient`` (exact for ints and sympy products);
  ``tensor_shape(node)``;
- op sets: ``CASTS`` (ops that return their input's values with the same dims: casts, copies,
  dropout in eval), ``VIEWS`` (reshapes), ``WEIGHT_PASS_THROUGH`` (what a weight may be read through
  and still be that weight: casts, views, transposes); ``weight_attribute(node)`` (the ``get_attr``
  a value is read from through those);
- attribute tensors: ``get_attribute``, ``set_attribute``, ``same_kind``, ``replace_tensors``;
- ``eval_mode(module)``: a context in eval mode, the previous mode restored after;
- ``as_input_tuple(inputs)``: a tensor or a sequence of tensors as a tuple.
"""
from __future__ import annotations

import contextlib
import re

import sympy
import torch
import torch.fx as fx

__all__ = ["module_paths", "module_path", "container_item", "layer_key", "in_module", "attribute_path",
           "plain_size", "same_size", "divides", "quotient", "tensor_shape", "CASTS", "VIEWS",
           "WEIGHT_PASS_THROUGH", "weight_attribute", "get_attribute", "set_attribute", "same_kind", "replace_tensors",
           "eval_mode", "as_input_tuple", "written_arguments", "tensor_arguments"]

aten = torch.ops.aten

_ITEM = re.compile(r"(?:\.|\[)(\d+)\]?$")

CASTS = frozenset({
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.alias.default,
    aten.clone.default, aten.contiguous.default, aten.dropout.default, aten.detach.default,
})
VIEWS = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})
WEIGHT_PASS_THROUGH = CASTS | VIEWS | frozenset({
    aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default, aten.mT.default,
    aten.mH.default, aten.adjoint.default, aten.matrix_H.default,
})


def weight_attribute(node) -> fx.Node | None:
    """The ``get_attr`` node that ``node`` reads through casts, views and transposes, or None."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in WEIGHT_PASS_THROUGH:
        node = node.args[0]
    return node if isinstance(node, fx.Node) and node.op == "get_attr" else None


# ----- module paths -----------------------------------------------------------------------------
def module_paths(node: fx.Node) -> list[str]:
    return [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


def module_path(node: fx.Node) -> str:
    paths = module_paths(node)
    return paths[-1] if paths else "<top level>"


def container_item(path: str) -> int | None:
    """The index of a module path that is an item of a container, else None."""
    match = _ITEM.search(path)
    return None if match is None else int(match.group(1))


def container_of(path: str) -> str:
    """The container's path of an item path (``model.layers.3`` → ``model.layers``)."""
    match = _ITEM.search(path)
    return path if match is None else path[: match.start()]


def layer_key(node: fx.Node) -> str | None:
    """The innermost module path holding ``node`` that is a container item."""
    return next((p for p in reversed(module_paths(node)) if container_item(p) is not None), None)


def in_module(node: fx.Node, path: str | None) -> bool:
    return path is not None and path in module_paths(node)


def attribute_path(path: str) -> str:
    """A module path as ``get_submodule`` spells it: ``a.b[3]`` → ``a.b.3``."""
    return path.replace("[", ".").replace("]", "")


# ----- sizes ------------------------------------------------------------------------------------
def plain_size(size):
    """An int, or a sympy expression for a dynamic axis (never a SymInt or an fx.Node)."""
    if isinstance(size, fx.Node):
        # a size computed in the graph (``x.size(0)``): its traced value; a Node kept as a size
        # would drag fake tensors into every deep copy of the graph
        size = size.meta.get("val")
    if isinstance(size, torch.SymInt):
        size = size.node.expr
    if isinstance(size, sympy.Basic) and size.is_number:
        # a sympy number (a size a rule computed from a SymInt's expression, ``s0 // s0``) is an
        # int: torch calls and ``ChannelGroup.static`` need one
        return int(size)
    return int(size) if isinstance(size, int) else size


def same_size(a, b) -> bool:
    a, b = plain_size(a), plain_size(b)
    if isinstance(a, int) and isinstance(b, int) or a == b:
        return a == b
    return sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0


def divides(a, b) -> bool:
    """True when ``a`` divides ``b`` and ``a != b`` (ints or sympy products)."""
    a, b = plain_size(a), plain_size(b)
    if isinstance(a, int) and isinstance(b, int):
        return a != b and a != 0 and b % a == 0
    ratio = sympy.cancel(sympy.sympify(b) / sympy.sympify(a))
    return ratio != 1 and sympy.fraction(ratio)[1] == 1


def quotient(a, b):
    a, b = plain_size(a), plain_size(b)
    if isinstance(a, int) and isinstance(b, int):
        return a // b
    return sympy.cancel(sympy.sympify(a) / sympy.sympify(b))


def tensor_arguments(node: fx.Node) -> list[fx.Node]:
    """The node's arguments that are tensors, in order: positional, then keyword, lists flattened."""
    out = []
    for a in [*node.args, *node.kwargs.values()]:
        items = a if isinstance(a, (list, tuple)) else [a]
        out.extend(x for x in items if isinstance(x, fx.Node) and tensor_shape(x) is not None)
    return out


def tensor_shape(value) -> tuple | None:
    """The shape of a node's tensor value, sizes as ints or sympy expressions (dynamic axes)."""
    if isinstance(value, fx.Node):
        value = value.meta.get("val")
    if isinstance(value, torch.Tensor):
        return tuple(plain_size(s) for s in value.shape)
    return None


# ----- op schemas -------------------------------------------------------------------------------
def written_arguments(target) -> list[tuple[int, str]]:
    """(position, name) of each argument an op writes in place, read off its schema (``Tensor(a!)``):
    ``add_`` writes its first, ``index_put_`` its first, an ``out=`` variant its ``out``."""
    arguments = getattr(getattr(target, "_schema", None), "arguments", ())
    return [(i, a.name) for i, a in enumerate(arguments) if a.alias_info is not None and a.alias_info.is_write]


# ----- attribute tensors ------------------------------------------------------------------------
def get_attribute(module: torch.nn.Module, target: str):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_attribute(module: torch.nn.Module, target: str, value) -> None:
    """Replace a parameter, buffer or plain tensor attribute, keeping which of the three it is."""
    prefix, _, name = target.rpartition(".")
    owner = module.get_submodule(prefix) if prefix else module
    if name in owner._parameters:
        owner._parameters[name] = value if isinstance(value, torch.nn.Parameter) else torch.nn.Parameter(value)
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        setattr(owner, name, value)


def same_kind(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``new`` as what ``old`` is: a trainable ``nn.Parameter`` (same ``requires_grad``) or a tensor."""
    if isinstance(old, torch.nn.Parameter):
        return torch.nn.Parameter(new, requires_grad=old.requires_grad)
    return new


def replace_tensors(gm: fx.GraphModule, replaced: dict[int, torch.Tensor]) -> None:
    """Set each new tensor under *every* name that held the old one (``id(old) -> new``),
    so that tied weights stay one tensor."""
    names = [(n, t) for n, t in gm.named_parameters(remove_duplicate=False)]
    names += [(n, t) for n, t in gm.named_buffers(remove_duplicate=False)]
    names += [(n.target, get_attribute(gm, n.target)) for n in gm.graph.nodes if n.op == "get_attr"]
    for name, tensor in names:
        if id(tensor) in replaced:
            set_attribute(gm, name, replaced[id(tensor)])


# ----- calling models ---------------------------------------------------------------------------
@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """Eval mode inside, the previous mode after (a module whose mode is fixed is left alone)."""
    was_training = module.training
    try:
        module.eval()
    except NotImplementedError:      # a raw ExportedProgram.module(): its mode is fixed anyway
        yield
        return
    try:
        yield
    finally:
        module.train(was_training)


def as_input_tuple(inputs) -> tuple:
    """A tensor, or a sequence of positional inputs, as a tuple of positional inputs."""
    if inputs is None:
        return ()
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    return tuple(inputs)
