"""The one pass shape: ``call(gm) -> PassResult``, in place, with checked pre/postconditions.

Every pass here is a ``torch.fx.passes.infra.pass_base.PassBase``, so it runs alone, in torch's
``PassManager``, or in any chain with other compilers' passes. All our passes work **in place**
(``in_place = True``): the GraphModule given is the one returned. ``SubclonePass.__call__``
checks that declaration on the result, and ``ensures()`` runs on the returned module.

Metadata lives under namespaced keys: per node in ``node.meta["subclone.*"]``, per graph in
``gm.meta["subclone.*"]``. ``need(gm, key, producer)`` fetches one and, when it is missing,
says which pass to run first.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.infra.pass_base import PassBase, PassResult

__all__ = ["SubclonePass", "PassError", "need", "log", "refresh_meta", "get_attribute", "set_attribute",
           "replace_tensors", "same_kind", "TensorOrigin", "ORIGINS", "track_origin"]

log = logging.getLogger("subclone_graph")


class PassError(RuntimeError):
    """A pass cannot run on this graph, or produced a graph that breaks its invariant."""


def need(gm: fx.GraphModule, key: str, producer: str):
    meta = getattr(gm, "meta", {})
    if key not in meta:
        raise PassError(f"graph metadata {key!r} is missing: run {producer} first")
    return meta[key]


class SubclonePass(PassBase):
    """Base of our passes. Subclasses implement ``run(gm) -> bool`` (modified?)."""

    in_place = True
    requires_meta: tuple[tuple[str, str], ...] = ()     # (key, producing pass)

    def requires(self, graph_module: fx.GraphModule) -> None:
        for key, producer in self.requires_meta:
            need(graph_module, key, producer)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        log.info("pass %s", type(self).__name__)
        modified = self.run(graph_module)
        if modified:
            graph_module.graph.lint()
            graph_module.recompile()
        return PassResult(graph_module, modified)

    def __call__(self, graph_module: fx.GraphModule) -> PassResult:
        self.requires(graph_module)
        result = self.call(graph_module)
        if self.in_place and result.graph_module is not graph_module:
            raise PassError(f"{type(self).__name__} declares in_place but returned a new module")
        self.ensures(result.graph_module)
        return result

    def run(self, gm: fx.GraphModule) -> bool:
        raise NotImplementedError


def get_attribute(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_attribute(gm: torch.nn.Module, target: str, value) -> None:
    """Replace a parameter, buffer or plain tensor attribute, keeping which of the three it is."""
    prefix, _, name = target.rpartition(".")
    owner = gm.get_submodule(prefix) if prefix else gm
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
        raise PassError("placeholders carry no fake values: trace the model with subclone_graph.trace first")
    # symbolic-size meta kernels (baddbmm's expand) need the python dispatcher, as export had
    with enable_python_dispatcher():
        _AttributesAsFake(gm, mode).propagate_dont_convert_inputs(*inputs)


# ----- tensor origins (streamed subcloning: the weights are read from disk at the end) ----------
ORIGINS = "subclone.tensor_origin"     # gm.meta key: {id(tensor): (tensor, TensorOrigin)}


@dataclass(frozen=True)
class TensorOrigin:
    """Where a child tensor comes from: parent tensor ``name``, the kept parent indices along each
    dim (``None``: all), then multiplied by each factor of ``scales`` in turn (in its dtype)."""
    name: str
    index: tuple = ()
    scales: tuple = ()


def track_origin(gm: fx.GraphModule, old: torch.Tensor, new: torch.Tensor, cuts=(), scale: float | None = None) -> None:
    """Record that ``new`` is ``old`` with ``cuts`` ((dim, kept indices), ...) then times ``scale``.

    A no-op unless ``gm.meta[ORIGINS]`` exists (a weightless streamed graph sets it); the tensor
    is kept in the record so that its ``id`` stays its own."""
    origins = getattr(gm, "meta", {}).get(ORIGINS)
    if origins is None or id(old) not in origins:
        return
    origin = origins[id(old)][1]
    index = list(origin.index) or [None] * old.dim()
    for dim, kept in cuts:
        kept = kept.detach().to("cpu", torch.long)
        index[dim] = kept if index[dim] is None else index[dim][kept]
    scales = origin.scales + ((scale,) if scale is not None else ())
    origins[id(new)] = (new, replace(origin, index=tuple(index), scales=scales))
