"""``python -m subclone_graph``: the ``subclone`` command line, so that
``torchrun --nproc-per-node N -m subclone_graph run ...`` launches data-parallel calibration."""
from subclone_graph.cli.main import main

raise SystemExit(main())
