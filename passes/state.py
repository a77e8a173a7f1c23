"""The pass state: every metadata key the passes share, named once, typed, with its owner.

Passes talk only through these keys. Each ``StateKey`` says where it lives (``gm.meta`` for a
graph key, ``node.meta`` for a node key — the two never share a name), the type of its value,
the pass that writes it and the passes that read it. ``docs/PIPELINES.md`` holds the same table
(``pipeline_table()`` renders it; a test checks that the two agree).

Lifetimes. Keys are ordered by the pipeline ``STAGES``. An analysis pass clears every key of its
own stage and of every later stage before it writes (``clear_from``), on the graph and on every
node, so nothing it reads was left by an earlier run on another graph: a child subcloned again
is analysed from scratch. Values are never mutated in place — ``copy.deepcopy`` of a
``GraphModule`` copies ``node.meta`` shallowly, so a list appended to would be appended to in
the parent as well: values are frozen dataclasses and tuples, replaced whole.

Vertex and group ids. Ids of a ``ChannelGraph`` mean something only in that graph. Every node
value holding them carries the ``token`` of the analysis run that made them, and reading one
against another graph raises ``StaleStateError`` instead of returning ids that point elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, Mapping, TypeVar

import torch.fx as fx

from .errors import PreconditionError, StaleStateError

__all__ = [
    "StateKey", "STAGES", "KEYS", "clear_from", "pipeline_table", "channel_groups",
    "Layer", "ResidualBlock", "AttentionSite", "Rescale", "SizeChange", "track_origin",
    "SizeOffset", "NodeChannels", "NodeLiterals", "NodeReduces", "NodeSliceParts", "NodeAttention", "NodeExpertRows",
    "EXAMPLE_INPUTS", "INPUT_GUARDS", "INPUT_SIZES", "PARENT_CLASS", "PARENT_CONFIG", "PARENT_LAYER_COUNT", "LAYERS",
    "CHANNEL_GRAPH",
    "ATTENTION", "UNKNOWN_OPS", "SCORES", "SCORE_SOURCE", "LAYER_RATIOS", "TARGET", "KEEP", "SIZES",
    "SIZE_CHANGES", "FOLDED", "DROP", "DUPLICATE", "RESCALE", "CLONED_READS", "TENSOR_ORIGINS",
    "CHANNELS", "LITERALS", "REDUCES", "SLICE_PARTS", "ATTENTION_OP", "EXPERT_ROWS", "CONTRACTS", "PICKS",
    "NodePick",
]

T = TypeVar("T")
_MISSING = object()

# Pipeline stages, in order; an analysis pass clears its stage and all later ones.
STAGES = ("trace", "blocks", "channels", "scores", "choice", "rewrite")


# ----- typed values -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ResidualBlock:
    add: str        # the node computing x + f(x)
    skip: str       # x
    branch: str     # f(x)


@dataclass(frozen=True)
class Layer:
    index: int
    key: str | None                      # module path of the layer, when there is one
    blocks: tuple[ResidualBlock, ...] = ()
    input: str = ""                      # the stream entering the layer
    output: str = ""                     # the stream leaving it


@dataclass(frozen=True)
class AttentionSite:
    """One attention op: its group ids in ``CHANNEL_GRAPH`` (``rep``: query heads per kv head,
    None without GQA), the node, and the layer it is in. ``rep_outer``: the query heads are
    ``rep × kv_heads`` (head ``i·n_kv + g`` reads kv head ``g``, keys repeated whole) rather than
    ``kv_heads × rep`` (head ``g·rep + i``)."""

    node: str
    heads: int
    kv_heads: int
    rep: int | None
    head_dim: int
    layer: int | None
    rep_outer: bool = False


@dataclass(frozen=True)
class Rescale:
    factor: float        # √(D/d) of the residual stream
    eps_scale: float     # D/d: what the ε added to a shrunk statistic was multiplied by
    inserted: tuple[str, ...] = ()   # the modules of the norms after which a ``mul`` was inserted
    # every ε scaled: (the node holding it, the node whose values the norm normalises, the scale)
    eps: tuple[tuple[str, str, float], ...] = ()


@dataclass(frozen=True)
class SizeChange:
    """One channel group of a target kind, from the parent's size to the child's."""

    kind: str
    group: int
    layer: int | None
    parent: int
    child: int


@dataclass(frozen=True)
class NodeChannels:
    token: int                   # the ChannelGraph the ids belong to
    groups: tuple[int, ...]      # group id of each dim of the node's tensor


@dataclass(frozen=True)
class SizeOffset:
    """A literal that is a group's size plus ``offset`` (``-1``: its last index), or the sizes of
    several groups added up (a ``tensor_split`` boundary: the pieces before it)."""

    vertex: int | tuple[int, ...]
    offset: int


@dataclass(frozen=True)
class NodeLiterals:
    token: int
    vertices: Mapping[int | str, Any]  # argument index (or keyword name) -> vertex (or tuple of vertices, or SizeOffset) whose size it holds


@dataclass(frozen=True)
class NodeReduces:
    token: int
    vertices: tuple[int, ...]    # dims of the input a reduction averages over


@dataclass(frozen=True)
class NodeSliceParts:
    token: int
    before: int
    inside: int
    after: int


@dataclass(frozen=True)
class NodePick:
    """A node whose values depend on its length (a static ``arange``): it keeps the parent's
    length, and the child reads the kept indices of ``vertex``'s group along ``dim``, picked
    right after it."""

    token: int
    vertex: int
    dim: int


@dataclass(frozen=True)
class NodeAttention:
    token: int
    heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class NodeExpertRows:
    """A grouped (mixture-of-experts) matmul: the rows of ``input`` are sorted by expert, expert
    ``e`` owning rows ``offsets[e-1]:offsets[e]``; ``experts`` is the vertex of the weight's expert
    dim, ``rows`` the input's row dim, ``channels`` the weight's in and out dims (whose order may
    differ per expert)."""

    token: int
    input: str
    offsets: str
    experts: int
    rows: int
    channels: tuple[int, ...]


@dataclass(frozen=True)
class NodeContracts:
    """A contraction (a matmul, linear, convolution, einsum): the vertices of the contracted
    dims of its activation operand, that operand's position among the node's tensor arguments
    (``RuleContext.tensor_args``: positions, not names, stay right in a copied layer), and the
    operand on the other side (``weight``: its position, a module attribute read through views
    and casts; ``None`` when the other side is an activation too) with its contracted dims."""

    token: int
    vertices: tuple[int, ...]
    operand: int | None
    weight: int | None
    weight_dims: tuple[int, ...]


# ----- keys -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StateKey(Generic[T]):
    name: str
    scope: str                   # "graph" (gm.meta) or "node" (node.meta)
    stage: str                   # one of STAGES: when it is written, and cleared
    type: str
    writer: str
    readers: tuple[str, ...] = ()
    doc: str = ""

    def _meta(self, owner) -> dict:
        if self.scope == "graph" and not isinstance(owner, fx.Node):
            return owner.meta
        if self.scope == "node" and isinstance(owner, fx.Node):
            return owner.meta
        raise TypeError(f"{self.name} is a {self.scope} key; got {type(owner).__name__}")

    def get(self, owner, default=None) -> T:
        return self._meta(owner).get(self.name, default)

    def need(self, owner) -> T:
        meta = self._meta(owner)
        if self.name not in meta:
            raise PreconditionError(f"metadata {self.name!r} is missing: run {self.writer} first")
        return meta[self.name]

    def has(self, owner) -> bool:
        return self.name in self._meta(owner)

    def set(self, owner, value: T) -> None:
        self._meta(owner)[self.name] = value

    def clear(self, owner) -> None:
        self._meta(owner).pop(self.name, None)

    def of(self, node: fx.Node, graph, default=None):
        """A node value made against ``graph`` (a ChannelGraph); a value from another analysis
        run is an error, not a silent mix of ids."""
        value = self._meta(node).get(self.name, _MISSING)
        if value is _MISSING:
            return default
        if value.token != graph.token:
            raise StaleStateError(f"node {node.name}: {self.name} was written against another channel graph "
                                  f"(run {self.writer} again)")
        return value


def _graph(name, stage, type_, writer, readers, doc) -> StateKey:
    return StateKey(f"subclone.{name}", "graph", stage, type_, writer, tuple(readers), doc)


def _node(name, stage, type_, writer, readers, doc) -> StateKey:
    return StateKey(f"subclone.node.{name}", "node", stage, type_, writer, tuple(readers), doc)


EXAMPLE_INPUTS = _graph("example_inputs", "trace", "tuple[Tensor, ...]", "trace",
                        ["save", "save_hf", "export checks"], "the inputs the model was traced with")
INPUT_GUARDS = _graph("input_guards", "trace", "tuple[str, ...]", "trace",
                      ["subclone", "subclone_checkpoint"],
                      "guards confining the traced inputs' sizes where the eager model ran (input_guards)")
INPUT_SIZES = _graph("input_sizes", "trace", "dict[tuple[str, int], tuple[int, ...]]", "trace",
                     ["subclone_graph.input_sizes (family checks, save_hf's second size)"],
                     "per input axis a confining guard names: the sizes 2..64 it still runs at (allowed_sizes)")
PARENT_CLASS = _graph("parent_class", "trace", "type", "trace", ["save_hf"], "the traced model's class")
PARENT_CONFIG = _graph("parent_config", "trace", "PretrainedConfig", "trace (subclone: the child's derived one)",
                       ["save_hf"], "the Hugging Face config of the model subcloned")
PARENT_LAYER_COUNT = _graph("parent_layer_count", "blocks", "int", "FindResidualBlocksPass", ["save_hf"],
                            "layers of the model analysed, before any was dropped or repeated")
LAYERS = _graph("layers", "blocks", "tuple[Layer, ...]", "FindResidualBlocksPass",
                ["AnalyzeChannelsPass", "ScoreChannelsPass", "ChooseKeepPass", "DropBlocksPass",
                 "DuplicateLayersPass", "save_hf"], "residual layers in order (DropBlocks / DuplicateLayers renew it)")
CHANNEL_GRAPH = _graph("channel_graph", "channels", "ChannelGraph", "AnalyzeChannelsPass",
                       ["ScoreChannelsPass", "ChooseKeepPass", "KeepChannelsPass", "RescaleResidualPass", "save_hf"],
                       "vertices, relations and channel groups (the parent's sizes)")
ATTENTION = _graph("attention", "channels", "tuple[AttentionSite, ...]", "AnalyzeChannelsPass",
                   ["ChooseKeepPass", "DropBlocksPass", "DuplicateLayersPass"], "attention sites, one per op")
UNKNOWN_OPS = _graph("unknown_ops", "channels", "tuple[str, ...]", "AnalyzeChannelsPass", ["subclone inspect"],
                     "ops without a rule (their dims are frozen)")
SCORES = _graph("scores", "scores", "dict[int, Tensor]", "ScoreChannelsPass", ["ChooseKeepPass"],
                "per-channel score of every residual, ffn, latent and heads group (float64); "
                "(experts, channels) for a group with one order per expert")
SCORE_SOURCE = _graph("score_source", "scores", "str", "ScoreChannelsPass", ["subclone inspect"],
                      "calibration activations or weight magnitude")
LAYER_RATIOS = _graph("layer_ratios", "scores", "tuple[float, ...]", "ScoreChannelsPass",
                      ["ChooseKeepPass (depth='measured')"], "‖f(x)‖/‖x+f(x)‖ per layer")
TARGET = _graph("target", "choice", "Target", "ChooseKeepPass", ["ChooseKeepPass.ensures", "save_hf"],
                "the target the child was made for")
KEEP = _graph("keep", "choice", "dict[int, LongTensor]", "ChooseKeepPass", ["KeepChannelsPass"],
              "kept indices of every group that shrinks; (experts, kept) for one order per expert")
SIZES = _graph("sizes", "choice", "dict[int, int]", "ChooseKeepPass",
               ["KeepChannelsPass", "RescaleResidualPass", "save_hf"], "the child's size of every static group")
SIZE_CHANGES = _graph("size_changes", "choice", "tuple[SizeChange, ...]", "ChooseKeepPass", ["save_hf"],
                      "parent → child size of every residual / ffn / latent / heads / kv_heads / head_dim group")
FOLDED = _graph("folded", "choice", "dict[int, int]", "ChooseKeepPass", ["ScaleClonedReadsPass", "RescaleResidualPass"],
                "groups whose removed indices are exact copies of kept ones: the copies each kept index stands for")
DROP = _graph("drop", "choice", "tuple[int, ...]", "ChooseKeepPass", ["DropBlocksPass"],
              "layer indices to remove (emptied once removed)")
DUPLICATE = _graph("duplicate", "choice", "tuple[int, ...]", "ChooseKeepPass", ["DuplicateLayersPass"],
                   "layer indices to repeat (emptied once repeated)")
RESCALE = _graph("rescale", "rewrite", "Rescale", "RescaleResidualPass", ["save_hf"],
                 "the residual's √(D/d) and the ε scale")
CLONED_READS = _graph("cloned_reads", "rewrite", "dict[int, float]", "ScaleClonedReadsPass", ["ScaleClonedReadsPass"],
                      "the factor every weight contracting a grown (1/copies) or folded (copies) group took")
TENSOR_ORIGINS = _graph("tensor_origins", "trace", "dict[int, tuple[Tensor, EditProgram]]",
                        "weightless_parent (a streamed parent); tensor_edits.edit_tensor in the rewrites",
                        ["CheckpointWeights (calibration, the writer)"],
                        "id(tensor) → (tensor, program): the parent tensor on disk and the edits that make it")

CHANNELS = _node("channels", "channels", "NodeChannels", "AnalyzeChannelsPass",
                 ["ScoreChannelsPass", "KeepChannelsPass", "RescaleResidualPass"], "group of each dim")
LITERALS = _node("literals", "channels", "NodeLiterals", "AnalyzeChannelsPass (op rules)", ["KeepChannelsPass"],
                 "which argument holds which vertex's size")
REDUCES = _node("reduces", "channels", "NodeReduces", "AnalyzeChannelsPass (op rules)", ["RescaleResidualPass"],
                "vertices a reduction averages over")
SLICE_PARTS = _node("slice_parts", "channels", "NodeSliceParts", "AnalyzeChannelsPass (op rules)",
                    ["KeepChannelsPass"], "a slice's (before, inside, after) vertices")
ATTENTION_OP = _node("attention_op", "channels", "NodeAttention", "AnalyzeChannelsPass (op rules)",
                     ["AnalyzeChannelsPass"], "an attention op's heads / kv heads / head dim vertices")

EXPERT_ROWS = _node("expert_rows", "channels", "NodeExpertRows", "AnalyzeChannelsPass (op rules)",
                    ["AnalyzeChannelsPass", "ScoreChannelsPass"], "a grouped matmul's expert-sorted rows and offsets")
CONTRACTS = _node("contracts", "channels", "NodeContracts", "AnalyzeChannelsPass (op rules)",
                   ["ChooseKeepPass", "ScaleClonedReadsPass"], "a contraction's contracted dims and weight operand")
PICKS = _node("picks", "channels", "NodePick", "AnalyzeChannelsPass (op rules)", ["KeepChannelsPass"],
               "a node kept at the parent's length whose kept indices are picked after it")

KEYS: tuple[StateKey, ...] = (
    EXAMPLE_INPUTS, INPUT_GUARDS, INPUT_SIZES, PARENT_CLASS, PARENT_CONFIG, PARENT_LAYER_COUNT, LAYERS, CHANNEL_GRAPH,
    ATTENTION,
    UNKNOWN_OPS, SCORES, SCORE_SOURCE, LAYER_RATIOS, TARGET, KEEP, SIZES, SIZE_CHANGES, FOLDED, DROP, DUPLICATE,
    RESCALE, CLONED_READS, TENSOR_ORIGINS, CHANNELS, LITERALS, REDUCES, SLICE_PARTS, ATTENTION_OP, EXPERT_ROWS,
    CONTRACTS, PICKS,
)


def clear_from(gm: fx.GraphModule, stage: str) -> None:
    """Remove every key of ``stage`` and later stages from the graph and from every node
    (and any other ``subclone.*`` key a node carries from an older version)."""
    later = set(STAGES[STAGES.index(stage):])
    for key in KEYS:
        if key.stage in later and key.scope == "graph":
            key.clear(gm)
    node_keys = [k.name for k in KEYS if k.scope == "node" and k.stage in later]
    for module in gm.modules():
        if isinstance(module, fx.GraphModule):
            for node in module.graph.nodes:
                if any(k in node.meta for k in node_keys):
                    # a fresh dict: a deep copy shares node.meta's values, never mutate them
                    node.meta = {k: v for k, v in node.meta.items() if k not in node_keys}


def pipeline_table() -> str:
    """The keys as a Markdown table (``docs/PIPELINES.md`` holds it)."""
    rows = ["| key | where | type | written by | read by |", "|---|---|---|---|---|"]
    for key in KEYS:
        where = "gm.meta" if key.scope == "graph" else "node.meta"
        rows.append(f"| `{key.name}` | {where} | `{key.type}` | {key.writer} | {', '.join(key.readers)} |")
    return "\n".join(rows)


def channel_groups(node: fx.Node) -> tuple[int, ...]:
    """The group id of each dim of ``node``'s tensor (empty before AnalyzeChannelsPass); for
    reading and tests — passes use ``CHANNELS.of(node, graph)``, which checks the graph."""
    value = CHANNELS.get(node)
    return () if value is None else value.groups


def track_origin(gm: fx.GraphModule, old, new, cuts=(), scale: float | None = None, per_expert=(),
                 offset: float = 0.0) -> None:
    """Record that ``new`` is ``old`` with ``per_expert`` ((dim, 2-D index, experts dim), ...)
    taken, then ``cuts`` ((dim, kept indices), ...), then times ``scale`` plus ``offset``.
    Kept for rewrites written before ``tensor_edits``: a rewrite should describe its edits
    once and call ``tensor_edits.edit_tensor``, which applies and records the same edits."""
    from .tensor_edits import Scale, Take, record_edits

    edits = [Take(dim, kept, rows) for dim, kept, rows in per_expert] + [Take(dim, kept) for dim, kept in cuts]
    record_edits(gm, old, new, edits + ([Scale(scale, offset)] if scale is not None else []))
