"""The child's config: the parent's, with every size the child changed (``save.py``'s docstring,
step 2), found by building the parent class on the meta device and comparing shapes."""
from __future__ import annotations

import math
import re

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from subclone_graph.passes import state as pass_state
from subclone_graph.passes.fx_utils import attribute_path, container_item, container_of

from subclone_graph.export.hf.common import (HFExportError, example_inputs, max_output_difference, outputs,
                                             quiet_transformers, required)
from subclone_graph.export.hf.embedding_scale import fold_embedding_scale
from subclone_graph.export.hf.weights import child_state_dict, fitted, load_fitted

__all__ = ["child_config"]

_MAX_ROUNDS = 8


def _rejections() -> tuple:
    """What a config class raises when it rejects a combination of sizes while the model is built
    from it (a width not divisible by the heads, a per-layer list shorter than the layer count, a
    width derived as a negative difference, a size left None that the class computes with, a field
    left None that the search set to a width and the class reads as an object: ``dtype=2`` →
    ``AttributeError: 'int' object has no attribute 'is_floating_point'``). The
    candidate is then dropped; whatever is kept is checked against the child's outputs at the end.
    A class that raises one of these on the parent's own config has a bug, and that propagates
    (``_Candidates.problems``)."""
    plain = (ValueError, AssertionError, ZeroDivisionError, TypeError, IndexError, KeyError, RuntimeError,
             AttributeError)
    try:
        from huggingface_hub.errors import StrictDataclassError   # transformers 5's config validation
    except ImportError:
        return plain
    return (*plain, StrictDataclassError)


def _size_map(child: fx.GraphModule) -> dict[int, list[int]]:
    """Parent size -> the distinct child sizes of the structural groups (and layer count)."""
    pairs = [(change.parent, change.child) for change in required(child, pass_state.SIZE_CHANGES)]
    pairs.append((required(child, pass_state.PARENT_LAYER_COUNT), len(required(child, pass_state.LAYERS))))
    found: dict[int, list[int]] = {}
    for parent, new in pairs:
        if isinstance(new, int) and new not in found.setdefault(parent, []):
            found[parent].append(new)
    return found


def _layer_key(key) -> int | None:
    """A per-layer dict's key as a layer index (``2`` or ``"2"``, as JSON writes it); None if not one."""
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    return int(key) if isinstance(key, str) and key.isdigit() else None


def _stage_depths(layers) -> dict[int, int] | None:
    """The child's layer count per stage, where its layers sit in containers that are items of a
    container themselves (``stages.0.layers``, ``stages.2.layers``: a multi-stage image model, a
    stage of which may have lost all its layers), keyed by the stage's index; None where they sit
    in one plain container (``model.layers``) or in containers of different names."""
    containers = [container_of(attribute_path(layer.key)) for layer in layers if layer.key]
    patterns = {re.sub(r"\.\d+(?=\.|$)", ".*", c) for c in containers}
    if len(patterns) != 1 or next(iter(patterns)).count("*") != 1:
        return None
    stages = [int(re.search(r"\.(\d+)(?=\.|$)", c).group(1)) for c in containers]
    return {s: stages.count(s) for s in sorted(set(stages))}


def _stage_lists(config_dict: dict, count: int, depths: dict[int, int]) -> dict:
    """Top-level integer lists that are the parent's layer count per stage (entries adding up to
    the layer count, one per stage, each at least the child's count there): the child's counts,
    0 for a stage whose layers all went (its downsampling stays, as in the child)."""
    changes = {}
    for name, value in config_dict.items():
        if _sizes_list(value) and sum(value) == count and len(value) > max(depths) and all(
                depths.get(s, 0) <= v for s, v in enumerate(value)):
            changes[name] = [depths.get(s, 0) for s in range(len(value))]
    return changes


def _per_layer_lists(config_dict: dict, child: fx.GraphModule) -> dict:
    """Top-level lists with one entry per parent layer, cut to the child's layers; dicts keyed
    by layer index (a sparse ``per_layer_config`` of overrides) re-keyed by the child's. Where the
    layers sit in stages (``_stage_depths``), the lists of a layer count per stage are set to the
    child's instead, and no list is read as per layer: a per-stage list of a tiny model may have as
    many entries as the model has layers, and cutting it would drop a stage."""
    count = required(child, pass_state.PARENT_LAYER_COUNT)
    layers = required(child, pass_state.LAYERS)
    depths = _stage_depths(layers)
    if depths is not None:
        return _stage_lists(config_dict, count, depths)

    def parent_indices(name: str) -> list[int]:
        indices = [container_item(attribute_path(layer.key)) if layer.key else -1 for layer in layers]
        if any(i is None or not 0 <= i < count for i in indices):
            raise HFExportError(f"config.{name} has one entry per layer, but a child layer has no parent index "
                                "(a duplicated layer?); cannot choose its entry")
        return indices

    changes = {}
    for name, value in config_dict.items():
        if isinstance(value, dict) and value and all(
                isinstance(v, dict) and _layer_key(k) is not None and _layer_key(k) < count for k, v in value.items()):
            keys = {_layer_key(k): k for k in value}
            changes[name] = {type(keys[i])(j): value[keys[i]] for j, i in enumerate(parent_indices(name)) if i in keys}
            continue
        if not isinstance(value, list) or len(value) != count:
            continue
        if all(v == value[0] for v in value):
            changes[name] = [value[0]] * len(layers)
            continue
        changes[name] = [value[i] for i in parent_indices(name)]
    return changes


def _configs(config: dict) -> list[dict]:
    """A config dict and every sub-config dict in it (``text_config``, ``vision_config``: a
    composite model's sizes live there)."""
    found = [config]
    for value in config.values():
        if isinstance(value, dict) and "model_type" in value:
            found += _configs(value)
    return found


def _sizes_list(value) -> bool:
    """A non-empty list of integers: sizes the search may set entry by entry (a width per stage)."""
    return isinstance(value, list) and bool(value) and all(type(v) is int for v in value)


def _flat(config: dict, prefix: tuple = ()) -> dict[tuple, object]:
    """Every field as ``{path: value}`` (``("text_config", "hidden_size")``), sub-configs flattened;
    each entry of a list of integers also as ``(..., name, index)`` (a width per stage:
    ``hidden_sizes[1]``), so that the search sets it alone."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and "model_type" in value:
            flat.update(_flat(value, (*prefix, key)))
        else:
            flat[(*prefix, key)] = value
            if _sizes_list(value):
                flat.update({(*prefix, key, i): v for i, v in enumerate(value)})
    return flat


def _changed(config: dict, changes: dict[tuple, object]) -> dict:
    """``config`` with each field at its path set (copied where changed; the rest shared)."""
    config = dict(config)
    for path, value in changes.items():
        node = config
        for key in path[:-1]:
            node[key] = list(node[key]) if isinstance(node[key], list) else dict(node[key])
            node = node[key]
        node[path[-1]] = value
    return config


def _derived(parent, base: dict) -> list[str]:
    """The top-level string fields and lists of them that the config class derives from the
    others (a backbone's ``out_features: ['stage3']``, the last of ``num_hidden_layers`` stages,
    derived from ``out_indices``, whose entries the search sets): left out of the candidates,
    the class derives them from each one's sizes. A per-layer list (``_per_layer_lists``) keeps
    the child's layers' entries instead."""
    found = []
    for name, value in base.items():
        # a list of integers may hold sizes (stage widths): those the search sets, entry by entry
        if not isinstance(value, (list, str)) or name in ("model_type", "architectures") or _sizes_list(value):
            continue
        try:
            again = type(parent).from_dict({k: v for k, v in base.items() if k != name})
        except _rejections():
            continue
        if getattr(again, name, None) == value and again.to_dict().get(name) == value:
            found.append(name)
    return found


class _Candidates:
    """Configs of the parent class, scored by how many parameter shapes differ from the child's."""

    def __init__(self, child: fx.GraphModule, state: dict) -> None:
        self.cls = required(child, pass_state.PARENT_CLASS)
        self.parent = required(child, pass_state.PARENT_CONFIG)
        self.base = self.parent.to_dict()
        for config in _configs(self.base):               # the top level and every sub-config
            config.update(_per_layer_lists(config, child))
        for name in _derived(self.parent, self.base):    # derived anew from each candidate's sizes
            del self.base[name]
        if all(t.is_floating_point() for t in state.values()):
            self.base.pop("quantization_config", None)   # the parent's storage format, not the child's
        self.flat = _flat(self.base)                     # field path -> value, sub-configs' fields too
        self.state = state
        self.rejections: dict[tuple, str] = {}           # candidate -> why the class rejected it
        self._scores: dict[tuple, int] = {}
        self._parent_built = False                       # the class built the parent's own config

    def config(self, changes: dict):
        return type(self.parent).from_dict(_changed(self.base, changes))

    def build(self, changes: dict, device: str = "cpu") -> torch.nn.Module:
        with quiet_transformers(), torch.device(device):
            return self.cls(self.config(changes)).eval()

    def problems(self, changes: dict) -> list[str] | None:
        """What differs between the class's parameters and the child's; None: the class rejects it."""
        try:
            model = self.build(changes, "meta")
        except _rejections() as error:   # an impossible combination of sizes; the reason is kept
            self._check_parent_builds()
            self.rejections[tuple(sorted(changes.items()))] = f"{type(error).__name__}: {error}"
            return None
        return fitted(model, self.state)[1]

    def _check_parent_builds(self) -> None:
        """A class that raises on the parent's own config has a bug, not a rejection of sizes:
        the error propagates (checked once, at the first rejection)."""
        if not self._parent_built:
            with quiet_transformers(), torch.device("meta"):
                self.cls(self.parent)
            self._parent_built = True

    def score(self, changes: dict) -> int:
        key = tuple(sorted(changes.items()))
        if key not in self._scores:
            problems = self.problems(changes)
            self._scores[key] = len(self.state) + 1 if problems is None else len(problems)
        return self._scores[key]


def _descend(candidates: _Candidates, options: dict[str, list], changes: dict) -> dict:
    """Coordinate search: per attribute, take the option that leaves fewest shape mismatches."""
    changes = dict(changes)
    for _ in range(_MAX_ROUNDS):
        improved = False
        for name, values in options.items():
            best = candidates.score(changes)
            for value in values:
                trial = {**changes, name: value}
                if candidates.score(trial) < best:
                    changes, best, improved = trial, candidates.score(trial), True
            if best == 0:
                return changes
        if not improved:
            break
    return changes


def _shape_changes(candidates: _Candidates, child: fx.GraphModule) -> dict:
    sizes = _size_map(child)
    ints = {k: v for k, v in candidates.flat.items() if type(v) is int}
    options = {k: [s for s in sizes[v] if s != v] + [v] for k, v in ints.items() if any(s != v for s in sizes.get(v, ()))}
    # two starts: every candidate changed (fields that move together, a width and its head
    # count), and nothing changed (one parent size that several groups share, heads and
    # head_dim both 8, where only one of them shrank); the better one wins
    starts = [{k: values[0] for k, values in options.items()}, {}]
    changes = min((_descend(candidates, options, start) for start in starts), key=candidates.score)
    if candidates.score(changes):
        widths = sorted({s for values in sizes.values() for s in values})
        unset = {k: [None, *widths] for k, v in candidates.flat.items() if v is None}
        changes = _descend(candidates, {**options, **unset}, changes)
    if candidates.score(changes):
        rejected = candidates.rejections.get(tuple(sorted(changes.items())))
        listed = "; ".join((candidates.problems(changes) or [f"the class rejects the closest candidate: {rejected}"])[:4])
        raise HFExportError(f"no config of {candidates.cls.__name__} has the child's parameter shapes ({listed})")
    found = [changes] + _same_shapes(candidates, options, changes)
    return [{k: v for k, v in c.items() if v != candidates.flat.get(k)} for c in found]


def _same_shapes(candidates: _Candidates, options: dict[str, list], changes: dict) -> list[dict]:
    """Other configs with the child's shapes: each changed field held at the parent's value and
    the rest searched again. Shapes alone cannot tell ``heads=8, head_dim=128`` from ``heads=16,
    head_dim=64`` (one projection of 1024 rows): the class computes with each differently (its
    per-head norms and its ``head_dim**-0.5``), so ``child_config`` measures them."""
    found = []
    for name in [k for k, v in changes.items() if v != candidates.flat.get(k)]:
        held = {k: v for k, v in options.items() if k != name}
        trial = _descend(candidates, held, {k: v for k, v in changes.items() if k != name})
        if not candidates.score(trial) and trial not in [changes, *found]:
            found.append(trial)
    return found


def _scaled_floats(candidates: _Candidates, child: fx.GraphModule) -> dict:
    """Float fields the child scaled: an ε whose scaled value is one a norm of the graph adds
    (``state.Rescale.eps`` names the nodes holding them; another float that happens to equal a
    field times the scale, an activation's constant, is no ε)."""
    rescale = pass_state.RESCALE.get(child)
    scale = rescale.eps_scale if rescale is not None else None
    if not scale or scale == 1:
        return {}
    holders = {name for name, _, _ in rescale.eps}
    literals = {a for node in child.graph.nodes if node.name in holders
                for a in pytree.tree_leaves((node.args, node.kwargs)) if type(a) is float}
    return {k: v * scale for k, v in candidates.flat.items()
            if type(v) is float and v and any(math.isclose(v * scale, f, rel_tol=1e-9) for f in literals)}


def _measure(candidates: _Candidates, state: dict, child: fx.GraphModule, distance=None):
    """changes -> max |difference| between the child and the class built from them (``distance``
    of its config where given; else the class holding ``state``, built in memory)."""
    expected = {}

    def in_memory_distance(config) -> float:
        inputs = example_inputs(child)
        if not expected:
            expected.update(outputs(child, inputs))
        try:
            with quiet_transformers():
                model = candidates.cls(config).eval()
                load_fitted(model, state)
                fold_embedding_scale(child, model, inputs)     # as _write will: measure what is saved
            return max_output_difference(expected, outputs(model, inputs))
        except Exception:          # a config the class cannot run with these weights (as the writer's)
            return float("inf")

    measure = distance or in_memory_distance
    return lambda trial: measure(candidates.config(trial))


def _needed_changes(candidates: _Candidates, changes: dict, distance, found: set = frozenset()) -> dict:
    """Keep a change the shapes do not need only if it brings the outputs closer to the child's
    (``n_head`` following the width stays; a token id that equals a width goes back). A change
    in ``found`` (read off the child's graph) stays unless reverting it is strictly closer.
    ``distance(changes)``: ``_measure``'s."""
    current = None
    for name in list(changes):
        trial = {k: v for k, v in changes.items() if k != name}
        if candidates.score(trial):
            continue                      # the shapes need it
        current = distance(changes) if current is None else current
        reverted = distance(trial)
        if reverted < current or (reverted == current and name not in found):
            changes, current = trial, reverted
    return changes


def child_config(child: fx.GraphModule, state: dict | None = None, distance=None):
    """The parent's config with every size the child changed (see module docstring, step 2).

    ``state`` may hold shape-only tensors when ``distance(config)`` is given: the max |difference|
    between the child's outputs and those of the class built from ``config`` (a streamed child
    measures it from its written weights)."""
    state = child_state_dict(child) if state is None else state
    candidates = _Candidates(child, state)
    floats = _scaled_floats(candidates, child)
    measure = _measure(candidates, state, child, distance)
    found = [_needed_changes(candidates, {**shapes, **floats}, measure, set(floats))
             for shapes in _shape_changes(candidates, child)]
    # configs with the same shapes (``_same_shapes``): the one whose class computes closest to the child
    return candidates.config(found[0] if len(found) == 1 else min(found, key=measure))
