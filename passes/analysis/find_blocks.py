"""Find the residual blocks (the branches f in ``x + f(x)``) and group them into layers.

A residual add is an ``add`` of two tensors of one shape where one operand ``x`` is an
ancestor of the other ``f(x)`` and the path between them reads a weight matrix (so the
tanh-GELU's ``x + 0.044715 x³`` is not a block), and that the output reads (an unused stream's
last update is dead code, no block). Blocks are grouped into layers by the
innermost module that contains every node of the branch (or the add itself) and is an item
of a container (a module path ending in an integer: ``ModuleList`` and ``Sequential``
children) — ``x = x + block(x)`` written outside the block finds the block too; without such
a module, each block is its own layer. Blocks whose container item lies inside another block's
(a bottleneck layer's inner blocks, in a list of their own) belong to that outer layer.

A layer has one stream input (the skip operand of its first block whose skip comes from outside
the layer — in a bottleneck layer, blocks at an inner width come first —, followed back out of the
layer through casts and copies; a skip computed inside the layer, after a branch without weights
that is no block, is followed back to the one value of its shape entering the layer) and one stream output (its last add of the input's width, followed forward through
same-shape ops and views still inside the layer, to the last node with the input's shape: a
post-norm layer ends in its norm, a layer that flattens the stream to (b·s, h) ends where it
views it back; when the stream still goes on inside the layer after that — a decomposed
post-norm reads the add twice — the one later node of the input's shape read outside the layer). A skip operand that is a cast of the stream made beside the branch (a residual
kept in fp32), or the stream times a learned per-channel gain or a number (``w * x + f(x)``), is
followed back through the cast and the gain when looking for the branch. Removing the layer
is replacing uses of its output by its input.

Writes ``gm.meta["subclone.layers"]``: a list of ``Layer``; modifies nothing.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from .. import state
from ..fx_utils import (CASTS, VIEWS, attribute_path, container_item, in_module, layer_key, module_paths, tensor_shape,
                        weight_attribute)
from ..errors import PostconditionError
from ..infra import SubclonePass
from ..state import Layer, ResidualBlock

__all__ = ["FindResidualBlocksPass", "find_layers", "layer_of_node"]


def _block_key(add: fx.Node, region: set[fx.Node]) -> str | None:
    """The innermost container item holding the add, or else holding the whole branch."""
    key = layer_key(add)
    if key is not None:
        return key
    stacks = [module_paths(n) for n in region if n.op == "call_function" and module_paths(n)]
    if not stacks:
        return None
    common = [p for p in stacks[0] if all(p in other for other in stacks[1:])]
    return next((p for p in reversed(common) if container_item(p) is not None), None)


def layer_of_node(node: fx.Node, index_of_key: dict[str, int]) -> int | None:
    """The index of the layer whose module holds ``node``, if any."""
    return next((index_of_key[p] for p in reversed(module_paths(node)) if p in index_of_key), None)


def _ancestor_region(start: fx.Node, stop: fx.Node, order: dict) -> set[fx.Node] | None:
    """Nodes between ``stop`` and ``start`` (backwards); None when ``stop`` is not an ancestor."""
    seen, frontier, found = set(), [start], False
    while frontier:
        node = frontier.pop()
        for arg in node.all_input_nodes:
            if arg is stop:
                found = True
            elif arg not in seen and order[arg] > order[stop]:
                seen.add(arg)
                frontier.append(arg)
    return seen | {start} if found else None


def _reads_weight(region: set[fx.Node]) -> bool:
    for node in region:
        for arg in node.all_input_nodes:
            shape = tensor_shape(arg)
            if arg.op == "get_attr" and shape is not None and len(shape) >= 2:
                return True
    return False


def _residual_block(node: fx.Node, order: dict) -> tuple[ResidualBlock, str | None] | None:
    if node.target is not torch.ops.aten.add.Tensor or len(node.args) < 2:
        return None
    a, b = node.args[0], node.args[1]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    # both operands of the output's own shape: a broadcast (1, 1, h) + (b, s, h) is no residual
    shape = tensor_shape(node)
    if shape is None or tensor_shape(a) != shape or tensor_shape(b) != shape:
        return None
    for skip, branch in ((a, b), (b, a)):
        # the skip may be a cast of the stream made beside the branch (a residual kept in fp32), or
        # the stream scaled by a learned gain or a constant (``w * x + f(x)``)
        source = _uncast(_unscaled(skip))
        region = _ancestor_region(branch, source, order)
        if region is not None and _reads_weight(region):
            return ResidualBlock(node.name, skip.name, branch.name), _block_key(node, region)
    return None


def _unscaled(node: fx.Node) -> fx.Node:
    """``x`` for ``w * x`` (or ``x * w``) where ``w`` is a number or a module attribute (read through
    casts and views) no bigger than ``x`` — a per-channel gain on the skip; else ``node``."""
    if node.op != "call_function" or node.target is not torch.ops.aten.mul.Tensor or len(node.args) != 2:
        return node
    shape = tensor_shape(node)
    for x, w in (node.args, reversed(node.args)):
        if not isinstance(x, fx.Node) or tensor_shape(x) != shape:
            continue
        if isinstance(w, (int, float)) and not isinstance(w, bool):
            return x
        gain = tensor_shape(w) if weight_attribute(w) is not None else None
        if gain is not None and len(gain) <= len(shape) and isinstance(shape[-1], int) and math.prod(gain) <= shape[-1]:
            return x
    return node


def _uncast(node: fx.Node) -> fx.Node:
    while node.op == "call_function" and node.target in CASTS and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def find_layers(gm: fx.GraphModule) -> list[Layer]:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    nodes = {n.name: n for n in gm.graph.nodes}
    grouped: list[tuple[str | None, list[ResidualBlock]]] = []
    live = _live(gm)
    found = [f for f in (_residual_block(node, order) for node in gm.graph.nodes if node in live) if f is not None]
    outermost = _outermost_keys({key for _, key in found if key is not None})
    for block, key in found:
        key = outermost.get(key, key)
        if grouped and key is not None and grouped[-1][0] == key:
            grouped[-1][1].append(block)
        else:
            grouped.append((key, [block]))
    layers = []
    for index, (key, blocks) in enumerate(grouped):
        first, last = _stream_blocks(blocks, nodes, key)
        stream_in = _stream_input(nodes[first.skip], key)
        stream_out = _stream_output(nodes[last.add], key, tensor_shape(stream_in))
        layers.append(Layer(index, key, tuple(blocks), stream_in.name, stream_out.name))
    return layers


def _live(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes the graph's output or a write reads: an add nothing reads (a second stream's last
    update, unused after the last layer) is no block — removing a layer erases it as dead code."""
    roots = [n for n in gm.graph.nodes if n.op == "output" or (
        n.op == "call_function" and getattr(getattr(n.target, "_schema", None), "is_mutable", False))]
    live, frontier = set(roots), list(roots)
    while frontier:
        for source in frontier.pop().all_input_nodes:
            if source not in live:
                live.add(source)
                frontier.append(source)
    return live


def _stream_blocks(blocks: list[ResidualBlock], nodes: dict, key: str | None) -> tuple:
    """The layer's first and last block on the stream it was given: the first whose skip comes from
    outside the layer, and the last of that width. A bottleneck layer (the stream projected down,
    residual blocks at the inner width, projected back up and added to the layer's input) has
    inner blocks of another width: they stay blocks (their width is a residual group of its own)
    but do not bound the layer."""
    outer = [b for b in blocks if not in_module(_uncast(nodes[b.skip]), key)]
    first = outer[0] if outer else blocks[0]
    shape = tensor_shape(nodes[first.add])
    last = [b for b in blocks if tensor_shape(nodes[b.add]) == shape][-1]
    return first, last


def _outermost_keys(keys: set[str]) -> dict[str, str]:
    """Each key nested in another's module (blocks in a container inside a layer: a bottleneck
    layer's inner blocks) mapped to the outermost such key: the layer holds them."""
    def inside(inner: str, outer: str) -> bool:
        return inner != outer and attribute_path(inner).startswith(attribute_path(outer) + ".")
    return {k: min((o for o in keys if inside(k, o)), key=len) for k in keys if any(inside(k, o) for o in keys)}


def _stream_input(node: fx.Node, key: str | None) -> fx.Node:
    while node.op == "call_function" and node.target in CASTS and in_module(node, key):
        node = node.args[0]
    if node.op == "call_function" and in_module(node, key):
        return _entering(node, key) or node
    return node


def _entering(node: fx.Node, key: str | None) -> fx.Node | None:
    """The one value of ``node``'s shape that enters the layer and that ``node`` is computed
    from, where the skip of the layer's first block is computed inside the layer (a branch
    without weights before it — a Fourier mixing sublayer — is no block, so the first block's
    skip is that sublayer's output); None when there is not exactly one."""
    shape, seen, frontier, entering = tensor_shape(node), {node}, [node], set()
    while frontier:
        current = frontier.pop()
        for source in current.all_input_nodes:
            if source in seen:
                continue
            seen.add(source)
            if source.op == "call_function" and in_module(source, key):
                frontier.append(source)
            elif tensor_shape(source) == shape:
                entering.add(source)
    return next(iter(entering)) if len(entering) == 1 else None


def _stream_output(node: fx.Node, key: str | None, input_shape) -> fx.Node:
    """The last add, followed through the layer's single-use tail of same-shape ops and views;
    the output is the last node there with the input's shape (a layer that works on the
    stream flattened to (b·s, h) views it back at its end)."""
    shape, output = tensor_shape(node), node
    while len(node.users) == 1:
        user = next(iter(node.users))
        user_shape = tensor_shape(user)
        if not in_module(user, key) or user_shape is None:
            break
        if user_shape != shape and not (user.target in VIEWS and math.prod(user_shape) == math.prod(shape)):
            break
        node, shape = user, user_shape
        if user_shape == input_shape:
            output = user
    return _leaving(output, key, input_shape)


def _leaving(output: fx.Node, key: str | None, input_shape) -> fx.Node:
    """A layer whose stream goes on inside it after ``output`` (a post-norm layer ending in a
    decomposed norm, ``x · rsqrt(mean x²) · (1 + w)``, reads its last add more than once) leaves
    through the one later node of the input's shape that is read outside the layer."""
    if key is None or not any(in_module(u, key) for u in output.users):
        return output
    later, node = [], output.next
    while node.op != "root":
        if in_module(node, key) and tensor_shape(node) == input_shape and \
                any(not in_module(u, key) for u in node.users):
            later.append(node)
        node = node.next
    return later[0] if len(later) == 1 else output



class FindResidualBlocksPass(SubclonePass):
    """Analysis: residual blocks and layers into ``state.LAYERS``; the first analysis, so it
    clears every analysis and rewrite key an earlier run left (a child analysed again)."""

    clears = "blocks"

    def run(self, gm: fx.GraphModule) -> bool:
        layers = tuple(find_layers(gm))
        state.LAYERS.set(gm, layers)
        # the depth of the model analysed: a checkpoint's per-layer config lists have this length
        state.PARENT_LAYER_COUNT.set(gm, len(layers))
        return False

    def ensures(self, graph_module: fx.GraphModule) -> None:
        names = {n.name for n in graph_module.graph.nodes}
        for layer in state.LAYERS.need(graph_module):
            missing = [n for n in (layer.input, layer.output) if n not in names]
            if missing:
                raise PostconditionError(f"FindResidualBlocksPass: layer {layer.index} names missing node {missing[0]}")
