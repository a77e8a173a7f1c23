"""Calibration batches streamed from disk: a large set is read window by window, never whole.

``TokenStream(path, ...)`` is a re-iterable of ``(input_ids,)`` batches of ``batch_size``
windows of ``window`` tokens, stopping after ``max_tokens`` tokens (whole windows) or
``max_batches`` batches. Memory holds one file chunk (text), one tensor (a token file) and one
batch — whatever the size of the set. Sources:

1. a text file, or a folder of ``*.txt`` / ``*.md`` files (sorted): read in chunks of about
   ``CHUNK_CHARS`` characters cut at whitespace, each chunk tokenized on its own (so a window may
   differ from whole-text tokenization at a chunk boundary, never within a chunk);
2. a ``.pt`` file of integer token ids (a tensor, or a list/tuple of tensors), or a folder of
   ``.pt`` / ``.safetensors`` files read one file (a safetensors file: one tensor) at a time.
   A 2-D tensor's rows are cut into windows, a 1-D tensor is one run of tokens.

Every problem raises a one-line ``ValueError`` naming the file: not UTF-8, not a tensor file,
not integer token ids, an id outside the vocabulary, nothing to read, fewer tokens than a window.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from subclone_graph import data

__all__ = ["TokenStream", "TOKEN_SUFFIXES", "CHUNK_CHARS", "is_token_folder"]

TOKEN_SUFFIXES = (".pt", ".safetensors")
CHUNK_CHARS = 1 << 20


def is_token_folder(path: Path) -> bool:
    return path.is_dir() and any(p.suffix in TOKEN_SUFFIXES for p in path.iterdir() if p.is_file())


def _text_chunks(file: Path):
    try:
        with open(file, encoding="utf-8") as handle:
            carry = ""
            while True:
                block = handle.read(CHUNK_CHARS)
                if not block:
                    break
                text = carry + block
                cut = max(text.rfind(" "), text.rfind("\n"))
                carry, text = (text[cut + 1:], text[:cut + 1]) if cut > 0 else ("", text)
                yield text
            if carry:
                yield carry
    except UnicodeDecodeError as error:
        raise ValueError(f"{file}: not UTF-8 text (byte {error.start}: {error.reason})") from None


def _token_tensors(file: Path):
    """The token tensors of one ``.pt`` / ``.safetensors`` file, one at a time where the format allows."""
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in sorted(handle.keys()):
                    yield f"{file} [{key}]", handle.get_tensor(key)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{file}: not a safetensors file of token ids ({str(error)[:120]})") from None
        return
    try:
        loaded = torch.load(file, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        raise ValueError(f"{file}: not a tensor file of token ids ({type(error).__name__})") from None
    items = list(loaded) if isinstance(loaded, (list, tuple)) else [loaded]
    for index, item in enumerate(items):
        yield f"{file} [{index}]", item


def _check_ids(where: str, ids, vocab: int | None) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{where}: holds a {type(ids).__name__}, not a tensor of token ids")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.dim() not in (1, 2):
        raise ValueError(f"{where}: holds {ids.dtype} values of shape {tuple(ids.shape)}, not token ids "
                         f"(1-D or 2-D integers)")
    if vocab is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"{where}: holds token ids outside the model's vocabulary 0..{vocab - 1}")
    return ids.to(torch.long)


class TokenStream:
    """Lazy calibration batches from a text or token path (module docstring)."""

    def __init__(self, path, tokenizer=None, window: int = 128, batch_size: int = 4,
                 max_tokens: int | None = None, max_batches: int | None = None, vocab: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"calibration data not found: {self.path}")
        for name, value in (("window", window), ("batch size", batch_size), ("token cap", max_tokens),
                            ("batch cap", max_batches)):
            if value is not None and value < 1:
                raise ValueError(f"{self.path}: {name} {value} must be at least 1")
        self.tokenizer, self.window, self.batch_size = tokenizer, window, batch_size
        self.max_tokens, self.max_batches, self.vocab = max_tokens, max_batches, vocab
        self.text = not (self.path.suffix in TOKEN_SUFFIXES or is_token_folder(self.path))
        if self.text and tokenizer is None:
            raise ValueError(f"--calib {self.path}: text needs a tokenizer and this model has none; "
                             f"give token ids (.pt or .safetensors) instead")

    def _files(self) -> list[Path]:
        if not self.path.is_dir():
            return [self.path]
        suffixes = data.TEXT_SUFFIXES if self.text else TOKEN_SUFFIXES
        files = sorted(p for p in self.path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
        if not files:
            raise ValueError(f"{self.path}: no {' or '.join(suffixes)} files in this folder")
        return files

    def _runs(self):
        """(where, 1-D token ids) runs; a window never spans two runs."""
        for file in self._files():
            if self.text:
                for chunk in _text_chunks(file):
                    yield str(file), torch.tensor(data.encode(chunk, self.tokenizer), dtype=torch.long)
                continue
            for where, ids in _token_tensors(file):
                ids = _check_ids(where, ids, self.vocab)
                yield from ((where, row) for row in (ids if ids.dim() == 2 else [ids]))

    def _windows(self):
        carry = torch.zeros(0, dtype=torch.long)
        for _, ids in self._runs():
            ids = torch.cat([carry, ids]) if self.text else ids
            whole = ids.numel() // self.window * self.window
            yield from ids[:whole].view(-1, self.window)
            carry = ids[whole:] if self.text else carry

    def __iter__(self):
        batch, tokens, batches = [], 0, 0
        for window in self._windows():
            if self.max_tokens is not None and tokens + self.window > self.max_tokens:
                break
            batch.append(window)
            tokens += self.window
            if len(batch) == self.batch_size:
                yield (torch.stack(batch),)
                batch, batches = [], batches + 1
                if self.max_batches is not None and batches >= self.max_batches:
                    return
        if batch:
            yield (torch.stack(batch),)
        elif tokens == 0:
            raise ValueError(f"{self.path}: fewer tokens than one window of {self.window} (--seq-len)")
