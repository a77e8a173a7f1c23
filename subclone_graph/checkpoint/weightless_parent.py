"""The parent of a streamed subcloning: its class traced with no real weights.

The class named by ``config.json`` (``architectures[0]``, a ``transformers`` class) is built
under ``accelerate.init_empty_weights(include_buffers=False)``: parameters on the meta device,
buffers real (rotary ``inv_freq``, position ids: computed, not stored). Every parameter is then
swapped for a fake CPU tensor (no storage) with the checkpoint's dtype and shape, after checking
that shape against the checkpoint's header; a buffer the checkpoint stores is read from it.
Tied parameters (an output head tied to the embedding) stay one tensor, found in the
checkpoint under whichever of their names it was saved. A parameter the checkpoint stores
converted (per-expert tensors that loading fuses) is read under its own name through
``stream_convert.ConvertingReader``, which replays ``transformers``' conversion on slices.

Why fake CPU tensors and not meta ones: ``torch.export`` fakifies the example inputs as CPU
tensors, and an op mixing them with meta parameters (``embedding(weight, ids)``) fails fake
device propagation; a fake CPU parameter has the inputs' device and no bytes. ``export``
detects the parameters' ``FakeTensorMode`` and traces in it.

Returns the traced ``GraphModule``, its parameters fake, each with its ``EditProgram`` (the
checkpoint tensor that holds it) in ``state.TENSOR_ORIGINS``: the rewrites append their edits
(``passes.tensor_edits``), and ``CheckpointWeights`` reads any tensor of the graph — the parent's
for calibration, the child's for writing — by replaying its program.
"""
from __future__ import annotations

import copy
import itertools
import warnings
from pathlib import Path

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from subclone_graph.passes import state
from subclone_graph.passes.errors import PassError
from subclone_graph.passes.fx_utils import get_attribute, set_attribute
from subclone_graph.passes.tensor_edits import EditProgram

from subclone_graph.checkpoint.files import CheckpointError, CheckpointReader
from subclone_graph.checkpoint.converted import ConvertingReader
from subclone_graph.tracing import fast_export_settings, trace

__all__ = ["weightless_parent", "CheckpointWeights", "is_fake", "parent_class", "resident_copy"]


def is_fake(value) -> bool:
    return isinstance(value, FakeTensor)


def parent_class(folder: Path):
    """The config and the ``transformers`` class its ``architectures`` names."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{folder / 'config.json'}: {str(error).splitlines()[0]}") from None
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise CheckpointError(f"{folder / 'config.json'}: architectures {names} names no transformers class")
    return config, cls


def _empty_model(folder: Path):
    from accelerate import init_empty_weights
    from transformers.utils import logging as hf_logging

    config, cls = parent_class(folder)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with init_empty_weights(include_buffers=False):
            model = cls(config)
        if hasattr(model, "tie_weights"):
            # as from_pretrained does (outside the context, whose register_parameter re-wraps)
            model.tie_weights()
    finally:
        hf_logging.set_verbosity(level)
    return model.eval()


def _tied_groups(model: torch.nn.Module) -> list[tuple[list[str], torch.Tensor, bool]]:
    groups: dict[int, tuple[list[str], torch.Tensor, bool]] = {}
    parameters = model.named_parameters(remove_duplicate=False)
    buffers = model.named_buffers(remove_duplicate=False)
    for (name, tensor), is_parameter in itertools.chain(((p, True) for p in parameters), ((b, False) for b in buffers)):
        groups.setdefault(id(tensor), ([], tensor, is_parameter))[0].append(name)
    return list(groups.values())


def _saved_names(model: torch.nn.Module) -> tuple[dict[str, str], set[str]]:
    """{model name: the name ``save_pretrained`` writes it under} for tensors it only renames,
    and the names it converts (splits, fuses: MoE experts), read through ``stream_convert``."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return {}, set()
    named = dict(itertools.chain(model.named_parameters(remove_duplicate=False),
                                 model.named_buffers(remove_duplicate=False)))
    try:
        saved = revert_weight_conversion(model, dict(named))
    except Exception:              # no conversion this transformers knows how to revert
        return {}, set()
    by_id = {id(v): k for k, v in saved.items()}
    renamed = {name: by_id[id(t)] for name, t in named.items() if id(t) in by_id}
    return renamed, {name for name in named if name not in renamed}


def _set(model: torch.nn.Module, name: str, value: torch.Tensor, is_parameter: bool) -> None:
    prefix, _, leaf = name.rpartition(".")
    owner = model.get_submodule(prefix) if prefix else model
    (owner._parameters if is_parameter else owner._buffers)[leaf] = value


def _swap_in_fakes(model: torch.nn.Module, reader: ConvertingReader, folder: Path) -> dict[str, str]:
    with fast_export_settings():        # export traces in this mode: made without the dispatch cache
        mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
    keys: dict[str, str] = {}
    saved, converted = _saved_names(model)
    reader.learn(model, converted)      # those built by transformers' conversion: read through it
    for names, tensor, is_parameter in _tied_groups(model):
        key = next((k for n in names for k in (saved.get(n), n) if k is not None and k in reader), None)
        if key is None:
            if is_parameter:
                raise CheckpointError(f"{folder}: tensor {names[0]} (a parameter of config.json's "
                                      f"{type(model).__name__}) is not in the checkpoint")
            continue                             # a computed buffer: stays as built
        info = reader.info(key)
        if tuple(info.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{info.file}: tensor {key} has shape {tuple(info.shape)}, but config.json's "
                                  f"{type(model).__name__} expects {tuple(tensor.shape)}")
        if is_parameter:
            with mode:
                value = torch.empty(info.shape, dtype=info.dtype)
            value = torch.nn.Parameter(value, requires_grad=tensor.requires_grad)
        else:
            value = reader.read(key)
        for name in names:
            _set(model, name, value, is_parameter)
            keys[name] = key
    return keys


def weightless_parent(folder: Path, reader: ConvertingReader, example_inputs) -> fx.GraphModule:
    """The traced parent with fake parameters, each with its program in ``state.TENSOR_ORIGINS``
    (the checkpoint tensor that holds it, no edits yet)."""
    model = _empty_model(folder)
    keys = _swap_in_fakes(model, reader, folder)
    gm = trace(model, example_inputs)
    programs = {}
    for name, tensor in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        if is_fake(tensor) and name not in keys:
            raise CheckpointError(f"{folder}: the traced graph reads {name}, which no checkpoint tensor holds")
        if is_fake(tensor):
            programs.setdefault(id(tensor), (tensor, EditProgram(keys[name], tuple(tensor.shape))))
    state.TENSOR_ORIGINS.set(gm, programs)
    return gm


class CheckpointWeights:
    """The weight source of a weightless graph (``passes.analysis.segments``): a fake tensor is
    read from the checkpoint by replaying its program — its kept slices, then its steps — and a
    real one (a computed buffer) is the module's own. Calibration and the writer both read here."""

    resident = False

    def __init__(self, reader=None) -> None:
        self.reader = reader

    def open(self, folder) -> ConvertingReader:
        """Read from the checkpoint in ``folder`` (validated: every shard and tensor); its reader."""
        self.reader = ConvertingReader(CheckpointReader(folder))
        return self.reader

    def tensor(self, gm: fx.GraphModule, value: torch.Tensor, name: str = "") -> torch.Tensor:
        if not is_fake(value):
            return value
        programs = state.TENSOR_ORIGINS.need(gm)
        if id(value) not in programs:
            raise PassError(f"tensor {name} of the child has no recorded program in the parent")
        read = programs[id(value)][1].replay(self.reader.read)
        # as the parameter it stands for: aten.matmul picks its algorithm by requires_grad
        return read.requires_grad_() if value.requires_grad and read.is_floating_point() else read

    def fetch(self, gm: fx.GraphModule, targets) -> dict:
        return {target: self.tensor(gm, get_attribute(gm, target), target) for target in targets}


def resident_copy(gm: fx.GraphModule, weights: CheckpointWeights) -> fx.GraphModule:
    """A copy of the weightless graph ``gm`` holding its real tensors, each read once through
    ``weights`` (its program replayed: the bits the writer writes); tied tensors stay tied."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = copy.deepcopy(gm)
    values = {}
    for name, tensor in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        if is_fake(tensor):
            if id(tensor) not in values:
                read = weights.tensor(gm, tensor, name).detach()
                values[id(tensor)] = torch.nn.Parameter(read, tensor.requires_grad) \
                    if isinstance(tensor, torch.nn.Parameter) else read
            set_attribute(real, name, values[id(tensor)])
    state.TENSOR_ORIGINS.clear(real)
    return real
