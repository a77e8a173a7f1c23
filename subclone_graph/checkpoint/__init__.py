"""Safetensors checkpoint folders read and written tensor by tensor, and the streamed subcloning
of a parent that never has to fit in memory.

``files.py`` reads and writes safetensors shards; ``converted.py`` reads parameters transformers
stores converted (fused experts); ``weightless_parent.py`` traces the parent class with fake
weights; ``streamed.py`` is ``subclone_checkpoint``; ``write_child.py`` writes and checks its child.
"""
from subclone_graph.checkpoint.files import CheckpointError, CheckpointReader
from subclone_graph.checkpoint.streamed import StreamReport, subclone_checkpoint

__all__ = ["subclone_checkpoint", "StreamReport", "CheckpointError", "CheckpointReader"]
