"""Training speed-up of a grown model (HyperCloning, arXiv 2409.12903) over random initialisation.

The harness is ``train_speed``'s: its settings, data, training loop (``train_run``), learning-rate
grids, speed-up metric (``speedup``: steps random init needs to reach its own final held-out loss,
over the steps the other init needs) and report. The protocol:

1. **small**: the parent (SmolLM2-135M-Instruct) subcloned to ``SMALL`` with calibration, then
   trained ``small_steps`` steps (lr 1e-3) on the training windows (another order than the
   measured runs): "a smaller trained model";
2. **grown**: the small trained model grown ×2 in hidden, MLP, query heads and kv heads
   (``Target(hidden=Times(2), ffn=Times(2), heads=Times(2), kv_heads=Times(2))``, same depth):
   it computes the small model's function exactly, so it starts at the small model's loss;
   **grown_noise**: the same with the paper's symmetry-breaking noise (``grow_noise_db``);
3. **random**: the grown architecture (a fresh ``LlamaForCausalLM``; shapes checked equal) with
   Hugging Face's default init;
4. **small_continued**: the small trained model trained on for the same steps — whether the
   grown model learns faster than the model it came from.

Every init trains the same ``steps`` on the same windows in the same order, each at every
(lr, weight decay) of its grid; the best final held-out loss is that init's tuned run. The small
model's own training (``small_steps``) is compute the grown model inherits: the JSON records it.

``python benchmarks/grow_speed.py`` writes ``benchmarks/results/grow_speed.json`` and ``.png``;
``--quick`` is a smoke run on the tiny random Llama (seconds).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import torch

import subclone_graph as sg
from subclone_graph import data

if __package__ in (None, ""):       # run as a script: the sibling modules by their package name
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from benchmarks.speed_report import environment, plot, table  # noqa: E402
from benchmarks.speed_setup import (Settings, load_parent, logits_of, prepare_data, random_child,  # noqa: E402
                                    shape_signature)
from benchmarks.speed_training import summarise, train_run  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent

__all__ = ["SMALL", "GROWN_GRIDS", "grown_target", "cpu_flags", "run_benchmark", "main"]

# the small model, per parent (SmolLM2: 576 wide, 30 layers, 9 query heads in 3 kv groups, MLP 1536):
# half the width and MLP, 6 layers, 2 kv groups of 2 query heads; grown, SmolLM2's widths with 8/4 heads
SMALL = {"smollm2": dict(hidden=288, layers=6, heads=4, kv_heads=2, ffn=768),
         "tiny": dict(hidden=32, layers=2, heads=4, kv_heads=2, ffn=64)}
GROW = sg.Target(hidden=sg.Times(2), ffn=sg.Times(2), heads=sg.Times(2), kv_heads=sg.Times(2))
# (lr, weight decay) per init; random's is train_speed's
GROWN_GRIDS = {"random": [(2e-3, 0.1), (1e-3, 0.1)], "grown": [(1e-3, 1e-3), (3e-4, 1e-3)],
               "grown_noise": [(1e-3, 1e-3)], "small_continued": [(1e-3, 1e-3)]}


def grown_target(small: dict) -> dict:
    return {**small, "hidden": 2 * small["hidden"], "ffn": 2 * small["ffn"], "heads": 2 * small["heads"],
            "kv_heads": 2 * small["kv_heads"]}


def cpu_flags() -> dict:
    """The CPU's model and the instruction-set flags that decide matmul speed here."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), None)
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx_vnni")
    return {"cpu_model": model, "cpu_flags": [f for f in wanted if f in flags]}


def _small_model(parent, d: dict, s: Settings, small: dict, small_steps: int, log) -> tuple:
    """The subcloned small model trained ``small_steps`` steps (another window order)."""
    start = time.perf_counter()
    child = sg.subclone(parent, d["calibration"][0], sg.Target(**small), calibration=d["calibration"])
    log(f"small {small}: subcloned in {time.perf_counter() - start:.1f} s, {sg.count_parameters(child)} parameters")
    pre = dataclasses.replace(s, steps=small_steps, eval_every=max(1, small_steps // 4), seed=s.seed + 1)
    run = train_run(child, d, pre, 1e-3, 1e-3, s.warmup, log, keep_model=True)
    return run.pop("model"), {"target": small, "steps": small_steps, "lr": 1e-3, "weight_decay": 1e-3, **run}


def _grow(small_model, d: dict, noise_db, log) -> tuple:
    start = time.perf_counter()
    grown = sg.subclone(small_model, d["calibration"][0], GROW, grow_noise_db=noise_db)
    seconds = time.perf_counter() - start
    held = d["held"][:4]
    with torch.no_grad():
        a, b = logits_of(grown)(held), logits_of(small_model)(held)
    error = float((a - b).abs().max() / b.abs().max())
    log(f"grown (noise {noise_db} dB) in {seconds:.1f} s: {sg.count_parameters(grown)} parameters, "
        f"logits vs the small model: max relative difference {error:.2e}")
    return grown, {"seconds": seconds, "noise_db": noise_db, "max_relative_logit_difference": error}


def run_benchmark(s: Settings, small_steps: int, noise_db: float, log=print) -> dict:
    torch.set_num_threads(s.threads)
    parent, tok = load_parent(s.parent)
    d = prepare_data(tok, s)
    small, target = SMALL[s.parent], grown_target(SMALL[s.parent])
    small_model, small_info = _small_model(parent, d, s, small, small_steps, log)
    grown, grow_info = _grow(small_model, d, None, log)
    noisy, noise_info = _grow(small_model, d, noise_db, log)
    random = random_child(parent.config, target, s.seed)
    if shape_signature(random) != shape_signature(grown):
        raise AssertionError("the random child and the grown child differ in architecture")
    inits = {"random": random, "grown": grown, "grown_noise": noisy, "small_continued": small_model}
    runs = []
    for name, model in inits.items():
        for lr, wd in s.grids.get(name, GROWN_GRIDS[name]):
            log(f"  {name}: lr {lr:g}, wd {wd:g}")
            runs.append({"init": name, **train_run(model, d, s, lr, wd, s.warmup, log)})
    params = sg.count_parameters(grown)
    embedding = parent.config.vocab_size * target["hidden"]
    child = {"target": target, "params": params, "non_embedding_params": params - embedding, "steps": s.steps,
             "eval_every": s.eval_every, "runs": runs, **summarise(runs, s.steps)}
    result = {"benchmark": "grow_speed", **environment(s), "settings": dataclasses.asdict(s),
              "parent": {"name": s.parent, "params": sg.count_parameters(parent)},
              "small": small_info, "grow": grow_info, "grow_noise": noise_info,
              "children": {"grown": child}, "speedup": child["speedup"].get("grown", {}).get("value")}
    result["machine"].update(cpu_flags())
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny random Llama, a few steps (seconds)")
    p.add_argument("--json", type=pathlib.Path, help="where to write the JSON (default benchmarks/results/)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--eval-every", dest="eval_every", type=int, default=5)
    p.add_argument("--batch", type=int, default=4, help="windows of 128 tokens per step")
    p.add_argument("--held-out", dest="held_out", type=int, default=16)
    p.add_argument("--small-steps", dest="small_steps", type=int, default=40)
    p.add_argument("--noise-db", dest="noise_db", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table", type=pathlib.Path, help="print the markdown table of a result JSON")
    args = p.parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return {}
    s = Settings(parent="tiny" if args.quick else "smollm2", threads=args.threads, seed=args.seed,
                 steps=args.steps, eval_every=args.eval_every, batch=args.batch, held_out=args.held_out,
                 transform_cost=False)
    small_steps = args.small_steps
    if args.quick:
        s = dataclasses.replace(s, steps=4, eval_every=2, held_out=4, grids={k: v[:1] for k, v in GROWN_GRIDS.items()})
        small_steps = 2
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    result = run_benchmark(s, small_steps, args.noise_db, log)
    path = args.json or ROOT / "benchmarks" / "results" / ("grow_speed_quick.json" if args.quick else "grow_speed.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    png = path.with_suffix(".png")
    result["plot"] = plot(result, png) or str(png.name)
    path.write_text(json.dumps(result, indent=1))
    log(table(result))
    log(f"wrote {path}; speed-up {result['speedup']}")
    return result


if __name__ == "__main__":
    main()
