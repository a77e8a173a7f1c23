"""Planting dead structure in a traced, analysed model, and comparing outputs: what the
equivalence checks of the tests and of the family sweep (``benchmarks/family_sweep.py``) share.

Planting uses the model's own channel analysis only to *find* the tensors that touch a channel;
the checks then verify numerically that removing the planted channels changes nothing — a wrong
grouping or index map makes the dead structure not dead, and fails.
"""
from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from subclone_graph.passes.analysis.keep_sets import derive_keep
from subclone_graph.passes.fx_utils import get_attribute, module_path, tensor_shape
from subclone_graph.passes.state import channel_groups

__all__ = ["output_tensor", "run", "relative_error", "groups_of", "plant_dead", "plant_dead_per_expert",
           "plant_dead_heads", "plant_dead_head_share", "heads_share_values", "centring_norm_over"]


def output_tensor(out) -> torch.Tensor:
    """The main output: logits / last hidden state / the tensor itself."""
    for name in ("logits", "last_hidden_state"):
        if hasattr(out, name):
            return getattr(out, name)
    leaves = [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
    return leaves[0]


def run(module, inputs) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(module(*inputs))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def groups_of(gm, kind: str) -> list:
    return [g for g in gm.meta["subclone.channel_graph"].groups.values() if g.kind == kind]


def plant_dead(gm, dead: dict[int, list[int]], sizes: dict[int, int] | None = None) -> None:
    """Zero, in the traced ``gm``, every tensor index the given dead indices of groups reach."""
    graph = gm.meta["subclone.channel_graph"]
    keep = {g: torch.tensor([i for i in range(graph.groups[g].size) if i not in set(d)]) for g, d in dead.items()}
    keep, _ = derive_keep(graph, keep, sizes or {})
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op != "get_attr":
                continue
            tensor = get_attribute(gm, node.target)
            for d, g in enumerate(channel_groups(node)):
                if g in keep and len(keep[g]) < graph.groups[g].size:
                    mask = torch.ones(tensor.shape[d], dtype=torch.bool)
                    mask[keep[g]] = False
                    index = [slice(None)] * tensor.dim()
                    index[d] = mask
                    tensor[tuple(index)] = 0


def plant_dead_per_expert(gm, dead: dict[int, list[list[int]]]) -> None:
    """Zero, in the traced ``gm``, the dead neurons of each expert: ``dead[group][e]`` are expert
    ``e``'s dead indices of a group with one order per expert (every expert as many)."""
    from subclone_graph.passes.analysis.expert_orders import expert_dim

    graph = gm.meta["subclone.channel_graph"]
    keep = {g: torch.tensor([[i for i in range(graph.groups[g].size) if i not in set(row)] for row in rows])
            for g, rows in dead.items()}
    keep, _ = derive_keep(graph, keep, {})
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op != "get_attr":
                continue
            tensor, channels = get_attribute(gm, node.target), channel_groups(node)
            for d, g in enumerate(channels):
                if g not in keep or keep[g].dim() != 2:
                    continue
                experts = expert_dim(graph, g, channels)
                moved = tensor.movedim((experts, d), (0, 1))
                for e, kept in enumerate(keep[g]):
                    mask = torch.ones(moved.shape[1], dtype=torch.bool)
                    mask[kept] = False
                    moved[e, mask] = 0


def plant_dead_heads(gm, per_site: int = 1) -> tuple[int, int]:
    """Kill the last ``per_site`` kv groups (GQA) or query heads (MHA) in every attention op.

    Returns (heads, kv_heads) to ask for so that exactly the dead ones go."""
    return _plant_heads(gm, lambda width: per_site)


def plant_dead_head_share(gm) -> float | None:
    """Kill the last half of the kv groups (GQA) or query heads (MHA) of every attention op — for a
    model whose attention ops differ in width, where no absolute count fits them all. Returns 0.5,
    to ask as ``heads`` and ``kv_heads`` (each op keeps half of its own), or None (nothing planted)
    where a width is odd: half of it is no whole number of heads."""
    graph = gm.meta["subclone.channel_graph"]
    sites = gm.meta["subclone.attention"]
    if any(graph.groups[s.heads if s.rep is None else s.kv_heads].size % 2 for s in sites):
        return None
    _plant_heads(gm, lambda width: width // 2)
    return 0.5


def _plant_heads(gm, dead_of) -> tuple[int, int]:
    """Kill the last ``dead_of(width)`` kv groups (GQA) or query heads (MHA) of each attention op,
    its width being its count of them; (heads, kv_heads) left in the last op."""
    graph = gm.meta["subclone.channel_graph"]
    dead, sizes = {}, {}
    heads = kv_heads = None
    for site in gm.meta["subclone.attention"]:
        n_heads, n_kv = graph.groups[site.heads].size, graph.groups[site.kv_heads].size
        if site.rep is None:
            per_site = dead_of(n_heads)
            dead[site.heads] = list(range(n_heads - per_site, n_heads))
            heads = kv_heads = n_heads - per_site
        else:
            rep, per_site = n_heads // n_kv, dead_of(n_kv)
            dead[site.kv_heads] = list(range(n_kv - per_site, n_kv))
            dead[site.heads] = ([i * n_kv + g for i in range(rep) for g in dead[site.kv_heads]]
                                if site.rep_outer else list(range((n_kv - per_site) * rep, n_heads)))
            sizes[site.rep] = rep
            heads, kv_heads = (n_kv - per_site) * rep, n_kv - per_site
    plant_dead(gm, dead, sizes)
    return heads, kv_heads


def heads_share_values(gm, site) -> bool:
    """Whether an attention op's keys or values reach its heads by broadcasting one copy over them
    (multi-query attention: one key/value head, ``expand``ed to every query head, the analysis
    seeing one heads group). Such a head's output mixes the shared values: zeroing its query and
    output weights makes it dead to the model's output but not to an activation score, so a
    calibrated subclone need not pick it — planting it dead checks nothing."""
    nodes = {n.name: n for n in gm.graph.nodes}
    todo = [a for a in nodes[site.node].args[1:3] if isinstance(a, torch.fx.Node)]
    seen = set()
    while todo:
        node = todo.pop()
        if node in seen or site.heads not in channel_groups(node):
            continue
        seen.add(node)
        if node.target is torch.ops.aten.expand.default:
            source, out = tensor_shape(node.args[0]) or (), tensor_shape(node) or ()
            offset = len(out) - len(source)
            if any(source[d - offset] == 1 != out[d] for d, g in enumerate(channel_groups(node))
                   if g == site.heads and d >= offset):
                return True
        todo.extend(node.all_input_nodes)
    return False


_CENTRING_NORMS = (torch.ops.aten.layer_norm.default, torch.ops.aten.native_layer_norm.default)


def centring_norm_over(gm, group_id: int) -> str | None:
    """The module of a LayerNorm whose normalised dims hold ``group_id`` or a width built from it (a
    QK-norm over a whole ``heads·head_dim`` projection), if any. A LayerNorm subtracts the mean over
    those dims: a zeroed channel still counts in that mean (and in the variance, as the mean's
    square), so removing it changes what the norm gives every kept channel — unlike RMSNorm, no
    rescale makes that exact. Planting such channels dead checks nothing exact."""
    graph = gm.meta["subclone.channel_graph"]
    wanted = {graph.find(group_id)} | graph.composites_containing(group_id)
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _CENTRING_NORMS:
            continue
        normalised = channel_groups(node.args[0])[-len(node.args[1]):]
        if wanted & {graph.find(g) for g in normalised}:
            return module_path(node)
    return None
