"""``subclone run FOLDER``: the streamed path for a safetensors checkpoint folder.

A folder with ``config.json`` and ``model.safetensors`` (or a ``model.safetensors.index.json``)
is subcloned by ``subclone_checkpoint`` unless ``--no-stream`` is given: the parent is never
loaded. The Hugging Face child is written to ``OUT/hf``; ``child.pt2`` / ``child.onnx``, when
asked for, are made from that written child (small), loaded and traced. Each phase (trace,
calibrate — a bar over segments × calibration batches —, rewrite, write, check, then each
other output) is printed as it starts and ends; the closing summary gives the time of each and
the bytes read from the parent against the checkpoint's size.
"""
from __future__ import annotations

import tempfile
import time
import types
from pathlib import Path

import subclone_graph as sg
from subclone_graph.export import pt2

from subclone_graph.checkpoint.files import INDEX_NAME, SINGLE_NAME
from subclone_graph.runtime.distributed import rank, summary_line
from subclone_graph.cli.report import Steps, calibration_source, print_config_changes
from subclone_graph.export.hf import HFExportError
from subclone_graph.cli.loaders import Loaded, example_inputs, load_calibration
from subclone_graph.export.destination import write_all
from subclone_graph.passes.analysis.compute_dtype import COMPUTE_DTYPES
from subclone_graph.checkpoint.weightless_parent import parent_class
from subclone_graph.checkpoint.streamed import subclone_checkpoint
from subclone_graph.cli.messages import first_line

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




def _gib(count: int) -> str:
    return f"{count / 2**30:.2f} GiB"


def _traced_child(hf_dir: Path, inputs: tuple):
    _, cls = parent_class(hf_dir)
    return sg.trace(cls.from_pretrained(hf_dir).eval(), inputs)


def run_streamed(args, target, files: dict) -> int:
    """Stream the checkpoint folder ``args.model`` into ``files`` (format -> path under ``--out``),
    all of them staged and moved into place together (``destination.write_all``)."""
    folder, out = Path(args.model), Path(args.out)
    started, steps = time.perf_counter(), Steps()
    config, _ = parent_class(folder)
    loaded = Loaded(types.SimpleNamespace(config=config), tokenizer=_tokenizer(folder))
    calibration = load_calibration(args.calib, loaded, args.calib_batches, args.batch_size, args.seq_len,
                                   getattr(args, "calib_tokens", None))
    print("no --calib: scoring channels by weight magnitude" if calibration is None
          else calibration_source(calibration, args.calib))
    inputs = example_inputs(loaded, calibration, small=True)
    print(f"streaming {folder} (the parent is read segment by segment, never loaded whole)")
    made: dict = {}

    def stream(path: Path):
        report = subclone_checkpoint(folder, path, target, calibration, example_inputs=inputs, depth=args.depth,
                                     selection=args.selection, overwrite=args.overwrite,
                                     device=getattr(args, "device", "cpu"), progress=steps.progress,
                                     compute_dtype=COMPUTE_DTYPES[getattr(args, "calib_dtype", "auto")],
                                     fixed_sizes=getattr(args, "fixed_sizes", False))
        # every rank's tokens (a collective: each rank reaches it right after its calibration)
        made["line"] = None if calibration is None else summary_line(report.calibration_tokens,
                                                                     report.seconds["calibrate"])
        return report

    if rank() != 0:                  # torchrun: every rank calibrates its share, rank 0 alone writes
        stream(files.get("hf", out / "hf"))
        return 0

    def write_hf(path: Path) -> None:
        try:
            made["report"] = stream(path)
        except HFExportError as error:
            if "hf" in files:
                raise
            raise ValueError(f"{first_line(error)} — streaming writes the child as its parent's class first; "
                             "--no-stream subclones it in memory instead") from error
        if set(files) - {"hf"}:
            with steps("load and trace the written child (for child.pt2 / child.onnx)"):
                made["child"] = _traced_child(path, inputs)

    def child_graph(path: Path):
        if "child" not in made:          # no hf/ asked for: make it beside, use it, remove it
            with tempfile.TemporaryDirectory(prefix=".hf-", dir=path.parent) as scratch:
                write_hf(Path(scratch) / "hf")
        return made["child"]

    def write_pt2(path: Path) -> None:
        child = child_graph(path)
        with steps("write and check child.pt2 (reloaded and compared with the child)"):
            pt2.save(child, path)

    def write_onnx(path: Path) -> None:
        diff = sg.export_onnx(child_graph(path), inputs, path, progress=steps.named("child.onnx"))
        print(f"    onnxruntime max |difference| from the child: {diff:.3g}")

    every = {"hf": write_hf, "pt2": write_pt2, "onnx": write_onnx}
    writers = {files[f].name: every[f] for f in ("hf", "pt2", "onnx") if f in files}
    write_all(out, writers, overwrite=args.overwrite, folders={files["hf"].name} if "hf" in files else set(),
              option="--overwrite")
    report = made["report"]
    print(f"wrote {', '.join(str(files[f]) for f in files)} (max |difference| of the written child "
          f"from the child graph {report.max_difference:.3g})")
    print_config_changes(report.config_changes)
    parent, child = report.parent_parameters, report.child_parameters
    print(f"parent: {parent:,} parameters")
    print(f"child:  {child:,} parameters ({child / parent:.2f} of the parent)")
    print(steps.summary())
    print(f"time: {time.perf_counter() - started:.1f} s in all")
    print(f"read {_gib(report.bytes_read)} from the parent's {_gib(report.checkpoint_bytes)} "
          f"({_gib(report.calibration_read)} calibrating, the rest writing the child); "
          f"calibration state peaked at {_gib(report.calibration_bytes)} in memory, "
          f"{_gib(report.spilled_bytes)} spilled to disk")
    if made.get("line") is not None:
        print(made["line"])
    return 0
