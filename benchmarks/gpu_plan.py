"""The GPU run of ``train_speed``: several children and budgets off one parent load.

The parent is loaded, traced and scored once; each entry of ``PLAN`` then builds its children,
trains every (init, lr) of its grid, and the JSON is rewritten after each entry so a run cut
short keeps what it finished. ``--budget-s`` stops starting new training runs after that many
seconds (the runs skipped are listed in the JSON).

    python benchmarks/gpu_plan.py --device cuda --json results/train_speed_gpu.json
    python benchmarks/gpu_plan.py --parent tiny --device cpu --scale 0.05   # smoke test
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

import torch

import subclone_graph as sg
from subclone_graph import data

try:
    from benchmarks import train_speed as ts
except ImportError:            # run as a script from benchmarks/
    import train_speed as ts

__all__ = ["PLAN", "main"]

SUBCLONED = ("subcloning", "weight_selection", "no_reordering", "no_rescale", "measured")
PLAN = [
    # label, child, steps, eval_every, inits, grids ("default" = every subcloned init)
    ("A", "A", 100, 5, ("random",) + SUBCLONED,
     {"random": [(4e-3, 0.1), (2e-3, 0.1), (1e-3, 0.1)],
      "default": [(1e-3, 1e-3), (3e-4, 1e-3), (1e-4, 1e-3)]}),
    ("B", "B", 120, 5, ("random",) + SUBCLONED + ("measured_no_rescale",),
     {"random": [(4e-3, 0.1), (2e-3, 0.1), (1e-3, 0.1)],
      "default": [(2e-3, 1e-3), (1e-3, 1e-3), (3e-4, 1e-3), (1e-4, 1e-3)],
      "subcloning": [(2e-3, 1e-3), (1e-3, 1e-3), (3e-4, 1e-3), (1e-4, 1e-3),
                     (1e-3, 1e-3, 0.3), (3e-4, 1e-3, 0.3), (1e-3, 0.1), (2e-3, 0.1)]}),
    ("A_400", "A", 400, 10, ("random", "subcloning", "weight_selection", "measured"),
     {"random": [(4e-3, 0.1), (2e-3, 0.1)], "default": [(1e-3, 1e-3), (3e-4, 1e-3)]}),
]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parent", default="smollm2", choices=("smollm2", "tiny"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--json", type=pathlib.Path, required=True)
    p.add_argument("--budget-s", type=float, default=420.0)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every step count (smoke tests)")
    p.add_argument("--only", help="comma-separated labels of PLAN to run")
    args = p.parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False      # fp32 like the CPU run
    base = ts.Settings(parent=args.parent, device=args.device, threads=args.threads,
                       deadline=t0 + args.budget_s, transform_cost=False)
    parent, tok = ts.load_parent(args.parent)
    d = ts.prepare_data(tok, base)
    parent_loss = data.held_out_loss(lambda ids: parent(input_ids=ids, use_cache=False).logits, d["held"])
    print(f"parent loaded in {time.time() - t0:.1f} s; held-out loss {parent_loss:.3f}", flush=True)
    result = {"benchmark": "train_speed", "run": "gpu_plan", **ts.environment(base),
              "settings": {k: v for k, v in dataclasses.asdict(base).items() if k not in ("grids", "deadline")},
              "parent": {"name": args.parent, "params": sg.count_parameters(parent), "held_out_loss": parent_loss},
              "children": {}, "transform_cost": {"skipped": "measured on the CPU run"}}
    only = set(args.only.split(",")) if args.only else None
    for label, child, steps, every, inits, grids in PLAN:
        if only and label not in only:
            continue
        steps, every = max(2, round(steps * args.scale)), max(1, round(every * args.scale))
        child = child if args.parent == "smollm2" else "tiny"
        s = dataclasses.replace(base, children=(child,), inits=inits, steps=steps, eval_every=every,
                                grids={**ts.GRIDS, **grids})
        entry = ts.run_child(parent, d, child, s, lambda m: print(m, flush=True))
        result["children"][label] = {"child": child, **entry}
        first = result["children"].get("A") or entry
        result["speedup"] = first["speedup"].get("subcloning", {}).get("value")
        result["elapsed_s"] = time.time() - t0
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"== {label} done at {time.time() - t0:.0f} s: {entry['speedup']}", flush=True)
    ts.plot(result, args.json.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
