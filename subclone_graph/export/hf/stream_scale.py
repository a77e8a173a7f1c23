"""The √(D/d) rescale's ε, folded into the residual stream's scale, for a class that cannot take ε·D/d.

``RescaleResidualPass`` gives every norm over the shrunk stream the ε ``ε·k`` (k = D/d). A class
whose norms take ε as a constant (``nn.LayerNorm(width)``), or from one config field that its
norms over another width read too (a QK-norm over the unshrunk head width), cannot hold that.
The same function has another form the class can hold: for LayerNorm and RMSNorm alike,

    norm(x, ε·k) = norm(s·x, ε)        with s = 1/√k,

so where every read of the stream is such a norm (a pre-norm network), scaling every write into
the stream by ``s`` and giving each of its norms back the parent's ε leaves every output as it
was. ``fold_stream_scale(child)`` returns that copy of the child, or None where it cannot:

1. the norms: every ``layer_norm`` / ``rms_norm`` op, or decomposed ``add(mean(x·x), ε)``,
   whose input carries the residual group in its last dim; its ε divided by k;
2. the writes: every weight whose op's output carries the residual group while the op's other
   inputs do not (a token or position table's lookup, a branch's output projection and its
   bias, an expert's down projection), and a bias added to such an output; scaled by s;
3. a written table also read as a weight elsewhere (an output head tied to the token table):
   the head's input comes from a norm op over the stream with a weight of its own, whose weight
   and bias take 1/s, so that the head computes what it did;
4. the reads: a linear that reads the stream itself, not a norm's output (a post-norm network's
   attention and MLP inputs), would now see ``s·x``; its weight takes 1/s. Which reads see the
   scaled stream is measured, not guessed: the copy runs on the example inputs beside the child,
   each read's input compared with the child's (``_scaled_reads``: ``s·x`` or ``x``, anything else
   and the fold gives up);
5. a norm over a shrunk width inside a layer (a sub-norm over the attention output or the MLP's
   inner width: ε·k of that width's k) takes the parent's ε too, the weights its values are
   linear in scaled by 1/√k instead (``norm_inputs.py``: the value projection, ``up``);
6. the copy's outputs are compared with the child's on its example inputs: a network that reads
   its stream otherwise (a nonlinearity on the stream itself) differs, and None is returned.

Every scale is a ``tensor_edits.Scale`` (one rounding in the tensor's dtype), recorded like the
passes' edits.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.fx as fx

from subclone_graph.passes import state as pass_state
from subclone_graph.passes.fx_utils import WEIGHT_PASS_THROUGH, get_attribute, replace_tensors, weight_attribute
from subclone_graph.passes.tensor_edits import Scale, edit_tensor

from subclone_graph.export.hf.common import example_inputs, tensor_outputs
from subclone_graph.export.hf.norm_inputs import NORM_EPS, inner_norm_folds
from subclone_graph.export.tolerance import max_difference, model_dtype, tolerance_for

__all__ = ["fold_stream_scale", "stream_fold_limit"]

aten = torch.ops.aten
_NORM_WEIGHTS = {aten.layer_norm.default: (2, 3), aten.native_layer_norm.default: (2, 3),
                 aten.rms_norm.default: (2,), aten._fused_rms_norm.default: (2,)}
_MEANS = {aten.mean.dim, aten.mean.default}
_ADDS = {aten.add.Tensor, aten.add.Scalar}
_LINEARS = {aten.linear.default: (0, 1), aten.mm.default: (0, 1), aten.matmul.default: (0, 1),
            aten.addmm.default: (1, 2)}     # op: (argument index of its input, of its weight)


def _carries(node, graph, residual: set[int], last: bool = False) -> bool:
    if not isinstance(node, fx.Node):
        return False
    channels = pass_state.CHANNELS.of(node, graph)
    if channels is None or not channels.groups:
        return False
    groups = {graph.find(g) for g in (channels.groups[-1:] if last else channels.groups) if g is not None}
    return bool(groups & residual)


# ops whose output is their first input's values, some of them: a scale passes through them
_PASS_THROUGH = WEIGHT_PASS_THROUGH | {aten.slice.Tensor, aten.select.int, aten.unsqueeze.default,
                                       aten.type_as.default, aten.clone.default, aten.expand.default}


def _through_casts(node):
    while isinstance(node, fx.Node) and node.target in _PASS_THROUGH and node.op == "call_function":
        node = node.args[0]
    return node


def _norm_eps(gm, graph, residual) -> list[tuple[fx.Node, int]]:
    """(node, argument index of its ε) of every norm over the stream (module docstring, 1)."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in NORM_EPS and _carries(node.args[0], graph, residual, last=True):
            index = NORM_EPS[node.target]
            if len(node.args) > index and isinstance(node.args[index], float):
                found.append((node, index))
        elif node.target in _ADDS and any(type(a) is float for a in node.args):
            mean = next((a for a in node.args if isinstance(a, fx.Node)), None)
            if mean is not None and mean.target in _MEANS and _carries(mean.args[0], graph, residual, last=True):
                found.append((node, next(i for i, a in enumerate(node.args) if type(a) is float)))
    return found


def _writes(gm, graph, residual) -> tuple[set[fx.Node], list[fx.Node]]:
    """(the get_attr nodes written into the stream, the ops they write through) (module docstring, 2)."""
    writers, ops = set(), []
    for node in gm.graph.nodes:
        if node.op != "call_function" or not _carries(node, graph, residual, last=True):
            continue
        inputs = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
        weights = [a for a in inputs if _through_casts(a).op == "get_attr"]
        others = [a for a in inputs if a not in weights]
        # a weight only cast or viewed (a router's weight cast to the stream's dtype) is written
        # nowhere yet: the write is the op that meets the values it reads (token ids, activations)
        if weights and others and not any(_carries(a, graph, residual) for a in others):
            writers.update(_through_casts(w) for w in weights if _carries(_through_casts(w), graph, residual))
            ops.append(node)
    for node in gm.graph.nodes:          # a bias added to a written output
        if node.target in _ADDS and node.op == "call_function":
            tensors = [a for a in node.args if isinstance(a, fx.Node)]
            weights = [a for a in tensors if _through_casts(a).op == "get_attr"]
            if len(tensors) == 2 and len(weights) == 1 and _through_casts(
                    next(a for a in tensors if a not in weights)) in ops:
                writers.add(_through_casts(weights[0]))
    return writers, ops


def _users_through(node: fx.Node) -> list[fx.Node]:
    """The users of ``node``, looked through the ops that pass its values on."""
    found = []
    for user in node.users:
        found += _users_through(user) if user.target in _PASS_THROUGH else [user]
    return found


def _gain_of(node: fx.Node) -> tuple[fx.Node, tuple[fx.Node, float] | None]:
    """(the norm's output, its gain as (get_attr, offset c) of ``c + w``) after the normalised
    value ``node``: the next ``mul`` by a weight, through casts (None: no gain)."""
    users = [u for u in _users_through(node) if u.target is not aten._assert_tensor_metadata.default]
    if len(users) != 1 or users[0].target is not aten.mul.Tensor:
        return node, None
    other = next((a for a in users[0].args if isinstance(a, fx.Node) and _through_casts(a) is not node), None)
    offset = 0.0
    if isinstance(other, fx.Node) and other.target in _ADDS and len(other.args) == 2:
        constants = [a for a in other.args if type(a) in (int, float)]
        tensors = [a for a in other.args if isinstance(a, fx.Node)]
        if len(constants) == 1 and len(tensors) == 1:
            offset, other = float(constants[0]), tensors[0]
    other = _through_casts(other)
    if isinstance(other, fx.Node) and other.op == "get_attr" and len(other.users) == 1:
        return users[0], (other, offset)
    return node, None


def _norm_gains(node: fx.Node, graph, residual) -> tuple[fx.Node, list[tuple[fx.Node, float]]] | None:
    """(output, [(gain or bias get_attr, offset)]) of the norm whose ε is at ``node`` (a norm op,
    or the ``add`` of a decomposed one); None where its normalised value is not found."""
    if node.target in _NORM_WEIGHTS:
        weights = [node.args[i] for i in _NORM_WEIGHTS[node.target] if len(node.args) > i]
        return node, [(w, 0.0) for w in weights if isinstance(w, fx.Node) and w.op == "get_attr"]
    frontier = list(node.users)
    while frontier:                      # ε → rsqrt → the mul/div joining it with the stream
        user = frontier.pop(0)
        if user.target in (aten.mul.Tensor, aten.div.Tensor) and any(
                _carries(a, graph, residual, last=True) for a in user.args if isinstance(a, fx.Node)):
            out, gain = _gain_of(user)
            return out, [gain] if gain is not None else []
        frontier += list(user.users)
    return None


def _constant_mul(node: fx.Node) -> fx.Node | None:
    """The ``mul`` by a constant that is the only user of a norm without a gain (the factor
    ``RescaleResidualPass`` inserted there), which then takes the stream's scale."""
    users = [u for u in _users_through(node) if u.target is not aten._assert_tensor_metadata.default]
    if len(users) == 1 and users[0].target is aten.mul.Tensor and sum(type(a) is float for a in users[0].args) == 1:
        return users[0]
    return None


def _module(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return (next(reversed(stack.values()))[0] if stack else "") or node.name     # the root module: ""


def _plan(gm, graph, residual, norms) -> dict[fx.Node, tuple[float, float]] | str:
    """{get_attr node (or constant ``mul``): (the power of s it takes, the offset c of a ``c + w``
    gain)}, or why there is none: a norm adds into the stream, or a tied head reads, with no gain
    to take the scale."""
    writers, ops = _writes(gm, graph, residual)
    if not writers:
        return "no weight writes the stream"
    plan = {w: (1.0, 0.0) for w in writers}
    outputs = {}
    for node, _ in norms:
        found = _norm_gains(node, graph, residual)
        if found is None:
            return f"the norm of {_module(node)} has no normalised value the fold finds"
        outputs[found[0]] = found[1]
        constant = _constant_mul(found[0]) if not found[1] else None
        reads = _users_through(constant if constant is not None else found[0])
        if any(u.target in _ADDS and _carries(u, graph, residual, last=True) for u in reads):
            if not found[1] and constant is None:   # a norm written into the stream (after the embedding)
                return f"{_module(node)} writes a norm without a weight of its own into the stream"
            plan.update({w: (1.0, c) for w, c in found[1]} if found[1] else {constant: (1.0, 0.0)})
    for writer in writers:               # a table also read as a weight (a tied output head)
        for read in [u for u in _users_through(writer) if u not in ops
                     and u.target is not aten._assert_tensor_metadata.default]:
            source = _through_casts(read.args[0]) if read.target is aten.linear.default else None
            if not outputs.get(source):
                return (f"{writer.target} writes the stream and is read again in {_module(read)} (tied), after no "
                        "norm with a weight of its own to take the stream's scale back")
            plan.update({w: (-1.0, c) for w, c in outputs[source]})
    return plan


def stream_fold_limit(child: fx.GraphModule) -> str | None:
    """Why the rescale's ε cannot be folded into the stream's scale (``_plan``), or None."""
    rescale, graph = pass_state.RESCALE.get(child), pass_state.CHANNEL_GRAPH.get(child)
    if rescale is None or graph is None or rescale.eps_scale == 1:
        return None
    residual = {graph.find(g.id) for g in graph.groups.values() if g.kind == "residual"}
    norms = _norm_eps(child, graph, residual)
    plan = _plan(child, graph, residual, norms) if norms else None
    return plan if isinstance(plan, str) else None


def fold_stream_scale(child: fx.GraphModule) -> fx.GraphModule | None:
    """A copy of ``child`` computing the same with its norms at the parent's ε (module docstring);
    None where the child has no such ε, or the copy does not compute the same."""
    rescale = pass_state.RESCALE.get(child)
    graph = pass_state.CHANNEL_GRAPH.get(child)
    if rescale is None or graph is None or rescale.eps_scale == 1:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folded = copy.deepcopy(child)
    residual = {graph.find(g.id) for g in graph.groups.values() if g.kind == "residual"}
    norms = _norm_eps(folded, graph, residual)
    plan = _plan(folded, graph, residual, norms) if norms else None
    inner = inner_norm_folds(folded, rescale.eps, {n.name for n, _ in norms})
    if isinstance(plan, str) or not (norms or inner):
        return None
    if plan is not None and not _fold_stream(child, folded, graph, residual, norms, plan, rescale.eps_scale):
        return None
    if not _fold_inner(folded, inner):
        return None
    folded.recompile()
    return folded if _same_outputs(child, folded) else None


def _fold_stream(child, folded, graph, residual, norms, plan, k: float) -> bool:
    """The stream's norms at the parent's ε, its writes × 1/√k (module docstring, 1-4); False
    where a read of the stream sees neither its old values nor them scaled."""
    done = {}
    for node, index in norms:
        node.args = node.args[:index] + (node.args[index] / k,) + node.args[index + 1:]
    for node, (power, offset) in plan.items():
        factor = k ** (-0.5 * power)
        if node.op == "call_function":   # a mul by a constant (``_constant_mul``)
            node.args = tuple(a * factor if type(a) is float else a for a in node.args)
            continue
        tensor = get_attribute(folded, node.target)
        if id(tensor) not in done:       # c + w' = factor · (c + w)
            done[id(tensor)] = edit_tensor(folded, tensor, [Scale(factor, offset * (factor - 1))])
    replace_tensors(folded, done)
    edited = {id(t) for t in done.values()}     # a tied head's table: its reads took the scale above
    folded.recompile()
    reads = _scaled_reads(child, folded, graph, residual, k ** -0.5, edited)
    if reads is None:
        return False
    tensors = {id(t): t for t in (get_attribute(folded, w.target) for w in reads)}
    replace_tensors(folded, {i: edit_tensor(folded, t, [Scale(k ** 0.5)]) for i, t in tensors.items()})
    return True


def _fold_inner(folded, inner) -> bool:
    """Each inner norm at the parent's ε, the weights its values are linear in × 1/√k
    (``norm_inputs``); False where one weight would take two scales."""
    scales: dict[int, tuple] = {}
    for node, index, k, sources in inner:
        node.args = node.args[:index] + (node.args[index] / k,) + node.args[index + 1:]
        for source in sources:
            tensor = get_attribute(folded, source.target)
            if scales.setdefault(id(tensor), (tensor, k))[1] != k:
                return False
    replace_tensors(folded, {i: edit_tensor(folded, t, [Scale(k ** -0.5)]) for i, (t, k) in scales.items()})
    return True


def _stream_reads(gm, graph, residual) -> dict[fx.Node, tuple[fx.Node, fx.Node]]:
    """{linear op: (its input, its weight's get_attr)} of every linear whose input carries the stream
    in its last dim and whose output does not (a read, not a write)."""
    found = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _LINEARS or _carries(node, graph, residual, last=True):
            continue
        i, w = _LINEARS[node.target]
        weight = weight_attribute(node.args[w])
        if weight is not None and _carries(node.args[i], graph, residual, last=True):
            found[node] = (node.args[i], weight)
    return found


class _Recorder(fx.Interpreter):
    """Runs a module, keeping the values of ``wanted`` nodes (by name)."""

    def __init__(self, gm, wanted: set[str]) -> None:
        super().__init__(gm)
        self.wanted, self.kept = wanted, {}

    def run_node(self, n):
        value = super().run_node(n)
        if n.name in self.wanted:
            self.kept[n.name] = value
        return value


class _Reader(fx.Interpreter):
    """Runs the folded copy; each stream read's input is compared with the child's (``want``) and
    divided by the scale found, as the read's weight will be: ``found`` maps the weight to the scale."""

    def __init__(self, gm, reads, want: dict, s: float) -> None:
        super().__init__(gm)
        self.reads, self.want, self.s = reads, want, s
        self.found: dict[fx.Node, float] = {}

    def run_node(self, n):
        if n not in self.reads:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        i = _LINEARS[n.target][0]
        ratio = _ratio(args[i], self.want[n.name], self.s)
        if ratio is None or self.found.setdefault(self.reads[n][1], ratio) != ratio:
            raise _NotFoldable
        args = args[:i] + (args[i] / ratio,) + args[i + 1:]
        return getattr(self, n.op)(n.target, args, kwargs)


def _ratio(got: torch.Tensor, want: torch.Tensor, s: float) -> float | None:
    """1 or ``s``, whichever ``got`` is times ``want`` to within ten times the dtype's tolerance,
    relative to ``want``'s size (a small stream is judged as well as a large one); None when
    neither is (a nonlinearity between the stream and the read)."""
    limit = min(0.1 * abs(1 - s), 10 * tolerance_for(want.dtype))
    got, want = got.double(), want.double()
    size = float(want.norm())
    if size == 0:
        return 1.0
    errors = {c: float((got - c * want).norm()) / size for c in (1.0, s)}
    best = min(errors, key=errors.get)
    return best if errors[best] < limit else None


class _NotFoldable(Exception):
    pass


def _scaled_reads(child, folded, graph, residual, s: float, edited: set[int]) -> list[fx.Node] | None:
    """The get_attr weights of the stream reads (``_stream_reads``; those of a tensor in ``edited``
    left out) whose input, in ``folded`` on the example inputs, is ``s`` times the child's (module
    docstring, 4); None where one is neither."""
    reads = {n: r for n, r in _stream_reads(folded, graph, residual).items()
             if id(get_attribute(folded, r[1].target)) not in edited}
    if not reads:
        return []
    inputs = example_inputs(child)
    recorder = _Recorder(child, {x.name for x, _ in reads.values()})     # folded is child's copy: same names
    with torch.no_grad():
        recorder.run(*inputs)
        want = {n.name: recorder.kept[x.name] for n, (x, _) in reads.items()}
        reader = _Reader(folded, reads, want, s)
        try:
            reader.run(*inputs)
        except _NotFoldable:
            return None
    return [w for w, ratio in reader.found.items() if ratio != 1.0]


def _same_outputs(child, folded) -> bool:
    inputs = example_inputs(child)
    with torch.no_grad():
        want, got = tensor_outputs(child(*inputs)), tensor_outputs(folded(*inputs))
    if set(want) != set(got):
        return False
    diff, scale = max_difference(list(want.values()), [got[k] for k in want])
    return diff <= tolerance_for(model_dtype(child)) * scale
