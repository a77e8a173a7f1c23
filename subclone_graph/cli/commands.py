"""The ``subclone`` commands: ``demo``, ``run``, ``inspect`` and ``convert`` (the heavy side:
``main`` imports this module only after the arguments and the cheap checks passed).

``run`` prints each phase as it starts and ends (load, trace, calibrate, rewrite, then each
output's write and check), stages every format in one folder and moves the set into ``--out``
only when all were written and checked (``destination.write_all``), and closes with the time
of each phase. The outputs most likely to be refused are made first (ONNX, then the Hugging
Face folder, then the ``.pt2``), so that a refusal costs the least.
"""
from __future__ import annotations

from pathlib import Path

import subclone_graph as sg
from subclone_graph.cli import loaders, preflight, report
from subclone_graph.cli.parser import OUTPUT_NAMES, Factor
from subclone_graph.cli.run_checkpoint import run_streamed, streams
from subclone_graph.export import destination, pt2
from subclone_graph.passes import state
from subclone_graph.passes.analysis.compute_dtype import COMPUTE_DTYPES
from subclone_graph.passes.target import TARGET_FIELDS, Target, Times
from subclone_graph.runtime import distributed
from subclone_graph.runtime.device import resolve_device

__all__ = ["cmd_demo", "cmd_run", "cmd_inspect", "cmd_convert", "target_of", "WRITE_ORDER"]

WRITE_ORDER = ("onnx", "hf", "pt2")      # the likeliest refusal first


def target_of(args) -> Target:
    def size(value):
        return Times(value.copies) if isinstance(value, Factor) else value

    return Target(**{name: size(getattr(args, name)) for name in TARGET_FIELDS},
                  **({"multiple_of": args.multiple_of} if getattr(args, "multiple_of", None) else {}))


def _load_all(args, steps) -> tuple[loaders.Loaded, list | None, tuple]:
    with steps(f"load {args.model}"):
        loaded = loaders.load_model(args.model)
    config = getattr(loaded.model, "config", None)
    if config is not None and hasattr(args, "hidden"):    # a factory's config: its sizes, before the trace
        preflight.check_target_sizes({f: getattr(args, f) for f in TARGET_FIELDS},
                                     preflight.sizes_from_config(config), f"{args.model}'s config")
    if args.calib is None:
        print("no --calib: scoring channels by weight magnitude")
        calibration = None
    else:
        with steps(f"read calibration data {args.calib}"):
            calibration = loaders.load_calibration(args.calib, loaded, args.calib_batches, args.batch_size,
                                                   args.seq_len, args.calib_tokens)
        print(report.calibration_source(calibration, args.calib))
    return loaded, calibration, loaders.example_inputs(loaded, calibration)


def cmd_demo(args) -> int:
    from subclone_graph.models.demo import run_demo
    run_demo(args.out, overwrite=args.overwrite)
    return 0


def _writers(child, inputs: tuple, formats: list[str], tokenizer, steps) -> dict:
    def write_pt2(path):
        with steps(f"write and check {OUTPUT_NAMES['pt2']} (reloaded and compared with the child)"):
            pt2.save(child, path)

    def write_onnx(path):
        diff = sg.export_onnx(child, inputs, path, progress=steps.named(OUTPUT_NAMES["onnx"]))
        print(f"    onnxruntime max |difference| from the child: {diff:.3g}")

    def write_hf(path):
        with steps("write and check hf/ (Hugging Face checkpoint, reloaded and compared with the child)"):
            saved = sg.save_hf(child, path, tokenizer=tokenizer)
        report.print_config_changes(saved.config_changes)

    every = {"pt2": write_pt2, "onnx": write_onnx, "hf": write_hf}
    return {OUTPUT_NAMES[f]: every[f] for f in WRITE_ORDER if f in formats}


def cmd_run(args) -> int:
    """Under torchrun (WORLD_SIZE > 1) every rank calibrates on its share and chooses the same
    child; rank 0 alone writes, the others wait for it in ``distributed.finish`` and exit 0."""
    target = target_of(args)
    formats = list(dict.fromkeys([*args.format, *(["onnx"] if args.onnx else [])]))
    names = {OUTPUT_NAMES[f]: f == "hf" for f in formats}
    destination.check_outputs(args.out, names, overwrite=args.overwrite, option="--overwrite")
    device = resolve_device(args.device)
    launched = distributed.launch(device)
    try:
        if streams(args):              # a safetensors folder: never loaded whole
            if args.grow_noise_db is not None:
                raise ValueError("--grow-noise-db: the streamed writer replays slices and scales only; "
                                 "add --no-stream to grow with noise in memory")
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
    if "hf" in formats and getattr(loaded.model, "config", None) is None:
        raise ValueError("--format hf needs a Hugging Face MODEL (a folder or .gguf); this model has no config")
    own = None if calibration is None else distributed.shard(calibration)
    child = sg.subclone(loaded.model, inputs, target, calibration=own, depth=args.depth, device=device,
                        selection=args.selection, progress=steps.progress,
                        compute_dtype=COMPUTE_DTYPES[args.calib_dtype], grow_noise_db=args.grow_noise_db,
                        fixed_sizes=args.fixed_sizes)
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
    print(report.target_summary(gm))
    print()
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


def cmd_convert(args) -> int:
    from subclone_graph.convert import convert_gguf

    steps = report.Steps()
    with steps(f"convert {args.gguf} (dequantise, write, reload and compare)"):
        diff = convert_gguf(args.gguf, args.folder, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {args.folder} (from_pretrained loads it; max |difference| of the reloaded model "
          f"from the GGUF model: {diff:.3g})")
    return 0
