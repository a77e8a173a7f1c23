"""Parameters a checkpoint stores *converted*: built at load time from several stored tensors.

``transformers`` saves some parameters in another layout than the module holds them: a fused
expert tensor ``experts.gate_up_proj`` of shape (experts, 2·inner, hidden) is stored as one
``experts.<e>.gate_proj.weight`` and one ``experts.<e>.up_proj.weight`` per expert, and
``from_pretrained`` fuses them with the model's *weight-conversion mapping*
(``transformers.conversion_mapping.get_model_conversion_mapping``). That mapping is
``transformers``' per-family knowledge; this module only asks it which stored tensors feed which
parameter (``transformers.core_model_loading.rename_source_key``, the function loading uses, on
the keys in loading's order, ``dot_natural_key``) and replays its operations symbolically:

1. ``MergeModulelist(dim)``: each source pattern's list of tensors stacked along ``dim``;
2. ``Concatenate(dim)``: the patterns' tensors, in the converter's pattern order, concatenated.

Any other operation is refused with one line naming it and the tensor (the streamed path then
cannot run; ``--no-stream`` loads the model whole).

The invariant: ``read(name, index)`` returns exactly ``parameter[index]`` of the parameter
``from_pretrained`` would build (the same values, the same bits), reading from disk only the
stored tensors that hold kept entries, and of each only its kept slice. ``index`` gives per dim
the kept indices (a 1-D integer tensor, or None for all); per-expert orders are read entry by
entry by the caller (``passes.tensor_edits.EditProgram.replay``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from subclone_graph.checkpoint.files import CheckpointError, CheckpointReader, TensorInfo

__all__ = ["Stored", "Joined", "ConvertingReader", "conversion_plans"]


@dataclass(frozen=True)
class Stored:
    """A tensor as the checkpoint stores it."""
    key: str
    shape: tuple
    dtype: torch.dtype


@dataclass(frozen=True)
class Joined:
    """``torch.stack`` (``how == "stack"``) or ``torch.cat`` of ``parts`` along ``dim``."""
    how: str
    dim: int
    parts: tuple
    shape: tuple
    dtype: torch.dtype


def _first_key(node) -> str:
    return node.key if isinstance(node, Stored) else _first_key(node.parts[0])


def _described(node) -> str:
    if isinstance(node, Stored):
        return f"{node.key} {tuple(node.shape)} {node.dtype}"
    return f"{len(node.parts)} tensors from {_first_key(node)} on, joined {tuple(node.shape)} {node.dtype}"


def _join(how: str, dim: int, parts: list, reader: CheckpointReader, name: str) -> Joined:
    first = parts[0]
    dim %= len(first.shape) + (how == "stack")          # as torch reads a negative dim
    for part in parts[1:]:
        same = part.shape == first.shape if how == "stack" else (
            len(part.shape) == len(first.shape) and all(a == b for d, (a, b) in
                                                        enumerate(zip(part.shape, first.shape)) if d != dim))
        if not same or part.dtype != first.dtype:
            raise CheckpointError(f"{reader.info(_first_key(part)).file}: tensor {name} cannot be built from the "
                                  f"stored tensors: {_described(part)} does not fit {_described(first)}")
    shape = list(first.shape)
    if how == "stack":
        shape.insert(dim, len(parts))
    else:
        shape[dim] = sum(p.shape[dim] for p in parts)
    return Joined(how, dim, tuple(parts), tuple(shape), first.dtype)


def _replay(converter, sources: dict[str, list[str]], reader: CheckpointReader, name: str):
    """The converter's operations applied to stored-tensor descriptions instead of tensors."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    values: dict = {pattern: [Stored(k, reader.info(k).shape, reader.info(k).dtype) for k in keys]
                    for pattern, keys in sources.items()}
    for op in converter.operations:
        if type(op) is MergeModulelist:
            values = {p: _join("stack", op.dim, v, reader, name) if isinstance(v, list) else v
                      for p, v in values.items()}
        elif type(op) is Concatenate:
            parts = []
            for pattern in converter.source_patterns:
                value = values.pop(pattern, [])
                parts.extend(value if isinstance(value, list) else [value])
            values = {"": _join("cat", op.dim, parts, reader, name)}
        else:
            key = next(iter(sources.values()))[0]
            raise CheckpointError(f"{reader.info(key).file}: tensor {name} is stored converted by transformers' "
                                  f"{op!r} (from {key}), which streaming cannot read as slices; use --no-stream")
    if len(values) != 1 or isinstance(next(iter(values.values())), list):
        key = next(iter(sources.values()))[0]
        raise CheckpointError(f"{reader.info(key).file}: tensor {name}: transformers' conversion of {key} does not "
                              "end in one tensor; streaming cannot read it; use --no-stream")
    return next(iter(values.values()))


def conversion_plans(model: torch.nn.Module, reader: CheckpointReader, names) -> dict:
    """{parameter name: its ``Joined`` plan} for those of ``names`` that the checkpoint stores
    through one of ``transformers``' weight converters (names it stores as they are are left out)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key
    except ImportError:
        return {}
    wanted = {n for n in names if n not in reader}
    if not wanted:
        return {}
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if not isinstance(m, WeightConverter)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta = dict(model.state_dict(keep_vars=True))
    found: dict[str, tuple] = {}
    for key in sorted(reader.tensors, key=dot_natural_key):        # the order loading collects them in
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if pattern is None or target not in wanted:
            continue
        converter, sources = found.setdefault(target, (by_pattern[pattern], {}))
        sources.setdefault(pattern, []).append(key)
    return {target: _replay(converter, sources, reader, target) for target, (converter, sources) in found.items()}


def _read_plain(reader: CheckpointReader, node, index: tuple) -> torch.Tensor:
    """``node``'s tensor cut to ``index`` (one 1-D tensor or None per dim), reading only kept parts."""
    if isinstance(node, Stored):
        return reader.read(node.key, index)
    shape = [s if i is None else len(i) for s, i in zip(node.shape, index)]
    out = torch.empty(shape, dtype=node.dtype)
    if out.numel() == 0:
        return out
    dim, kept = node.dim, index[node.dim]
    rest = index[:dim] + index[dim + 1:]
    if node.how == "stack":
        chosen = range(len(node.parts)) if kept is None else kept.tolist()
        done: dict[int, torch.Tensor] = {}
        for position, part in enumerate(chosen):
            if part not in done:                       # a duplicated index reads its part once
                done[part] = _read_plain(reader, node.parts[part], rest)
            out.select(dim, position).copy_(done[part])
        return out
    offset = 0
    for part in node.parts:
        size = part.shape[dim]
        if kept is None:
            where, local = torch.arange(offset, offset + size), None
        else:
            where = torch.nonzero((kept >= offset) & (kept < offset + size)).flatten()
            local = kept[where] - offset
        if len(where):
            piece = _read_plain(reader, part, index[:dim] + (local,) + index[dim + 1:])
            out.index_copy_(dim, where, piece)
        offset += size
    return out


class ConvertingReader:
    """A ``CheckpointReader`` that also serves converted parameters under their module names."""

    def __init__(self, reader: CheckpointReader) -> None:
        self.reader = reader
        self.plans: dict = {}

    @property
    def folder(self):
        return self.reader.folder

    @property
    def files(self):
        return self.reader.files

    @property
    def tensors(self):
        return self.reader.tensors

    @property
    def bytes_read(self) -> int:
        return self.reader.bytes_read

    def learn(self, model: torch.nn.Module, names) -> None:
        """Find, among ``names``, the parameters ``model``'s class builds by conversion."""
        self.plans = {**self.plans, **conversion_plans(model, self.reader, names)}

    def __contains__(self, name: str) -> bool:
        return name in self.plans or name in self.reader

    def info(self, name: str) -> TensorInfo:
        if name not in self.plans:
            return self.reader.info(name)
        plan = self.plans[name]
        first = self.reader.info(_first_key(plan))
        return TensorInfo(first.file, plan.dtype, plan.shape, first.start, first.start)

    def read(self, name: str, index: tuple = ()) -> torch.Tensor:
        """Tensor ``name`` cut to ``index`` (module docstring)."""
        node = self.plans.get(name)
        if node is None:
            info = self.reader.info(name)
            node = Stored(name, info.shape, info.dtype)
        index = tuple(index) or (None,) * len(node.shape)
        if len(index) != len(node.shape):
            raise CheckpointError(f"{self.folder}: tensor {name} has {len(node.shape)} dims, the index {len(index)}")
        return _read_plain(self.reader, node, index)
