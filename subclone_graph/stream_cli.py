"""``subclone run FOLDER``: the streamed path for a safetensors checkpoint folder.

A folder with ``config.json`` and ``model.safetensors`` (or a ``model.safetensors.index.json``)
is subcloned by ``subclone_checkpoint`` unless ``--no-stream`` is given: the parent is never
loaded. The Hugging Face child is written to ``OUT/hf``; ``child.pt2`` / ``child.onnx``, when
asked for, are made from that written child (small), loaded and traced. One progress bar runs
over segments × calibration batches; the closing summary gives the time split (trace /
calibrate / write / check) and the bytes read from the parent against the checkpoint's size.
"""
from __future__ import annotations

import sys
import time
import types
from pathlib import Path

import subclone_graph as sg

from . import io
from .checkpoint import INDEX_NAME, SINGLE_NAME
from .distributed import summary_line
from .report import calibration_source
from .loading import Loaded, example_inputs, load_calibration
from .hf_export import HFExportError
from .stream_parent import parent_class
from .streaming import subclone_checkpoint

__all__ = ["streams", "run_streamed"]


def streams(args) -> bool:
    """Whether ``subclone run`` streams MODEL: a safetensors folder, and no ``--no-stream``."""
    folder = Path(args.model)
    if getattr(args, "no_stream", False) or not folder.is_dir() or not (folder / "config.json").is_file():
        return False
    return (folder / SINGLE_NAME).is_file() or (folder / INDEX_NAME).is_file()


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _bar(iterable):
    from tqdm.auto import tqdm
    return tqdm(iterable, desc="calibration (segments × batches)", unit="step", file=sys.stderr)


def _first_line(error: BaseException) -> str:
    return next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)


def _gib(count: int) -> str:
    return f"{count / 2**30:.2f} GiB"


def _other_formats(files: dict, hf_dir: Path, inputs: tuple, overwrite: bool) -> None:
    if not set(files) - {"hf"}:
        return
    config, cls = parent_class(hf_dir)
    model = cls.from_pretrained(hf_dir).eval()
    child = sg.trace(model, inputs)
    if "pt2" in files:
        print(f"wrote {io.save(child, files['pt2'], overwrite=overwrite)}")
    if "onnx" in files:
        diff = sg.export_onnx(child, inputs, files["onnx"], overwrite=overwrite)
        print(f"wrote {files['onnx']} (onnxruntime max |difference| {diff:.3g})")


def run_streamed(args, target, files: dict) -> int:
    """Stream the checkpoint folder ``args.model`` into ``files`` (see module docstring)."""
    folder = Path(args.model)
    started = time.perf_counter()
    config, _ = parent_class(folder)
    loaded = Loaded(types.SimpleNamespace(config=config), tokenizer=_tokenizer(folder))
    calibration = load_calibration(args.calib, loaded, args.calib_batches, args.batch_size, args.seq_len,
                                   getattr(args, "calib_tokens", None))
    print("no --calib: scoring channels by weight magnitude" if calibration is None
          else calibration_source(calibration, args.calib))
    inputs = example_inputs(loaded, calibration)
    hf_dir = files.get("hf", Path(args.out) / "hf")
    print(f"streaming {folder} (the parent is read segment by segment, never loaded whole)")
    try:
        report = subclone_checkpoint(folder, hf_dir, target, calibration, example_inputs=inputs, depth=args.depth,
                                     selection=args.selection, overwrite=args.overwrite,
                                     device=getattr(args, "device", "cpu"), progress=_bar if calibration else None)
    except HFExportError as error:
        if "hf" in files:
            raise
        raise ValueError(f"{_first_line(error)} — streaming writes the child as its parent's class first; "
                         "--no-stream subclones it in memory instead") from error
    line = None if calibration is None else summary_line(report.calibration_tokens, report.seconds["calibrate"])
    if report.out_dir is None:      # not rank 0: rank 0 writes the outputs
        return 0
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(hf_dir)
    print(f"wrote a Hugging Face checkpoint to {hf_dir} (from_pretrained loads it; max |difference| "
          f"from the child graph {report.max_difference:.3g})")
    _other_formats(files, hf_dir, inputs, args.overwrite)
    parent, child = report.parent_parameters, report.child_parameters
    print(f"parent: {parent:,} parameters")
    print(f"child:  {child:,} parameters ({child / parent:.2f} of the parent)")
    split = " / ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items())
    print(f"time: {time.perf_counter() - started:.1f} s in all ({split})")
    print(f"read {_gib(report.bytes_read)} from the parent's {_gib(report.checkpoint_bytes)} "
          f"({_gib(report.calibration_read)} calibrating, the rest writing the child); "
          f"calibration state peaked at {_gib(report.calibration_bytes)} in memory, "
          f"{_gib(report.spilled_bytes)} spilled to disk")
    if line is not None:
        print(line)
    return 0
