"""The command line's inputs: MODEL and ``--calib``, loaded or refused with a one-line error.

MODEL is one of
1. a Hugging Face model folder: ``from_pretrained(folder, local_files_only=True)`` of the class
   named in its config's ``architectures`` (so a classifier keeps its head), falling back to
   ``AutoModelForCausalLM``, then ``AutoModel``;
2. a ``.gguf`` file: ``from_pretrained(its folder, gguf_file=its name)``;
3. a ``.pt2`` file written by ``subclone_graph.save`` (a child subcloned again; its example
   inputs are the ones saved with it; ``--format hf`` needs the Hugging Face parent instead);
4. ``module:factory``: ``factory()`` returns a model, or ``(model, example_inputs)``.

``--calib`` is a text file or folder (tokenized with the model's tokenizer into windows), a
``.pt`` tensor file (``data.load_tensor_file``) or a folder of images. Example inputs for tracing
come from the factory or the ``.pt2``, else from the first calibration batch, else are made from
the model's config (token ids of shape (2, 16)).

Every problem with the files — missing, truncated, corrupt, not what the suffix says, token ids
outside the vocabulary — raises ``ValueError`` / ``FileNotFoundError`` / ``ImportError`` /
``TypeError`` with one line naming the file (the command line prints it and exits 2).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import struct
import sys
from pathlib import Path

import torch

from subclone_graph import data
from subclone_graph.export import pt2
from subclone_graph.export.hf import quiet_transformers
from subclone_graph.data.token_stream import TokenStream, is_token_folder
from subclone_graph.cli.messages import first_line

__all__ = ["Loaded", "load_model", "load_calibration", "example_inputs", "check_token_ids",
           "check_calibration_options", "check_safetensors"]


@dataclasses.dataclass
class Loaded:
    model: torch.nn.Module
    inputs: tuple | None = None      # a factory's (or a .pt2's) example inputs
    tokenizer: object | None = None  # a Hugging Face model's tokenizer


def _file_errors() -> tuple:
    """What reading a broken checkpoint raises: I/O, a bad safetensors header, a short GGUF, bad JSON."""
    errors = [OSError, struct.error, EOFError, UnicodeDecodeError, json.JSONDecodeError]
    with contextlib.suppress(ImportError):
        from safetensors import SafetensorError
        errors.append(SafetensorError)
    return tuple(errors)


# ----- models -------------------------------------------------------------------------------
def load_model(spec: str) -> Loaded:
    """MODEL as a Hugging Face folder, a ``.gguf``, a ``.pt2`` or ``module:factory`` (see module doc)."""
    path = Path(spec)
    if path.is_dir():
        return _load_hf(path)
    if path.suffix == ".gguf" and path.is_file():
        return _load_hf(path.parent, gguf_file=path.name)
    if path.suffix == ".pt2" and path.is_file():
        return _load_pt2(path)
    if path.is_file():
        raise ValueError(f"{spec}: not a model (expected a Hugging Face folder, a .gguf or .pt2 file, "
                         f"or module:factory)")
    if ":" in spec and path.suffix not in (".gguf", ".pt2"):
        return _load_factory(spec)
    raise FileNotFoundError(f"model not found: {spec} (expected a Hugging Face folder, a .gguf or .pt2 "
                            f"file, or module:factory)")


def _load_pt2(path: Path) -> Loaded:
    module, inputs = pt2.load_with_inputs(path)
    return Loaded(module, inputs)


def _model_classes(folder: Path, kwargs: dict) -> list:
    """The class the checkpoint was saved from (its config's ``architectures``), then the Autos."""
    import transformers

    classes = []
    if "gguf_file" not in kwargs:
        config = transformers.AutoConfig.from_pretrained(folder, **kwargs)
        names = getattr(config, "architectures", None) or []
        classes += [getattr(transformers, n) for n in names[:1] if hasattr(transformers, n)]
    return classes + [transformers.AutoModelForCausalLM, transformers.AutoModel]


def _from_pretrained(folder: Path, kwargs: dict):
    classes = _model_classes(folder, kwargs)
    for cls in classes:
        try:
            return cls.from_pretrained(folder, **kwargs)
        except ValueError:            # "Unrecognized configuration class": try the next class
            if cls is classes[-1]:
                raise
    raise AssertionError("unreachable: the last class re-raises")


def check_safetensors(file: Path) -> None:
    """A ``.safetensors`` file must hold its whole header and every tensor it lists (cheap: the
    header only), so that a truncated or corrupt file is named before ``from_pretrained`` runs."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if length is None or length > size - 8:
            raise ValueError(f"{file}: truncated or not a safetensors file (its header does not fit)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{file}: corrupt safetensors header ({error})") from error
    ends = [entry["data_offsets"][1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    if ends and 8 + length + max(ends) > size:
        raise ValueError(f"{file}: truncated: its header lists {8 + length + max(ends):,} bytes, the file has {size:,}")


def _load_hf(folder: Path, **kwargs) -> Loaded:
    where = folder / kwargs["gguf_file"] if "gguf_file" in kwargs else folder
    if "gguf_file" not in kwargs and not (folder / "config.json").is_file():
        raise FileNotFoundError(f"cannot load a Hugging Face model from {folder}: it has no config.json")
    kwargs["local_files_only"] = True
    for weights in sorted(folder.glob("*.safetensors")) if "gguf_file" not in kwargs else []:
        check_safetensors(weights)
    try:
        with quiet_transformers():
            model = _from_pretrained(folder, kwargs)
    except _file_errors() as error:
        raise ValueError(f"cannot load a Hugging Face model from {where}: "
                         f"{first_line(error)} (a truncated or corrupt file?)") from error
    except ValueError as error:
        raise ValueError(f"cannot load a Hugging Face model from {where}: {first_line(error)}") from error
    return Loaded(model.eval(), tokenizer=_load_tokenizer(folder, kwargs))


def _load_tokenizer(folder: Path, kwargs: dict):
    """The folder's tokenizer; None when it has none (an image model). A broken one is an error."""
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
    if "gguf_file" not in kwargs and not any((folder / n).is_file() for n in names):
        return None
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(folder, **kwargs)
    except (*_file_errors(), ValueError, KeyError) as error:
        raise ValueError(f"{folder}: its tokenizer files cannot be loaded: {first_line(error)}") from error


def _load_factory(spec: str) -> Loaded:
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ValueError(f"{spec}: expected module:factory, like mypackage.models:build")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())   # console scripts do not put the working folder there
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(f"cannot import {module_name!r} (from {spec}): {first_line(error)}") from error
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ImportError(f"{module_name!r} has no callable {name!r} (from {spec})")
    return _as_loaded(factory(), spec)


def _as_loaded(made, spec: str) -> Loaded:
    if isinstance(made, torch.nn.Module):
        return Loaded(made)
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        inputs = made[1]
        return Loaded(made[0], (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs))
    raise TypeError(f"{spec} returned {type(made).__name__}; expected a torch.nn.Module or "
                    f"(model, example_inputs)")


# ----- calibration --------------------------------------------------------------------------
def check_calibration_options(batches: int | None, batch_size: int, seq_len: int, tokens: int | None = None) -> None:
    """The command line's numbers, named as the user typed them (None: not given)."""
    for option, value in (("--calib-batches", batches), ("--batch-size", batch_size), ("--seq-len", seq_len),
                          ("--calib-tokens", tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{option} {value}: must be at least 1")


def load_calibration(path, loaded: Loaded, batches: int | None = 4, batch_size: int = 4, seq_len: int = 128,
                     tokens: int | None = None):
    """At most ``batches`` calibration batches from a ``.pt`` file, an image folder or text — a
    list; or, with a token cap ``tokens`` or a folder of token files, a ``data_stream.TokenStream``
    read lazily from disk (``batches`` None: no batch cap)."""
    if path is None:
        return None
    check_calibration_options(batches, batch_size, seq_len, tokens)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"calibration data not found: {path}")
    if tokens is not None or is_token_folder(path) or path.suffix == ".safetensors":
        return TokenStream(path, loaded.tokenizer, seq_len, batch_size, max_tokens=tokens, max_batches=batches,
                           vocab=_vocabulary_size(loaded.model))
    batches = 4 if batches is None else batches
    if path.suffix == ".pt":
        calibration = data.load_tensor_file(path, batch_size)[:batches]
        check_token_ids(calibration, loaded.model, path)
        return calibration
    if path.is_dir() and _is_image_folder(path):
        return data.image_folder_batches(path, _image_size(loaded), batch_size, batches)
    text = data.load_text_path(path)          # an unreadable file is named before anything else
    if loaded.tokenizer is None:
        raise ValueError(f"--calib {path}: text needs a tokenizer and this model has none; "
                         f"give a .pt file of input tensors instead")
    try:
        windows = data.text_windows(text, loaded.tokenizer, window=seq_len)
    except ValueError as error:
        if "too short" in str(error):
            raise ValueError(f"--calib {path}: {first_line(error)} (--seq-len {seq_len})") from error
        raise
    return data.calibration_batches(windows, batch_size, batches)


def _vocabulary_size(model: torch.nn.Module) -> int | None:
    """Rows of the model's input embedding, where the model says which one that is."""
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(size, int):
        return size
    embeddings = getattr(model, "get_input_embeddings", None)
    if callable(embeddings):
        with contextlib.suppress(NotImplementedError, AttributeError):
            return getattr(embeddings(), "num_embeddings", None)
    return None


def check_token_ids(calibration: list, model: torch.nn.Module, path) -> None:
    """Integer first inputs must be token ids of the model's vocabulary (when the model tells it)."""
    vocab = _vocabulary_size(model)
    for index, batch in enumerate(calibration):
        ids = batch[0]
        if vocab is None or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or not ids.numel():
            continue
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            raise ValueError(f"{path}: batch {index} holds token id {high if high >= vocab else low}, outside "
                             f"the model's vocabulary 0..{vocab - 1}")


def _is_image_folder(path: Path) -> bool:
    suffixes = {p.suffix.lower() for p in path.iterdir() if p.is_file()}
    return not suffixes & set(data.TEXT_SUFFIXES) and bool(suffixes & set(data.IMAGE_SUFFIXES))


def _image_size(loaded: Loaded):
    if loaded.inputs and loaded.inputs[0].dim() == 4:
        return tuple(loaded.inputs[0].shape[-2:])
    size = getattr(getattr(loaded.model, "config", None), "image_size", None)
    if size is None:
        raise ValueError("--calib is an image folder but the model's image size is unknown; "
                         "give a .pt file of input tensors instead")
    return size


def example_inputs(loaded: Loaded, calibration, small: bool = False) -> tuple:
    """The factory's inputs, else the first calibration batch, else inputs made from the config.
    ``small``: inputs made from the config (2 × 16 tokens) come before the calibration batch —
    the streamed path traces and checks with them, and a check of a large child on a full
    calibration batch would cost as much as calibrating it."""
    if loaded.inputs is not None:
        return loaded.inputs
    config = getattr(loaded.model, "config", None)
    generator = torch.Generator().manual_seed(0)
    tokens = (torch.randint(0, config.vocab_size, (2, 16), generator=generator),) \
        if getattr(config, "vocab_size", None) else None
    if small and tokens is not None:
        return tokens
    first = calibration[0] if isinstance(calibration, (list, tuple)) and calibration else \
        next(iter(calibration), None) if calibration is not None else None
    if first is not None:
        return tuple(first)
    if tokens is not None:
        return tokens
    if getattr(config, "image_size", None):
        size, channels = config.image_size, getattr(config, "num_channels", 3)
        return (torch.randn(2, channels, size, size, generator=generator),)
    raise ValueError(f"cannot make example inputs for {type(loaded.model).__name__}: give --calib, "
                     f"or a module:factory that returns (model, example_inputs)")
