"""The ``subclone`` command line: ``demo``, ``run``, ``inspect`` and ``convert``.

    subclone demo [--out DIR]
    subclone run MODEL --hidden 432 --layers 20 --heads 6 --kv-heads 2 --ffn 1024 \\
                 [--latent 0.5] [--multiple-of 64] --calib corpus.txt --out child/ [--format pt2 onnx hf]
    subclone inspect MODEL [--calib PATH]
    subclone convert MODEL.gguf FOLDER

This module and what it imports first (``parser``, ``preflight``) load no torch: ``--help``
answers at once, and a mistyped path, a bad option or a size the parent cannot give
(``preflight``) is refused before the model is loaded. Only then are the commands
(``commands.py``) imported.

``--out`` is checked first, then MODEL: an output that cannot be written is named before a
missing model. User errors — a missing, truncated or corrupt file, a bad target or option, an existing output
without ``--overwrite``, a bad ``module:factory``, a child a pass or an output format refuses —
print one line ``subclone: error: ...`` to stderr and exit with status 2 (``--traceback``, before
or after the command, shows the full traceback instead). A path inside the staging folder is
printed as the path under ``--out`` it stands for. Ctrl-C prints one line and exits 130;
nothing is left half-written. Any other exception is a bug and propagates.
"""
from __future__ import annotations

import re
import sys

from subclone_graph.cli import preflight
from subclone_graph.cli.messages import first_line
from subclone_graph.cli.parser import FORMATS, OUTPUT_NAMES, TARGET_FIELDS, build_parser

__all__ = ["main", "build_parser", "user_errors"]

# the package's error types that are the user's, by module (only loaded modules can have raised)
_USER_ERROR_TYPES = {
    "subclone_graph.passes.errors": ("PassError",), "subclone_graph.tracing": ("TraceError",),
    "subclone_graph.export.hf": ("HFExportError",), "subclone_graph.export.onnx_export": ("OnnxExportError",),
    "subclone_graph.export.pt2": ("RoundTripError",), "subclone_graph.runtime.distributed": ("DistributedError",),
    "subclone_graph.checkpoint.files": ("CheckpointError",),
}
_BUILTIN_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError,
                        PermissionError, ImportError)
_STAGING = re.compile(r"\.subclone-staging-\d+-[0-9a-f]+/|\.hf-[A-Za-z0-9_]+/(?=hf\b)")


def user_errors() -> tuple:
    """The exception types the command line reports in one line (exit 2)."""
    found = list(_BUILTIN_USER_ERRORS)
    for module, names in _USER_ERROR_TYPES.items():
        loaded = sys.modules.get(module)
        found += [getattr(loaded, n) for n in names if loaded is not None and hasattr(loaded, n)]
    return tuple(found)


def _in_option_words(message: str) -> str:
    """The API's names (``Target.kv_heads=3``, ``depth="measured"``) as the options the user typed,
    and a staged path as the path under ``--out`` it was going to be."""
    message = re.sub(rf"\bTarget\.({'|'.join(TARGET_FIELDS)})=(\S+)",
                     lambda m: f"--{m[1].replace('_', '-')} {m[2]}", message)
    message = re.sub(r"\bTarget\.multiple_of=(\S+)", r"--multiple-of \1", message)
    message = re.sub(r" \(or None to keep the parent's\)", " (omit the option to keep the parent's)", message)
    message = _STAGING.sub("", message)
    return re.sub(r'\b(depth|selection)="(\w+)"', r"--\1 \2", message)


def _check_early(args) -> None:
    """What needs no torch (``preflight``): ``--out``, MODEL, ``--calib``, counts, sizes, formats."""
    if args.command not in ("run", "inspect"):
        return
    if args.command == "run":
        from subclone_graph.export import destination

        formats = set(args.format) | ({"onnx"} if args.onnx else set())
        destination.check_outputs(args.out, {OUTPUT_NAMES[f]: f == "hf" for f in formats},
                                  overwrite=args.overwrite, option="--overwrite")
    kind = preflight.model_kind(args.model)
    preflight.check_calibration_options(args.calib_batches, args.batch_size, args.seq_len, args.calib_tokens)
    preflight.check_calibration_path(args.calib)
    if args.command != "run":
        return
    sizes, where = preflight.parent_sizes(args.model, kind)
    preflight.check_target_sizes({f: getattr(args, f) for f in TARGET_FIELDS}, sizes, where)
    formats = set(args.format) | ({"onnx"} if args.onnx else set())
    if "hf" in formats and kind == "pt2":
        raise ValueError(f"--format hf needs the Hugging Face parent, not a .pt2 child ({args.model}); "
                         "write --format pt2 or onnx, or subclone the parent's folder")
    if "onnx" in formats:
        import importlib.util
        missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise ImportError(f"--format onnx needs {', '.join(missing)} (pip install {' '.join(missing)})")
    assert formats <= set(FORMATS)


def main(argv=None) -> int:
    """Run the command line; return the exit status (0, 2 for a user error, 130 on Ctrl-C)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:           # --help
        return done.code or 0
    except ValueError as error:
        print(f"subclone: error: {first_line(error)}", file=sys.stderr)
        return 2
    try:
        _check_early(args)
        from subclone_graph.cli import commands
        handler = {"demo": commands.cmd_demo, "run": commands.cmd_run, "inspect": commands.cmd_inspect,
                   "convert": commands.cmd_convert}[args.command]
        return handler(args)
    except KeyboardInterrupt:
        print("subclone: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as error:
        if getattr(args, "traceback", False) or not isinstance(error, user_errors()):
            raise
        print(f"subclone: error: {_in_option_words(first_line(error))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
