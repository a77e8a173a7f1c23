"""Safetensors checkpoint folders read and written tensor by tensor, and the streamed subcloning
of a parent that never has to fit in memory.

``files.py`` reads and writes safetensors shards; ``converted.py`` reads parameters transformers
stores converted (fused experts); ``weightless_parent.py`` traces the parent class with fake
weights and reads any tensor of it through its edit program (``CheckpointWeights``);
``streamed.py`` is ``subclone_checkpoint`` (import it from there or from ``subclone_graph``: it
sits above ``export`` and ``api``, which this package's readers sit below).
"""
from subclone_graph.checkpoint.files import CheckpointError, CheckpointReader

__all__ = ["CheckpointError", "CheckpointReader"]
