"""The one writer of a Hugging Face folder, for a child in memory and for a streamed one.

``write_folder(child, staging, weights)`` writes what ``from_pretrained`` of the parent's class
reads; ``save_hf`` (tensors in memory) and ``subclone_checkpoint`` (tensors read on demand, each
replayed from its edit program) both call it, so one child gives one folder, byte for byte:

1. weights: every tensor the child's graph reads, under the name a parent-class model with
   contiguous layers uses (``weights.hf_names``), in the child's state-dict order, streamed into
   safetensors shards of bounded size (``checkpoint.files.write_shards``) one tensor at a time.
   A tensor the class ties under several names (an output head tied to the embedding) is
   stored once, under the name the class ties the others from when it loads (its tie source,
   whichever name comes first in the child). Experts are
   stored fused, as the module holds them (transformers 5 loads that layout directly). A
   tensor the child holds but its graph never reads (a decoder-only run's cross-attention, an
   unused pooler) is no part of what it computes and is not written: the class initialises it
   as it does any missing weight, and the check below verifies the class does not read it
   either (while the config is searched it holds seeded random values, so a class that does
   read it differs from the child);
2. config: ``config.child_config``, its output distance measured on the class built from a
   candidate config holding the *written* weights against the reference — the child's graph run
   by the segment runner on the written weights (so both sources give the same reference bits);
3. embedding scale: where the class derives its token embedding's scale from a size the child
   changed, ``embedding_scale.fold_scale`` on the class holding the written weights, and the
   shards rewritten with the changed tensors;
4. ``config.json`` (the child's dtype, the class in ``architectures``), the generation config
   and the tokenizer copied from the parent's folder when there is one (a tokenizer object
   given is saved instead), and ``changes``: every config field that differs from the
   parent's, with why (``ConfigChange``).
The written folder is checked by ``check.check_folder``.
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from subclone_graph.passes import state as pass_state
from subclone_graph.passes.analysis.segments import ResidentWeights
from subclone_graph.passes.fx_utils import get_attribute

from subclone_graph.checkpoint.files import CheckpointReader, write_shards
from subclone_graph.export.hf.check import segment_outputs
from subclone_graph.export.hf.common import (HFExportError, example_inputs, max_output_difference,
                                             quiet_transformers, required, tensor_outputs)
from subclone_graph.export.hf.config import child_config
from subclone_graph.export.hf.embedding_scale import child_scales, fold_scale
from subclone_graph.export.hf.weights import child_state_dict, hf_names, name_pattern, tied_names
from subclone_graph.export.tolerance import model_dtype
from subclone_graph.input_sizes import another_example

__all__ = ["write_folder", "Written", "ConfigChange", "DEFAULT_SHARD_SIZE", "TOKENIZER_FILES"]

DEFAULT_SHARD_SIZE = 2 * 2**30
# what a tokenizer or processor is saved as (copied from the parent's folder as they are)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
                   "preprocessor_config.json", "processor_config.json")


@dataclass(frozen=True)
class ConfigChange:
    field: str
    parent: Any
    child: Any
    why: str

    def __str__(self) -> str:
        return f"{self.field}: {self.parent!r} → {self.child!r} ({self.why})"


@dataclass
class Written:
    config: Any
    reference: dict                       # the child's outputs on its example inputs (written weights)
    changes: list[ConfigChange] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)     # files taken from the parent's folder
    checked: list = field(default_factory=list)     # [(inputs, the child's outputs)]: example, another size


def _stored(child: fx.GraphModule, names: dict) -> dict[str, str]:
    """{stored name: child state-dict name}: one entry per tensor the class does not tie."""
    cls, config = required(child, pass_state.PARENT_CLASS), required(child, pass_state.PARENT_CONFIG)
    from accelerate import init_empty_weights

    with quiet_transformers():
        with init_empty_weights(include_buffers=False):
            model = cls(config)
        if hasattr(model, "tie_weights"):      # as from_pretrained ties, outside the context
            model.tie_weights()
    tied = {n: set(group) for group in tied_names(model) for n in group}
    read = {id(get_attribute(child, n.target)) for n in child.graph.nodes if n.op == "get_attr" and n.users}
    stored, first = {}, {}
    for name, tensor in child.state_dict(keep_vars=True).items():
        if id(tensor) not in read:
            continue
        hf = names[name]
        kept = first.setdefault(id(tensor), hf)
        if kept != hf and hf in tied.get(kept, ()):      # the class ties it to the one stored
            continue
        stored[hf] = name
    # tie_weights overwrites each tied name from its source: a tensor stored under a tied name
    # (the head's, when the class registers its head before its body) goes under the source
    sources = getattr(model, "all_tied_weights_keys", None) or {}
    return {(sources[hf] if sources.get(hf) in tied.get(hf, ()) and sources[hf] not in stored else hf): name
            for hf, name in stored.items()}


class _WrittenWeights:
    """The child's tensors read back from the written shards (a tensor stored once under its
    first name serves every name it has); what is not stored (a computed buffer) is the graph's."""

    resident = False

    def __init__(self, child: fx.GraphModule, stored: dict, written: CheckpointReader) -> None:
        tensors = child.state_dict(keep_vars=True)
        self.stored_as = {id(tensors[name]): hf for hf, name in stored.items()}
        self.written = written

    def name_of(self, value) -> str | None:
        return self.stored_as.get(id(value))

    def fetch(self, gm, targets) -> dict:
        values = {}
        for target in targets:
            value = get_attribute(gm, target)
            name = self.name_of(value)
            values[target] = self.written.read(name) if name is not None else value
        return values


def _checked_inputs(child: fx.GraphModule) -> list[tuple]:
    """The inputs the written folder is checked at: the example, and it at another size (module doc)."""
    example = example_inputs(child)
    other = another_example(child, example)
    return [example] if other is None else [example, other]


def _load(cls, config, written: CheckpointReader) -> torch.nn.Module:
    """The class built from ``config`` with the written weights, read without a memory map."""
    from accelerate import init_empty_weights

    with quiet_transformers(), init_empty_weights(include_buffers=False):
        model = cls(config)
    result = model.load_state_dict({name: written.read(name) for name in written.tensors}, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    _fill_unwritten(model, set(written.tensors))
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing or result.unexpected_keys:
        raise HFExportError(f"{written.folder}: the written tensors do not fit {cls.__name__} "
                            f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
    return model.eval()


def _fill_unwritten(model: torch.nn.Module, written: set) -> None:
    """Give the class's tensors of a kind the child wrote none of (module docstring, step 1)
    seeded random values; a tensor of a written kind that is missing stays meta (an error)."""
    kinds = {name_pattern(name) for name in written}
    generator = torch.Generator().manual_seed(0)
    for name, tensor in list(model.named_parameters()):
        if tensor.is_meta and name_pattern(name) not in kinds:
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            value = torch.randn(tensor.shape, generator=generator).to(tensor.dtype)
            setattr(module, leaf, torch.nn.Parameter(value, requires_grad=tensor.requires_grad))


def _folded(model: torch.nn.Module, inputs: tuple, scales: dict) -> list[str]:
    """``fold_scale`` with the child's scale of the class's token table; the changed names."""
    try:
        table = getattr(model.get_input_embeddings(), "weight", None)
    except NotImplementedError:         # a class without a token table (a vision model): nothing to fold
        return []
    names = [n for n, t in model.state_dict(keep_vars=True).items() if t is table]
    wanted = next((scales[n] for n in names if n in scales), None)
    return fold_scale(model, inputs, wanted) if names else []


def _distance(child, written: CheckpointReader, reference: dict, scales: dict):
    cls, inputs = required(child, pass_state.PARENT_CLASS), example_inputs(child)

    def distance(config) -> float:
        try:
            model = _load(cls, config, written)
            _folded(model, inputs, scales)
            with torch.no_grad():
                return max_output_difference(reference, tensor_outputs(model(*inputs)))
        except Exception:          # a config the class cannot run with these weights
            return float("inf")
    return distance


def _refold(child, config, staging: Path, entries: list, shard_size: int, scales: dict) -> None:
    written, cls = CheckpointReader(staging), required(child, pass_state.PARENT_CLASS)
    try:
        model = _load(cls, config, written)
        changed = _folded(model, example_inputs(child), scales)
    except HFExportError:
        raise
    except Exception as error:      # the class's own code, on the child's config: its limit, named
        first = str(error).splitlines()[0] if str(error) else ""
        raise HFExportError(f"{cls.__name__} built from the child's config does not run ({type(error).__name__}: "
                            f"{first}): a limit of the class with the child's layers and sizes") from error
    if not changed:
        return
    tensors = model.state_dict(keep_vars=True)
    folded = staging / "folded"
    folded.mkdir()
    with torch.no_grad():
        write_shards(folded, entries, lambda n: tensors[n].detach() if n in changed else written.read(n), shard_size)
    for path in staging.glob("model*.safetensors*"):
        path.unlink()
    for path in folded.iterdir():
        path.rename(staging / path.name)
    folded.rmdir()


def _why(name: str, old, new, child: fx.GraphModule) -> str:
    sizes = [c for c in required(child, pass_state.SIZE_CHANGES) if c.parent == old and c.child == new]
    if sizes:
        return "the child's " + " / ".join(sorted({c.kind for c in sizes})) + " size"
    if old == required(child, pass_state.PARENT_LAYER_COUNT) and new == len(required(child, pass_state.LAYERS)):
        return "the child's layer count"
    rescale = pass_state.RESCALE.get(child)
    if isinstance(old, float) and rescale is not None and math.isclose(old * rescale.eps_scale, new, rel_tol=1e-9):
        return (f"the √(D/d) rescale's ε: a norm over the kept d of D channels adds ε·D/d "
                f"(× {rescale.eps_scale:.4g}) to keep the parent's normalised values")
    if isinstance(old, list) and isinstance(new, list):
        return "one entry per kept layer"
    if name == "dtype":
        return "the child's dtype"
    if name == "quantization_config":
        return "the child's weights are plain floating tensors"
    return "the class matches the child's outputs only with it"


def config_changes(parent, config, child: fx.GraphModule) -> list[ConfigChange]:
    """Every field of ``config`` that differs from ``parent``'s, with why."""
    before, after = parent.to_dict(), config.to_dict()
    ignored = {"architectures", "transformers_version", "_name_or_path", "torch_dtype"}
    names = [k for k in [*before, *(k for k in after if k not in before)] if k not in ignored]
    return [ConfigChange(k, before.get(k), after.get(k), _why(k, before.get(k), after.get(k), child))
            for k in names if before.get(k) != after.get(k)]


def _parent_folder(child: fx.GraphModule) -> Path | None:
    path = getattr(required(child, pass_state.PARENT_CONFIG), "_name_or_path", "") or ""
    return Path(path) if path and Path(path).is_dir() else None


def _companions(child, staging: Path, config, parent_folder: Path | None, tokenizer) -> list[str]:
    """The generation config and the tokenizer: from the parent's folder, as they are."""
    copied = []
    names = ["generation_config.json", *([] if tokenizer is not None else TOKENIZER_FILES)]
    for name in names if parent_folder is not None else ():
        if (parent_folder / name).is_file():
            shutil.copyfile(parent_folder / name, staging / name)
            copied.append(name)
    cls = required(child, pass_state.PARENT_CLASS)
    if "generation_config.json" not in copied and getattr(cls, "can_generate", lambda: False)():
        from transformers import GenerationConfig
        GenerationConfig.from_model_config(config).save_pretrained(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    return copied


def write_folder(child: fx.GraphModule, staging: Path, weights=None, *, shard_size: int = DEFAULT_SHARD_SIZE,
                 parent_folder=None, tokenizer=None) -> Written:
    """Write ``child`` into the empty folder ``staging`` (module docstring); ``weights``: where
    its tensors come from (default: the graph's own; ``CheckpointWeights`` for a streamed child)."""
    weights = weights if weights is not None else ResidentWeights()       # anything with .tensor(gm, value, name)
    cls, parent = required(child, pass_state.PARENT_CLASS), required(child, pass_state.PARENT_CONFIG)
    names = hf_names(child)
    stored = _stored(child, names)
    tensors = child.state_dict(keep_vars=True)
    entries = [(hf, tuple(tensors[name].shape), tensors[name].dtype) for hf, name in stored.items()]

    with torch.no_grad():
        write_shards(staging, entries, lambda hf: weights.tensor(child, tensors[stored[hf]], hf).detach(), shard_size)
    source = _WrittenWeights(child, stored, CheckpointReader(staging))
    inputs = _checked_inputs(child)
    checked = list(zip(inputs, segment_outputs(child, inputs, source)))
    reference = checked[0][1]
    table_of = lambda node: source.fetch(child, [node.target])[node.target]  # noqa: E731
    scales = {source.name_of(get_attribute(child, target)): scale
              for target, scale in child_scales(child, table_of).items()}
    written = source.written
    config = child_config(child, child_state_dict(child), distance=_distance(child, written, reference, scales))
    _refold(child, config, staging, entries, shard_size, scales)
    config.dtype = model_dtype(child)
    config.architectures = [cls.__name__]
    config.save_pretrained(staging)
    folder = Path(parent_folder) if parent_folder is not None else _parent_folder(child)
    copied = _companions(child, staging, config, folder, tokenizer)
    return Written(config, reference, config_changes(parent, config, child), copied, checked=checked)
