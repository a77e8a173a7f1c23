"""Every phase of ``subclone run FOLDER`` beside its limit, on one machine, in one run.

For each random Llama-shaped bfloat16 checkpoint (``scale.py``'s shapes and generator: 1B-,
7B- and a 70B-wide one with a 70B model's widths and 4 layers), measured in this process, one
after the other, on the same machine:

1. **matmul peak**, float32 and bfloat16, at the calibration's shapes: each linear of a layer
   with ``--batch-tokens`` rows, FLOPs over seconds of the best of a few runs, weighted by the
   FLOPs of each shape (a dtype measured slower than a quarter of float32 stops after its first
   shape: bfloat16 without matrix units, where a 70B-wide layer alone would take minutes);
2. **eager forward**: the same widths' ``LlamaModel`` (no output head, as calibration computes
   none) in the dtype calibration computes in, with as many layers as ``--eager-gib`` holds,
   random weights, the same batches: tokens/s scaled to the full depth;
3. **our calibration** (``subclone run`` under ``/usr/bin/time -v``, the whole command line):
   tokens/s, and its matmul FLOPs (every linear of every layer, attention as dense ``QKᵀ`` and
   ``AV``, no output head) over its seconds, against the chosen dtype's peak;
4. **trace** seconds, beside a meta-device trace of the same class (``sg.trace`` of the model
   built on ``torch.device("meta")``, in a fresh process);
5. **write**: the child's bytes over the write phase's seconds, beside one sequential read of
   the parent's files (page cache dropped, ``scale.sequential_read``) and one sequential write
   of as many bytes as the child (``fsync`` included);
6. **peak RSS** of the whole ``subclone run`` process, against the machine's memory;

with ``lscpu``'s flags and the load average before and after each run (a figure measured under
load is marked by it; ``--note`` saves a line beside them). Each figure also as a ratio to its
limit. Writes ``benchmarks/results/transform_speed.json``; ``--table`` prints the README's table.

    python benchmarks/transform_speed.py --sizes 1B 7B 70B-wide-4 --tokens 4096 --delete

Results so far: at most ``transform_speed_quick.json`` (the 1B shape only, 512 tokens, on a
contended 2-core AVX2 machine without bfloat16 matrix units: float32 throughout). The full run
(1B, 7B, 70B-wide-4 at 4,096 tokens) on an uncontended machine, and a run on a machine where
``auto`` picks bfloat16 matmuls (AMX or a GPU), are pending. "computes in" is this process's own
``auto`` decision; the ``subclone run`` subprocess measures again for itself.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks import scale  # noqa: E402  (the generator and the CLI run, imported, not copied)

RESULTS = ROOT / "benchmarks" / "results" / "transform_speed.json"
# the children: scale.py's, except the 70B-wide parent into one as wide as itself, 2 layers
CHILDREN = {**scale.CHILDREN, "70B-wide-4": (8192, 28672, 2, 64, 8)}
FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_fp16")


def machine() -> dict:
    """CPU model and flags (``lscpu``), cores, memory, torch's view of the CPU."""
    listed = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in listed.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    pages = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": fields.get("Model name", platform.processor()).strip(), "cores": os.cpu_count(),
            "memory_gib": round(pages / 2**30, 1), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "flags": {flag: flag in flags for flag in FLAGS}, "lscpu_flags": " ".join(flags)}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def linear_shapes(name: str, rows: int) -> list[tuple[int, int, int]]:
    """(rows, in, out) of each linear of one layer of ``name``."""
    hidden, ffn, _, heads, kv_heads, _ = scale.SHAPES[name]
    kv = kv_heads * hidden // heads
    return [(rows, hidden, hidden), (rows, hidden, kv), (rows, hidden, kv), (rows, hidden, hidden),
            (rows, hidden, ffn), (rows, hidden, ffn), (rows, ffn, hidden)]


def flops_per_token(name: str, seq: int) -> float:
    """Calibration's matmul FLOPs per token: every linear of every layer, attention's ``QKᵀ`` and
    ``AV`` as dense (2 · 2 · seq · hidden a layer); no output head (calibration computes none)."""
    hidden, _, layers, _, _, _ = scale.SHAPES[name]
    per_layer = sum(2 * k * n for _, k, n in linear_shapes(name, 1)) + 4 * seq * hidden
    return layers * per_layer


def _best_seconds(a: torch.Tensor, w: torch.Tensor, budget: float) -> float:
    torch.nn.functional.linear(a[:16], w)                  # kernels chosen, weight touched
    best, spent = math.inf, 0.0
    while spent < budget:
        start = time.perf_counter()
        torch.nn.functional.linear(a, w)
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
        if took > budget / 2:
            break
    return best


def matmul_peak(name: str, rows: int, dtype: torch.dtype, slow_below: float | None = None) -> dict:
    """FLOP/s of ``dtype`` linears at one layer's shapes (module docstring, item 1)."""
    generator = torch.Generator().manual_seed(0)
    flops = seconds = 0.0
    shapes = []
    for m, k, n in sorted(set(linear_shapes(name, rows))):
        a = torch.randn(m, k, generator=generator).to(dtype)
        w = torch.randn(n, k, generator=generator).to(dtype)
        took = _best_seconds(a, w, 1.0)
        flops, seconds = flops + 2 * m * k * n, seconds + took
        shapes.append({"shape": [m, k, n], "flops_per_second": 2 * m * k * n / took})
        del a, w
        if slow_below is not None and flops / seconds < slow_below:
            break                     # a slow dtype: its first shape says enough (module docstring)
    return {"dtype": str(dtype).removeprefix("torch."), "flops_per_second": flops / seconds, "shapes": shapes}


def eager_forward(name: str, rows: int, batches: int, dtype: torch.dtype, budget_gib: float) -> dict:
    """Tokens/s of the plain ``LlamaModel`` forward (module docstring, item 2)."""
    from transformers import LlamaModel

    config = scale.config(name)
    per_layer = sum(k * n for _, k, n in linear_shapes(name, 1)) * dtype.itemsize
    layers = max(1, min(config.num_hidden_layers, int(budget_gib * 2**30 // per_layer)))
    config.num_hidden_layers = layers
    with torch.device("meta"):
        model = LlamaModel(config)
    model = model.to_empty(device="cpu").to(dtype).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator).mul_(0.02))
        ids = [torch.randint(0, config.vocab_size, (1, rows), generator=generator) for _ in range(batches)]
        model(ids[0][:, :16])
        start = time.perf_counter()
        for batch in ids:
            model(batch)
        seconds = time.perf_counter() - start
    depth = scale.SHAPES[name][2]
    del model
    return {"dtype": str(dtype).removeprefix("torch."), "layers_run": layers, "tokens": rows * batches,
            "seconds": seconds, "tokens_per_second": rows * batches / (seconds * depth / layers)}


META_TRACE = """
import sys, time, torch, transformers
import subclone_graph as sg
config = transformers.AutoConfig.from_pretrained(sys.argv[1])
with torch.device("meta"):
    model = transformers.LlamaForCausalLM(config)
start = time.perf_counter()
sg.trace(model, (torch.randint(0, 100, (2, 16)).to("meta"),))
print(time.perf_counter() - start)
"""


def meta_trace_seconds(folder: Path) -> float:
    done = subprocess.run([sys.executable, "-c", META_TRACE, str(folder)], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"meta-device trace failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.split()[-1])


def sequential_write(size: int, folder: Path) -> dict:
    """One sequential write of ``size`` bytes (64 MiB writes, then ``fsync``)."""
    path = folder / "sequential-write.bin"
    block, done = os.urandom(64 * 2**20), 0
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as handle:
        while done < size:
            done += handle.write(block[: min(len(block), size - done)])
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return {"bytes": done, "seconds": seconds}


def chosen_precision():
    """What ``--calib-dtype auto`` picks here for a bfloat16 parent (the same rule, this process)."""
    from subclone_graph.passes.analysis.compute_dtype import resolve_precision

    return resolve_precision("auto", {torch.bfloat16})


def measure(name: str, folder: Path, tokens: int, rows: int, eager_gib: float) -> dict:
    """Every figure of one parent (module docstring)."""
    before = load()
    result = {"parent": name, "shape": dict(zip(("hidden", "ffn", "layers", "heads", "kv_heads", "vocab"),
                                               scale.SHAPES[name])),
              "tokens": tokens, "batch_tokens": rows, "load_before": before}
    f32 = matmul_peak(name, rows, torch.float32)
    bf16 = matmul_peak(name, rows, torch.bfloat16, slow_below=f32["flops_per_second"] / 4)
    chosen = chosen_precision()
    compute = chosen.matmul or torch.float32
    result["matmul_peak"] = {"float32": f32, "bfloat16": bf16}
    result["compute"] = str(chosen)
    result["eager_forward"] = eager_forward(name, rows, max(1, min(tokens // rows, 4)), compute, eager_gib)
    result["meta_trace_seconds"] = meta_trace_seconds(folder)
    result["sequential_read"] = scale.sequential_read(folder)
    ran = scale.run(name, folder, tokens, rows, CHILDREN[name])
    result["run"] = ran
    result["sequential_write"] = sequential_write(ran["child_bytes"], folder.parent)
    result["load_after"] = load()
    result["ratios"] = ratios(result, compute)
    return result


def ratios(r: dict, compute: torch.dtype) -> dict:
    """Each figure against its limit (module docstring)."""
    seconds = r["run"].get("seconds", {})
    peak = r["matmul_peak"]["bfloat16" if compute == torch.bfloat16 else "float32"]["flops_per_second"]
    flops = flops_per_token(r["parent"], r["batch_tokens"]) * r["tokens"]
    calibrate = seconds.get("calibrate", math.nan)
    read = r["sequential_read"]["bytes"] / r["sequential_read"]["seconds"]
    write = r["sequential_write"]["bytes"] / r["sequential_write"]["seconds"]
    child = r["run"]["child_bytes"] / seconds.get("write", math.nan)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"calibration_flops_per_second": flops / calibrate,
            "calibration_time_over_peak_time": calibrate / (flops / peak),
            "calibration_tokens_per_second": r["tokens"] / calibrate,
            "calibration_over_eager_tokens_per_second": r["tokens"] / calibrate / r["eager_forward"]["tokens_per_second"],
            "trace_over_meta_trace": seconds.get("trace", math.nan) / r["meta_trace_seconds"],
            "write_bytes_per_second": child, "sequential_read_bytes_per_second": read,
            "sequential_write_bytes_per_second": write,
            "write_over_sequential_read": child / read, "write_over_sequential_write": child / write,
            "peak_rss_over_memory": r["run"]["peak_rss_bytes"] / memory,
            "per_layer_calibration_seconds": calibrate / r["shape"]["layers"]}


def projection_70b(r: dict) -> dict:
    """A 70B-class parent (80 layers, 140 GB) from the 70B-wide run: per-layer calibration × 80,
    plus reading 140 GB at the measured sequential speed."""
    per_layer = r["ratios"]["per_layer_calibration_seconds"]
    read = 140e9 / r["ratios"]["sequential_read_bytes_per_second"]
    return {"per_layer_seconds": per_layer, "layers": 80, "read_140gb_seconds": read,
            "projected_seconds": per_layer * 80 + read}


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f}"


def table(results: list[dict]) -> str:
    lines = ["| parent | computes in | matmul peak f32 / bf16 | eager fwd | calibration | trace (× meta) | "
             "write (÷ seq. read, ÷ seq. write) | peak RSS | wall | load |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        q, s, run = r["ratios"], r["run"].get("seconds", {}), r["run"]
        peak = r["matmul_peak"]
        lines.append(
            f"| {r['parent']} ({r['tokens']} tok, {r['batch_tokens']}/batch) | {r['compute']} | "
            f"{peak['float32']['flops_per_second'] / 1e9:.0f} / {peak['bfloat16']['flops_per_second'] / 1e9:.1f} GFLOP/s | "
            f"{r['eager_forward']['tokens_per_second']:.0f} tok/s | "
            f"{q['calibration_tokens_per_second']:.0f} tok/s, {q['calibration_flops_per_second'] / 1e9:.0f} GFLOP/s "
            f"(**{q['calibration_time_over_peak_time']:.2f}×** peak time; {q['calibration_over_eager_tokens_per_second']:.2f}× eager) | "
            f"{s.get('trace', 0):.1f} s ({q['trace_over_meta_trace']:.2f}×) | "
            f"{q['write_bytes_per_second'] / 1e9:.2f} GB/s ({q['write_over_sequential_read']:.2f}, "
            f"{q['write_over_sequential_write']:.2f}) | {_gib(run['peak_rss_bytes'])} GiB "
            f"({q['peak_rss_over_memory']:.2f} of RAM) | {run['wall_seconds']:.0f} s | "
            f"{r['load_before'][0]:.1f} → {r['load_after'][0]:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=list(scale.SHAPES), default=["1B", "7B", "70B-wide-4"])
    parser.add_argument("--dir", default="/tmp/subclone-scale", help="where the checkpoints are generated")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--batch-tokens", type=int, nargs="+", default=[512],
                        help="tokens per calibration batch; several: one run each (peak RSS per batch shape)")
    parser.add_argument("--eager-gib", type=float, default=6.0, help="memory for the eager forward's layers")
    parser.add_argument("--delete", action="store_true", help="delete each checkpoint after its runs")
    parser.add_argument("--json", default=str(RESULTS))
    parser.add_argument("--table", action="store_true", help="print the table of --json and stop")
    parser.add_argument("--note", default=None, help="saved with the results (e.g. \"contended machine\")")
    args = parser.parse_args(argv)
    path = Path(args.json)
    saved = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    if args.table:
        print(table(saved["runs"]))
        return 0
    saved["machine"] = machine()
    saved["note"] = args.note
    for name in args.sizes:
        folder = Path(args.dir) / f"llama-{name}"
        if not folder.is_dir():
            start = time.perf_counter()
            scale.generate(name, folder)
            print(f"generated {folder} in {time.perf_counter() - start:.0f} s", flush=True)
        for rows in args.batch_tokens:
            result = measure(name, folder, args.tokens, rows, args.eager_gib)
            if name.startswith("70B-wide"):
                result["projection_70b"] = projection_70b(result)
            key = (name, args.tokens, rows)
            saved["runs"] = [r for r in saved["runs"] if (r["parent"], r["tokens"], r["batch_tokens"]) != key]
            saved["runs"].append(result)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(saved, indent=2) + "\n")
            print(table([result]), flush=True)
        if args.delete:
            shutil.rmtree(folder, ignore_errors=True)
    print(table(saved["runs"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
