"""The one runner of a traced graph: segment by segment, from any weight source.

The segments are cut at the layer boundaries ``FindResidualBlocksPass`` found (no per-family
code): the nodes up to the first layer's stream input, then each layer up to its stream
output, then the rest. Nodes keep graph order, so each segment only reads values computed in
itself or in earlier ones. Within a segment a value is freed after its last use, as
``fx.Interpreter`` does.

Where the weights come from is a *weight source* (``fetch(gm, targets) -> {target: tensor}``
and ``resident``): ``ResidentWeights`` hands out the module's own tensors (a model in memory); a
checkpoint reader reads them on demand (``subclone_graph.checkpoint``: a parent larger than
memory). The runner does the same either way; only the order of the loops differs:

1. resident weights: batch by batch, every segment in turn (the batches may be a lazy stream);
2. weights read on demand: segment by segment, every batch through one segment before the
   next; a segment's attributes are fetched just before it runs and dropped after, and the
   values a later segment reads (the stream, rotary tables, masks, the inputs, each layer's
   input) are kept per batch in a ``BoundaryStore``, in memory up to a byte budget and on disk
   past it.

Weights read on demand can be fetched one segment ahead, in a background thread, while the
current segment runs (reading a file releases the interpreter lock): the disk and the matrix
units work at once. Only a segment whose fetched attributes take at most ``prefetch_bytes``
is fetched ahead, so peak memory grows by at most that much. It is off by default
(``PREFETCH_BYTES = 0``): torch ops in the second thread take cores from the running
segment's kernels, whose float32 sums then come out in another order — the streamed scores of
a half-precision state-space model differed from the in-memory ones in the last bits, and the two paths
must give the same bits.

Device placement: with ``device``, every fetched attribute and every input is moved there
(a floating attribute keeps its ``requires_grad``: ``aten.matmul`` picks its algorithm by it,
even under no_grad) and the device literals ``torch.export`` wrote (``arange(device=cpu)``) are
read as it; resident attributes are moved once. A compute precision (``compute_dtype.Precision``):
``compute_dtype.call_widened`` for every op, and each segment's attributes that are not read
as stored (``compute_dtype.narrow_attributes``) widened once as they are fetched.

The invariant: every node computes exactly what ``fx.Interpreter`` computes for it (same
target, same arguments), in the same per-node order of batches whichever loop runs, so
statistics gathered node by node are the same bits from every weight source.
"""
from __future__ import annotations

import bisect
import math
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.node import map_arg

from .. import state
from ..errors import PassError
from ..fx_utils import get_attribute, written_arguments
from .compute_dtype import HALF_DTYPES, Precision, call_widened, narrow_attributes, widen

__all__ = ["Segment", "plan_segments", "BoundaryStore", "run_segments", "carried_bytes", "ResidentWeights",
           "PREFETCH_BYTES"]

# a segment read on demand is fetched ahead while the one before it runs when its attributes
# (as the runner holds them: widened or stored) take at most this many bytes (0: never; module doc)
PREFETCH_BYTES = 0


@dataclass
class Segment:
    nodes: list[fx.Node]
    attributes: list[str]                          # get_attr targets the nodes read
    keep: list[str] = field(default_factory=list)  # values later segments read
    free: dict[str, list[str]] = field(default_factory=dict)   # node -> values dead after it


def _segment_of(gm: fx.GraphModule) -> dict[fx.Node, int]:
    layers = state.LAYERS.get(gm) or []
    nodes = {n.name: n for n in gm.graph.nodes}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    # a child's layer may name an input a dropped layer's removal erased: cut at outputs then
    first = [order[nodes[layers[0].input]]] if layers and layers[0].input in nodes else []
    cuts = first + [order[nodes[layer.output]] for layer in layers]
    if any(b <= a for a, b in zip(cuts, cuts[1:])):
        raise PassError("the layers' stream inputs and outputs are not in graph order: cannot cut the graph "
                        "into segments")
    return {n: bisect.bisect_left(cuts, order[n]) for n in gm.graph.nodes if n.op != "get_attr"}


def _writes(node: fx.Node) -> bool:
    return node.op == "call_function" and bool(written_arguments(node.target))


def _needed(gm: fx.GraphModule, wanted) -> set[fx.Node]:
    """The nodes ``wanted`` names and every node they read, transitively — and every in-place
    write with what it reads: a value written into a view of a tensor (``new_empty`` then
    ``copy_`` into slices) is read through the tensor, not through the write."""
    nodes = {n.name: n for n in gm.graph.nodes}
    todo = [nodes[name] for name in wanted if name in nodes] + [n for n in gm.graph.nodes if _writes(n)]
    needed: set[fx.Node] = set()
    while todo:
        node = todo.pop()
        if node not in needed:
            needed.add(node)
            todo.extend(node.all_input_nodes)
    return needed


def plan_segments(gm: fx.GraphModule, wanted=None) -> list[Segment]:
    """The segments of ``gm`` (see module docstring); with ``wanted`` (node names), only the
    nodes those values need."""
    segment_of = _segment_of(gm)
    if wanted is not None:
        needed = _needed(gm, wanted)
        segment_of = {n: k for n, k in segment_of.items() if n in needed or n.op == "placeholder"}
    count = max(segment_of.values()) + 1
    segments = [Segment([], []) for _ in range(count)]
    last_use: dict[str, int] = {}
    for node, k in segment_of.items():
        segments[k].nodes.append(node)
        for used in node.all_input_nodes:
            if used.op != "get_attr":
                last_use[used.name] = max(last_use.get(used.name, -1), k)
    names = {n.name for n in gm.graph.nodes}
    extra = {layer.output: layer.input for layer in state.LAYERS.get(gm) or [] if layer.input in names}
    for node, k in segment_of.items():                        # read again at the layer's output
        if node.name in extra:
            last_use[extra[node.name]] = max(last_use.get(extra[node.name], -1), k)
    home = {n.name: k for n, k in segment_of.items()}
    for k, segment in enumerate(segments):
        segment.attributes = sorted({a.target for n in segment.nodes for a in n.all_input_nodes if a.op == "get_attr"})
        segment.keep = [name for name, last in last_use.items() if home[name] <= k < last]
        segment.free = _frees(segment, set(segment.keep) | {n for n, last in last_use.items() if last > k}, extra)
    return segments


def _frees(segment: Segment, kept: set[str], extra: dict[str, str]) -> dict[str, list[str]]:
    last: dict[str, str] = {}
    for node in segment.nodes:
        for used in node.all_input_nodes:
            if used.op != "get_attr":
                last[used.name] = node.name
        if node.name in extra:
            last[extra[node.name]] = node.name
    frees: dict[str, list[str]] = {}
    for value, node in last.items():
        if value not in kept:
            frees.setdefault(node, []).append(value)
    return frees


def carried_bytes(values: dict) -> int:
    return sum(v.numel() * v.element_size() for v in pytree.tree_leaves(values) if isinstance(v, torch.Tensor))


class BoundaryStore:
    """Per-batch boundary values: in memory while their bytes fit ``budget``, else on disk."""

    def __init__(self, budget: int, spill_dir=None) -> None:
        self.budget, self.spill_root = budget, spill_dir
        self.memory: dict[int, tuple[dict, int]] = {}
        self.files: dict[int, Path] = {}
        self.used = self.peak = self.spilled = 0
        self._dir: Path | None = None

    def put(self, batch: int, values: dict) -> None:
        size = carried_bytes(values)
        if self.used + size <= self.budget:
            self.memory[batch] = (values, size)
            self.used += size
            self.peak = max(self.peak, self.used)
            return
        if self._dir is None:
            root = self.spill_root
            if root is not None:
                os.makedirs(root, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="subclone-spill-", dir=root))
        path = self._dir / f"batch-{batch}.pt"
        torch.save(values, path)
        self.files[batch] = path
        self.spilled += size

    def take(self, batch: int) -> dict:
        if batch in self.memory:
            values, size = self.memory.pop(batch)
            self.used -= size
            return values
        path = self.files.pop(batch)
        values = torch.load(path, weights_only=False)
        path.unlink()
        return values

    def close(self) -> None:
        self.memory.clear()
        self.files.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def _run_node(gm: fx.GraphModule, node: fx.Node, env: dict, attributes: dict, device=None, precision=None):
    def value(arg: fx.Node):
        return attributes[arg.target] if arg.op == "get_attr" else env[arg.name]

    args, kwargs = map_arg(node.args, value), map_arg(node.kwargs, value)
    if device is not None:      # the device literals torch.export wrote (arange(device=cpu), ...)
        args, kwargs = pytree.tree_map_only(torch.device, lambda _: device, (args, kwargs))
    if node.op == "call_function":
        return call_widened(node.target, args, kwargs, precision)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    if node.op == "output":
        return args[0]
    raise PassError(f"cannot run node {node.name} ({node.op}) segment by segment")


class ResidentWeights:
    """The weight source of a model in memory: each attribute is the module's own tensor."""

    resident = True

    def fetch(self, gm: fx.GraphModule, targets) -> dict:
        return {target: get_attribute(gm, target) for target in targets}

    def tensor(self, gm: fx.GraphModule, value: torch.Tensor, name: str = "") -> torch.Tensor:
        return value


def _moved(value, device):
    if device is None or not isinstance(value, torch.Tensor) or value.device == device:
        return value
    moved = value.detach().to(device)
    return moved.requires_grad_() if value.requires_grad and moved.is_floating_point() else moved


class _Attributes:
    """A segment's attributes as the runner needs them: fetched, moved, widened (module docstring)."""

    def __init__(self, gm, weights, device, dtype, narrow: set) -> None:
        self.gm, self.weights, self.device, self.dtype, self.narrow = gm, weights, device, dtype, narrow
        self.cache: dict = {}           # resident weights on another device: moved once

    def of(self, segment: Segment) -> dict:
        if self.weights.resident and self.device is not None:
            missing = [t for t in segment.attributes if t not in self.cache]
            self.cache.update({t: _moved(v, self.device) for t, v in self.weights.fetch(self.gm, missing).items()})
            fetched = {t: self.cache[t] for t in segment.attributes}
        else:
            fetched = {t: _moved(v, self.device) for t, v in self.weights.fetch(self.gm, segment.attributes).items()}
        if self.dtype is None:
            return fetched
        # one tensor at a time, each stored tensor let go as its wide copy is made: a segment
        # read on demand is resident once as stored and once widened tensor by tensor, not whole
        wide = {}
        for target in list(fetched):
            value = fetched.pop(target)
            wide[target] = value if target in self.narrow else widen(value, self.dtype)
        return wide

    def held_bytes(self, segment: Segment) -> int:
        """The bytes ``of(segment)`` holds, from the attributes' shapes (nothing read)."""
        total = 0
        for target in segment.attributes:
            value = get_attribute(self.gm, target)
            if not isinstance(value, torch.Tensor):
                continue
            wide = self.dtype is not None and target not in self.narrow and value.dtype in HALF_DTYPES
            total += math.prod(value.shape) * (self.dtype.itemsize if wide else value.element_size())
        return total


def _run_segment(gm, segment: Segment, env: dict, attributes: dict, observe, device, precision):
    """Run ``segment``'s nodes in ``env``; return the output node's value (None before the end)."""
    result = None
    for node in segment.nodes:
        if node.op != "placeholder":
            env[node.name] = _run_node(gm, node, env, attributes, device, precision)
        if node.op == "output":
            result = env.pop(node.name)
            continue
        if observe is not None:
            observe(node, env[node.name], env)
        for dead in segment.free.get(node.name, ()):
            env.pop(dead, None)
    return result


def _ticker(progress, total: int):
    """A ``tick()`` advancing ``progress(range(total))`` (a tqdm bar shows its count only when
    it refreshes: ``update`` it), and a ``close()``."""
    if progress is None:
        return lambda: None, lambda: None
    bar = progress(range(total))
    if hasattr(bar, "update"):
        return lambda: bar.update(1), getattr(bar, "close", lambda: None)
    steps = iter(bar)
    return lambda: next(steps, None), lambda: None


def run_segments(gm: fx.GraphModule, batches, weights, store: BoundaryStore | None = None,
                 observe=None, progress=None, device=None, dtype=None, wanted=None,
                 prefetch_bytes: int = PREFETCH_BYTES) -> list:
    """Run every flat input list of ``batches`` through ``gm`` (module docstring); return the
    flat outputs of each batch.

    ``weights``: the weight source. ``observe(node, value, env)`` sees each computed value;
    ``progress(iterable)`` wraps the batches (resident weights) or the segment × batch steps
    (weights read on demand). ``device``: where the nodes run. ``dtype``: what half-precision ops
    compute in — a ``compute_dtype.Precision``, a wide dtype, or None (as they are). ``wanted``: node
    names whose values are needed; only they and what they read run (the outputs then are None).
    ``store``: where boundary values wait between segments (weights read on demand; default: all
    in memory). ``prefetch_bytes``: the largest segment fetched ahead (weights read on demand)."""
    precision = dtype if isinstance(dtype, Precision) else Precision(dtype)
    wide = precision.wide
    segments = plan_segments(gm, wanted)
    live = None if wanted is None else {n.name for s in segments for n in s.nodes}
    device = None if device is None else torch.device(device)
    attributes = _Attributes(gm, weights, device, wide, narrow_attributes(gm, precision, live) if wide else set())
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]

    def first_env(flat) -> dict:
        flat = [_moved(v, device) for v in flat]
        return dict(zip(placeholders, flat if wide is None else widen(flat, wide)))

    if weights.resident:
        outputs = []
        for flat in batches if progress is None else progress(batches):
            env = first_env(flat)
            for segment in segments:
                result = _run_segment(gm, segment, env, attributes.of(segment), observe, device, precision)
            outputs.append(result)
            del env
        return outputs
    batches = list(batches)
    if not batches:
        return []                   # nothing to run: read no weights
    outputs: list = [None] * len(batches)
    store = BoundaryStore(2**62) if store is None else store
    tick, close = _ticker(progress, len(segments) * len(batches))
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="subclone-prefetch") as ahead:
            pending = None
            for k, segment in enumerate(segments):
                fetched = attributes.of(segment) if pending is None else pending.result()
                following = segments[k + 1] if k + 1 < len(segments) else None
                fits = (prefetch_bytes > 0 and following is not None
                        and attributes.held_bytes(following) <= prefetch_bytes)
                pending = ahead.submit(attributes.of, following) if fits else None
                for b, flat in enumerate(batches):
                    env = first_env(flat) if k == 0 else store.take(b)
                    outputs[b] = _run_segment(gm, segment, env, fetched, observe, device, precision)
                    if following is not None:
                        store.put(b, {name: env[name] for name in segment.keep})
                    del env
                    tick()
                del fetched
    finally:
        store.close()
        close()
    return outputs
