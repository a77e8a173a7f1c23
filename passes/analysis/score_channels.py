"""Importance scores (the paper's): mean |activation| over batch and tokens.

With calibration inputs, the traced graph runs in an ``fx.Interpreter`` that watches:
1. residual: every tensor of the residual stream (each block's input and output, each layer's
   input and output) and every normalised read of it (the input of each weight that contracts
   the stream: q/k/v, gate/up, the output head); their per-channel means are **summed**, one
   order for the network;
2. MLP widths and attention heads: the input of the weight that contracts them (an MLP's
   ``down`` input; the attention output before the output projection), projected onto the
   group: a heads × head_dim input is averaged over head_dim, a fused gate/up half is summed;
3. per layer, ‖f(x)‖/‖x+f(x)‖ = ‖out − in‖/‖out‖ (the paper's depth criterion);
4. experts (REAP): per expert, the mean over the rows routed to it of ‖router weight × expert
   output‖ (``expert_orders.output_watch_list``; 0 for an expert no row reached);
5. an MLP width with one order per expert (``expert_orders``): the input of its grouped matmul,
   each row counted for the expert that processed it (mean over that expert's rows); the score
   is ``(experts, inner)``. An expert no calibration row reached scores its rows pooled over all
   experts.

Without calibration data, a group scores the mean |weight| of every weight slicing it
(each weight's profile normalised to mean 1; per expert for a width with one order per expert),
and ``state.SCORE_SOURCE`` says so.

A half-precision model is calibrated in float32 (``compute_dtype``, whose docstring says why).

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
from .channel_graph import ChannelGraph
from .compute_dtype import HALF_DTYPES, call_widened, widen
from .expert_orders import expert_dim, expert_row_sums, output_watch_list, row_watch_list

__all__ = ["ScoreChannelsPass", "ActivationStatistics", "watch_list", "row_watch_list", "output_watch_list",
           "combine_profiles", "weight_profiles", "project", "flat_inputs", "SCORED_KINDS", "calibration_dtype"]

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


class ActivationStatistics:
    """The running sums of the calibration statistics (module docstring, 1–3), fed value by value.

    ``record(name, value)`` after each node runs (per-expert statistics, ``rows`` and ``outputs``
    from ``row_watch_list`` / ``output_watch_list``, keep the values they read until they run);
    ``record_layer(index, input, output)`` at each layer's output. Sums accumulate in float64 in
    the order values arrive, so feeding the same values in the same per-node order gives the
    same bits, whichever way the graph is run."""

    def __init__(self, watch: dict[str, list[int]], layers, rows: dict | None = None,
                 outputs: dict | None = None) -> None:
        self.watch, self.sums, self.counts = watch, defaultdict(float), defaultdict(int)
        self.rows, self.outputs = rows or {}, outputs or {}
        # the values a per-expert statistic reads (inputs and offsets), kept from when they ran
        self.needed = {n for source, _, offsets in self.rows.values() for n in (source, offsets)}
        self.needed |= {n for source, offsets in self.outputs.values() for n in (source, offsets)}
        self.kept: dict = {}
        # a node may be the input of several layers (a looped model feeds one state to each loop)
        self.layer_in: dict[str, tuple[int, ...]] = {}
        for layer in layers:
            self.layer_in[layer.input] = (*self.layer_in.get(layer.input, ()), layer.index)
        self.layer_out = {layer.output: layer.index for layer in layers}
        self.ratios = defaultdict(list)

    def names(self) -> set[str]:
        """Every node whose value these statistics read (a runner may skip the rest)."""
        return {*self.watch, *self.rows, *self.outputs, *self.needed, *self.layer_in, *self.layer_out}

    def record(self, name: str, value) -> None:
        self._record_rows(name, value)
        for dim in self.watch.get(name, ()):
            x = value.detach().abs().to(torch.float64)
            self.sums[(name, dim)] = self.sums[(name, dim)] + x.mean(dim=[d for d in range(x.dim()) if d != dim])
            self.counts[(name, dim)] += 1

    def _record_rows(self, name: str, value) -> None:
        if name in self.needed:
            self.kept[name] = value.detach()
        value_of = self.kept.__getitem__
        if name in self.rows:
            source, dim, offsets = self.rows[name]
            sums, counts = expert_row_sums(value_of(source), dim, value_of(offsets))
            self._add_rows((name, dim), sums, counts, "experts")
        if name in self.outputs:
            source, offsets = self.outputs[name]
            norms = value_of(source).detach().to(torch.float64).norm(dim=-1, keepdim=True)
            sums, counts = expert_row_sums(norms, 1, value_of(offsets))
            self._add_rows((name, -1), sums, counts, "expert outputs")

    def _add_rows(self, key, sums, counts, kind) -> None:
        self.sums[(*key, kind)] = self.sums[(*key, kind)] + sums
        self.sums[(*key, kind + " rows")] = self.sums[(*key, kind + " rows")] + counts
        self.counts[(*key, kind)] += 1

    def record_layer(self, index: int, layer_input: torch.Tensor, layer_output: torch.Tensor) -> None:
        out = layer_output.detach().to(torch.float64)
        change = (out - layer_input.detach().to(torch.float64)).norm()
        self.ratios[index].append(float(change / out.norm().clamp_min(1e-30)))

    def layer_ratios(self) -> list[float]:
        return [sum(r) / len(r) for _, r in sorted(self.ratios.items())]

    def profiles(self, gm: fx.GraphModule) -> list[tuple[int, torch.Tensor]]:
        """(group id, mean |activation| per index) of every watched (node, dim)."""
        nodes = {n.name: n for n in gm.graph.nodes}
        graph = state.CHANNEL_GRAPH.need(gm)
        found = []
        for key, total in self.sums.items():
            name, dim = key[:2]
            if len(key) == 2 and self.counts[key]:
                found.append((state.CHANNELS.of(nodes[name], graph).groups[dim], (total / self.counts[key]).cpu()))
            elif key[2:] == ("experts",) and self.counts[key]:
                group = state.CHANNELS.of(nodes[self.rows[name][0]], graph).groups[dim]
                found.append((group, _per_expert_mean(total.reshape(-1, graph.groups[group].size),
                                                      self.sums[(name, dim, "experts rows")])))
            elif key[2:] == ("expert outputs",) and self.counts[key]:
                group = state.CHANNELS.of(nodes[self.outputs[name][1]], graph).groups[0]
                rows = self.sums[(name, dim, "expert outputs rows")].reshape(-1).cpu()
                found.append((group, total.reshape(-1).cpu() / rows.clamp_min(1)))
        return found

    def all_reduce(self) -> None:
        """Sum these statistics over every rank of ``torch.distributed``'s default group, in place
        (a no-op in one process): data-parallel calibration, ``subclone_graph.distributed``."""
        from subclone_graph.distributed import all_reduce_statistics
        all_reduce_statistics(self)


def _per_expert_mean(sums: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean over each expert's rows; an expert without rows gets the mean over all rows (case 4)."""
    rows = rows.reshape(-1).to(torch.float64).cpu()
    means = sums.cpu() / rows.clamp_min(1)[:, None]
    pooled = sums.cpu().sum(0) / rows.sum().clamp_min(1)
    means[rows == 0] = pooled
    return means


class _Recorder(fx.Interpreter):
    def __init__(self, gm, statistics: ActivationStatistics, dtype: torch.dtype | None = None):
        super().__init__(gm)
        self.statistics, self.stash, self.dtype = statistics, {}, dtype

    def call_function(self, target, args, kwargs):
        return call_widened(target, args, kwargs, self.dtype)

    def placeholder(self, target, args, kwargs):
        value = super().placeholder(target, args, kwargs)
        return value if self.dtype is None else widen(value, self.dtype)

    def run_node(self, n):
        result = super().run_node(n)
        stats = self.statistics
        stats.record(n.name, result)
        for index in stats.layer_in.get(n.name, ()):
            self.stash[index] = result.detach()
        if n.name in stats.layer_out:
            index = stats.layer_out[n.name]
            stats.record_layer(index, self.stash[index], result)
        return result


def calibration_dtype(gm: fx.GraphModule, wide: torch.dtype | None) -> torch.dtype | None:
    """The dtype calibration computes in: ``wide`` when ``gm`` holds half-precision floating
    weights (``compute_dtype``'s module docstring), else None (as the model is)."""
    tensors = [*gm.parameters(), *gm.buffers()]
    return wide if wide is not None and any(t.dtype in HALF_DTYPES for t in tensors) else None


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
        x = tensor_of(node).detach().abs().to(torch.float64)
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


class ScoreChannelsPass(SubclonePass):
    """Analysis: per-channel scores of every residual, MLP and heads group."""

    requires_keys = (state.CHANNEL_GRAPH, state.LAYERS)
    clears = "scores"

    def __init__(self, calibration=None, progress=None, device=None, compute_dtype=torch.float32) -> None:
        """``compute_dtype``: what a half-precision model's calibration computes in (None: its own
        dtype); statistics accumulate in float64 either way."""
        self.calibration, self.progress, self.device = calibration, progress, device
        self.compute_dtype = compute_dtype

    def run(self, gm: fx.GraphModule) -> bool:
        graph = state.CHANNEL_GRAPH.need(gm)
        if self.calibration is None:
            log.info("no calibration data: scoring channels by weight magnitude")
            profiles = weight_profiles(gm, graph)
            state.SCORE_SOURCE.set(gm, "weight magnitude (no calibration data)")
        else:
            profiles = self._activation_profiles(gm, graph)
            state.SCORE_SOURCE.set(gm, "mean |activation| on calibration data")
        state.SCORES.set(gm, combine_profiles(graph, profiles))
        return False

    def _activation_profiles(self, gm, graph):
        from subclone_graph import distributed
        from subclone_graph.device import calibration_copy, to_device

        layers = state.LAYERS.need(gm)
        statistics = ActivationStatistics(watch_list(gm, graph, layers), layers, row_watch_list(gm, graph),
                                          output_watch_list(gm, graph))
        runner, device = calibration_copy(gm, self.device)     # gm itself when no device is asked
        recorder = _Recorder(runner, statistics, calibration_dtype(gm, self.compute_dtype))
        own = distributed.shard(self.calibration)       # this rank's batches (all of them in one process)
        batches = own if self.progress is None else self.progress(own)
        with torch.no_grad():
            for index, batch in enumerate(batches):
                recorder.run(*to_device(flat_inputs(gm, batch, index), device))
        statistics.all_reduce()
        if sum(distributed.gather_counts(own.count)) == 0:
            raise ValueError("calibration: no batches given (pass None to score by weight magnitude)")
        state.LAYER_RATIOS.set(gm, tuple(statistics.layer_ratios()))
        return statistics.profiles(gm)
