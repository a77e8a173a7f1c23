"""A GGUF file as an ordinary Hugging Face folder: ``convert_gguf`` / ``subclone convert``.

transformers reads a ``.gguf`` (dequantising its weights) but refuses to ``save_pretrained`` the
model it made ("quantized with gguf and is not serializable"): the model keeps the GGUF's
quantizer and ``quantization_config``, which describe the file it came from, not the float
tensors it now holds. ``convert_gguf`` drops both and writes what is left — ``config.json``,
``model.safetensors`` (shared tensors stored once), ``generation_config.json`` and the
tokenizer — in a staging folder, reloads it with ``from_pretrained``, compares its logits with
the GGUF model's on a few token ids (exact in the converted dtype: the same tensors run by
the same class), and only then moves it into place (``export.destination``: an existing folder
only with ``overwrite``, and only one this package wrote).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from subclone_graph.export.destination import check_destination, replace_with, staging_folder, write_manifest
from subclone_graph.export.tolerance import max_difference, tolerance_for

__all__ = ["convert_gguf", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load(gguf: Path, dtype: torch.dtype):
    import transformers

    from subclone_graph.export.hf import quiet_transformers

    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    try:
        with quiet_transformers():
            tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
            model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError, EOFError) as error:
        first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ValueError(f"cannot read {gguf} as a Hugging Face model: {first}") from error
    return model.eval(), tokenizer


def _as_plain_float(model) -> None:
    """Forget the GGUF storage: the tensors are plain floats now (module doc)."""
    model.hf_quantizer = None
    for attribute in ("quantization_method", "is_quantized"):
        if attribute in vars(model):
            delattr(model, attribute)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _ordinary_permissions(folder: Path) -> None:
    """Files as any other the user writes (the umask's), not the 0600 a weights writer may leave."""
    umask = os.umask(0)
    os.umask(umask)
    for file in folder.iterdir():
        if file.is_file():
            file.chmod(0o666 & ~umask)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def convert_gguf(gguf, folder, *, dtype="float32", overwrite: bool = False) -> float:
    """Write the GGUF file ``gguf`` as a Hugging Face folder ``folder`` of ``dtype`` weights
    (``float32``: the dequantised values exactly; ``bfloat16`` / ``float16`` rounded once);
    return the max |difference| of the reloaded folder's logits from the GGUF model's."""
    gguf = Path(gguf)
    if gguf.suffix != ".gguf" or not gguf.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: allowed values are {', '.join(DTYPES)}")
    folder = check_destination(folder, overwrite=overwrite, folder=True, option="--overwrite")
    model, tokenizer = _load(gguf, DTYPES[dtype])
    _as_plain_float(model)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    with staging_folder(folder.parent) as staging:
        staged = staging / folder.name
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        import transformers

        from subclone_graph.export.hf import quiet_transformers
        with quiet_transformers():
            reloaded = transformers.AutoModelForCausalLM.from_pretrained(staged, dtype=DTYPES[dtype]).eval()
        diff, scale = max_difference([_logits(model, ids)], [_logits(reloaded, ids)])
        if not diff <= tolerance_for(DTYPES[dtype]) * scale:
            raise ValueError(f"the converted folder's logits differ from the GGUF model's by {diff:.3g} "
                             f"(scale {scale:.3g}); nothing written to {folder}")
        _ordinary_permissions(staged)
        write_manifest(staged)
        replace_with(staged, folder, staging)
    return diff
