"""Calibration and evaluation data helpers.

Everything here produces plain tensors or *calibration batches*: a list of
tuples of tensors, each tuple holding the positional inputs of one forward
call (``(input_ids,)`` for a language model, ``(pixel_values,)`` for an image
model).  That is the form a calibration argument takes: any iterable of
input tuples.

Text sources
    :func:`english_corpus` (about 0.5 MB of English prose from the standard
    library, no download), :func:`load_text_path` (a file or a folder).

Tokenizer protocol
    :func:`text_windows` accepts any object with an ``encode(text)`` method
    that returns a sequence of integer token ids (a list, tuple, array or 1-D
    tensor).  Hugging Face tokenizers satisfy it; for them (any ``encode``
    that takes an ``add_special_tokens`` keyword) special tokens are turned
    off so the windows are raw, contiguous text.  A tokenizer without
    ``encode`` but callable, returning a dict-like with ``"input_ids"``, is
    accepted too.

Other sources
    :func:`load_tensor_file` (a ``.pt`` file), :func:`image_folder_batches`
    (a folder of images; needs Pillow).

Evaluation
    :func:`held_out_loss`: mean next-token cross-entropy in nats.
"""

from __future__ import annotations

import inspect
import pathlib
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "IMAGE_SUFFIXES",
    "TEXT_SUFFIXES",
    "calibration_batches",
    "encode",
    "english_corpus",
    "held_out_loss",
    "image_folder_batches",
    "load_tensor_file",
    "load_text_path",
    "split_windows",
    "text_windows",
]

TEXT_SUFFIXES = (".txt", ".md")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

Batch = tuple[torch.Tensor, ...]


def english_corpus() -> str:
    """English prose from the standard library's ``pydoc_data.topics``.

    The topic texts are concatenated in sorted key order, separated by blank
    lines, so the result is the same on every run (about 0.5 MB).
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _encode(text: str, tokenizer: Any) -> list[int]:
    """Token ids of ``text`` under the tokenizer protocol (see module doc)."""
    encode = getattr(tokenizer, "encode", None)
    if encode is not None:
        try:
            params = inspect.signature(encode).parameters
        except (TypeError, ValueError):
            params = {}
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        if "add_special_tokens" in params or takes_kwargs:
            ids = encode(text, add_special_tokens=False)
        else:
            ids = encode(text)
    elif callable(tokenizer):
        ids = tokenizer(text)["input_ids"]
    else:
        raise TypeError(
            f"tokenizer {type(tokenizer).__name__} has no encode(text) method"
        )
    if isinstance(ids, torch.Tensor):
        return ids.reshape(-1).tolist()
    return [int(i) for i in ids]


def encode(text: str, tokenizer: Any) -> list[int]:
    """Token ids of ``text`` under the tokenizer protocol (see module doc)."""
    return _encode(text, tokenizer)


def text_windows(
    text: str,
    tokenizer: Any,
    window: int = 128,
    count: int | None = None,
    stride: int | None = None,
) -> torch.Tensor:
    """Cut ``text`` into windows of ``window`` token ids.

    The text is tokenized once; windows start every ``stride`` tokens
    (default ``window``: consecutive, non-overlapping) and a trailing
    remainder shorter than a window is dropped.  ``count`` keeps only the
    first ``count`` windows.

    Returns:
        an int64 tensor of shape ``(n, window)``.

    Raises:
        ValueError: the text holds fewer than ``window`` tokens, or an
            argument is not positive.
    """
    stride = window if stride is None else stride
    if window < 1 or stride < 1 or (count is not None and count < 1):
        raise ValueError(
            f"window, stride and count must be positive, got {window}, {stride}, {count}"
        )
    ids = torch.tensor(_encode(text, tokenizer), dtype=torch.long)
    if ids.numel() < window:
        raise ValueError(
            f"text is too short: {ids.numel()} tokens, fewer than one window of {window}"
        )
    windows = ids.unfold(0, window, stride)
    if count is not None:
        windows = windows[:count]
    return windows.contiguous()


def split_windows(
    windows: torch.Tensor, held_out_fraction: float = 0.25
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split windows into ``(train, held_out)``, deterministically.

    The held-out part is the last ``round(n * held_out_fraction)`` windows
    (at least one, and at least one is left for training): the end of the
    text, which non-overlapping training windows never see.
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(
            f"held_out_fraction must be between 0 and 1, got {held_out_fraction}"
        )
    n = len(windows)
    if n < 2:
        raise ValueError(f"need at least 2 windows to split, got {n}")
    held = min(n - 1, max(1, round(n * held_out_fraction)))
    return windows[: n - held], windows[n - held :]


def calibration_batches(
    windows: torch.Tensor, batch_size: int = 4, count: int | None = 16
) -> list[Batch]:
    """Group windows into at most ``count`` batches of ``(input_ids,)``.

    The last batch may be smaller than ``batch_size``; ``count=None`` keeps
    every batch.
    """
    if batch_size < 1 or (count is not None and count < 1):
        raise ValueError(
            f"batch_size and count must be positive, got {batch_size}, {count}"
        )
    batches = [(chunk,) for chunk in torch.split(windows, batch_size)]
    return batches if count is None else batches[:count]


def _read_text(path: pathlib.Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8"
        ) from error


def load_text_path(path: str | pathlib.Path) -> str:
    """Read a text file, or every ``*.txt``/``*.md`` file in a folder.

    Folder files are read in sorted name order (not recursively) and joined
    with blank lines.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file, or every file in the folder, is empty or not
            UTF-8 (the message names the file), or the folder holds no text file.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text path not found: {path}")
    if path.is_dir():
        files = sorted(
            p for p in path.iterdir() if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
        )
        if not files:
            raise ValueError(f"no *.txt or *.md files in folder: {path}")
        text = "\n\n".join(_read_text(p) for p in files)
    else:
        text = _read_text(path)
    if not text.strip():
        raise ValueError(f"text path is empty: {path}")
    return text


def _as_batch(item: Any, path: pathlib.Path) -> Batch:
    """One element of a tensor file as an input tuple."""
    if isinstance(item, torch.Tensor):
        return (item,)
    if isinstance(item, (list, tuple)) and item and all(
        isinstance(t, torch.Tensor) for t in item
    ):
        return tuple(item)
    raise ValueError(
        f"{path}: expected tensors or tuples of tensors, got {type(item).__name__}"
    )


def load_tensor_file(path: str | pathlib.Path, batch_size: int = 4) -> list[Batch]:
    """Calibration batches from a ``.pt`` file (``torch.load(weights_only=True)``).

    The file holds either one tensor, split along dim 0 into batches of
    ``batch_size`` (default 4), or a list/tuple whose elements are tensors
    (one batch each) or tuples/lists of tensors (one input tuple each).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tensor file not found: {path}")
    try:
        data = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        # torch's own message advises an unsafe load; this one says what the file must hold
        raise ValueError(
            f"{path}: not a tensor file this loader reads (it must hold only tensors, or "
            f"lists/tuples of tensors, saved with torch.save); {type(error).__name__}"
        ) from error
    if isinstance(data, torch.Tensor):
        if data.dim() == 0 or data.shape[0] == 0:
            raise ValueError(f"{path}: tensor has no batch dimension to split")
        return [(chunk,) for chunk in torch.split(data, batch_size)]
    if isinstance(data, (list, tuple)):
        if not data:
            raise ValueError(f"{path}: tensor file holds an empty list")
        return [_as_batch(item, path) for item in data]
    raise ValueError(
        f"{path}: expected a tensor or a list of tensors, got {type(data).__name__}"
    )


def _read_image(file: pathlib.Path, size: tuple[int, int], image_module: Any) -> torch.Tensor:
    """One image as a float tensor (3, H, W) in [0, 1]."""
    with image_module.open(file) as img:
        img = img.convert("RGB").resize((size[1], size[0]), image_module.BILINEAR)
        raw = bytearray(img.tobytes())
    pixels = torch.frombuffer(raw, dtype=torch.uint8).view(size[0], size[1], 3)
    return pixels.permute(2, 0, 1).float() / 255.0


def image_folder_batches(
    path: str | pathlib.Path,
    size: int | tuple[int, int],
    batch_size: int = 4,
    count: int | None = 16,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
) -> list[Batch]:
    """Images of a folder as ``(pixel_values,)`` batches, shape (B, 3, H, W).

    Files with an image suffix are read in sorted name order, converted to
    RGB, resized to ``size`` (an int for a square, or ``(height, width)``)
    and normalised as ``(x - mean) / std`` per channel.  At most ``count``
    batches are read.  Needs Pillow (``pip install pillow``).
    """
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError(
            "image_folder_batches needs Pillow; install it with `pip install pillow`"
        ) from exc
    path = pathlib.Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"image folder not found: {path}")
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    files = sorted(
        p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if count is not None:
        files = files[: count * batch_size]
    if not files:
        raise ValueError(f"no image files in folder: {path}")
    images = torch.stack([_read_image(f, hw, Image) for f in files])
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    images = (images - mean_t) / std_t
    return [(chunk,) for chunk in torch.split(images, batch_size)]


def held_out_loss(
    model_fn: Callable[[torch.Tensor], Any],
    windows: torch.Tensor,
    batch_size: int = 4,
) -> float:
    """Mean next-token cross-entropy, in nats per predicted token.

    ``model_fn(input_ids)`` returns logits of shape ``(B, T, V)``, or an
    object with a ``.logits`` attribute, or a tuple whose first element is
    the logits.  Every position but the last predicts the next token; the
    mean is over all predicted tokens of all windows.  A non-finite result
    (``nan``/``inf``) is returned as is, not raised.
    """
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] == 0:
        raise ValueError(
            f"windows must have shape (n>=1, T>=2), got {tuple(windows.shape)}"
        )
    total, tokens = 0.0, 0
    with torch.no_grad():
        for chunk in torch.split(windows, batch_size):
            out = model_fn(chunk)
            logits = getattr(out, "logits", out)
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
            pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
            target = chunk[:, 1:].reshape(-1)
            total += F.cross_entropy(pred, target, reduction="sum").item()
            tokens += target.numel()
    return total / tokens
