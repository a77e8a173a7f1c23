"""Streamed subcloning at scale: peak RSS, wall time and bytes read of ``subclone run FOLDER``.

For each Llama-shaped random bfloat16 checkpoint (1B-, 3B-, 7B-shaped, and a "70B-wide" one
with a 70B model's widths but only 2 or 4 layers), this script
1. writes the checkpoint under ``--dir`` shard by shard, tensor by tensor (never whole in
   memory), unless it is there already;
2. measures one plain sequential read of its files (64 MiB reads, after dropping the files'
   pages from the page cache with ``posix_fadvise(DONTNEED)``): the physical limit;
3. drops the pages again and runs the whole ``subclone run FOLDER ... --format hf`` as a
   subprocess under ``/usr/bin/time -v``: peak RSS (its "Maximum resident set size"), wall
   time, the time split and bytes read that the command prints;
4. writes ``benchmarks/results/scale.json`` and prints a table; ``--delete`` removes each
   generated checkpoint (and child) after its run.

    python benchmarks/scale.py --sizes 1B 7B --tokens 4096 --batch-tokens 512 --delete
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from subclone_graph.checkpoint.files import write_shards

SHAPES = {   # hidden, MLP, layers, heads, kv heads, vocab
    "1B": (2048, 5632, 22, 32, 4, 32000),
    "3B": (3072, 8192, 28, 24, 8, 32000),
    "7B": (4096, 14336, 32, 32, 8, 32000),
    "70B-wide-2": (8192, 28672, 2, 64, 8, 128256),
    "70B-wide-4": (8192, 28672, 4, 64, 8, 128256),
}
CHILDREN = {   # hidden, MLP, layers, heads, kv heads
    "1B": (1024, 2816, 11, 16, 2),
    "3B": (1536, 4096, 14, 12, 4),
    "7B": (2048, 5632, 16, 16, 4),
    "70B-wide-2": (4096, 14336, 2, 32, 4),
    "70B-wide-4": (4096, 14336, 4, 32, 4),
}
SHARD = 4 * 2**30
ROWS_PER_CHUNK = 4096
RESULTS = Path(__file__).resolve().parent / "results" / "scale.json"


def _config(name: str):
    from transformers import LlamaConfig

    hidden, ffn, layers, heads, kv_heads, vocab = SHAPES[name]
    return LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                       max_position_embeddings=8192, tie_word_embeddings=False, dtype="bfloat16",
                       architectures=["LlamaForCausalLM"], bos_token_id=1, eos_token_id=2)


def generate(name: str, folder: Path) -> None:
    """A random bfloat16 checkpoint of shape ``name``, written tensor by tensor."""
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    config = _config(name)
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    entries = [(n, tuple(p.shape), torch.bfloat16) for n, p in model.named_parameters()]
    del model
    generator = torch.Generator().manual_seed(0)

    def produce(tensor_name: str) -> torch.Tensor:
        shape = next(s for n, s, _ in entries if n == tensor_name)
        if tensor_name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16)
        out = torch.empty(shape, dtype=torch.bfloat16)
        for first in range(0, shape[0], ROWS_PER_CHUNK):
            rows = min(ROWS_PER_CHUNK, shape[0] - first)
            out[first:first + rows] = torch.randn((rows, *shape[1:]), generator=generator).mul_(0.02)
        return out

    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write_shards(partial, entries, produce, SHARD)
    config.save_pretrained(partial)
    os.replace(partial, folder)


def _drop_cache(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def sequential_read(folder: Path) -> dict:
    _drop_cache(folder)
    buffer, total, start = bytearray(64 * 2**20), 0, time.perf_counter()
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb", buffering=0) as handle:
            while got := handle.readinto(buffer):
                total += got
    return {"bytes": total, "seconds": time.perf_counter() - start}


def _calibration(folder: Path, tokens: int, batch_tokens: int, vocab: int) -> Path:
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (1, batch_tokens), generator=generator) for _ in range(tokens // batch_tokens)]
    path = folder.parent / f"{folder.name}-calib.pt"
    torch.save(batches, path)
    return path


def _parse(stdout: str, stderr: str) -> dict:
    found = {}
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    found["peak_rss_bytes"] = int(rss.group(1)) * 1024 if rss else None
    split = re.search(r"time: ([\d.]+) s in all \((.*)\)", stdout)
    if split:
        found["command_seconds"] = float(split.group(1))
        found["seconds"] = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) s", split.group(2))}
    read = re.search(r"read ([\d.]+) GiB from the parent's ([\d.]+) GiB \(([\d.]+) GiB calibrating", stdout)
    if read:
        found["read_gib"], found["checkpoint_gib"], found["calibration_read_gib"] = map(float, read.groups())
    state = re.search(r"calibration state peaked at ([\d.]+) GiB in memory, ([\d.]+) GiB spilled", stdout)
    if state:
        found["calibration_state_gib"], found["spilled_gib"] = map(float, state.groups())
    return found


def run(name: str, folder: Path, tokens: int, batch_tokens: int) -> dict:
    hidden, ffn, layers, heads, kv_heads = CHILDREN[name]
    calib = _calibration(folder, tokens, batch_tokens, SHAPES[name][5])
    out = folder.parent / f"{folder.name}-child"
    command = [sys.executable, "-c", "from subclone_graph.cli.main import main; raise SystemExit(main())", "run",
               str(folder), "--hidden", str(hidden), "--ffn", str(ffn), "--layers", str(layers), "--heads",
               str(heads), "--kv-heads", str(kv_heads), "--calib", str(calib), "--calib-batches",
               str(tokens // batch_tokens), "--out", str(out), "--format", "hf", "--overwrite"]
    _drop_cache(folder)
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{name}: subclone run failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    result = {"parent": name, "child": dict(zip(("hidden", "ffn", "layers", "heads", "kv_heads"), CHILDREN[name])),
              "tokens": tokens, "batch_tokens": batch_tokens, "wall_seconds": wall, **_parse(done.stdout, done.stderr)}
    shutil.rmtree(out, ignore_errors=True)
    calib.unlink()
    return result


def table(results: list[dict]) -> str:
    lines = ["| parent | checkpoint | tokens | peak RSS | wall | trace / calibrate / write / check | read | sequential read |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r.get("seconds", {})
        split = " / ".join(f"{s.get(k, 0):.0f}" for k in ("trace", "calibrate", "write", "check"))
        seq = r["sequential_read"]
        lines.append(f"| {r['parent']} | {seq['bytes'] / 2**30:.1f} GiB | {r['tokens']} | "
                     f"{r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['wall_seconds']:.0f} s | {split} s | "
                     f"{r.get('read_gib', 0):.1f} GiB | {seq['seconds']:.0f} s |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--dir", default="/tmp/subclone-scale", help="where the checkpoints are generated")
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    parser.add_argument("--batch-tokens", type=int, default=512, help="tokens per calibration batch")
    parser.add_argument("--delete", action="store_true", help="delete each checkpoint after its run")
    parser.add_argument("--json", default=str(RESULTS))
    args = parser.parse_args(argv)
    path = Path(args.json)
    results = json.loads(path.read_text())["runs"] if path.is_file() else []
    for name in args.sizes:
        folder = Path(args.dir) / f"llama-{name}"
        if not folder.is_dir():
            start = time.perf_counter()
            generate(name, folder)
            print(f"generated {folder} in {time.perf_counter() - start:.0f} s", flush=True)
        result = run(name, folder, args.tokens, args.batch_tokens)
        result["sequential_read"] = sequential_read(folder)
        results = [r for r in results if (r["parent"], r["tokens"]) != (name, args.tokens)] + [result]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"machine": f"{os.cpu_count()} cores", "runs": results}, indent=2))
        print(table([result]), flush=True)
        if args.delete:
            shutil.rmtree(folder, ignore_errors=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
