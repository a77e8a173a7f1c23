"""Rewrite: multiply what reads a shrunk residual stream by √(D/d).

The math: a normalisation over the residual width D divides by a statistic of its d kept
channels. For RMSNorm, ``mean_d(x²) = (D/d)·mean_D(x²)`` when the removed channels were zero,
so ``x·rsqrt(mean_d(x²) + ε·D/d) = √(d/D)·x·rsqrt(mean_D(x²) + ε)``: with the ε added to the
statistic scaled by D/d like the statistic itself, every normalised output is the parent's times √(d/D), and
multiplying it by √(D/d) restores it exactly. That makes removing all-zero residual channels
from an RMSNorm model output-preserving, and gives the paper's rescaling of the weights that
read the stream. ``state.RESCALE`` records the factor and the ε scale, and each ε scaled (the node
holding it, the node whose values it normalises, its scale: a writer whose class cannot hold it folds
it into the scale of those values, ``export/hf/norm_inputs.py``).

The same holds for a norm over any other shrunk width — a QK-norm over a whole ``heads·head_dim``
projection loses heads —, so every reduction over a shrunk group gets the correction, with
D/d the product over the shrunk groups it reduces; ``state.RESCALE`` records the residual's.

Where the factor goes, for every reduction (``state.REDUCES``) over a shrunk group:
1. ``layer_norm``/``rms_norm`` ops: into their weight (and bias) — the op's whole output scales;
2. a decomposed norm (``mean`` … ``rsqrt`` … ``x * r``): the first ``mul``/``div`` that joins the
   reduced statistic back to a stream-wide tensor is the normalised value; a per-channel
   weight that multiplies it next (through casts of either: ``weight.to(float32) * x``,
   ``normalised.type_as(x) * weight``) takes
   the factor; so does a gain written
   ``c + w`` (an ``add`` of a constant to the weight, the ``(1 + w)`` RMSNorm): ``w`` becomes
   ``factor·w + c·(factor − 1)``, so that ``c + w'`` is ``factor·(c + w)`` and the child keeps
   the parent's graph (a class loading its weights computes the same);
3. no weight (or a weight also used elsewhere), but every read of the normalised value is a
   ``linear`` whose weight is read nowhere else: those weights take the factor
   (``linear(f·x, W, b) = linear(x, f·W, b)``), so the child keeps the parent's graph;
4. otherwise a ``mul`` by the factor is inserted after the normalised value.
A weight shared by several norms (a layer applied several times in a loop, or one norm module
reused) is scaled once when every use of it is the gain (or bias) of a norm taking the same
factor and offset: scaling it scales each of them, as one weight per norm would.
A reduction that meets the stream only by subtraction (LayerNorm's centring) needs nothing.
The factor is applied once per weight tensor, so a tied weight is scaled for all its uses or
none; the embedding and output head are never touched (the factor sits in the norms).

Run again on its own result it changes nothing (``state.RESCALE`` says the correction is in).
``ensures()``: every normalisation over a shrunk group was corrected (its weight scaled, or a
``mul`` inserted after it); ``state.RESCALE`` is written.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from .. import state
from ..errors import PostconditionError
from ..analysis.clones import unfolded_sizes
from ..fx_utils import CASTS, VIEWS, get_attribute, replace_tensors
from ..infra import SubclonePass
from ..tensor_edits import Scale, edit_tensor

__all__ = ["RescaleResidualPass", "rescale_residual"]

aten = torch.ops.aten
# norm op -> (argument indices of its weight and bias, argument index of its ε)
_NORM_OPS = {aten.layer_norm.default: ((2, 3), 4), aten.native_layer_norm.default: ((2, 3), 4),
             aten.rms_norm.default: ((2,), 3), aten._fused_rms_norm.default: ((2,), 3)}
_JOINS = {aten.mul.Tensor, aten.div.Tensor}
_ADDS = {aten.add.Tensor, aten.add.Scalar}


def _has_group(node, groups) -> bool:
    if not isinstance(node, fx.Node):
        return False
    channels = state.CHANNELS.get(node)
    return channels is not None and any(g in groups for g in channels.groups)


def _normalised(reduction: fx.Node, groups: set[int]) -> tuple[fx.Node | None, list[fx.Node]]:
    """The first mul/div joining the statistic with a tensor that carries the stream, and
    the nodes computing on the statistic on the way there."""
    frontier, seen, path = [reduction], set(), []
    while frontier:
        node = frontier.pop(0)
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if user.target in _JOINS and any(_has_group(a, groups) for a in user.args if a is not node):
                return user, path
            if not _has_group(user, groups):
                path.append(user)
                frontier.append(user)
    return None, path


def _scale_epsilon(path: list[fx.Node], eps_scale: float) -> list[fx.Node]:
    """An ε added to the statistic scales with it (see the module docstring); the adds scaled."""
    scaled = []
    for node in path:
        if node.target in (aten.add.Tensor, aten.add.Scalar) and any(isinstance(a, float) for a in node.args):
            node.args = tuple(a * eps_scale if isinstance(a, float) else a for a in node.args)
            scaled.append(node)
    return scaled


def _gain(node: fx.Node, groups: set[int]) -> tuple[fx.Node, float] | None:
    """(weight get_attr, offset c) when a per-channel gain multiplies ``node`` next: the weight
    itself (c = 0) or ``c + weight`` for a constant c (a ``(1 + w)`` gain), through casts."""
    while True:
        users = [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]
        if len(users) != 1:
            return None
        user = users[0]
        # ``norm(x.float()).type_as(x) * weight``: type_as casts its first argument
        if user.target in CASTS or (user.target is aten.type_as.default and user.args[0] is node):
            node = user
            continue
        if user.target is aten.mul.Tensor:
            other = user.args[0] if user.args[1] is node else user.args[1]
            return _gain_weight(other, groups)
        return None


def _gain_weight(other, groups: set[int]) -> tuple[fx.Node, float] | None:
    offset = 0.0
    if isinstance(other, fx.Node) and other.target in _ADDS and len(other.users) == 1 \
            and other.kwargs.get("alpha", 1) == 1:
        constants = [a for a in other.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
        tensors = [a for a in other.args if isinstance(a, fx.Node)]
        if len(constants) != 1 or len(tensors) != 1:
            return None
        offset, other = float(constants[0]), tensors[0]
    # the weight's casts feed only this gain (``weight.to(float32) * x``): scaling before a cast
    # is scaling after it
    while isinstance(other, fx.Node) and other.target in CASTS and len(other.users) == 1:
        other = other.args[0]
    if isinstance(other, fx.Node) and other.op == "get_attr" and _has_group(other, groups):
        return other, offset
    return None


class RescaleResidualPass(SubclonePass):
    """Multiply normalised residual reads by √(D/d) (see module docstring)."""

    requires_keys = (state.SIZES, state.CHANNEL_GRAPH)

    def __init__(self) -> None:
        self.needed: set[str] = set()       # normalisations over a shrunk group
        self.handled: set[str] = set()      # ... corrected

    def run(self, gm: fx.GraphModule) -> bool:
        graph, sizes = state.CHANNEL_GRAPH.need(gm), state.SIZES.need(gm)
        # a group whose removed indices were copies of kept ones (state.FOLDED) lost only what
        # each kept index stands for: its statistic counts its width before cloning as the parent's
        unfolded = unfolded_sizes(graph, state.FOLDED.get(gm) or {})
        # a group kept whole at zero (every channel of one part of a concatenated stream removed)
        # leaves no statistic of its own: the norms read the groups it was part of
        shrunk = {g.id: unfolded.get(g.id, g.size) / sizes[g.id] for g in graph.groups.values()
                  if g.static and 0 < sizes.get(g.id, g.size) < unfolded.get(g.id, g.size)}
        self.needed, self.handled = set(), set()
        if not shrunk or state.RESCALE.has(gm):      # nothing shrank, or already corrected
            return False
        residual = [g for g in shrunk if graph.groups[g].kind == "residual"]
        ratio = shrunk[residual[0]] if residual else next(iter(shrunk.values()))
        state.RESCALE.set(gm, state.Rescale(factor=math.sqrt(ratio), eps_scale=ratio))
        scaled: set[int] = set()
        norms = []
        for node in list(gm.graph.nodes):
            # a norm over a shrunk residual, or over any other shrunk width (a QK-norm over the
            # whole heads·head_dim projection): the same statistic, the same correction
            reduces = state.REDUCES.of(node, graph)
            reduced = {graph.find(v) for v in reduces.vertices} & set(shrunk) if reduces is not None else set()
            if reduced and _is_normalisation(node, set(shrunk)):
                self.needed.add(node.name)
                norms.append((node, math.sqrt(math.prod(shrunk[g] for g in reduced))))
        foldable, self._uses = self._foldable(gm, norms, set(shrunk)), self._use_counts(gm)
        modified, self._inserted, self._eps = False, [], []
        for node, factor in norms:
            if self._rescale_at(gm, node, set(shrunk), factor, scaled, foldable):
                self.handled.add(node.name)
                modified = True
        # what a class loading the weights cannot hold (save_hf says so), and the ε it may fold
        state.RESCALE.set(gm, state.Rescale(factor=math.sqrt(ratio), eps_scale=ratio,
                                            inserted=tuple(dict.fromkeys(self._inserted)), eps=tuple(self._eps)))
        return modified

    def ensures(self, graph_module: fx.GraphModule) -> None:
        missed = sorted(self.needed - self.handled)
        if missed:
            raise PostconditionError(f"RescaleResidualPass: the reduction {missed[0]} over a shrunk width "
                                     "got no √(D/d) correction")
        if self.needed and not state.RESCALE.has(graph_module):
            raise PostconditionError("RescaleResidualPass: state.RESCALE was not written")

    @staticmethod
    def _use_counts(gm) -> dict[int, int]:
        counts: dict[int, int] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                key = id(get_attribute(gm, node.target))
                # a metadata assert (a cast's dtype check) reads the tensor but computes nothing with it
                uses = [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]
                counts[key] = counts.get(key, 0) + len(uses)
        return counts

    @staticmethod
    def _gains(node, groups) -> list | None:
        """The (weight get_attr, offset) pairs that take the factor of the norm at ``node``, or
        None where the factor cannot go into a weight (no weight: a ``mul`` is inserted)."""
        if node.target in _NORM_OPS:
            weight_args, _ = _NORM_OPS[node.target]
            weights = [node.args[i] if len(node.args) > i else None for i in weight_args]
            if not isinstance(weights[0], fx.Node):
                return None
            return [(w, 0.0) for w in weights if isinstance(w, fx.Node) and w.op == "get_attr"]
        point, _ = _normalised(node, groups)
        gain = _gain(point, groups) if point is not None else None
        return [gain] if gain is not None else None

    def _foldable(self, gm, norms, groups) -> set[fx.Node]:
        """The norms whose factor goes into their weights: each weight is used only as the gain
        (or bias) of norms taking one factor and offset (module docstring)."""
        use_count, claims, planned = self._use_counts(gm), {}, {}
        for node, factor in norms:
            gains = self._gains(node, groups)
            if gains is None:
                continue
            planned[node] = gains
            for weight, offset in gains:
                claims.setdefault(id(get_attribute(gm, weight.target)), []).append((factor, offset))
        return {node for node, gains in planned.items()
                if all(len(claims[key]) == use_count[key] and len(set(claims[key])) == 1
                       for key in (id(get_attribute(gm, w.target)) for w, _ in gains))}

    def _rescale_at(self, gm, node, groups, factor, scaled, foldable) -> bool:
        if node.target in _NORM_OPS:
            _, eps_arg = _NORM_OPS[node.target]
            if len(node.args) > eps_arg and isinstance(node.args[eps_arg], float):
                node.args = node.args[:eps_arg] + (node.args[eps_arg] * factor**2,) + node.args[eps_arg + 1:]
                self._eps.append((node.name, node.args[0].name, factor**2))
            if node not in foldable:
                return self._scale_readers(gm, node, factor, scaled) or self._insert_mul(gm, node, factor)
            for weight, offset in self._gains(node, groups):
                self._scale_attribute(gm, weight, factor, scaled, offset)
            return True
        point, path = _normalised(node, groups)
        if point is None:
            return False
        normalised = next(a for a in point.args if isinstance(a, fx.Node) and _has_group(a, groups))
        self._eps += [(add.name, normalised.name, factor**2) for add in _scale_epsilon(path, factor**2)]
        if node not in foldable:
            return self._scale_readers(gm, point, factor, scaled) or self._insert_mul(gm, point, factor)
        for weight, offset in self._gains(node, groups):
            self._scale_attribute(gm, weight, factor, scaled, offset)
        return True

    @staticmethod
    def _scale_attribute(gm, node, factor, scaled, offset: float = 0.0) -> None:
        """``c + w`` becomes ``factor · (c + w)``: ``w' = factor · w + c · (factor − 1)``."""
        tensor = get_attribute(gm, node.target)
        if id(tensor) in scaled:
            return
        # one rounding in the tensor's dtype (tensor_edits.Scale), replayed as is by a streamed writer
        new = edit_tensor(gm, tensor, [Scale(factor, offset * (factor - 1))])
        replace_tensors(gm, {id(tensor): new})
        scaled.add(id(new))

    def _scale_readers(self, gm, node, factor, scaled) -> bool:
        """Case 3 of the module docstring: the weights of the ``linear`` ops reading ``node``
        (through casts) take the factor, when each is read there only; False where not."""
        reads, frontier = [], [node]
        while frontier:
            current = frontier.pop()
            for user in current.users:
                if user.target is aten._assert_tensor_metadata.default:
                    continue
                # casts and views carry the values on (a head reads ``hidden[:, -k:]``)
                if user.target in CASTS | VIEWS | {aten.slice.Tensor} or (
                        user.target is aten.type_as.default and user.args[0] is current):
                    frontier.append(user)
                elif user.target is aten.linear.default and user.args[0] is not user.args[1]:
                    reads.append(user)
                else:
                    return False
        weights = [read.args[1] for read in reads]
        if not reads or any(not isinstance(w, fx.Node) or w.op != "get_attr" or any(r.args[0] is w for r in reads)
                            or self._uses.get(id(get_attribute(gm, w.target))) != 1 for w in weights):
            return False
        for weight in weights:
            self._scale_attribute(gm, weight, factor, scaled)
        return True

    def _insert_mul(self, gm, node, factor) -> bool:
        stack = node.meta.get("nn_module_stack") or {}
        self._inserted.append((next(reversed(stack.values()))[0] if stack else "") or node.name)   # root: ""
        with gm.graph.inserting_after(node):
            product = gm.graph.call_function(aten.mul.Tensor, (node, factor))
        node.replace_all_uses_with(product, delete_user_cb=lambda user: user is not product)
        product.meta.update({k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack", state.CHANNELS.name)})
        return True


def _is_normalisation(reduction: fx.Node, groups: set[int]) -> bool:
    """A norm op, or a statistic that divides or multiplies the stream (``x · rsqrt(mean x²)``).
    A reduction that meets the stream only by subtraction (LayerNorm's centring mean) or not at
    all (a routing score, a pooled output) is no normalisation: it needs no correction."""
    return reduction.target in _NORM_OPS or _normalised(reduction, groups)[0] is not None


def rescale_residual(gm: fx.GraphModule) -> fx.GraphModule:
    return RescaleResidualPass()(gm).graph_module
