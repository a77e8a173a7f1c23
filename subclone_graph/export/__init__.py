"""The child written out: ``.pt2`` (``pt2.py``), ONNX checked in onnxruntime (``onnx_export.py``,
grouped expert matmuls through ``onnx_grouped_mm.py``) and a Hugging Face folder of the parent's
class (``hf/``). Every writer checks its destination first, stages, compares the written model with
the child at the dtype's tolerance (``tolerance.py``) and moves it into place whole
(``destination.py``).

Names are imported on first use (PEP 562), as in the package above: ``export.destination`` —
which the command line uses to check ``--out`` before anything loads — imports no torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the submodule that defines it
_EXPORTS = {"save_hf": "hf", "HFExportError": "hf", "export_onnx": "onnx_export", "OnnxExportError": "onnx_export",
            "OnnxMismatchError": "onnx_export", "save": "pt2", "load": "pt2", "tolerance_for": "tolerance"}

__all__ = ["save_hf", "HFExportError", "export_onnx", "OnnxExportError", "OnnxMismatchError", "save", "load",
           "tolerance_for"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # what the names are, for readers and type checkers
    from subclone_graph.export.hf import HFExportError, save_hf
    from subclone_graph.export.onnx_export import OnnxExportError, OnnxMismatchError, export_onnx
    from subclone_graph.export.pt2 import load, save
    from subclone_graph.export.tolerance import tolerance_for
