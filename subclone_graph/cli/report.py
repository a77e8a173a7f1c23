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

__all__ = ["print_config_changes", "Steps", "target_summary", "group_table", "layer_table", "score_tables", "display_kind", "progress_bar",
           "calibration_source"]

TARGET_KINDS = ("residual", "ffn", "heads", "kv_heads", "head_dim")


class Steps:
    """The command line's phases, each printed as it starts (``[2] trace ...``) and ends (``done
    in 41.3 s``), its time kept for ``summary()``: ``with steps("load MODEL"):`` for the command
    line's own, ``steps.progress`` (the library's ``progress=`` protocol, ``subclone_graph.progress``)
    for the library's; a phase with several steps shows a bar on stderr."""

    def __init__(self, echo=None, bars: bool = True) -> None:
        self.echo = echo or (lambda line: print(line, flush=True))
        self.bars = bars
        self.seconds: dict[str, float] = {}
        self.started = 0

    @contextlib.contextmanager
    def __call__(self, name: str):
        steps = self.progress(range(1), desc=name, total=1)
        next(steps)
        try:
            yield
        except BaseException:
            steps.close()
            raise
        next(steps, None)

    def progress(self, iterable, desc: str = "", total: int | None = None):
        """``progress(iterable, desc=phase, total=n)``: the phase ``desc`` (see class doc)."""
        self.started += 1
        self.echo(f"[{self.started}] {desc} ...")
        start = time.perf_counter()
        if self.bars and total != 1:
            from tqdm.auto import tqdm
            iterable = tqdm(iterable, desc=desc, total=total, unit="step", file=sys.stderr, leave=False)
        try:
            yield from iterable
        except GeneratorExit:
            self.echo(f"    stopped after {time.perf_counter() - start:.1f} s")
            raise
        self.seconds[desc] = self.seconds.get(desc, 0.0) + time.perf_counter() - start
        self.echo(f"    done in {self.seconds[desc]:.1f} s")

    def named(self, suffix: str):
        """A ``progress`` whose phases read ``write child.onnx``, ``check child.onnx``, ..."""
        return lambda iterable, desc="", total=None: self.progress(iterable, f"{desc} {suffix}", total)

    def summary(self) -> str:
        width = max((len(n) for n in self.seconds), default=0)
        lines = [f"  {name:<{width}}  {s:7.1f} s" for name, s in self.seconds.items()]
        return "\n".join(["time per phase:", *lines, f"  {'total':<{width}}  {sum(self.seconds.values()):7.1f} s"])


# Target field -> the group role that carries it (``ChooseKeepPass`` reads the same roles)
FIELD_ROLES = {"hidden": "residual", "ffn": "ffn", "latent": "latent", "experts": "experts"}


def _frozen_layer_width(graph) -> str | None:
    """Why a layer has no MLP width to shrink although a weight produces or contracts one: the
    reason of the first frozen width inside a layer (it names the op and the module)."""
    weighted = graph.produced | graph.contracted
    for group in sorted(graph.groups.values(), key=lambda g: (g.layer if g.layer is not None else -1, g.id)):
        if (not group.static or group.reason is None or group.layer is None or group.size < 2
                or group.kind in ("heads", "kv_heads", "head_dim")):
            continue
        related = [group.id, *graph.composites_containing(group.id)]
        if any(v in weighted for g in related for v in graph.groups[g].vertices):
            return group.reason
    return None


def _widths(sizes) -> str:
    """``576``, or ``64/1536`` where groups of one kind differ (give a fraction for those)."""
    return "/".join(str(w) for w in sorted(set(sizes)))


def target_summary(gm) -> str:
    """What ``inspect`` says first: the sizes a ``Target`` takes, which can shrink and what
    freezes the others (the op and the module, from the analysis' reasons)."""
    graph, layers, sites = state.CHANNEL_GRAPH.need(gm), state.LAYERS.need(gm), state.ATTENTION.need(gm)
    sizes, free, fixed = {}, [], []
    for field, role in FIELD_ROLES.items():
        groups = [g for g in graph.groups.values() if g.role == role and g.static]
        if not groups:
            reason = _frozen_layer_width(graph) if field == "ffn" else None
            if reason:
                fixed.append(f"{field}: {reason}")
            continue
        sizes[field] = _widths(g.size for g in groups)
        frozen = [g for g in groups if g.reason]
        if len(frozen) == len(groups):
            fixed.append(f"{field}: {frozen[0].reason}")
        else:
            free.append(field if not frozen else f"{field} (not in {len(frozen)} of {len(groups)} groups: "
                                                 f"{frozen[0].reason})")
    if layers:
        sizes["layers"] = str(len(layers))
        free.append("layers")
    for field, ids in (("heads", [s.heads for s in sites]), ("kv_heads", [s.kv_heads for s in sites])):
        if not sites:
            break
        groups = [graph.groups[i] for i in ids]
        sizes[field] = _widths(g.size for g in groups)
        frozen = [g for g in groups if g.reason]
        (fixed.append(f"{field}: {frozen[0].reason}") if frozen else free.append(field))
    order = ("hidden", "layers", "heads", "kv_heads", "ffn", "latent", "experts")
    line = ", ".join(f"{f.replace('_', ' ')} {sizes[f]}" for f in order if f in sizes)
    absent = [f.replace("_", " ") for f in order if f not in sizes]
    lines = [f"sizes: {line}" if line else "sizes: none a Target can take (no residual stream, layers or attention found)"]
    lines.append(f"can shrink: {', '.join(x.replace('_', ' ') for x in free) or 'nothing'}")
    lines += [f"cannot shrink {reason}" for reason in fixed]
    if absent:
        lines.append(f"not in this model: {', '.join(absent)}")
    unknown = state.UNKNOWN_OPS.get(gm, ())
    if unknown:
        lines.append(f"ops without a rule (they freeze what they touch): {', '.join(unknown)}")
    return "\n".join(lines)


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


def print_config_changes(changes) -> None:
    """The Hugging Face child's config fields that differ from the parent's, each with why."""
    if changes:
        print("config.json: " + "; ".join(str(change) for change in changes))


def progress_bar(iterable):
    """A bar over calibration batches (``ScoreChannelsPass``'s ``progress``)."""
    from tqdm.auto import tqdm
    return tqdm(iterable, desc="calibration", unit="batch", file=sys.stderr)
