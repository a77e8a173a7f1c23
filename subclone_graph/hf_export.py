"""Save a child as a Hugging Face model directory that its parent's class loads back.

``save_hf(child, out_dir)`` writes ``config.json`` and ``model.safetensors`` (plus the
tokenizer, when given) such that ``type(parent).from_pretrained(out_dir)`` is a model of the
parent's class whose outputs equal the child's. It checks exactly that before returning.

The invariant: the saved model computes what the child computes, in the child's dtype (max
|difference| ≤ ``tolerance.tolerance_for(dtype)`` × max(1, max |output|) on
the child's ``state.EXAMPLE_INPUTS``). Nothing about a model family is known here;
every decision is made by building the parent class and looking at it:

1. weights: the child's state dict, each layer's module path renumbered by its position
   (``x.layers.0, x.layers.2`` → ``x.layers.0, x.layers.1``; a duplicated layer takes the
   index of where it runs); a name the class ties to another (an output head tied to the
   embedding) takes the one tensor the child has under either name; a tensor of the class the child
   has in no layer at all (never read by its graph: a decoder-only run's cross-attention, an
   unused pooler) keeps the class's initialisation;
2. config: a copy of the parent's. Each top-level integer equal to the parent size of a
   residual / ffn / latent / heads / kv_heads / head_dim group, or to the parent's layer count, is a
   candidate for the matching child size. A ``quantization_config`` is dropped: the child's
   weights are plain floating tensors (a GGUF parent is dequantised when loaded), so the saved
   checkpoint loads as an ordinary, trainable float model; ``dtype`` is the child's. Which
   candidates change is decided by building the class on the meta device and comparing its
   parameter shapes with the child's (a coordinate search over the candidates; an integer
   left ``None`` in the parent, like a width derived from another, may be set too when shapes
   need it). A change that leaves the
   shapes alone is kept only if it brings the outputs closer to the child's (``n_head`` must
   follow the width; a token id that happens to equal a width must not). A float field whose
   value times ``state.RESCALE``'s ε scale is a literal of the child's graph (the ε of a
   norm over a shrunk residual, see ``RescaleResidualPass``) is a candidate too. A top-level
   list with one entry per parent layer keeps the entries of the child's layers;
3. the class is built from that config in the child's dtype, loads the weights with
   ``strict=True`` (so ties stay ties) and is saved with ``save_pretrained`` into a staging
   folder beside ``out_dir`` (``outputs.staging_folder``), with a manifest of what it wrote;
4. the staging directory is loaded back with ``from_pretrained`` (in the child's dtype) and
   compared with the child;
   on a mismatch it is removed and the error gives the max difference. A child whose graph
   holds what the class cannot express — a √(D/d) ``mul`` that ``RescaleResidualPass``
   inserted after a norm without its own weight — fails here, not silently;
5. the staging directory is renamed to ``out_dir``. ``out_dir`` is checked before any work
   (``outputs.check_destination``): an existing empty folder is written into; a non-empty one
   is replaced only with ``overwrite`` and only if it holds nothing but what ``save_hf`` wrote
   there (its manifest); a regular file is never replaced.

A child subcloned again is a parent whose config is its own derived one (``subclone`` puts
``child_config(child)`` in its copy's ``state.PARENT_CONFIG``), so a grandchild saves too.

Needs the child's pass state (``passes/state.py``): ``PARENT_CLASS``, ``PARENT_CONFIG``,
``SIZE_CHANGES``, ``LAYERS``, ``EXAMPLE_INPUTS`` and ``PARENT_LAYER_COUNT`` (``RESCALE`` when the
stream shrank). The parent → child size of every group comes from ``SIZE_CHANGES``, which
``ChooseKeepPass`` wrote; what is searched is only which config field holds which of them.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
from pathlib import Path

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from subclone_graph.passes import state as pass_state
from subclone_graph.passes.fx_utils import attribute_path, container_item, container_of, get_attribute

from .hf_embedding_scale import fold_embedding_scale
from .outputs import check_destination, staging_folder, write_manifest
from .tolerance import max_difference, model_dtype, tolerance_for

__all__ = ["save_hf", "child_config", "child_state_dict", "hf_names", "HFExportError", "quiet_transformers",
           "tensor_outputs", "max_output_difference"]

_MAX_ROUNDS = 8


def _rejections() -> tuple:
    """What a config class raises when it rejects a combination of sizes while the model is built
    from it (a width not divisible by the heads, a per-layer list shorter than the layer count, a
    width derived as a negative difference, a size left None that the class computes with). The
    candidate is then dropped; whatever is kept is checked against the child's outputs at the end."""
    plain = (ValueError, AssertionError, ZeroDivisionError, TypeError, IndexError, KeyError, RuntimeError)
    try:
        from huggingface_hub.errors import StrictDataclassError   # transformers 5's config validation
    except ImportError:
        return plain
    return (*plain, StrictDataclassError)


class HFExportError(RuntimeError):
    """The child cannot be written as its parent's class, or the written model differs from it."""


def _meta(child: fx.GraphModule, key: pass_state.StateKey):
    if not hasattr(child, "meta") or not key.has(child):
        raise HFExportError(f"the child's {key.name} is missing: save_hf needs a child made by "
                            "subclone_graph.subclone from a Hugging Face model")
    return key.get(child)


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load reports and progress bars while models are built and saved."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


# ----- weights ------------------------------------------------------------------------------
def _layer_renames(layers) -> dict[str, str]:
    """Old module path of each layer -> the path with its position in its container."""
    renames, counts = {}, {}
    for layer in layers:
        if layer.key is None:
            continue
        path = attribute_path(layer.key)
        if container_item(path) is None:
            continue
        container = container_of(path)
        position = counts.get(container, 0)
        counts[container] = position + 1
        renames[path] = f"{container}.{position}"
    return renames


def _renamed(name: str, renames: dict[str, str]) -> str:
    for old in sorted(renames, key=len, reverse=True):
        if name.startswith(old + "."):
            return renames[old] + name[len(old):]
    return name


def hf_names(child: fx.GraphModule) -> dict[str, str]:
    """Each state-dict name of the child -> its name in a parent-class model with contiguous layers."""
    renames = _layer_renames(_meta(child, pass_state.LAYERS))
    names = {}
    for name in child.state_dict(keep_vars=True):
        new = _renamed(name, renames)
        if new in names.values():
            raise HFExportError(f"two child tensors map to {new!r} after renumbering the layers")
        names[name] = new
    return names


def child_state_dict(child: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The child's tensors its graph reads, under the names a parent-class model with contiguous
    layers uses (a tensor it holds but never reads is no part of what it computes: ``_fitted``)."""
    names = hf_names(child)
    read = {id(get_attribute(child, n.target)) for n in child.graph.nodes if n.op == "get_attr" and n.users}
    return {names[name]: tensor.detach() for name, tensor in child.state_dict(keep_vars=True).items()
            if id(tensor) in read}


def _tied_names(model: torch.nn.Module) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, tensor in itertools.chain(model.named_parameters(remove_duplicate=False),
                                        model.named_buffers(remove_duplicate=False)):
        groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


def _pattern(name: str) -> str:
    """A state-dict name with its container indices as ``*`` (``a.layers.3.w`` → ``a.layers.*.w``)."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def _fitted(model: torch.nn.Module, state: dict) -> tuple[dict, list[str]]:
    """``state`` keyed like ``model.state_dict()``, filling tied names; and the problems found.

    A tensor of the class that the child has in no layer at all (a cross-attention a decoder-only
    run never reads, a pooler the head does not use) is left to the class's own initialisation:
    the child's graph never read it, so it cannot change what the class computes on the child's
    inputs — which the final check verifies."""
    wanted = model.state_dict(keep_vars=True)
    partners = {n: names for names in _tied_names(model) for n in names}
    non_persistent = {n for n, _ in model.named_buffers(remove_duplicate=False)} - set(wanted)
    present = {_pattern(n) for n in state}
    fitted, problems = {}, []
    for name, target in wanted.items():
        source = next((s for s in [name, *partners.get(name, ())] if s in state), None)
        if source is None and _pattern(name) not in present:
            continue
        if source is None:
            problems.append(f"{name}: missing from the child")
        elif tuple(state[source].shape) != tuple(target.shape):
            problems.append(f"{name}: child {tuple(state[source].shape)}, class {tuple(target.shape)}")
        else:
            fitted[name] = state[source]
    problems += [f"{name}: not in the class" for name in state if name not in wanted and name not in non_persistent]
    return fitted, problems


def _load(model: torch.nn.Module, state: dict) -> None:
    """Load the child's tensors into ``model`` (every child tensor, every class tensor the child
    has a counterpart of; ``_fitted``), as ``strict=True`` would except for the tensors it leaves."""
    fitted, problems = _fitted(model, state)
    if problems:
        raise HFExportError(f"the child's tensors do not fit {type(model).__name__}: {'; '.join(problems[:4])}")
    model.load_state_dict(fitted, strict=False)


# ----- config -------------------------------------------------------------------------------
def _size_map(child: fx.GraphModule) -> dict[int, list[int]]:
    """Parent size -> the distinct child sizes of the structural groups (and layer count)."""
    pairs = [(change.parent, change.child) for change in _meta(child, pass_state.SIZE_CHANGES)]
    pairs.append((_meta(child, pass_state.PARENT_LAYER_COUNT), len(_meta(child, pass_state.LAYERS))))
    found: dict[int, list[int]] = {}
    for parent, new in pairs:
        if isinstance(new, int) and new not in found.setdefault(parent, []):
            found[parent].append(new)
    return found


def _per_layer_lists(config_dict: dict, child: fx.GraphModule) -> dict:
    """Top-level lists with one entry per parent layer, cut to the child's layers."""
    count = _meta(child, pass_state.PARENT_LAYER_COUNT)
    layers = _meta(child, pass_state.LAYERS)
    changes = {}
    for name, value in config_dict.items():
        if not isinstance(value, list) or len(value) != count:
            continue
        if all(v == value[0] for v in value):
            changes[name] = [value[0]] * len(layers)
            continue
        indices = [container_item(attribute_path(layer.key)) if layer.key else -1 for layer in layers]
        if any(i is None or not 0 <= i < count for i in indices):
            raise HFExportError(f"config.{name} has one entry per layer, but a child layer has no parent index "
                                "(a duplicated layer?); cannot choose its entry")
        changes[name] = [value[i] for i in indices]
    return changes


def _configs(config: dict) -> list[dict]:
    """A config dict and every sub-config dict in it (``text_config``, ``vision_config``: a
    composite model's sizes live there)."""
    found = [config]
    for value in config.values():
        if isinstance(value, dict) and "model_type" in value:
            found += _configs(value)
    return found


def _flat(config: dict, prefix: tuple = ()) -> dict[tuple, object]:
    """Every field as ``{path: value}`` (``("text_config", "hidden_size")``), sub-configs flattened."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and "model_type" in value:
            flat.update(_flat(value, (*prefix, key)))
        else:
            flat[(*prefix, key)] = value
    return flat


def _changed(config: dict, changes: dict[tuple, object]) -> dict:
    """``config`` with each field at its path set (copied where changed; the rest shared)."""
    config = dict(config)
    for path, value in changes.items():
        node = config
        for key in path[:-1]:
            node[key] = dict(node[key])
            node = node[key]
        node[path[-1]] = value
    return config


class _Candidates:
    """Configs of the parent class, scored by how many parameter shapes differ from the child's."""

    def __init__(self, child: fx.GraphModule, state: dict) -> None:
        self.cls = _meta(child, pass_state.PARENT_CLASS)
        self.parent = _meta(child, pass_state.PARENT_CONFIG)
        self.base = self.parent.to_dict()
        for config in _configs(self.base):               # the top level and every sub-config
            config.update(_per_layer_lists(config, child))
        if all(t.is_floating_point() for t in state.values()):
            self.base.pop("quantization_config", None)   # the parent's storage format, not the child's
        self.flat = _flat(self.base)                     # field path -> value, sub-configs' fields too
        self.state = state
        self.rejections: dict[tuple, str] = {}           # candidate -> why the class rejected it
        self._scores: dict[tuple, int] = {}

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
            self.rejections[tuple(sorted(changes.items()))] = f"{type(error).__name__}: {error}"
            return None
        return _fitted(model, self.state)[1]

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
    return {k: v for k, v in changes.items() if v != candidates.flat.get(k)}


def _scaled_floats(candidates: _Candidates, child: fx.GraphModule) -> dict:
    """Float fields the child scaled: an ε whose scaled value (``state.RESCALE``) is in the graph."""
    rescale = pass_state.RESCALE.get(child)
    scale = rescale.eps_scale if rescale is not None else None
    if not scale or scale == 1:
        return {}
    literals = {a for node in child.graph.nodes for a in pytree.tree_leaves((node.args, node.kwargs))
                if type(a) is float}
    return {k: v * scale for k, v in candidates.flat.items()
            if type(v) is float and v and any(math.isclose(v * scale, f, rel_tol=1e-9) for f in literals)}


def _needed_changes(candidates: _Candidates, changes: dict, state: dict, child: fx.GraphModule,
                    found: set = frozenset(), distance=None) -> dict:
    """Keep a change the shapes do not need only if it brings the outputs closer to the child's
    (``n_head`` following the width stays; a token id that equals a width goes back). A change
    in ``found`` (read off the child's graph) stays unless reverting it is strictly closer.
    ``distance(config)``: max |difference| between the child and the class built from ``config``."""
    expected = {}

    def in_memory_distance(config) -> float:
        inputs = _inputs(child)
        if not expected:
            expected.update(_outputs(child, inputs))
        with quiet_transformers():
            model = candidates.cls(config).eval()
            _load(model, state)
            fold_embedding_scale(child, model, inputs)     # as _write will: measure what is saved
        return max_output_difference(expected, _outputs(model, inputs))

    measure = distance or in_memory_distance
    distance = lambda trial: measure(candidates.config(trial))  # noqa: E731

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
    changes = {**_shape_changes(candidates, child), **floats}
    return candidates.config(_needed_changes(candidates, changes, state, child, set(floats), distance))


# ----- checking -----------------------------------------------------------------------------
def _inputs(child: fx.GraphModule) -> tuple:
    inputs = _meta(child, pass_state.EXAMPLE_INPUTS)
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def tensor_outputs(out) -> dict:
    """Tensor outputs by key (a ModelOutput / dict), else by position."""
    if isinstance(out, dict):
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    return dict(enumerate(x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)))


def _outputs(module, inputs: tuple) -> dict:
    with torch.no_grad():
        return tensor_outputs(module(*inputs))


def max_output_difference(expected: dict, got: dict) -> float:
    if not expected or any(k not in got or got[k].shape != v.shape for k, v in expected.items()):
        return float("inf")
    return max(float((got[k].float() - v.float()).abs().max()) for k, v in expected.items())


# ----- writing ------------------------------------------------------------------------------
def _write(child: fx.GraphModule, staging: Path, tokenizer) -> None:
    state = child_state_dict(child)
    config = child_config(child, state)
    config.dtype = model_dtype(child)          # config.json's dtype: the child's, not the parent's
    cls = _meta(child, pass_state.PARENT_CLASS)
    with quiet_transformers():
        model = cls(config).to(config.dtype).eval()
        _load(model, state)
        fold_embedding_scale(child, model, _inputs(child))
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    write_manifest(staging)


def _check(child: fx.GraphModule, staging: Path, rtol: float, out_dir: Path) -> float:
    cls, dtype = _meta(child, pass_state.PARENT_CLASS), model_dtype(child)
    with quiet_transformers():
        loaded = cls.from_pretrained(staging, dtype=dtype).eval()
    if type(loaded) is not cls:
        raise HFExportError(f"{staging} loads as {type(loaded).__name__}, not {cls.__name__}; nothing written to {out_dir}")
    if model_dtype(loaded) != dtype:
        raise HFExportError(f"the saved {cls.__name__} loads as {model_dtype(loaded)}, not the child's {dtype}; "
                            f"nothing written to {out_dir}")
    expected, got = _outputs(child, _inputs(child)), _outputs(loaded, _inputs(child))
    if set(expected) - set(got):
        raise HFExportError(f"the saved {cls.__name__} lacks the child's outputs {sorted(set(expected) - set(got))}; "
                            f"nothing written to {out_dir}")
    diff, scale = max_difference(list(expected.values()), [got[k] for k in expected])
    if not diff <= rtol * scale:
        raise HFExportError(f"the saved {cls.__name__} differs from the child by {diff:.3g} (> {rtol:g} × {scale:.3g}): the child "
                            "computes something the class cannot express (e.g. a √(D/d) multiply inserted after a "
                            f"norm without its own weight; subclone with rescale=False); nothing written to {out_dir}")
    return diff


def save_hf(child: fx.GraphModule, out_dir, *, tokenizer=None, overwrite: bool = False,
            rtol: float | None = None) -> Path:
    """Write ``child`` as a ``from_pretrained`` directory of its parent's class; return its path.

    The checkpoint has the child's dtype. Raises ``FileExistsError`` if ``out_dir`` is a file, or
    a non-empty folder without ``overwrite``, or one holding files ``save_hf`` did not write;
    ``HFExportError`` (leaving nothing behind) if the child cannot be expressed as the parent's
    class or the reloaded model's outputs differ from the child's by more than ``rtol`` (default
    ``tolerance_for(child's dtype)``) × max(1, max |output|).
    """
    out_dir = check_destination(out_dir, overwrite=overwrite, folder=True)
    rtol = tolerance_for(model_dtype(child)) if rtol is None else rtol
    with staging_folder(out_dir.parent) as staging:
        staged = staging / out_dir.name
        staged.mkdir()
        _write(child, staged, tokenizer)
        _check(child, staged, rtol, out_dir)
        if out_dir.is_dir() and any(out_dir.iterdir()):
            os.replace(out_dir, staging / "old")
        elif out_dir.is_dir():
            out_dir.rmdir()
        os.replace(staged, out_dir)
        return out_dir
