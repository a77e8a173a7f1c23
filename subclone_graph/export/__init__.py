"""The child written out: ``.pt2`` (``pt2.py``), ONNX checked in onnxruntime (``onnx_export.py``,
grouped expert matmuls through ``onnx_grouped_mm.py``) and a Hugging Face folder of the parent's
class (``hf/``). Every writer checks its destination first, stages, compares the written model with
the child at the dtype's tolerance (``tolerance.py``) and moves it into place whole
(``destination.py``)."""
from subclone_graph.export.hf import HFExportError, save_hf
from subclone_graph.export.onnx_export import OnnxExportError, OnnxMismatchError, export_onnx
from subclone_graph.export.pt2 import load, save
from subclone_graph.export.tolerance import tolerance_for

__all__ = ["save_hf", "HFExportError", "export_onnx", "OnnxExportError", "OnnxMismatchError", "save", "load",
           "tolerance_for"]
