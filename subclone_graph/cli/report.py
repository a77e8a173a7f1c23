"""What the command line prints: timed step lines, the closing summary, and ``inspect``'s tables.

Kinds are shown with the README's names: ``residual``, ``ffn``, ``heads``, ``kv_heads``,
``head_dim`` (the targets), ``frozen`` (cannot shrink; the reason names the op and module),
``heads×head_dim``-style composites (a q/k/v/o projection's dim: it shrinks with its target
parts; ``kv_heads×other`` when a part, like a value head's width, is reached by no target) and
``other`` (a dim no target reaches; it keeps its size unless a group it is built from shrinks).
"""
from __future__ import annotations

import contextlib
import sys
import time

import torch

from subclone_graph.passes import state

__all__ = ["Steps", "group_table", "layer_table", "score_tables", "display_kind", "progress_bar",
           "calibration_source"]

TARGET_KINDS = ("residual", "ffn", "heads", "kv_heads", "head_dim")


class Steps:
    """``with steps("load MODEL"):`` prints ``[1] load MODEL ...`` then its time; ``summary()``."""

    def __init__(self, echo=None) -> None:
        self.echo = echo or (lambda line: print(line, flush=True))
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.echo(f"[{len(self.seconds) + 1}] {name} ...")
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        self.echo(f"    done in {self.seconds[name]:.1f} s")

    def summary(self) -> str:
        width = max((len(n) for n in self.seconds), default=0)
        lines = [f"  {name:<{width}}  {s:7.1f} s" for name, s in self.seconds.items()]
        return "\n".join(["time per step:", *lines, f"  {'total':<{width}}  {sum(self.seconds.values()):7.1f} s"])


def _composite_parts(graph, group) -> list:
    """The parts of a heads·head_dim-like product of which at least one is a target group."""
    for relation in graph.relations_of(group.id, kind="factor"):
        parts = [graph.groups[p] for p in graph.part_groups(relation) if p in graph.groups]
        if any(p.kind in TARGET_KINDS for p in parts):
            return parts
    return []


def display_kind(graph, group) -> str:
    """The README's name for a group's kind (see module doc)."""
    if group.kind in TARGET_KINDS or group.kind in ("frozen", "dynamic"):
        return group.kind
    if group.reason:
        return "frozen"
    parts = _composite_parts(graph, group)
    if parts:     # shrinks with its target parts; a part no target reaches shows as "other"
        return "×".join(p.kind if p.kind in TARGET_KINDS else "other" for p in parts)
    return "other"


def _example(graph, group) -> str:
    if group.reason:
        return group.reason
    if group.tensors:
        return f"{group.tensors[0][0]} dim {group.tensors[0][1]}"
    for name, dim, whole in graph.slices(group.id):
        if whole != group.id:
            return f"part of {name} dim {dim} ({display_kind(graph, graph.groups[whole])})"
    return ""


def group_table(graph, all_groups: bool = False) -> str:
    """Channel groups with tensors or a target kind (``other`` groups only with ``all_groups``)."""
    order = {"residual": 0, "heads": 1, "kv_heads": 2, "head_dim": 3, "ffn": 4, "frozen": 6, "other": 7}
    shown, hidden = [], 0
    for g in graph.groups.values():
        if not g.static or g.size <= 1 or g.kind == "dynamic":
            continue
        kind = display_kind(graph, g)
        if kind == "other" and not all_groups:
            hidden += 1
            continue
        if g.tensors or kind in TARGET_KINDS or kind == "frozen":
            shown.append((kind, g))
    shown.sort(key=lambda kg: (order.get(kg[0], 5), -1 if kg[1].layer is None else kg[1].layer, kg[1].id))
    rows = [("group", "kind", "size", "layer", "tensors", "example / reason")]
    rows += [(str(g.id), kind, str(g.size), "-" if g.layer is None else str(g.layer), str(len(g.tensors)),
              _example(graph, g)) for kind, g in shown]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5] for r in rows]
    note = (f"{len(shown)} groups shown; {hidden} 'other' groups hidden (dims no target reaches: they keep "
            f"their size)" if hidden else f"{len(shown)} groups")
    return "\n".join([f"channel groups ({note})", *lines])


def layer_table(layers) -> str:
    lines = [f"layers ({len(layers)})", f"{'index':>6}  {'blocks':>6}  key / stream input -> output"]
    for layer in layers:
        lines.append(f"{layer.index:>6}  {len(layer.blocks):>6}  {layer.key or '-'}: {layer.input} -> {layer.output}")
    return "\n".join(lines)


def score_tables(gm) -> str:
    graph = state.CHANNEL_GRAPH.need(gm)
    lines = ["per-layer ||f(x)|| / ||x + f(x)|| (depth=measured drops the smallest)"]
    lines += [f"{i:>6}  {ratio:.4f}" for i, ratio in enumerate(state.LAYER_RATIOS.need(gm))]
    lines += ["", f"top-5 channels of each score (index: score; {state.SCORE_SOURCE.need(gm)})"]
    for gid, scores in state.SCORES.need(gm).items():
        group = graph.groups[gid]
        scores = scores.mean(0) if scores.dim() == 2 else scores      # one order per expert: their mean
        top = torch.topk(scores, min(5, len(scores)))
        picks = ", ".join(f"{i}: {v:.3g}" for v, i in zip(top.values.tolist(), top.indices.tolist()))
        layer = "-" if group.layer is None else group.layer
        lines.append(f"{gid:>6}  {group.kind:<9} layer {layer:<4} size {len(scores):<6} {picks}")
    return "\n".join(lines)


def calibration_source(calibration, path) -> str:
    """'calibration: 4 batches from X', or for a stream read lazily, what it reads at most."""
    if isinstance(calibration, (list, tuple)):
        return f"calibration: {len(calibration)} batches from {path}"
    cap = getattr(calibration, "max_tokens", None)
    return (f"calibration: streaming windows of {getattr(calibration, 'window', '?')} tokens from {path}"
            + (f" (at most {cap:,} tokens)" if cap else ""))


def progress_bar(iterable):
    from tqdm.auto import tqdm
    return tqdm(iterable, desc="calibration", unit="batch", file=sys.stderr)
