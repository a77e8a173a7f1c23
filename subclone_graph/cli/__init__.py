"""The ``subclone`` command line (``main``): ``demo``, ``run``, ``inspect``.

``main.py`` parses and dispatches; ``loaders.py`` loads MODEL and ``--calib``; ``run_checkpoint.py``
runs a checkpoint folder through the streamed path; ``report.py`` prints steps and tables.
"""
from subclone_graph.cli.main import USER_ERRORS, build_parser, main

__all__ = ["main", "build_parser", "USER_ERRORS"]
