"""Calibration and evaluation data: text, token, tensor and image sources turned into batches
(``calibration.py``), and large token sets streamed from disk (``token_stream.py``)."""
from subclone_graph.data.calibration import *  # noqa: F401,F403  (the module's __all__)
from subclone_graph.data.calibration import __all__ as _calibration_names
from subclone_graph.data.token_stream import TOKEN_SUFFIXES, TokenStream, is_token_folder

__all__ = [*_calibration_names, "TokenStream", "TOKEN_SUFFIXES", "is_token_folder"]
