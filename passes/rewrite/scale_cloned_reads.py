"""Rewrite: divide every weight that sums over a cloned width by the number of copies.

The math (HyperCloning, arXiv 2409.12903): a width grown ``n`` times holds each parent channel
``n`` times (``analysis/grow.py``), so a contraction over it — a linear layer reading the
stream, a down projection reading the MLP's neurons, an output projection reading the heads —
sums every parent term ``n`` times. Dividing its weight by ``n`` makes ``W' x' = W x`` exactly;
over several grown dims of one contraction, by the product. Everything else is cloned, never
divided: what produces a grown width (embedding columns, the rows of a projection writing it,
biases, norm gains) writes each copy the parent's value.

Cases:
1. a weight (a module attribute, read through views and casts) whose every use wants one
   divisor is divided (one tensor: tied names stay tied);
2. a weight with uses that want different divisors — a tied embedding that also computes the
   output logits: the lookup wants it whole, the head wants it divided — stays whole, and each
   contraction that wants a divisor takes it on its other operand instead: folded into the gain
   that multiplies that operand last (a norm op's weight and bias, a ``x · w`` or ``x · (c + w)``
   gain, through casts and views, read by nothing else; ``w' = w/n + c·(1/n − 1)``), else a
   ``mul`` by ``1/n`` is inserted before the contraction;
3. ``noise_snr_db`` (the paper's noisy variants, to break the symmetry between copies): each
   divided weight gets Gaussian noise along its contracted grown dim that sums to zero over the
   copies of every parent index, at that signal-to-noise ratio (dB, against the weight's own
   mean square) — the copies of an input are equal, so the contraction's value is unchanged in
   exact arithmetic; a weight read through a reshape that moves its contracted dim is refused.

4. the inverse, a fold: a shrink that keeps one copy of each class of clones
   (``analysis/clones.py``, ``state.FOLDED``) multiplies every weight reading that group by the
   copies each kept index stands for — ``W[:, i] + W[:, j] = 2·W[:, i]`` for a pair.

Reads ``state.KEEP`` / ``state.SIZES`` / ``state.FOLDED`` / ``state.CHANNEL_GRAPH`` and the node
key ``state.CONTRACTS``; writes ``state.CLONED_READS`` (group → the factor its readers took), so a
second run changes nothing. ``ensures()``: every contraction over a grown or folded width got
its factor.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from .. import state
from ..analysis.clones import folded_groups
from ..analysis.grow import grown_groups
from ..errors import PassError, PostconditionError
from ..fx_utils import CASTS, VIEWS, WEIGHT_PASS_THROUGH, get_attribute, replace_tensors, tensor_arguments
from ..infra import SubclonePass
from ..tensor_edits import Scale, edit_tensor

__all__ = ["ScaleClonedReadsPass", "scale_cloned_reads", "scale_attribute"]

aten = torch.ops.aten
_NORM_WEIGHTS = {aten.layer_norm.default: (2, 3), aten.native_layer_norm.default: (2, 3),
                 aten.rms_norm.default: (2,), aten._fused_rms_norm.default: (2,)}
_ADDS = {aten.add.Tensor, aten.add.Scalar}
_SWAPS = {aten.t.default, aten.numpy_T.default, aten.mT.default, aten.mH.default, aten.adjoint.default,
          aten.matrix_H.default}


def _users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]


def _root(node: fx.Node, dims: tuple[int, ...]) -> tuple[fx.Node, tuple[int, ...] | None]:
    """The attribute a weight operand reads, and its dims that are ``dims`` of the operand
    (``None`` where a reshape moved them)."""
    while node.op != "get_attr":
        source = node.args[0]
        rank = len(source.meta["val"].shape)
        if dims is None:
            pass
        elif node.target is aten.numpy_T.default:
            dims = tuple(rank - 1 - d for d in dims)
        elif node.target in _SWAPS and rank >= 2:
            dims = tuple({rank - 1: rank - 2, rank - 2: rank - 1}.get(d % rank, d % rank) for d in dims)
        elif node.target is aten.transpose.int:
            a, b = (d % rank for d in node.args[1:3])
            dims = tuple(b if d == a else a if d == b else d for d in dims)
        elif node.target is aten.permute.default:
            dims = tuple(node.args[1][d] % rank for d in dims)
        elif node.target in VIEWS and tuple(source.meta["val"].shape) != tuple(node.meta["val"].shape):
            dims = None
        node = source
    return node, dims


def scale_attribute(gm: fx.GraphModule, node: fx.Node, factor: float, offset: float = 0.0) -> torch.Tensor:
    """Replace the attribute ``node`` reads by ``factor · (c + w) − c`` for a gain ``c + w``
    (``offset`` = c; 0 for a plain weight), under every name; return the new tensor."""
    tensor = get_attribute(gm, node.target)
    new = edit_tensor(gm, tensor, [Scale(factor, offset * (factor - 1))])
    replace_tensors(gm, {id(tensor): new})
    return new


# ops that only move or cast values: a factor on their input is the same factor on their output
_MOVES = CASTS | VIEWS | WEIGHT_PASS_THROUGH | {
    aten.slice.Tensor, aten.select.int, aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.dims, aten.flatten.using_ints, aten.alias.default, aten.type_as.default}


def _single_chain(node: fx.Node) -> fx.Node:
    """Back through ops that only move values (views, casts, slices) and feed only the next node."""
    while (node.op == "call_function" and node.target in _MOVES and isinstance(node.args[0], fx.Node)
           and len(_users(node.args[0])) == 1):
        node = node.args[0]
    return node


def _gain_of(node: fx.Node, gm: fx.GraphModule, use_count) -> tuple[fx.Node, float] | list | None:
    """What multiplies ``node`` last: a norm op's weight (and bias), or a per-channel gain
    ``w`` / ``c + w`` of a ``mul``; each an attribute read only there."""
    if node.target in _NORM_WEIGHTS:
        found = [node.args[i] for i in _NORM_WEIGHTS[node.target] if len(node.args) > i and node.args[i] is not None]
        if found and all(isinstance(w, fx.Node) and w.op == "get_attr" and use_count(w) == 1 for w in found):
            return [(w, 0.0) for w in found]
        return None
    if node.target is not aten.mul.Tensor:
        return None
    for other in node.args:
        offset = 0.0
        if isinstance(other, fx.Node) and other.target in _ADDS and len(_users(other)) == 1:
            constants = [a for a in other.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
            tensors = [a for a in other.args if isinstance(a, fx.Node)]
            if len(constants) != 1 or len(tensors) != 1 or other.kwargs.get("alpha", 1) != 1:
                continue
            offset, other = float(constants[0]), _single_chain(tensors[0])
        elif isinstance(other, fx.Node):
            other = _single_chain(other)
        if isinstance(other, fx.Node) and other.op == "get_attr" and use_count(other) == 1:
            return [(other, offset)]
    return None


class ScaleClonedReadsPass(SubclonePass):
    """Divide every weight contracting a cloned width by its copies (see module docstring)."""

    requires_keys = (state.KEEP, state.SIZES, state.CHANNEL_GRAPH)

    def __init__(self, noise_snr_db: float | None = None, seed: int = 0) -> None:
        self.noise_snr_db, self.seed = noise_snr_db, seed
        self.needed: set[str] = set()
        self.handled: set[str] = set()

    def run(self, gm: fx.GraphModule) -> bool:
        graph, keep, sizes = state.CHANNEL_GRAPH.need(gm), state.KEEP.need(gm), state.SIZES.need(gm)
        grown = grown_groups(graph, keep, sizes)
        self._refuse_uneven_contractions(gm, graph, [g for g, n in grown.items() if n is None])
        factors = {g: 1.0 / n for g, n in grown.items() if n is not None}
        for g, copies in folded_groups(graph, state.FOLDED.get(gm) or {}).items():
            factors[g] = factors.get(g, 1.0) * copies
        self.needed, self.handled = set(), set()
        if not factors or state.CLONED_READS.has(gm):
            return False
        reads = self._reads(gm, graph, factors)
        if not reads:
            state.CLONED_READS.set(gm, factors)
            return False
        if self.noise_snr_db is not None and state.TENSOR_ORIGINS.has(gm):
            raise PassError("ScaleClonedReadsPass: noise_snr_db on a streamed parent: the writer replays "
                            "slices and scales only; grow in memory for noise")
        generator = torch.Generator().manual_seed(self.seed)
        for tensor_id, uses in self._by_tensor(gm, reads).items():
            wanted = {scale for _, scale, _ in uses}
            if len(wanted) == 1 and wanted != {1.0}:
                node, scale, dims = uses[0]
                new = scale_attribute(gm, self._attribute(node, gm), scale)
                if self.noise_snr_db is not None and scale < 1:
                    self._add_noise(gm, node, new, dims, graph, keep, generator)
                self.handled |= {n.name for n, _, _ in uses if n is not None}
                continue
            for contraction, scale, _ in uses:
                if contraction is not None and scale != 1.0:
                    self._scale_operand(gm, graph, contraction, scale)
                    self.handled.add(contraction.name)
        state.CLONED_READS.set(gm, factors)
        return True

    def ensures(self, graph_module: fx.GraphModule) -> None:
        missed = sorted(self.needed - self.handled)
        if missed:
            raise PostconditionError(f"ScaleClonedReadsPass: the contraction {missed[0]} over a cloned width "
                                     "was not divided by its copies")

    # ----- which weight reads which grown width ----------------------------------------------
    @staticmethod
    def _refuse_uneven_contractions(gm, graph, uneven: list) -> None:
        """A group holding its channels unevenly (a concatenation of a grown and a kept width, as a
        projection whose output is split into both) needs no factor unless something contracts
        it: then no one factor keeps the function, and the growth is refused in one line."""
        for node in gm.graph.nodes:
            contracts = state.CONTRACTS.of(node, graph)
            if contracts is None:
                continue
            hit = [graph.find(v) for v in contracts.vertices if graph.find(v) in uneven]
            if hit:
                g = graph.groups[hit[0]]
                raise ValueError(f"cannot grow this model by cloning: {node.target} ({node.name}) contracts a "
                                 f"{g.kind} width (group {g.id} of size {g.size}) whose channels the growth copies "
                                 "unevenly; leave the widths it is tied to at the parent's size")

    def _reads(self, gm, graph, factors) -> dict[str, tuple[float, fx.Node, tuple]]:
        """contraction node name → (its factor, its weight's attribute node, contracted dims there)."""
        reads = {}
        for node in gm.graph.nodes:
            contracts = state.CONTRACTS.of(node, graph)
            if contracts is None:
                continue
            factor = math.prod(factors[graph.find(v)] for v in contracts.vertices if graph.find(v) in factors)
            if factor == 1:
                continue
            if contracts.weight is None:
                raise PassError(f"ScaleClonedReadsPass: {node.name} contracts two activations over a cloned width "
                                "(ChooseKeepPass refuses that; was the graph changed since?)")
            attribute, dims = _root(tensor_arguments(node)[contracts.weight], contracts.weight_dims)
            reads[node.name] = (factor, attribute, dims)
            self.needed.add(node.name)
        return reads

    @staticmethod
    def _by_tensor(gm, reads) -> dict[int, list]:
        """id(tensor) → [(contraction or None, wanted scale, contracted dims)] over every use of
        the tensor under any name: a use that is none of the contractions in ``reads`` wants it whole."""
        attributes: dict[int, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                attributes.setdefault(id(get_attribute(gm, node.target)), []).append(node)
        by_tensor: dict[int, list] = {}
        for _, attribute, _ in reads.values():
            tensor_id = id(get_attribute(gm, attribute.target))
            if tensor_id in by_tensor:
                continue
            uses = []
            for name in attributes[tensor_id]:
                for consumer in _consumers(name):
                    scale, _, dims = reads.get(consumer.name, (1.0, None, ()))
                    uses.append((consumer if consumer.name in reads else None, scale, dims))
            by_tensor[tensor_id] = uses
        return by_tensor

    @staticmethod
    def _attribute(contraction: fx.Node, gm) -> fx.Node:
        contracts = state.CONTRACTS.of(contraction, state.CHANNEL_GRAPH.need(gm))
        return _root(tensor_arguments(contraction)[contracts.weight], ())[0]

    # ----- case 2: the divisor on the other operand ------------------------------------------
    def _scale_operand(self, gm, graph, contraction: fx.Node, scale: float) -> None:
        contracts = state.CONTRACTS.of(contraction, graph)
        operand = tensor_arguments(contraction)[contracts.operand]
        counts: dict[int, int] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                key = id(get_attribute(gm, node.target))
                counts[key] = counts.get(key, 0) + len(_users(node))
        use_count = lambda n: counts[id(get_attribute(gm, n.target))]  # noqa: E731
        source = _single_chain(operand) if len(_users(operand)) == 1 else operand
        gains = _gain_of(source, gm, use_count) if len(_users(source)) == 1 else None
        if gains:
            for weight, offset in gains:
                scale_attribute(gm, weight, scale, offset)
            return
        with gm.graph.inserting_before(contraction):
            product = gm.graph.call_function(aten.mul.Tensor, (operand, scale))
        product.meta.update({k: v for k, v in operand.meta.items() if k in ("val", "nn_module_stack", state.CHANNELS.name)})
        contraction.replace_input_with(operand, product)

    # ----- case 3: noise that cancels over the copies ----------------------------------------
    def _add_noise(self, gm, contraction, tensor, dims, graph, keep, generator) -> None:
        attribute = self._attribute(contraction, gm)
        if dims is None or not dims:
            raise PassError(f"ScaleClonedReadsPass: noise for {attribute.target}: its contracted dim is "
                            "reshaped on the way to the contraction; grow without noise_snr_db")
        dim = dims[0]
        group = state.CHANNELS.of(attribute, graph).groups[dim]
        index = keep[group].reshape(-1)
        with torch.no_grad():
            moved = tensor.detach().movedim(dim, 0)
            z = torch.randn(moved.shape, generator=generator, dtype=torch.float32)
            sums = torch.zeros((graph.groups[group].size, *moved.shape[1:])).index_add_(0, index, z)
            counts = torch.bincount(index, minlength=graph.groups[group].size).clamp_min(1)
            z -= (sums / counts.view(-1, *[1] * (z.dim() - 1)))[index]
            power = moved.float().pow(2).mean().sqrt()
            sigma = power * 10 ** (-self.noise_snr_db / 20) / z.pow(2).mean().sqrt().clamp_min(1e-12)
            moved.add_((z * sigma).to(moved.dtype))


def _consumers(node: fx.Node) -> list[fx.Node]:
    """The nodes that compute with an attribute: its users past views, casts and transposes."""
    found, frontier = [], [node]
    while frontier:
        current = frontier.pop()
        for user in _users(current):
            if user.op == "call_function" and user.target in WEIGHT_PASS_THROUGH and user.args[0] is current:
                frontier.append(user)
            else:
                found.append(user)
    return found


def scale_cloned_reads(gm: fx.GraphModule, noise_snr_db: float | None = None) -> fx.GraphModule:
    """Plain-function twin of ``ScaleClonedReadsPass``."""
    return ScaleClonedReadsPass(noise_snr_db)(gm).graph_module
