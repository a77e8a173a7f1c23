"""Device check: calibration on a GPU against the CPU — same keep-sets, less time.

On a machine with CUDA this script
1. subclones SmolLM2-135M (``models.smollm2``, loaded offline from its wheel) in memory with
   ``device="cuda"`` on ``--tokens`` calibration tokens (default 65,536) and times it; then does
   the same work with ``device="cpu"`` and checks that both chose the same keep-sets
   (``state.KEEP``) and wrote bit-identical children;
2. generates a 3B-shaped random bfloat16 Llama checkpoint (``benchmarks/scale.py``) and
   subclones it with ``subclone_checkpoint(device="cuda")`` on the same tokens (timed); the CPU
   comparison of the 3B runs on ``--cpu-tokens`` (default 4,096: 64k tokens through 3B
   parameters would take the CPU far longer than a device check may), on both devices, and checks
   that the written children are bit-identical (the same keep-sets);
3. writes ``benchmarks/results/gpu_check_<gpu>.json``, labelled with the machine.

In bfloat16 a GPU matmul may round differently from the CPU's, so scores can differ in their
last bits and a near-tie can flip: the check reports the fraction of keep-set entries (or child
tensors) that agree, and says plainly when it is not all of them.

Without CUDA it prints that nothing was measured and exits with status 0 (status 2 with
``--require-gpu``).

    python benchmarks/gpu_check.py [--tokens 65536] [--cpu-tokens 4096] [--dir /tmp/scale]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
SEQ_LEN, BATCH = 512, 8


def _batches(tokens: int, vocab: int) -> list[tuple]:
    generator = torch.Generator().manual_seed(0)
    count = max(1, tokens // (SEQ_LEN * BATCH))
    return [(torch.randint(0, vocab, (BATCH, SEQ_LEN), generator=generator),) for _ in range(count)]


def _timed(function, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = function()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


def _agreement(first: dict, second: dict) -> float:
    same = sum(int(k in second and torch.equal(v, second[k])) for k, v in first.items())
    return same / max(1, len(first))


def smollm2(tokens: int) -> dict:
    import subclone_graph as sg
    from models.smollm2 import load_smollm2
    from subclone_graph.passes import state

    model, _ = load_smollm2(torch.float32)
    batches = _batches(tokens, model.config.vocab_size)
    target = sg.Target(hidden=384, layers=20, heads=6, kv_heads=2, ffn=1024)
    run = {}
    for device in ("cuda", "cpu"):
        child, seconds = _timed(lambda: sg.subclone(model, batches[0], target, calibration=batches, device=device), device)
        run[device] = (child, seconds)
    keep = {d: {k: v.cpu() for k, v in state.KEEP.need(c).items()} for d, (c, _) in run.items()}
    return {"model": "SmolLM2-135M float32, in memory", "tokens": len(batches) * BATCH * SEQ_LEN,
            "seconds": {d: round(s, 2) for d, (_, s) in run.items()},
            "keep_sets_agree": _agreement(keep["cuda"], keep["cpu"]),
            "children_agree": _agreement(run["cuda"][0].state_dict(), run["cpu"][0].state_dict())}


def checkpoint_3b(tokens: int, cpu_tokens: int, folder: Path) -> dict:
    import subclone_graph as sg
    from benchmarks.scale import SHAPES, generate
    from safetensors.torch import load_file

    if not folder.is_dir():
        generate("3B", folder)
    vocab, target = SHAPES["3B"][5], sg.Target(hidden=1536, layers=14, heads=12, kv_heads=4, ffn=4096)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        def child(device: str, count: int, name: str):
            out = Path(scratch) / name
            report, seconds = _timed(lambda: sg.subclone_checkpoint(folder, out, target, _batches(count, vocab),
                                                                    device=device), device)
            tensors = {}
            for file in sorted(out.glob("*.safetensors")):
                tensors.update(load_file(file))
            return tensors, seconds, report

        _, full_seconds, full = child("cuda", tokens, "full")
        gpu, gpu_seconds, _ = child("cuda", cpu_tokens, "gpu")
        cpu, cpu_seconds, _ = child("cpu", cpu_tokens, "cpu")
    return {"model": "3B-shaped Llama bfloat16, streamed", "tokens": tokens,
            "seconds_gpu_full": round(full_seconds, 1), "calibrate_seconds_gpu_full": round(full.seconds["calibrate"], 1),
            "compare_tokens": cpu_tokens, "seconds": {"cuda": round(gpu_seconds, 1), "cpu": round(cpu_seconds, 1)},
            "children_agree": _agreement(gpu, cpu)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="calibration on a GPU against the CPU")
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--cpu-tokens", type=int, default=4096)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "subclone-scale" / "3B")
    parser.add_argument("--skip-3b", action="store_true")
    parser.add_argument("--require-gpu", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine: nothing was measured, no result written "
              "(run it where torch.cuda.is_available())")
        return 2 if args.require_gpu else 0
    name = torch.cuda.get_device_name(0)
    result = {"machine": f"{name}, {platform.node()}, {torch.get_num_threads()} CPU threads",
              "torch": torch.__version__, "smollm2": smollm2(args.tokens)}
    print(json.dumps(result["smollm2"], indent=2))
    if not args.skip_3b:
        result["3b"] = checkpoint_3b(args.tokens, args.cpu_tokens, args.dir)
        print(json.dumps(result["3b"], indent=2))
    label = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
    path = RESULTS / f"gpu_check_{label}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    agree = [result["smollm2"]["keep_sets_agree"], *([result["3b"]["children_agree"]] if "3b" in result else [])]
    if min(agree) < 1:
        print("gpu_check: GPU and CPU did not choose identical keep-sets everywhere (see the fractions above)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
