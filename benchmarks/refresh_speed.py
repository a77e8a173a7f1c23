"""The rewrite's cost with ``refresh_meta`` static (the default) against symbolic, in one process.

After ``KeepChannelsPass`` edits tensors, every node's fake value is recomputed (``passes/refresh.py``):
statically at the size hints with the symbolic sizes rebuilt from the old values, or — the fallback,
and the only path before — by symbolic fake-tensor propagation. Per model (the hand-written zoo and
some Hugging Face families, tiny, random weights), traced once, then, alternating the two paths:

1. **subclone**: CPU seconds of ``sg.subclone`` (no calibration: weight-magnitude scores) of the
   traced parent to half its widths, with the rewrite's refresh static or forced symbolic;
2. **refresh**: CPU seconds of ``refresh_meta`` alone on that child, each path.

The best of ``--repeats`` runs of each, and their ratio (symbolic / static); the child's sizes on
every node are the same on both paths (checked here on each model as in ``tests/test_refresh_meta.py``).
CPU flags, load average and versions beside them. Writes ``benchmarks/results/refresh_speed.json``.

    python -m benchmarks.refresh_speed                 # about two minutes on 2 cores
    python -m benchmarks.refresh_speed --table         # the README's table from the JSON
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import time
import warnings
from pathlib import Path

import torch

import subclone_graph as sg
from subclone_graph.models import MODEL_NAMES, build, hf_families, hf_zoo
from subclone_graph.passes import refresh
import importlib

keep_channels = importlib.import_module("subclone_graph.passes.rewrite.keep_channels")

from .family_sweep import cpu, versions

RESULTS = Path(__file__).resolve().parent / "results" / "refresh_speed.json"
FAMILIES = ("qwen2_moe", "gemma3", "olmo2", "gpt_neox")      # Hugging Face families beside the zoo
TARGET = sg.Target(hidden=0.5, ffn=0.5, heads=0.5)


def _parent(name: str):
    if name in MODEL_NAMES:
        model, inputs = build(name)
    else:
        model = hf_families.build(name)
        inputs = hf_zoo.example_inputs(model, 2, 8, 0)
    return sg.trace(model, inputs), inputs


def _cpu_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def _sizes(gm) -> list:
    return [tuple(map(str, n.meta["val"].shape)) for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]


def measure(name: str, repeats: int) -> dict:
    gm, inputs = _parent(name)
    static_refresh = keep_channels.refresh_meta
    symbolic_refresh = functools.partial(refresh.refresh_meta, symbolic=True)

    def subclone(symbolic: bool):
        keep_channels.refresh_meta = symbolic_refresh if symbolic else static_refresh
        try:
            return sg.subclone(gm, inputs, TARGET)
        finally:
            keep_channels.refresh_meta = static_refresh

    child = subclone(False)
    if _sizes(child) != _sizes(subclone(True)):
        raise AssertionError(f"{name}: the static and symbolic refresh give different sizes")
    row = {"model": name, "nodes": len(child.graph.nodes)}
    for path in ("static", "symbolic"):
        row[f"subclone_{path}_s"] = _cpu_seconds(lambda: subclone(path == "symbolic"), repeats)
        copies = [copy.deepcopy(child) for _ in range(repeats)]
        row[f"refresh_{path}_s"] = _cpu_seconds(lambda: refresh.refresh_meta(copies.pop(), symbolic=path == "symbolic"),
                                                repeats)
    row["subclone_ratio"] = row["subclone_symbolic_s"] / row["subclone_static_s"]
    row["refresh_ratio"] = row["refresh_symbolic_s"] / row["refresh_static_s"]
    return row


def table(result: dict) -> str:
    lines = ["| model | nodes | subclone s, static | symbolic | ratio | refresh s, static | symbolic | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['nodes']} | {r['subclone_static_s']:.2f} | {r['subclone_symbolic_s']:.2f} | "
                     f"{r['subclone_ratio']:.2f} | {r['refresh_static_s']:.3f} | {r['refresh_symbolic_s']:.3f} | "
                     f"{r['refresh_ratio']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join([*MODEL_NAMES, *FAMILIES]))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--table", action="store_true", help="print the table of --out and stop")
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    load_before = os.getloadavg()
    rows = []
    for name in args.models.split(","):
        rows.append(measure(name, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    result = {"cpu": cpu(), "versions": versions(), "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "repeats": args.repeats, "threads": 1, "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
