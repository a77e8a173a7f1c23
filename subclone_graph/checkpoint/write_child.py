"""Write a streamed child (a weightless graph with tensor origins) as a checked HF folder.

Weights: every tensor of the child's state dict, under the name a parent-class model with
contiguous layers uses (``hf_export.hf_names``), is made from its ``TensorOrigin`` — the
parent tensor read as its kept slice, cut, then multiplied by each recorded factor in the
parent's dtype (the in-memory passes' own ops, hence their bits) — and streamed into shards.
A real (non-fake) tensor of the child, a computed buffer, is written as it is.

Config: ``hf_export.child_config`` with a ``distance`` that builds the class from a candidate
config, loads the *written* weights and compares its outputs with the reference.

Embedding scale: where the class derives its token embedding's scale from a size the child
changed (a √hidden), the ratio is folded as ``save_hf`` folds it
(``hf_embedding_scale.fold_scale``): the child's scale is read off the reference run (the
lookup's value and its users'), the class's is measured on the class holding the written
weights, and the changed tensors are written again (shards rewritten whole, same layout).

Reference and check: the child graph run segment by segment on the example inputs with the
written weights is the reference; the folder loaded as the parent's class — its config.json
read back, the class built on the meta device, every written tensor assigned (strict: none
missing, none unexpected), read with ``readinto`` rather than ``from_pretrained``'s memory map,
whose mapped pages would double the resident size — must match it within the dtype's
tolerance, relative to the outputs' scale (float32: 1e-4; bfloat16 / float16: 16 units of the
dtype's epsilon). The tests also reload children with ``from_pretrained``. We do not hold the full-size
in-memory child to compare with: the reference is what the graph computes with these weights,
and the bit-identity of those weights with the in-memory path is what the tests show.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.fx as fx

from subclone_graph.passes import state
from subclone_graph.passes.errors import PassError
from subclone_graph.passes.fx_utils import get_attribute
from subclone_graph.passes.analysis.score_channels import flat_inputs
from subclone_graph.passes.analysis.segments import run_segments

from subclone_graph.checkpoint.files import CheckpointReader, write_shards
from subclone_graph.export.hf import (HFExportError, child_config, child_state_dict, hf_names, max_output_difference,
                        tensor_outputs)
from subclone_graph.export.hf.embedding_scale import embedding_lookups, fold_scale, scale_after
from subclone_graph.checkpoint.weightless_parent import CheckpointWeights, is_fake

__all__ = ["write_child", "check_written", "tolerance"]


def tolerance(dtype: torch.dtype, scale: float) -> float:
    """The largest |difference| two computations of one function in ``dtype`` may show."""
    if dtype in (torch.float32, torch.float64):
        return 1e-4 * max(1.0, scale)
    return 16 * torch.finfo(dtype).eps * max(1.0, scale)


def _producer(gm: fx.GraphModule, reader, sources: dict):
    weights = CheckpointWeights(reader)
    return lambda name: weights.tensor(gm, sources[name], name).detach().contiguous()


def _inputs(gm: fx.GraphModule) -> tuple:
    inputs = state.EXAMPLE_INPUTS.need(gm)
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def _reference(gm: fx.GraphModule, written: CheckpointReader, names: dict) -> tuple[dict, dict]:
    """The child graph's outputs with the written weights, and the constant it multiplies each
    token table's rows by ({written name: scale}, ``hf_embedding_scale.scale_after``)."""
    class Written:
        """The child's tensors as written (the reference runs on what is on disk)."""
        resident = False

        def fetch(self, gm, targets):
            values = {}
            for target in targets:
                value = get_attribute(gm, target)
                values[target] = written.read(names[target]) if is_fake(value) else value
            return values

    lookups = embedding_lookups(gm)
    watched = {node for lookup in lookups for node in (lookup, *lookup.users)}
    seen: dict[fx.Node, torch.Tensor] = {}

    def observe(node, value, env):
        if node in watched:
            seen[node] = value

    flat = flat_inputs(gm, _inputs(gm), 0)
    with torch.no_grad():
        outputs = run_segments(gm, [flat], Written(), observe=observe)[0]
    scales = {names.get(lookup.args[0].target): scale_after(lookup, seen) for lookup in lookups if lookup in seen}
    return tensor_outputs(gm.graph._codegen.process_outputs(outputs)), scales


def _load(cls, config, written: CheckpointReader) -> torch.nn.Module:
    """The class built from ``config`` with the written weights, read without a memory map
    (``from_pretrained`` maps the files, and the mapped pages double the resident size)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = cls(config)
    state = {name: written.read(name) for name in written.tensors}
    result = model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing or result.unexpected_keys:
        raise HFExportError(f"{written.folder}: the written tensors do not fit {cls.__name__} "
                            f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
    return model.eval()


def _folded(model: torch.nn.Module, inputs: tuple, scales: dict) -> list[str]:
    """``hf_embedding_scale.fold_scale`` with the child's scale of the class's token table (as
    ``save_hf`` folds it); the names of the tensors it changed."""
    table = getattr(model.get_input_embeddings(), "weight", None)
    names = [n for n, t in model.state_dict(keep_vars=True).items() if t is table]
    wanted = next((scales[n] for n in names if n in scales), None)
    return fold_scale(model, inputs, wanted) if names else []


def _distance(gm: fx.GraphModule, written: CheckpointReader, expected: dict, scales: dict):
    cls = state.PARENT_CLASS.need(gm)

    def distance(config) -> float:
        try:
            model = _load(cls, config, written)
            _folded(model, _inputs(gm), scales)
            with torch.no_grad():
                return max_output_difference(expected, tensor_outputs(model(*_inputs(gm))))
        except Exception:          # a config the class cannot run with these weights
            return float("inf")
    return distance


def _refold(gm: fx.GraphModule, config, staging: Path, entries: list, shard_size: int, scales: dict) -> None:
    """Rewrite the shards with the embedding scale folded, when the class built from ``config``
    derives a different one (``save_hf`` does the same fold in memory)."""
    written = CheckpointReader(staging)
    model = _load(state.PARENT_CLASS.need(gm), config, written)
    changed = _folded(model, _inputs(gm), scales)
    if not changed:
        return
    tensors = model.state_dict(keep_vars=True)
    folded = staging / "folded"
    folded.mkdir()
    with torch.no_grad():
        write_shards(folded, entries, lambda name: tensors[name].detach() if name in changed else written.read(name),
                     shard_size)
    for path in staging.glob("model*.safetensors*"):
        path.unlink()
    for path in folded.iterdir():
        path.rename(staging / path.name)
    folded.rmdir()


def write_child(gm: fx.GraphModule, reader: CheckpointReader, staging: Path, shard_size: int):
    """Write the child's weights and config.json into ``staging``; return (config, reference outputs)."""
    names = hf_names(gm)
    state = gm.state_dict(keep_vars=True)
    sources = {names[n]: t for n, t in state.items()}
    entries = [(names[n], tuple(t.shape), t.dtype) for n, t in state.items()]
    with torch.no_grad():
        write_shards(staging, entries, _producer(gm, reader, sources), shard_size)
    written = CheckpointReader(staging)
    expected, scales = _reference(gm, written, names)
    config = child_config(gm, child_state_dict(gm), distance=_distance(gm, written, expected, scales))
    _refold(gm, config, staging, entries, shard_size, scales)
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), None)
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(staging)
    return config, expected


def check_written(gm: fx.GraphModule, staging: Path, expected: dict, out_dir: Path) -> float:
    """Load ``staging`` (its config.json and tensors, as the parent's class) and compare it with
    the reference outputs."""
    from transformers.utils import logging as hf_logging

    cls = state.PARENT_CLASS.need(gm)
    dtype = next((t.dtype for t in gm.state_dict(keep_vars=True).values() if t.is_floating_point()), None)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        config = type(gm.meta["subclone.parent_config"]).from_pretrained(staging)
        loaded = _load(cls, config, CheckpointReader(staging))
    finally:
        hf_logging.set_verbosity(level)
    with torch.no_grad():
        got = tensor_outputs(loaded(*_inputs(gm)))
    diff = max_output_difference(expected, got)
    scale = max((float(v.float().abs().max()) for v in expected.values()), default=1.0)
    allowed = tolerance(dtype or torch.float32, scale)
    if not (math.isfinite(diff) and diff <= allowed):
        raise HFExportError(f"the written {cls.__name__} differs from the child graph by {diff:.3g} (> {allowed:.3g}); "
                            f"nothing written to {out_dir}")
    return diff
