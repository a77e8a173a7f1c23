"""The calibration statistics: sums that add over batches and ranks, divided once at the end.

Every token counts once, however the rows are split into batches and across ranks: each
statistic is kept as a float64 *sum* with its *count* beside it (``sums``: one flat mapping of
tensors), the sums of every batch added, every rank's sums added (``reduce``), and only then is
anything divided. A mean of per-batch means would give a short last batch the weight of a full
one (the same 8 rows as 1 + 7 changed scores by 63%).

The entries (key → float64 tensor):

1. ``("channel", node, dim)``: Σ |value| over every index but ``dim``, per channel of ``dim``,
   and ``("channel count", node, dim)``: how many values each channel summed (tokens × the
   other dims) — the paper's mean |activation| is their ratio;
2. ``("experts", node, dim)``: Σ |input| per expert and channel over the rows routed to each
   expert, ``("experts rows", node, dim)``: rows per expert (``expert_orders.expert_row_sums``);
3. ``("expert outputs", node)``: Σ ‖router weight × expert output‖ per expert, with its rows;
4. ``("layer", index)``: (Σ ‖out − in‖², Σ ‖out‖²) over every token at the layer's output —
   the layer's ‖f(x)‖/‖x+f(x)‖ is the square root of their ratio;
5. ``("batches",)``: how many batches were seen (zero everywhere: no calibration data).

Summing in float64 in the order values arrive makes the same values in the same per-node order
give the same bits, whichever runner order produced them; a different split of the same rows
moves a score only by the float64 rounding of its additions (≈ 1e-16 relative).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from .. import state
from .expert_orders import expert_row_sums

__all__ = ["ActivationStatistics"]


def _add(sums: dict, key: tuple, value: torch.Tensor) -> None:
    sums[key] = sums[key] + value if key in sums else value


class ActivationStatistics:
    """The running sums of the calibration statistics (module docstring), fed value by value.

    ``watch``: {node: dims} averaged per channel; ``rows`` and ``outputs``: the per-expert
    statistics (``expert_orders.row_watch_list`` / ``output_watch_list``); ``layers``: where each
    layer's input and output are. ``observe`` is the runner's callback."""

    def __init__(self, watch: dict[str, list[int]], layers, rows: dict | None = None,
                 outputs: dict | None = None) -> None:
        self.watch, self.rows, self.outputs = watch, rows or {}, outputs or {}
        self.sums: dict[tuple, torch.Tensor] = {}
        # the values a per-expert statistic reads (inputs and offsets), kept from when they ran
        self.needed = {n for source, _, offsets in self.rows.values() for n in (source, offsets)}
        self.needed |= {n for source, offsets in self.outputs.values() for n in (source, offsets)}
        self.kept: dict = {}
        self.layer_out = {layer.output: layer for layer in layers}
        self.layer_in = {layer.input for layer in layers}

    def names(self) -> set[str]:
        """Every node whose value these statistics read (a runner may skip the rest)."""
        return {*self.watch, *self.rows, *self.outputs, *self.needed, *self.layer_in, *self.layer_out}

    def observe(self, node: fx.Node, value, env: dict) -> None:
        self.record(node.name, value)
        layer = self.layer_out.get(node.name)
        if layer is not None:
            self.record_layer(layer.index, env[layer.input], value)

    def count_batch(self) -> None:
        _add(self.sums, ("batches",), torch.ones((), dtype=torch.float64))

    def record(self, name: str, value) -> None:
        self._record_rows(name, value)
        for dim in self.watch.get(name, ()):
            x = value.detach().abs().to(torch.float64)
            others = [d for d in range(x.dim()) if d != dim]
            _add(self.sums, ("channel", name, dim), x.sum(dim=others).cpu())
            count = x.numel() // max(x.shape[dim], 1)
            _add(self.sums, ("channel count", name, dim), torch.tensor(float(count), dtype=torch.float64))

    def _record_rows(self, name: str, value) -> None:
        if name in self.needed:
            self.kept[name] = value.detach()
        value_of = self.kept.__getitem__
        if name in self.rows:
            source, dim, offsets = self.rows[name]
            sums, counts = expert_row_sums(value_of(source), dim, value_of(offsets))
            _add(self.sums, ("experts", name, dim), sums)
            _add(self.sums, ("experts rows", name, dim), counts)
        if name in self.outputs:
            source, offsets = self.outputs[name]
            norms = value_of(source).detach().to(torch.float64).norm(dim=-1, keepdim=True)
            sums, counts = expert_row_sums(norms, 1, value_of(offsets))
            _add(self.sums, ("expert outputs", name), sums.reshape(-1))
            _add(self.sums, ("expert outputs rows", name), counts)

    def record_layer(self, index: int, layer_input: torch.Tensor, layer_output: torch.Tensor) -> None:
        out = layer_output.detach().to(torch.float64)
        change = out - layer_input.detach().to(torch.float64)
        squares = torch.stack([change.square().sum(), out.square().sum()]).cpu()
        _add(self.sums, ("layer", index), squares)

    @property
    def batches(self) -> int:
        return int(self.sums[("batches",)]) if ("batches",) in self.sums else 0

    def layer_ratios(self) -> tuple[float, ...]:
        """‖f(x)‖/‖x+f(x)‖ of each layer over every token, in layer order."""
        ratios = []
        for key in sorted(k for k in self.sums if k[0] == "layer"):
            change, out = self.sums[key].tolist()
            ratios.append(math.sqrt(change / out) if out > 0 else 0.0)
        return tuple(ratios)

    def profiles(self, gm: fx.GraphModule) -> list[tuple[int, torch.Tensor]]:
        """(group id, mean |activation| per index) of every watched (node, dim); (experts,
        channels) for a width with one order per expert."""
        nodes = {n.name: n for n in gm.graph.nodes}
        graph = state.CHANNEL_GRAPH.need(gm)
        found = []
        for key, total in self.sums.items():
            if key[0] == "channel":
                name, dim = key[1:]
                count = self.sums[("channel count", name, dim)]
                found.append((state.CHANNELS.of(nodes[name], graph).groups[dim], total / count.clamp_min(1)))
            elif key[0] == "experts":
                name, dim = key[1:]
                group = state.CHANNELS.of(nodes[self.rows[name][0]], graph).groups[dim]
                found.append((group, _per_expert_mean(total.reshape(-1, graph.groups[group].size),
                                                      self.sums[("experts rows", name, dim)])))
            elif key[0] == "expert outputs":
                name = key[1]
                group = state.CHANNELS.of(nodes[self.outputs[name][1]], graph).groups[0]
                rows = self.sums[("expert outputs rows", name)].reshape(-1)
                found.append((group, total.reshape(-1) / rows.clamp_min(1)))
        return found


def _per_expert_mean(sums: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean over each expert's rows; an expert without rows gets the mean over all rows."""
    rows = rows.reshape(-1).to(torch.float64)
    means = sums / rows.clamp_min(1)[:, None]
    pooled = sums.sum(0) / rows.sum().clamp_min(1)
    means[rows == 0] = pooled
    return means
