"""Calibration throughput of ``subclone run`` on this machine: tokens per second, 1 vs 2 ranks.

Runs the real command line (``python -m subclone_graph run`` and ``torchrun --nproc-per-node 2
-m subclone_graph run``, gloo on the CPU) on a small hand-written Llama (``build`` below) with
the same calibration tokens, and reads the closing line "calibration: R ranks, a + b tokens in
S s (T tokens/s)": S is the slowest rank's time from its first batch to its last (the forward
runs with the statistics hooks), T the tokens of all ranks over S. Also checks that both runs
wrote bit-identical children. Writes ``benchmarks/results/calibration_throughput.json``.

    python benchmarks/calibration_throughput.py [--tokens 16384] [--seq-len 128]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "calibration_throughput.json"
LINE = re.compile(r"calibration: (\d+) ranks?, ([\d,+ ]+) tokens in ([\d.]+) s \(([\d,]+) tokens/s\)")


def build():
    """The benchmarked parent: a Llama of 4 layers, width 256, vocabulary 1,000 (~3.4M parameters)."""
    from subclone_graph.models import TinyLlama

    torch.manual_seed(0)
    model = TinyLlama(vocab=1000, hidden=256, layers=4, heads=8, kv_heads=4, head_dim=32, ffn=768).eval()
    return model, (torch.randint(0, 1000, (2, 16)),)


def _run(ranks: int, tokens_file: Path, out: Path, seq_len: int, batch_size: int) -> dict:
    launcher = [sys.executable, "-m", "subclone_graph"] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
         "-m", "subclone_graph"]
    command = [*launcher, "run", "benchmarks.calibration_throughput:build", "--hidden", "128", "--ffn", "384",
               "--calib", str(tokens_file), "--calib-tokens", str(10**12), "--seq-len", str(seq_len),
               "--batch-size", str(batch_size), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    found = LINE.search(done.stdout)
    if found is None:
        raise SystemExit(f"no calibration summary in the output of {ranks} rank(s):\n{done.stdout[-2000:]}")
    per_rank = [int(t.replace(",", "")) for t in found.group(2).split("+")]
    return {"ranks": ranks, "tokens_per_rank": per_rank, "seconds": float(found.group(3)),
            "tokens_per_second": int(found.group(4).replace(",", "")), "line": found.group(0)}


def _same_children(first: Path, second: Path) -> bool:
    from subclone_graph.export import pt2 as io

    a, b = io.load(first / "child.pt2").state_dict(), io.load(second / "child.pt2").state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="subclone-throughput-") as scratch:
        scratch = Path(scratch)
        tokens_file = scratch / "tokens.pt"
        rows = args.tokens // args.seq_len
        torch.save(torch.randint(0, 1000, (rows, args.seq_len), generator=torch.Generator().manual_seed(0)), tokens_file)
        runs = [_run(r, tokens_file, scratch / f"out{r}", args.seq_len, args.batch_size) for r in (1, 2)]
        identical = _same_children(scratch / "out1", scratch / "out2")
    result = {"machine": f"{platform.node()}: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})",
              "torch": torch.__version__, "model": "TinyLlama 4 layers, width 256, ffn 768, vocab 1000",
              "tokens": rows * args.seq_len, "seq_len": args.seq_len, "batch_size": args.batch_size,
              "runs": runs, "children_bit_identical": identical,
              "ms_per_1k_tokens": {str(r["ranks"]): round(1000 * 1000 / r["tokens_per_second"], 1) for r in runs}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for run in runs:
        print(run["line"])
    print(f"children bit-identical: {identical}; wrote {RESULTS}")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
