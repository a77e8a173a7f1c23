"""Training speed-up of subcloned children over random initialisation (arXiv 2312.09299, Fig. 1).

Speed-up of an initialisation = S_random / S_init, where S_random is the first evaluation step at
which the (learning-rate-tuned) random init reaches its own final held-out loss L, and S_init the
first evaluation step at which the other init reaches L. Evaluations happen every ``eval_every``
steps, so both are known to that granularity:

1. reached at step 0 (already below L before training): S_init < 1, the speed-up is at least
   S_random (``bound: "lower"``, ``below_at_step_0: true``);
2. reached at the first evaluation after step 0: S_init lies in (0, eval_every], the value is a
   lower bound (``bound: "lower"``);
3. reached later: ``bound: "eval_granularity"``;
4. never reached in the budget: S_init > steps, the value S_random / steps is an upper bound.

Initialisations, all of the same child architecture, trained on the same windows in the same
order for the same steps:

- ``random``: the architecture's own default init (a fresh ``LlamaForCausalLM`` from the child's
  config; its parameter shapes are checked against the subcloned child's);
- ``subcloning``: ``sg.subclone`` with calibration (scores, middle layers, √(D/d));
- ``weight_selection``: uniform channel picks, first layers, no √(D/d), no calibration
  (arXiv 2311.18823);
- ``no_reordering``: ``selection="first"`` (ablation);
- ``no_rescale``: ``rescale=False`` (ablation);
- ``measured``/``measured_no_rescale``: ``depth="measured"`` (layer choice by ‖f(x)‖/‖x+f(x)‖).

Training: next-token cross-entropy, AdamW β=(0.9, 0.95) (weight decay on matrices only), cosine
decay to 0 after a linear warm-up (10% of the steps unless a run says otherwise), gradient
clipping at 1.0, ``batch`` × ``window`` tokens per step. Each init runs every (lr, weight decay)
of its grid; the run with the lowest final held-out loss is that init's tuned run.

Run ``python benchmarks/train_speed.py --help``; ``--quick`` is the < 5 min CPU smoke run.
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
from benchmarks.speed_setup import (CHILDREN, GRIDS, INITS, Settings, build_children,  # noqa: E402,F401
                                    child_config, finish_subclone, load_parent, prepare_data,
                                    random_child, scored_parent, shape_signature)
from benchmarks.speed_training import (batch_order, grid_for, lr_at, speedup, summarise,  # noqa: E402,F401
                                       train_run)
from benchmarks.transform_cost import cost_worker, transform_costs  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent

__all__ = ["CHILDREN", "INITS", "Settings", "run_benchmark", "speedup", "train_run", "main"]


# ------------------------------------------------------------------------------------- driver
def _finished_run(s: Settings, child: str, name: str, lr: float, wd: float, warmup: float) -> dict | None:
    """A run of the same init and hyper-parameters in ``s.resume`` (a partial JSON of a stopped
    run with the same settings: same data, order and seed give the same curve)."""
    if not s.resume:
        return None
    previous = json.loads(pathlib.Path(s.resume).read_text())
    for key in ("steps", "eval_every", "held_out", "held_out_pick", "seed", "batch", "window", "parent"):
        if previous["settings"][key] != getattr(s, key):
            raise ValueError(f"--resume {s.resume}: its {key} is {previous['settings'][key]!r}, this run's is "
                             f"{getattr(s, key)!r}")
    runs = previous["children"].get(child, {}).get("runs", [])
    return next((r for r in runs if (r["init"], r["lr"], r["weight_decay"], r["warmup"]) == (name, lr, wd, warmup)),
                None)


def run_child(parent, d: dict, child: str, s: Settings, log, progress=lambda runs: None) -> dict:
    target = CHILDREN[child]
    log(f"child {child}: {target}")
    made = build_children(parent, d, target, s, log)
    params = sg.count_parameters(next(iter(made.values()))["model"])
    embedding = parent.config.vocab_size * target["hidden"]
    runs, skipped = [], []
    for name, entry in made.items():
        for lr, wd, warmup in grid_for(name, s):
            if s.deadline is not None and time.time() > s.deadline:
                log(f"  {name}: lr {lr:g} skipped (time budget)")
                skipped.append({"init": name, "lr": lr, "weight_decay": wd, "warmup": warmup})
                continue
            done = _finished_run(s, child, name, lr, wd, warmup)
            if done is not None:
                log(f"  {name}: lr {lr:g}, wd {wd:g}, warm-up {warmup:g}: taken from {s.resume}")
                runs.append({**done, "resumed_from": str(s.resume)})
                progress(runs)
                continue
            log(f"  {name}: lr {lr:g}, wd {wd:g}, warm-up {warmup:g}")
            run = train_run(entry["model"], d, s, lr, wd, warmup, log)
            runs.append({"init": name, "build_seconds": entry["seconds"], **run})
            progress(runs)
        entry["model"] = None
    return {"target": target, "params": params, "non_embedding_params": params - embedding,
            "steps": s.steps, "eval_every": s.eval_every, "runs": runs, "skipped_runs": skipped,
            **summarise(runs, s.steps)}


def run_benchmark(s: Settings, log=print) -> dict:
    torch.set_num_threads(s.threads)
    parent, tok = load_parent(s.parent)
    d = prepare_data(tok, s)
    parent_loss = data.held_out_loss(lambda ids: parent(input_ids=ids, use_cache=False).logits, d["held"])
    log(f"parent {s.parent}: {sg.count_parameters(parent)} parameters, held-out loss {parent_loss:.3f}")
    result = {"benchmark": "train_speed", **environment(s),
              "settings": {k: v for k, v in dataclasses.asdict(s).items()},
              "parent": {"name": s.parent, "params": sg.count_parameters(parent), "held_out_loss": parent_loss},
              "data": {"train_windows": len(d["train"]), "held_out_windows": len(d["held"]),
                       "calibration_windows": sum(len(b[0]) for b in d["calibration"]),
                       "source": "pydoc_data.topics (Python docs), held-out = end of the text"},
              "children": {}}
    def progress(child, runs):
        # a long CPU run must not lose its finished curves to a crash or a stop
        if s.partial:
            result["children"][child] = {"partial": True, "runs": runs}
            pathlib.Path(s.partial).write_text(json.dumps(result, indent=1))

    for child in s.children:
        result["children"][child] = run_child(parent, d, child, s, log,
                                              lambda runs, child=child: progress(child, runs))
    first = result["children"][s.children[0]]["speedup"].get("subcloning")
    result["speedup"] = first["value"] if first else None
    result["transform_cost"] = transform_costs(s, log) if s.transform_cost else {"skipped": True}
    return result


def _parse_grid(text: str) -> list[tuple]:
    return [tuple(float(x) for x in item.split("/")) for item in text.split(",") if item]


def settings_from(args) -> Settings:
    s = Settings(parent=args.parent, device=args.device, threads=args.threads, seed=args.seed)
    if args.quick:
        s = dataclasses.replace(s, children=("A",) if args.parent != "tiny" else ("tiny",),
                                inits=("random", "subcloning"), steps=6, eval_every=2, held_out=8,
                                transform_cost=False,
                                grids={"random": [(2e-3, 0.1)], "default": [(3e-4, 1e-3)]})
    elif args.parent == "tiny":
        s.children = ("tiny",)
    for field in ("steps", "eval_every", "held_out", "held_out_pick", "warmup", "cost_timeout_s"):
        if getattr(args, field) is not None:
            setattr(s, field, getattr(args, field))
    if args.child:
        s.children = tuple(args.child)
    if args.inits:
        s.inits = tuple(args.inits.split(","))
    for spec in args.grid or []:
        name, _, grid = spec.partition("=")
        s.grids[name] = _parse_grid(grid)
    if args.no_cost:
        s.transform_cost = False
    s.resume = str(args.resume) if args.resume else None
    if args.budget_minutes is not None:
        s.deadline = time.time() + 60 * args.budget_minutes
    return s


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="child A, random vs subcloning, 6 steps (< 5 min)")
    p.add_argument("--json", type=pathlib.Path, help="where to write the JSON (default benchmarks/results/)")
    p.add_argument("--png", type=pathlib.Path, help="where to write the plot (default beside the JSON)")
    p.add_argument("--parent", default="smollm2", choices=("smollm2", "tiny", "gpt2"))
    p.add_argument("--child", action="append", choices=tuple(CHILDREN))
    p.add_argument("--inits", help=f"comma-separated, from {','.join(INITS)}")
    p.add_argument("--grid", action="append", help="INIT=lr/wd[/warmup],...  (INIT 'default': subcloned)")
    p.add_argument("--steps", type=int)
    p.add_argument("--eval-every", dest="eval_every", type=int)
    p.add_argument("--held-out", dest="held_out", type=int)
    p.add_argument("--held-out-pick", dest="held_out_pick", choices=("start", "spread", "end"))
    p.add_argument("--warmup", type=float)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-minutes", dest="budget_minutes", type=float,
                   help="start no training run after this many minutes (skipped runs are listed)")
    p.add_argument("--add-to", dest="add_to", type=pathlib.Path,
                   help="add this run's children to an existing result JSON (and redraw its plot)")
    p.add_argument("--resume", type=pathlib.Path,
                   help="take finished runs from this partial JSON of a stopped run with the same settings")
    p.add_argument("--no-cost", action="store_true", help="skip the transform-cost measurements")
    p.add_argument("--cost-timeout", dest="cost_timeout_s", type=int)
    p.add_argument("--table", type=pathlib.Path, help="print the markdown table of a result JSON")
    p.add_argument("--cost-only", action="store_true", help="only the transform-cost measurements")
    p.add_argument("--cost-worker", choices=("subclone", "torch_pruning"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return None
    if args.cost_worker:
        print(json.dumps(cost_worker(args.cost_worker, args.parent)), flush=True)
        return None
    s = settings_from(args)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if args.cost_only:
        result = {"benchmark": "train_speed", "run": "transform_cost", **environment(s),
                  "transform_cost": transform_costs(s, log)}
        args.json.write_text(json.dumps(result, indent=1))
        return result
    path = args.json or ROOT / "benchmarks" / "results" / "train_speed.json"
    s.partial = str(path.with_suffix(".partial.json"))
    result = run_benchmark(s, log)
    if args.add_to:
        # one result file for children run separately (each child records its own steps)
        base = json.loads(args.add_to.read_text())
        base.setdefault("parts", []).append({key: result[key] for key in ("children", "settings", "machine", "versions")}
                                            | {"children": list(result["children"])})
        base["children"].update(result["children"])
        result, path = base, args.add_to
    path.parent.mkdir(parents=True, exist_ok=True)
    png = args.png or path.with_suffix(".png")
    result["plot"] = plot(result, png) or str(png.name)
    path.write_text(json.dumps(result, indent=1))
    pathlib.Path(s.partial).unlink(missing_ok=True)
    log(f"wrote {path}; speed-up {result['speedup']}")
    return result


if __name__ == "__main__":
    main()
