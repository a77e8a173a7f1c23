"""Trace any model into a ``torch.fx.GraphModule`` whose batch and sequence axes stay dynamic.

``torch.fx.symbolic_trace`` fails on current Hugging Face models; ``torch.export.export``
(non-strict) traces them all. The result keeps parameter names (FQNs) and ``nn_module_stack``.
An already-traced ``GraphModule`` (with fake values on its placeholders, as ``torch.export``
leaves them) or an ``ExportedProgram`` is accepted as is, so our passes chain after others.

Dynamic axes: dim 0 of every tensor input (batch), and dim 1 of integer inputs (token ids,
masks) and of 3-D float inputs (embeddings): the sequence. Images keep their size.

A ``torch.no_grad()`` block inside ``forward`` is inlined between two grad-mode switches
(``inline_grad_mode_regions``): the analysis sees its ops, the graph still runs it without gradients.

An output that is neither a tensor nor a pytree of them (a ``DynamicCache`` that a class returns
whatever ``use_cache`` says) cannot leave an exported graph: the traced forward returns ``None`` in
its place (``tensor_outputs``), with a warning naming its type and place; the tensors a user reads
(logits, hidden states) are the model's own.

Complex arithmetic (a rotary embedding through ``view_as_complex``) is rewritten as pairs of real
tensors (``passes/rewrite/lower_complex.py``), so the analysis and the ONNX exporter see real ops.
A call of an ATen alias (``torch.multiply``) is rewritten as its canonical op (``torch.mul``:
``passes/rewrite/canonical_aliases.py``). Both whatever the input (a module, an
``ExportedProgram``, a graph), and on a copy where the graph is the caller's own.

Non-tensor keyword inputs of the example (``use_cache=False``) are baked into the graph as
constants, so the traced module — and every child made from it — is called with tensors only.

An example input that is a view of another tensor (``ids[:2, :8]``) is traced as a copy:
torch.export would otherwise guard the *base* tensor's sizes (``input_ids._base.size()[1]``),
and every later call with another tensor — each calibration batch — would fail the guard.

Speed: with dynamic axes every op's shapes are sympy expressions, and two of export's defaults
cost more than they give here (measured on one decoder layer: ~30% of the trace): the fake-tensor
dispatch cache (a hit rebuilds its symbolic output shapes, slower than computing them afresh)
and a Python stack trace kept per node (``node.meta["stack_trace"]``, which no pass reads). Both
are off while we export (``fast_export_settings``); the graph is the same.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import sys
import warnings

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.fx.node import map_arg

from subclone_graph.passes import state
from subclone_graph.input_sizes import dynamic_axes, resized
from subclone_graph.passes.analysis.input_guards import allowed_sizes, input_guards
from subclone_graph.passes.fx_utils import as_input_tuple, eval_mode
from subclone_graph.passes.rewrite.canonical_aliases import canonical_aliases
from subclone_graph.passes.rules.aliases import ALIASES
from subclone_graph.passes.rewrite.lower_complex import has_complex_values, lower_complex

__all__ = ["trace", "dynamic_shapes_for", "TraceError", "fast_export_settings", "refuse_confined_sizes",
           "inline_grad_mode_regions", "tensor_outputs"]


class TraceError(ValueError):
    """The model could not be traced; the message names the model and the failing construct."""


def _axes(value):
    return {axis: torch.export.Dim.AUTO for axis in dynamic_axes(value)} or None


def dynamic_shapes_for(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """A ``dynamic_shapes`` spec keyed by ``forward``'s parameter names."""
    signature = inspect.signature(module.forward)
    bound = signature.bind_partial(*args, **kwargs)
    spec = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            spec[name] = tuple(_axes(v) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            spec[name] = {k: _axes(v) for k, v in value.items()}
        else:
            spec[name] = _axes(value)
    return spec


def _default_kwargs(model: torch.nn.Module, kwargs: dict) -> dict:
    # A cache object among the outputs would make the traced outputs differ from the logits; a
    # composite model's cache flag may sit on a sub-config only, so it is turned off wherever
    # forward takes it
    kwargs = dict(kwargs)
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs.setdefault("use_cache", False)
    return kwargs


def _is_traced(gm: fx.GraphModule) -> bool:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return all("val" in n.meta for n in placeholders)


def trace(model, example_inputs=(), example_kwargs: dict | None = None) -> fx.GraphModule:
    """Trace ``model(*example_inputs, **example_kwargs)`` into a GraphModule (see module doc)."""
    example_inputs = _without_views(as_input_tuple(example_inputs))
    example_kwargs = _without_views(example_kwargs)
    if isinstance(model, torch.export.ExportedProgram):
        gm = model.module()
    elif isinstance(model, fx.GraphModule) and _is_traced(model):
        gm = model
    elif isinstance(model, torch.nn.Module):
        gm = _export(model, example_inputs, _default_kwargs(model, example_kwargs or {}))
    else:
        raise TypeError(f"trace: expected a torch.nn.Module, GraphModule or ExportedProgram, got {type(model).__name__}")
    gm = _normalised(gm, own=gm is model)
    bind_constant_inputs(gm)
    _allow_train_eval(gm)
    if not state.EXAMPLE_INPUTS.has(gm):
        state.EXAMPLE_INPUTS.set(gm, example_inputs)
    if not state.INPUT_GUARDS.has(gm):
        guards = _confining_guards(model, example_inputs, example_kwargs or {}, gm)
        state.INPUT_GUARDS.set(gm, tuple(str(g) for g in guards))
        state.INPUT_SIZES.set(gm, allowed_sizes(guards))
    if isinstance(model, torch.nn.Module) and not isinstance(model, fx.GraphModule):
        state.PARENT_CLASS.set(gm, type(model))
        if hasattr(model, "config"):
            state.PARENT_CONFIG.set(gm, model.config)
    return gm


def _normalised(gm: fx.GraphModule, own: bool) -> fx.GraphModule:
    """``gm`` with its complex arithmetic as pairs of real tensors and its ATen aliases as their
    canonical ops (module doc); where ``gm`` is the caller's own graph and either would change it,
    a copy sharing its weights is rewritten instead. An op on a complex value with no real form
    leaves the graph as it was (the analysis names it)."""
    aliases = any(n.op == "call_function" and n.target in ALIASES for n in gm.graph.nodes)
    if not (has_complex_values(gm) or aliases):
        return gm
    if own:
        copied = fx.GraphModule(gm, copy.deepcopy(gm.graph))
        copied.meta.update(gm.meta)
        gm = copied
    lower_complex(gm)
    canonical_aliases(gm)   # torch.multiply as torch.mul: one name per op for the rules and passes
    return gm


def _without_views(value):
    """``value`` with every tensor that is a view of another replaced by a copy (module doc)."""
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) and t._base is not None else t, value)


def _runs_at(model: torch.nn.Module, args: tuple, kwargs: dict, guard) -> bool | None:
    """Whether the eager ``model`` runs with the guarded input axes at a size the guard rejects: the
    least one above the traced size, else the least one; None when that cannot be tried (weights
    without data, an input the guard names not found)."""
    if not guard.failing or not guard.inputs or any(
            p.is_meta or isinstance(p, torch._subclasses.fake_tensor.FakeTensor) for p in model.parameters()):
        return None
    bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
    if any(name not in bound.arguments for name, _ in guard.inputs):
        return None
    name, dim = guard.inputs[0]
    traced = bound.arguments[name].shape[dim]
    sizes = [s for s in guard.failing if s > traced][:1] or [guard.failing[0]]
    for size in sizes:
        trial = inspect.signature(model.forward).bind_partial(*args, **kwargs)
        trial.arguments.update({n: resized(trial.arguments[n], d, size) for n, d in guard.inputs})
        try:
            with torch.no_grad(), eval_mode(model):
                model(*trial.args, **trial.kwargs)
        except Exception:       # the model's own limit at this size
            continue
        return True
    return False


def _confining_guards(model, args: tuple, kwargs: dict, gm: fx.GraphModule) -> list:
    """The guards on input sizes (``input_guards``) at whose rejected size the eager model runs (or
    could not be tried): the ones that confine the trace and not the model."""
    guards = input_guards(gm)
    if guards and isinstance(model, torch.nn.Module) and not isinstance(model, fx.GraphModule):
        guards = [g for g in guards if _runs_at(model, args, _default_kwargs(model, kwargs), g) is not False]
    return guards


def refuse_confined_sizes(gm: fx.GraphModule, name: str) -> None:
    """Raise a one-line ``TraceError`` when torch.export confined the traced ``gm`` to input sizes
    its eager model is not confined to (``state.INPUT_GUARDS``, from ``passes.analysis.input_guards``:
    an axis pinned to the traced length, a raised least length): its child would not run where the
    parent runs. The error names the guard and where it was raised, and how to accept fixed sizes."""
    guards = state.INPUT_GUARDS.get(gm) or ()
    if guards:
        shown = "; ".join(guards[:2]) + (f"; {len(guards) - 2} more" if len(guards) > 2 else "")
        raise TraceError(f"{name} traces only for inputs where {shown}: its code specialises on that size, so the "
                         "child would not run where the parent runs; trace it with inputs of the size the child "
                         "will run at and pass fixed_sizes=True to accept")


def _allow_train_eval(gm: fx.GraphModule) -> None:
    # ExportedProgram.module() makes train()/eval() raise; they only flip the flag here
    # (dropout was traced off), and ordinary training loops call them.
    for name in ("train", "eval"):
        gm.__dict__.pop(name, None)


def bind_constant_inputs(gm: fx.GraphModule) -> None:
    """Bake non-tensor inputs (flags like ``use_cache``) into the graph as constants."""
    codegen = gm.graph._codegen
    if not isinstance(codegen, _PyTreeCodeGen):
        return
    info = codegen.pytree_info
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    spec = info.in_spec
    leaves = [n.meta.get("val") for n in placeholders]
    if all(isinstance(v, torch.Tensor) for v in leaves):
        return
    args, kwargs = pytree.tree_unflatten(list(range(len(leaves))), spec)
    keep = lambda i: isinstance(leaves[i], torch.Tensor)  # noqa: E731
    new_args = tuple(pytree.tree_map(lambda i: i, a) for a in args)
    if not all(keep(i) for i in pytree.tree_leaves(new_args)):
        return    # a positional non-tensor input: leave the signature alone
    new_kwargs = {k: v for k, v in kwargs.items() if all(keep(i) for i in pytree.tree_leaves(v))}
    for i, node in enumerate(placeholders):
        if not keep(i):
            constant = leaves[i]
            for user in list(node.users):
                user.args = map_arg(user.args, lambda n: constant if n is node else n)
                user.kwargs = map_arg(user.kwargs, lambda n: constant if n is node else n)
            gm.graph.erase_node(node)
    new_spec = pytree.tree_flatten((new_args, new_kwargs))[1]
    names = [f"arg_{i}" for i in range(len(new_args))] + list(new_kwargs)
    gm.graph._codegen = _PyTreeCodeGen(_PyTreeInfo(names, new_spec, info.out_spec))
    gm._in_spec = new_spec
    gm.recompile()


@contextlib.contextmanager
def fast_export_settings():
    """No fake-tensor dispatch cache and no per-node stack traces while exporting (module docstring);
    a ``FakeTensorMode`` made inside reads the cache setting when it is made."""
    import torch._dynamo.config as dynamo_config
    import torch.fx.config as fx_config

    traces = fx_config.do_not_emit_stack_traces
    fx_config.do_not_emit_stack_traces = True
    try:
        with dynamo_config.patch(fake_tensor_cache_enabled=False):
            yield
    finally:
        fx_config.do_not_emit_stack_traces = traces


_OUTPUT_CONSTANTS = (torch.Tensor, int, float, bool, str, type(None))


@contextlib.contextmanager
def tensor_outputs(model: torch.nn.Module):
    """``model.forward`` returning ``None`` for each leaf of its output that is not a tensor nor a
    constant (a cache object: module docstring), warned once by type and place; restored on exit."""
    forward, own, warned = model.forward, model.__dict__.get("forward"), set()

    @functools.wraps(forward)
    def without_objects(*args, **kwargs):
        output = forward(*args, **kwargs)
        leaves, spec = pytree.tree_flatten_with_path(output)
        if not any(isinstance(leaf, torch.Tensor) for _, leaf in leaves):
            # e.g. a transformers ModelOutput class first defined while torch.export ran: transformers
            # skips its pytree registration while compiling, and the whole output would become None
            raise TraceError(f"{type(model).__name__} returns a {type(output).__name__} in which torch's pytree finds "
                             "no tensor (is its class registered with torch.utils._pytree? transformers does not "
                             "register an output class defined during a torch.export: import it before tracing)")
        for path, leaf in leaves:
            if not isinstance(leaf, _OUTPUT_CONSTANTS) and type(leaf) not in warned:
                warned.add(type(leaf))
                warnings.warn(f"trace: {type(model).__name__} returns a {type(leaf).__name__} at output"
                              f"{pytree.keystr(path)}, not a tensor: the traced model returns None there", stacklevel=2)
        return pytree.tree_unflatten([v if isinstance(v, _OUTPUT_CONSTANTS) else None for _, v in leaves], spec)

    model.forward = without_objects     # an instance attribute over the class's method, undone on exit
    try:
        yield model
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own


def _export(model: torch.nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    if "transformers" in sys.modules:
        # its output classes register with torch's pytree when defined, but not during an export
        # (``tensor_outputs``): defined now, before one, if a forward would import them lazily
        import transformers.modeling_outputs  # noqa: F401
    try:
        with eval_mode(model), fast_export_settings(), tensor_outputs(model):
            program = torch.export.export(model, args, kwargs, strict=False,
                                          dynamic_shapes=dynamic_shapes_for(model, args, kwargs))
    except Exception as error:       # export's own errors name the construct
        first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise TraceError(f"could not trace {type(model).__name__}: {type(error).__name__}: {first}") from error
    gm = program.module()
    inline_grad_mode_regions(gm)
    _warn_static_axes(model, args, kwargs, gm)
    return gm


def inline_grad_mode_regions(gm: fx.GraphModule) -> None:
    """Inline each ``wrap_with_set_grad_enabled(enabled, submodule, *args)`` (what export makes of a
    ``torch.no_grad()`` block inside ``forward``) as its nodes between two grad-mode switches, so the
    channel analysis sees the ops of the region and the child still runs it without gradients."""
    hop = torch.ops.higher_order.wrap_with_set_grad_enabled
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is hop]:
        enabled, holder, *args = node.args
        region = getattr(gm, holder.target)
        placeholders = [n for n in region.graph.nodes if n.op == "placeholder"]
        with gm.graph.inserting_before(node):
            before = gm.graph.call_function(torch.is_grad_enabled, ())
            gm.graph.call_function(torch._C._set_grad_enabled, (enabled,))
            outputs = gm.graph.graph_copy(region.graph, dict(zip(placeholders, args)))
            gm.graph.call_function(torch._C._set_grad_enabled, (before,))
        outputs = outputs if isinstance(outputs, (list, tuple)) else (outputs,)
        for user in list(node.users):
            user.replace_all_uses_with(outputs[user.args[1]])
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        if not holder.users:
            gm.graph.erase_node(holder)
            delattr(gm, holder.target)
    gm.recompile()


def _warn_static_axes(model, args: tuple, kwargs: dict, gm: fx.GraphModule) -> None:
    """An axis meant to stay dynamic that export fixed: the model's code specialises on it (a
    Python loop over the sequence, a size-1 example), and the child runs at that size only."""
    leaves = pytree.tree_leaves((args, kwargs))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(leaves) != len(placeholders):
        return
    for value, node in zip(leaves, placeholders):
        fake = node.meta.get("val")
        if not isinstance(fake, torch.Tensor):
            continue
        for axis in _axes(value) or {}:
            if is_concrete_int(fake.shape[axis]):
                warnings.warn(f"trace: {type(model).__name__} fixes axis {axis} of input {node.name} at "
                              f"{fake.shape[axis]} (its code specialises on that size): the traced model and "
                              "its children run at that size only", stacklevel=3)
