"""Importance scores (the paper's): mean |activation| over batch and tokens.

With calibration inputs, the traced graph runs in an ``fx.Interpreter`` that watches:
1. residual: every tensor of the residual stream (each block's input and output, each layer's
   input and output) and every normalised read of it (the input of each weight that contracts
   the stream: q/k/v, gate/up, the output head); their per-channel means are **summed**, one
   order for the network;
2. MLP widths and attention heads: the input of the weight that contracts them (an MLP's
   ``down`` input; the attention output before the output projection), projected onto the
   group: a heads × head_dim input is averaged over head_dim, a fused gate/up half is summed;
3. per layer, ‖f(x)‖/‖x+f(x)‖ = ‖out − in‖/‖out‖ over every token (the paper's depth criterion);
4. experts (REAP): per expert, the mean over the rows routed to it of ‖router weight × expert
   output‖ (``expert_orders.output_watch_list``; 0 for an expert no row reached);
5. an MLP width with one order per expert (``expert_orders``): the input of its grouped matmul,
   each row counted for the expert that processed it (mean over that expert's rows); the score
   is ``(experts, inner)``. An expert no calibration row reached scores its rows pooled over all
   experts.

Without calibration data, a group scores the mean |weight| of every floating-point weight slicing
it (each weight's profile normalised to mean 1; per expert for a width with one order per expert;
a boolean mask or an integer index buffer has no magnitude and is passed over), and
``state.SCORE_SOURCE`` says so.

Every token counts once, across batches and ranks: the statistics are sums with their counts
(``activation_statistics``), added over the ranks by the ``reduce`` the caller hands in, and
divided once at the end. The graph runs in the one runner (``segments``) from whatever weight
source the caller gives: the module's own tensors, or a checkpoint read segment by segment —
the same pass, the same bits. A half-precision model is calibrated in float32, its matmuls in
the half dtype where the hardware runs them fast (``compute_dtype``, whose docstring says why).

Writes ``state.SCORES`` ({group id: 1-D float64 tensor}), ``state.SCORE_SOURCE`` and, with
calibration, ``state.LAYER_RATIOS``; modifies nothing. Statistics accumulate in float64 whatever
the model's dtype.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .. import state
from ..fx_utils import get_attribute, tensor_shape
from ..infra import SubclonePass, log
from .activation_statistics import ActivationStatistics
from .channel_graph import ChannelGraph
from .compute_dtype import Precision, check_compute_dtype, resolve_precision
from .expert_orders import expert_dim, output_watch_list, row_watch_list
from .segments import ResidentWeights, run_segments

__all__ = ["ScoreChannelsPass", "watch_list", "row_watch_list", "output_watch_list",
           "combine_profiles", "weight_profiles", "project", "flat_inputs", "SCORED_KINDS", "calibration_precision"]

SCORED_KINDS = ("residual", "ffn", "latent", "heads", "experts")


def project(graph: ChannelGraph, vec: torch.Tensor, source: int, target: int) -> torch.Tensor | None:
    """Map a per-index profile of group ``source`` onto group ``target`` it is built from."""
    if source == target:
        return vec
    total = None
    for rel in graph.relations_of(source):
        parts = graph.part_groups(rel)
        sizes = [graph.groups[p].size for p in parts]
        for i, part in enumerate(parts):
            if part != target and part not in graph.composites_containing(target):
                continue
            if rel.kind == "factor":
                axes = [a for a in range(len(sizes)) if a != i]
                piece = vec.reshape(sizes).mean(dim=axes) if axes else vec
            else:
                offset = sum(sizes[:i])
                piece = vec[offset: offset + sizes[i]]
            sub = project(graph, piece, part, target)
            if sub is not None:
                total = sub if total is None else total + sub
    return total


def flat_inputs(gm: fx.GraphModule, inputs, index: int) -> list:
    """Flatten one calibration batch the way the graph's placeholders expect, checking shapes."""
    args, kwargs = (inputs, {}) if not isinstance(inputs, dict) else ((), inputs)
    if isinstance(args, torch.Tensor):
        args = (args,)
    spec = getattr(gm, "_in_spec", None)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if spec is not None:
        flat, given = pytree.tree_flatten((tuple(args), kwargs))
        if given != spec:
            expected = pytree.tree_unflatten(["*"] * spec.num_leaves, spec)
            raise ValueError(f"calibration batch {index}: inputs do not match the traced signature: "
                             f"expected (args, kwargs) like {expected}, got {len(args)} positional input(s)")
    else:
        flat = list(args)
    if len(flat) != len(placeholders):
        raise ValueError(f"calibration batch {index}: expected {len(placeholders)} inputs, got {len(flat)}")
    for j, (value, node) in enumerate(zip(flat, placeholders)):
        expected = tensor_shape(node)
        if expected is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"calibration batch {index}, input {j} ({node.name}): expected a tensor, got {type(value).__name__}")
        got = tuple(value.shape)
        if len(got) != len(expected) or any(isinstance(e, int) and e != g for e, g in zip(expected, got)):
            want = tuple(e if isinstance(e, int) else "*" for e in expected)
            raise ValueError(f"calibration batch {index}, input {j} ({node.name}): expected shape {want}, got {got}")
    return flat


def calibration_precision(gm: fx.GraphModule, compute_dtype, device=None) -> Precision:
    """What calibration of ``gm`` computes in, asked for as ``compute_dtype`` (``"auto"``, a
    dtype, None): only a graph holding half-precision floating weights is widened
    (``compute_dtype``'s module docstring); ``"auto"`` measures the matmul rates on ``device``
    (None: where the weights are, as the runner then runs there)."""
    tensors = [*gm.parameters(), *gm.buffers()]
    if device is None:
        device = tensors[0].device if tensors else "cpu"
    return resolve_precision(compute_dtype, {t.dtype for t in tensors}, device)


def _groups(node: fx.Node, graph: ChannelGraph) -> tuple[int, ...]:
    channels = state.CHANNELS.of(node, graph)
    return () if channels is None else channels.groups


def watch_list(gm, graph: ChannelGraph, layers) -> dict[str, list[int]]:
    """The (node name -> dims) whose mean |activation| the scores are made of (module docstring)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    watch: dict[str, set] = defaultdict(set)
    stream = {b.add for layer in layers for b in layer.blocks} | {b.skip for layer in layers for b in layer.blocks}
    for name in stream:
        for d, g in enumerate(_groups(nodes[name], graph)):
            if graph.groups[g].kind == "residual":
                watch[name].add(d)
    for v in graph.contracted:
        name, _, dim = graph.labels[v]
        # a width with one order per expert is watched per expert (row_watch_list) instead
        if name in nodes and nodes[name].op != "get_attr" and graph.group_of(v).experts is None:
            watch[name].add(dim)
    return {k: sorted(v) for k, v in watch.items()}


def combine_profiles(graph: ChannelGraph, profiles) -> dict[int, torch.Tensor]:
    """Scores of every scored group: the sum of the profiles projected onto it."""
    scores = {}
    for target in (g.id for g in graph.groups.values() if g.kind in SCORED_KINDS):
        reach = {target} | graph.composites_containing(target)
        experts = graph.groups[target].experts
        shape = (graph.groups[experts].size,) if experts is not None else ()
        total = torch.zeros(*shape, graph.groups[target].size, dtype=torch.float64)
        for source, vec in profiles:
            if source in reach:
                if vec.dim() == 2 and experts is None:
                    vec = vec.mean(0)
                rows = vec if vec.dim() == 2 else [vec]
                pieces = [project(graph, row, source, target) for row in rows]
                if all(piece is not None for piece in pieces):
                    total += torch.stack(pieces) if vec.dim() == 2 else pieces[0]
        scores[target] = total
    return scores


def weight_profiles(gm: fx.GraphModule, graph: ChannelGraph, tensor_of=None) -> list[tuple[int, torch.Tensor]]:
    """Each weight's mean |weight| per index of every static group it spans, normalised to mean 1.
    ``tensor_of(node)`` gives a get_attr node's tensor (default: the module's own)."""
    tensor_of = tensor_of or (lambda node: get_attribute(gm, node.target))
    profiles = []
    for node in gm.graph.nodes:
        shape = tensor_shape(node)
        if node.op != "get_attr" or shape is None or not shape:
            continue
        groups = [(d, g) for d, g in enumerate(_groups(node, graph))
                  if graph.groups[g].static and graph.groups[g].size > 1]
        if not groups:
            continue
        tensor = tensor_of(node)
        if not tensor.is_floating_point():
            continue        # a mask or an index buffer has no magnitude to score by
        x = tensor.detach().abs().to(torch.float64)
        channels = _groups(node, graph)
        for d, g in groups:
            experts = expert_dim(graph, g, channels)
            if experts is not None:       # one profile per expert: (experts, channels)
                moved = x.movedim((experts, d), (0, 1))
                vec = moved.mean(dim=list(range(2, moved.dim()))) if moved.dim() > 2 else moved
            else:
                vec = x.mean(dim=[i for i in range(x.dim()) if i != d]) if x.dim() > 1 else x
            profiles.append((g, vec / vec.mean().clamp_min(1e-30)))
    return profiles


class _FlatBatches:
    """The calibration batches as the graph's flat inputs, counted as they are read; as long
    as the batches (a progress bar shows it)."""

    def __init__(self, gm, batches, statistics: ActivationStatistics) -> None:
        self.gm, self.batches, self.statistics = gm, batches, statistics

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for index, batch in enumerate(self.batches):
            self.statistics.count_batch()
            yield flat_inputs(self.gm, batch, index)


class ScoreChannelsPass(SubclonePass):
    """Analysis: per-channel scores of every residual, MLP and heads group."""

    requires_keys = (state.CHANNEL_GRAPH, state.LAYERS)
    clears = "scores"

    def __init__(self, calibration=None, progress=None, device=None, compute_dtype="auto", *,
                 weights=None, reduce=None, store=None) -> None:
        """``calibration``: an iterable of input batches (None: score by weight magnitude).
        ``progress(iterable)`` wraps the runner's steps (e.g. ``tqdm``). ``device``: where
        calibration runs (None: where the weights are). ``compute_dtype``: what a half-precision
        model's calibration computes in — ``"auto"`` (float32, with the half dtype's matmuls where
        they are measured fast), a dtype, or None (its own dtype); statistics accumulate in
        float64 either way. ``weights``: where the weights come from (``segments``: default the module's
        own tensors). ``reduce(sums) -> sums``: every entry of ``ActivationStatistics.sums`` added
        over the ranks of a data-parallel calibration (default: one process, the identity).
        ``store``: the ``BoundaryStore`` of a runner reading weights on demand."""
        check_compute_dtype(compute_dtype)
        self.calibration, self.progress, self.device = calibration, progress, device
        self.compute_dtype, self.weights, self.reduce, self.store = compute_dtype, weights, reduce, store

    def run(self, gm: fx.GraphModule) -> bool:
        graph = state.CHANNEL_GRAPH.need(gm)
        weights = self.weights if self.weights is not None else ResidentWeights()
        if self.calibration is None:
            log.info("no calibration data: scoring channels by weight magnitude")
            profiles = weight_profiles(gm, graph, lambda node: weights.fetch(gm, [node.target])[node.target])
            state.SCORE_SOURCE.set(gm, "weight magnitude (no calibration data)")
        else:
            profiles = self._activation_profiles(gm, graph, weights)
            state.SCORE_SOURCE.set(gm, "mean |activation| on calibration data")
        state.SCORES.set(gm, combine_profiles(graph, profiles))
        return False

    def _activation_profiles(self, gm, graph, weights):
        layers = state.LAYERS.need(gm)
        statistics = ActivationStatistics(watch_list(gm, graph, layers), layers, row_watch_list(gm, graph),
                                          output_watch_list(gm, graph))

        precision = calibration_precision(gm, self.compute_dtype, self.device)
        log.info("calibration computes in %s", precision)
        with torch.no_grad():
            run_segments(gm, _FlatBatches(gm, self.calibration, statistics), weights, self.store, statistics.observe,
                         self.progress, self.device, precision, statistics.names())
        # every rank's sums added before anything is divided or chosen (and after every rank ran)
        statistics.sums = statistics.sums if self.reduce is None else self.reduce(statistics.sums)
        if statistics.batches == 0:
            raise ValueError("calibration: no batches given (pass None to score by weight magnitude)")
        state.LAYER_RATIOS.set(gm, statistics.layer_ratios())
        return statistics.profiles(gm)
