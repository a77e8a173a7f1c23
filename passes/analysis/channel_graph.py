"""The channel-dependency graph: which tensor dimensions must be sliced together.

Every dimension of every tensor in the traced graph is a *vertex*. Per-op rules
(``op_rules``) add three kinds of facts about vertices:

1. ``eq(a, b)`` — index ``i`` of ``a`` is index ``i`` of ``b``. Equality edges live in a
   ``networkx.Graph``; its connected components are the **channel groups**.
2. ``factor(w, [p1, p2, ...])`` — ``w`` is the row-major merge of its parts:
   ``w[i1 * |p2| + i2] = (p1[i1], p2[i2])`` (a view of ``heads*head_dim`` as ``heads, head_dim``).
3. ``concat(w, [p1, p2, ...])`` — ``w`` is its parts laid end to end (``cat``, ``split``, a slice).

``solve()`` merges what the facts imply (two views of one group into the same factors
unify those factors; the cut points of all concatenations of one group are refined into
common atoms) and freezes a group whose facts contradict each other. A frozen group, and
every part of a frozen composite, can never be shrunk; the reason says which op froze it.

Keep-sets are decided on a few groups (residual, MLP, heads) and derived for the rest:
a factor composite keeps the Kronecker product of its parts' keep-sets (or, for a factor
that no tensor owns on its own, a per-parent selection — a kv group keeping its best query
heads); a concat composite keeps its parts' keep-sets shifted by their offsets.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import networkx as nx

from ..fx_utils import plain_size

__all__ = ["ChannelGraph", "ChannelGroup", "Relation"]


@dataclass
class Relation:
    kind: str            # "factor" | "concat"
    whole: int
    parts: list[int]
    origin: str          # name of the node whose rule stated it


@dataclass
class ChannelGroup:
    """A connected component of the equality graph, with what the analysis learnt of it."""

    id: int
    size: object                      # int, or a sympy expression for a dynamic axis
    vertices: list[int]
    kind: str = "fixed"               # residual | ffn | latent | heads | kv_heads | head_dim | experts | fixed | dynamic | frozen
    role: str | None = None           # what a frozen group would have been (residual, ffn, ...)
    reason: str | None = None         # why it is frozen
    layer: int | None = None
    tensors: list[tuple[str, int]] = field(default_factory=list)   # (attribute FQN, dim) touching it
    experts: int | None = None        # the expert dim's group, when each expert keeps its own order

    @property
    def static(self) -> bool:
        return isinstance(self.size, int)


_TOKENS = itertools.count(1)


class ChannelGraph:
    """Vertices, relations and, after ``solve()``, channel groups.

    ``token`` names this analysis run: node metadata holding this graph's ids carries it, so that
    ids are never read against another graph (a copy made by ``copy.deepcopy`` keeps it, and
    its nodes keep theirs: they agree)."""

    def __init__(self) -> None:
        self.token = next(_TOKENS)
        self.graph = nx.Graph()
        self._union = nx.utils.UnionFind()
        self.sizes: list[object] = []
        self.labels: list[tuple] = []
        self.vertex_of: dict[tuple, int] = {}
        self.relations: list[Relation] = []
        self.frozen: dict[int, str] = {}
        self.contracted: set[int] = set()      # in-features of a weight contraction
        self.produced: set[int] = set()        # out-features of a weight contraction
        self.groups: dict[int, ChannelGroup] = {}
        self._atoms: dict[tuple, int] = {}
        # values that are indices into a dim: (node name, output index) -> that dim's vertex
        self.pointers: dict[tuple[str, int], int] = {}
        self.histograms: set[str] = set()      # nodes counting, per index of a dim, the values pointing at it
        self.picks: list[tuple[int, int, str]] = []    # (vertex, k, origin): an op picks k indices of the dim

    # ----- building -------------------------------------------------------------------
    def vertex(self, key: tuple, size) -> int:
        v = self.vertex_of.get(key)
        if v is None:
            v = self.fresh(size, key)
            self.vertex_of[key] = v
        return v

    def fresh(self, size, label) -> int:
        v = len(self.sizes)
        self.sizes.append(plain_size(size))
        self.labels.append(label if isinstance(label, tuple) else ("fresh", label))
        self.graph.add_node(v)
        self._union[v]
        return v

    def eq(self, a: int, b: int, origin: str) -> None:
        if a == b:
            return
        if _known_different(self.sizes[a], self.sizes[b]):
            self.freeze(a, f"{origin} equates dims of sizes {self.sizes[a]} and {self.sizes[b]}")
            self.freeze(b, f"{origin} equates dims of sizes {self.sizes[a]} and {self.sizes[b]}")
            return
        self.graph.add_edge(a, b, origin=origin)
        self._union.union(a, b)

    def factor(self, whole: int, parts: list[int], origin: str) -> None:
        parts = [p for p in parts if self.sizes[p] != 1]
        if len(parts) == 1:
            self.eq(whole, parts[0], origin)
        elif parts:
            self.relations.append(Relation("factor", whole, parts, origin))

    def concat(self, whole: int, parts: list[int], origin: str) -> None:
        parts = [p for p in parts if self.sizes[p] != 0]
        if len(parts) == 1:
            self.eq(whole, parts[0], origin)
        elif parts:
            self.relations.append(Relation("concat", whole, parts, origin))

    def freeze(self, v: int, reason: str) -> None:
        self.frozen.setdefault(v, reason)

    def find(self, v: int) -> int:
        return self._union[v]

    # ----- solving --------------------------------------------------------------------
    def solve(self) -> None:
        """Merge implied equalities until nothing changes, then form the groups."""
        for _ in range(100):
            changed = self._merge_factors()
            changed |= self._refine_concats()
            if not changed:
                break
        self._dedupe_relations()
        self._form_groups()
        self._propagate_freezing()

    def _merge_factors(self) -> bool:
        changed = False
        by_whole: dict[int, list[Relation]] = {}
        for rel in self.relations:
            if rel.kind == "factor":
                by_whole.setdefault(self.find(rel.whole), []).append(rel)
        for root, rels in by_whole.items():
            first = rels[0]
            for rel in rels[1:]:
                if len(rel.parts) == len(first.parts) and all(
                    not _known_different(self.sizes[a], self.sizes[b])
                    for a, b in zip(rel.parts, first.parts)
                ):
                    for a, b in zip(rel.parts, first.parts):
                        if self.find(a) != self.find(b):
                            self.eq(a, b, rel.origin)
                            changed = True
                elif root not in self.frozen:
                    self.freeze(root, f"{first.origin} and {rel.origin} split one dimension two ways")
        return changed

    def _refine_concats(self) -> bool:
        changed = False
        by_whole: dict[int, list[Relation]] = {}
        for rel in self.relations:
            if rel.kind == "concat" and all(isinstance(self.sizes[p], int) for p in rel.parts):
                by_whole.setdefault(self.find(rel.whole), []).append(rel)
        for root, rels in by_whole.items():
            cuts = sorted({c for rel in rels for c in self._cuts(rel)})
            spans = list(zip(cuts[:-1], cuts[1:]))
            atoms = [self._atom(root, span) for span in spans]
            for rel in rels:
                offset = 0
                for part in rel.parts:
                    size = self.sizes[part]
                    inside = [a for a, (lo, hi) in zip(atoms, spans) if lo >= offset and hi <= offset + size]
                    offset += size
                    if len(inside) == 1:
                        if self.find(part) != self.find(inside[0]):
                            self.eq(part, inside[0], rel.origin)
                            changed = True
                    elif not self._has_concat(part, inside):
                        self.relations.append(Relation("concat", part, inside, rel.origin))
                        changed = True
            if not self._has_concat(root, atoms):
                self.relations.append(Relation("concat", root, atoms, rels[0].origin))
                changed = True
        return changed

    def _cuts(self, rel: Relation) -> list[int]:
        cuts, offset = [0], 0
        for part in rel.parts:
            offset += self.sizes[part]
            cuts.append(offset)
        return cuts

    def _atom(self, root: int, span: tuple[int, int]) -> int:
        key = (root, span)
        if key not in self._atoms:
            self._atoms[key] = self.fresh(span[1] - span[0], ("atom", root, span))
        return self._atoms[key]

    def _has_concat(self, whole: int, parts: list[int]) -> bool:
        target = [self.find(p) for p in parts]
        return any(
            rel.kind == "concat" and self.find(rel.whole) == self.find(whole)
            and [self.find(p) for p in rel.parts] == target
            for rel in self.relations
        )

    def _dedupe_relations(self) -> None:
        seen, kept = set(), []
        for rel in self.relations:
            key = (rel.kind, self.find(rel.whole), tuple(self.find(p) for p in rel.parts))
            if key not in seen:
                seen.add(key)
                kept.append(rel)
        self.relations = kept

    def _form_groups(self) -> None:
        self.groups = {}
        for component in nx.connected_components(self.graph):
            members = sorted(component)
            root = self.find(members[0])
            size = next((self.sizes[v] for v in members if isinstance(self.sizes[v], int)), self.sizes[members[0]])
            self.groups[root] = ChannelGroup(id=root, size=size, vertices=members,
                                             kind="fixed" if isinstance(size, int) else "dynamic")
        for v, reason in self.frozen.items():
            group = self.groups[self.find(v)]
            if group.reason is None:
                group.reason = reason

    def _propagate_freezing(self) -> None:
        """A frozen composite freezes its parts: none of them may lose an index."""
        changed = True
        while changed:
            changed = False
            for rel in self.relations:
                whole = self.group_of(rel.whole)
                if whole.reason is None:
                    continue
                for part in rel.parts:
                    group = self.group_of(part)
                    if group.reason is None:
                        group.reason = f"part of a frozen group: {whole.reason}"
                        changed = True

    # ----- queries --------------------------------------------------------------------
    def group_of(self, v: int) -> ChannelGroup:
        return self.groups[self.find(v)]

    def relations_of(self, group_id: int, kind: str | None = None, as_whole: bool = True) -> list[Relation]:
        out = []
        for rel in self.relations:
            if kind is not None and rel.kind != kind:
                continue
            if as_whole and self.find(rel.whole) == group_id:
                out.append(rel)
            if not as_whole and any(self.find(p) == group_id for p in rel.parts):
                out.append(rel)
        return out

    def part_groups(self, rel: Relation) -> list[int]:
        return [self.find(p) for p in rel.parts]

    def slices(self, group_id: int) -> list[tuple[str, int, int]]:
        """Every (tensor name, dim, group of that dim) that shrinks when ``group_id`` does:
        its own tensors and those of every composite built from it (a fused QKV, heads ×
        head_dim); ``derive_keep`` gives the index map of each."""
        found = [(name, dim, group_id) for name, dim in self.groups[group_id].tensors]
        for whole in sorted(self.composites_containing(group_id)):
            found += [(name, dim, whole) for name, dim in self.groups[whole].tensors]
        return found

    def summary(self, all_groups: bool = False) -> str:
        """A readable table of the groups (by default those that own a tensor or a target kind)."""
        rows = [("group", "kind", "size", "layer", "tensors", "example / reason")]
        shown = [g for g in self.groups.values() if g.static and g.size > 1 and
                 (all_groups or g.tensors or g.kind not in ("fixed", "dynamic"))]
        order = {"residual": 0, "heads": 1, "kv_heads": 2, "head_dim": 3, "ffn": 4, "latent": 4, "experts": 4,
                 "frozen": 5, "fixed": 6}
        for g in sorted(shown, key=lambda g: (order.get(g.kind, 9), -1 if g.layer is None else g.layer, g.id)):
            example = g.reason or (f"{g.tensors[0][0]} dim {g.tensors[0][1]}" if g.tensors else "")
            layer = "-" if g.layer is None else str(g.layer)
            rows.append((str(g.id), g.kind, str(g.size), layer, str(len(g.tensors)), example))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5] for r in rows)

    def composites_containing(self, group_id: int) -> set[int]:
        """Every group built (through any chain of factor/concat) from ``group_id``."""
        found, frontier = set(), [group_id]
        while frontier:
            g = frontier.pop()
            for rel in self.relations_of(g, as_whole=False):
                w = self.find(rel.whole)
                if w not in found:
                    found.add(w)
                    frontier.append(w)
        return found


def _known_different(a, b) -> bool:
    return isinstance(a, int) and isinstance(b, int) and a != b
