"""What the command line checks before it loads anything heavy (no torch, no transformers).

A mistyped path or an impossible size is refused in well under a second — before the model is
loaded and long before the trace:

1. ``model_kind``: MODEL is an existing folder, ``.gguf`` or ``.pt2`` file, or ``module:factory``;
2. ``check_calibration_path`` / ``check_calibration_options``: ``--calib`` exists, the counts are ≥ 1;
3. ``parent_sizes``: the sizes a ``Target`` takes, read from a folder's ``config.json`` or a
   GGUF file's metadata (its header only: ``read_gguf_metadata``), or — once a factory has built
   the model — from the model's config object; only transformers' standard config names
   (``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``,
   ``intermediate_size``) and the GGUF specification's keys are read, and a size not found is
   not checked here (the analysis checks every size on the graph);
4. ``check_target_sizes``: an absolute count above the parent's (hidden, heads, kv heads, ffn:
   not a whole multiple of it; experts: any) and query heads that do not fit the kv grouping are
   refused in the words of the command line, naming where the parent's size was read.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

__all__ = ["model_kind", "check_calibration_path", "check_calibration_options", "parent_sizes",
           "sizes_from_config", "read_gguf_metadata", "check_target_sizes", "SIZE_NAMES"]

MODEL_EXPECTED = "expected a Hugging Face folder, a .gguf or .pt2 file, or module:factory"

# Target field -> transformers' standard config attribute; the GGUF specification's key suffix
SIZE_NAMES = {"hidden": ("hidden_size", "embedding_length"), "layers": ("num_hidden_layers", "block_count"),
              "heads": ("num_attention_heads", "attention.head_count"),
              "kv_heads": ("num_key_value_heads", "attention.head_count_kv"),
              "ffn": ("intermediate_size", "feed_forward_length"), "experts": (None, "expert_count")}


def model_kind(spec: str) -> str:
    """``folder``, ``gguf``, ``pt2`` or ``factory``; a path that is none of these is a one-line error."""
    path = Path(spec)
    if path.is_dir():
        return "folder"
    if path.suffix == ".gguf" and path.is_file():
        return "gguf"
    if path.suffix == ".pt2" and path.is_file():
        return "pt2"
    if path.is_file():
        raise ValueError(f"{spec}: not a model ({MODEL_EXPECTED})")
    if ":" in spec and path.suffix not in (".gguf", ".pt2"):
        module, _, name = spec.partition(":")
        if not module or not name:
            raise ValueError(f"{spec}: expected module:factory, like mypackage.models:build")
        return "factory"
    raise FileNotFoundError(f"model not found: {spec} ({MODEL_EXPECTED})")


def check_calibration_options(batches: int | None, batch_size: int, seq_len: int, tokens: int | None = None) -> None:
    """The command line's numbers, named as the user typed them (None: not given)."""
    for option, value in (("--calib-batches", batches), ("--batch-size", batch_size), ("--seq-len", seq_len),
                          ("--calib-tokens", tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{option} {value}: must be at least 1")


def check_calibration_path(path) -> None:
    if path is not None and not Path(path).exists():
        raise FileNotFoundError(f"calibration data not found: {path}")


# ----- the parent's sizes -------------------------------------------------------------------
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _read(handle, fmt: str):
    size = struct.calcsize(fmt)
    raw = handle.read(size)
    if len(raw) != size:
        raise ValueError("truncated header")
    return struct.unpack(fmt, raw)[0]


def _value(handle, kind: int, keep: bool):
    if kind in _SCALARS:
        return _read(handle, _SCALARS[kind])
    if kind == _STRING:
        raw = handle.read(_read(handle, "<Q"))
        return raw.decode("utf-8", "replace") if keep else None
    if kind == _ARRAY:
        inner, count = _read(handle, "<I"), _read(handle, "<Q")
        if inner in _SCALARS:                 # skipped in one seek
            handle.seek(count * struct.calcsize(_SCALARS[inner]), 1)
        else:
            for _ in range(count):
                _value(handle, inner, False)
        return None
    raise ValueError(f"unknown metadata value type {kind}")


def read_gguf_metadata(path, wanted=None) -> dict:
    """A GGUF file's key/value metadata (arrays skipped), read from its header alone; stops once
    every key of ``wanted`` (a predicate on the key) that can appear has been read."""
    path = Path(path)
    found = {}
    try:
        with open(path, "rb") as handle:
            if handle.read(4) != b"GGUF":
                raise ValueError("not a GGUF file (no GGUF magic)")
            version = _read(handle, "<I")
            if version < 2:
                raise ValueError(f"GGUF version {version} is not supported")
            _read(handle, "<Q")                      # tensor count
            for _ in range(_read(handle, "<Q")):
                key = handle.read(_read(handle, "<Q")).decode("utf-8", "replace")
                value = _value(handle, _read(handle, "<I"), keep=True)
                if wanted is None or wanted(key):
                    found[key] = value
    except (OSError, ValueError, struct.error) as error:
        raise ValueError(f"{path}: truncated or corrupt GGUF file (its metadata cannot be read: {error})") from error
    return found


def sizes_from_config(config) -> dict:
    """Sizes read off a config (a ``config.json`` dict or a transformers config object)."""
    read = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    sizes = {}
    for field, (name, _) in SIZE_NAMES.items():
        value = read(name) if name else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            sizes[field] = value
    keys = config.keys() if isinstance(config, dict) else vars(config).keys()
    if any("intermediate_size" in k and k != "intermediate_size" and read(k) for k in keys):
        sizes.pop("ffn", None)       # other MLP widths beside it (experts, a shared MLP): not one width
    return sizes


def parent_sizes(spec: str, kind: str) -> tuple[dict, str]:
    """(sizes by Target field, where they were read) without loading the model; ({}, "") if unknown."""
    path = Path(spec)
    if kind == "folder" and (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path / 'config.json'}: not a readable JSON config ({error})") from error
        return (sizes_from_config(config), f"{path / 'config.json'}") if isinstance(config, dict) else ({}, "")
    if kind == "gguf":
        metadata = read_gguf_metadata(path, wanted=lambda key: "." in key and not key.startswith("tokenizer."))
        arch = metadata.get("general.architecture")
        sizes = {field: metadata[f"{arch}.{key}"] for field, (_, key) in SIZE_NAMES.items()
                 if isinstance(metadata.get(f"{arch}.{key}"), int) and metadata[f"{arch}.{key}"] > 0}
        return sizes, f"{path} metadata"
    return {}, ""


def check_target_sizes(values: dict, sizes: dict, where: str) -> None:
    """Refuse, in the command line's words, a size no child of this parent can have (module doc)."""
    for field, value in values.items():
        parent = sizes.get(field)
        if parent is None or not isinstance(value, int) or value <= parent or field == "layers":
            continue
        if field == "experts" or value % parent:
            option = f"--{field.replace('_', '-')}"
            raise ValueError(f"{option} {value} is larger than the parent's {field.replace('_', ' ')} ({parent}, "
                             f"read from {where}); allowed: 1..{parent}"
                             + ("" if field == "experts" else f", or a multiple of it ({parent * 2}, {parent * 3}, …: "
                                "grown by cloning) or xN"))
    _check_head_grouping(values, sizes, where)


def _check_head_grouping(values: dict, sizes: dict, where: str) -> None:
    heads, kv_heads = values.get("heads"), values.get("kv_heads")
    n_heads, n_kv = sizes.get("heads"), sizes.get("kv_heads")
    if not isinstance(heads, int) or n_heads is None or n_kv is None or heads > n_heads or n_heads % n_kv:
        return
    kv_heads = kv_heads if isinstance(kv_heads, int) else n_kv if kv_heads is None else None
    if kv_heads is None or kv_heads > n_kv:
        return
    per_group = n_heads // n_kv
    if n_kv > 1 and (heads % kv_heads or heads // kv_heads > per_group):
        raise ValueError(f"--heads {heads} does not fit the kv grouping: the parent has {n_heads} query heads in "
                         f"{n_kv} kv groups ({where}), the child {kv_heads}; --heads must be --kv-heads × "
                         f"(1..{per_group})")
