"""The ``subclone`` command line (``main``): ``demo``, ``run``, ``inspect``, ``convert``.

``main.py`` parses (``parser.py``), checks what it can without torch (``preflight.py``) and
dispatches to ``commands.py``; ``loaders.py`` loads MODEL and ``--calib``; ``run_checkpoint.py``
runs a checkpoint folder through the streamed path; ``report.py`` prints phases and tables.
``import subclone_graph.cli`` imports no torch: ``subclone --help`` answers at once.
"""
from subclone_graph.cli.main import build_parser, main, user_errors

__all__ = ["main", "build_parser", "user_errors"]
