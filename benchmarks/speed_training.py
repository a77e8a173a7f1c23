"""Training one initialisation, and the speed-up metric (definitions in ``train_speed``'s docstring)."""
from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F

from subclone_graph import data

try:
    from benchmarks.speed_setup import GRIDS, Settings, logits_of
except ImportError:            # run as a script from benchmarks/
    from speed_setup import GRIDS, Settings, logits_of  # type: ignore[no-redef]

__all__ = ["lr_at", "batch_order", "held_out", "train_run", "grid_for", "first_reach", "speedup", "summarise"]


def lr_at(step: int, steps: int, warmup: float) -> float:
    """Linear warm-up over ``warmup`` × steps, then cosine decay to 0 (a factor on the lr)."""
    warm = max(1, round(warmup * steps))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batch_order(n_windows: int, steps: int, batch: int, seed: int) -> list[torch.Tensor]:
    """The same window indices for every init: shuffled epochs, ``batch`` windows a step."""
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(n_windows, generator=g)
                       for _ in range(math.ceil(steps * batch / n_windows))])
    return [order[i * batch:(i + 1) * batch] for i in range(steps)]


def _optimizer(model, lr: float, wd: float):
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": wd}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95)), params


def held_out(fn, held: torch.Tensor, device: str) -> float:
    return data.held_out_loss(fn, held.to(device), batch_size=8)


def train_run(model, d: dict, s: Settings, lr: float, wd: float, warmup: float, log, keep_model: bool = False) -> dict:
    """Train a copy of ``model``; return its held-out curve, train losses and timings (and the
    trained copy under ``"model"`` with ``keep_model``: a model trained further, as grow_speed's)."""
    model = copy.deepcopy(model)
    fn = logits_of(model)
    opt, params = _optimizer(model, lr, wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_at(k, s.steps, warmup))
    batches = batch_order(len(d["train"]), s.steps, s.batch, s.seed)
    curve, train_loss = [[0, held_out(fn, d["held"], s.device)]], []
    start = time.perf_counter()
    for step, index in enumerate(batches, 1):
        ids = d["train"][index].to(s.device)
        logits = fn(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s.clip)
        opt.step()
        sched.step()
        train_loss.append(loss.item())
        if step % s.eval_every == 0 or step == s.steps:
            curve.append([step, held_out(fn, d["held"], s.device)])
            log(f"    step {step:4d}  train {train_loss[-1]:.3f}  held-out {curve[-1][1]:.3f}")
    result = {"lr": lr, "weight_decay": wd, "warmup": warmup, "curve": curve, "train_loss": train_loss,
              "final": curve[-1][1], "seconds": time.perf_counter() - start}
    return {**result, "model": model} if keep_model else result


def grid_for(name: str, s: Settings) -> list[tuple]:
    grid = s.grids.get(name, s.grids["default"] if name != "random" else GRIDS["random"])
    return [(g[0], g[1], g[2] if len(g) > 2 else s.warmup) for g in grid]


# ------------------------------------------------------------------------------------- metric
def first_reach(curve: list, level: float):
    """First evaluation step whose loss is ≤ ``level`` (None when never)."""
    return next((step for step, loss in curve if loss <= level + 1e-9), None)


def speedup(random_curve: list, curve: list, steps: int) -> dict:
    """Speed-up of ``curve`` over ``random_curve`` (see the module docstring for the cases)."""
    level = random_curve[-1][1]
    s_random = first_reach(random_curve, level)
    s_init = first_reach(curve, level)
    first_eval = curve[1][0] if len(curve) > 1 else steps
    out = {"random_final": level, "steps_random": s_random, "steps_init": s_init, "below_at_step_0": s_init == 0}
    if s_init is None:
        out.update(value=s_random / steps, bound="upper")
    elif s_init == 0:
        out.update(value=float(s_random), bound="lower")
    else:
        out.update(value=s_random / s_init, bound="lower" if s_init == first_eval else "eval_granularity")
    return out


def summarise(runs: list, steps: int) -> dict:
    """Tuned run per init, speed-ups against tuned random, and the ordering checks."""
    best = {}
    for i, run in enumerate(runs):
        if run["init"] not in best or run["final"] < runs[best[run["init"]]]["final"]:
            best[run["init"]] = i
    out = {"best_run": best, "speedup": {}}
    if "random" in best:
        rc = runs[best["random"]]["curve"]
        for name, i in best.items():
            if name != "random":
                out["speedup"][name] = speedup(rc, runs[i]["curve"], steps)
    if "subcloning" in best and "weight_selection" in best:
        a, b = runs[best["subcloning"]]["curve"], runs[best["weight_selection"]]["curve"]
        out["subcloning_ahead_of_weight_selection_at_every_eval"] = all(x[1] < y[1] for x, y in zip(a, b))
        finals = {n: runs[best[n]]["final"] for n in ("no_reordering", "no_rescale") if n in best}
        lo, hi = runs[best["subcloning"]]["final"], runs[best["weight_selection"]]["final"]
        out["ablations_between_final"] = {n: lo <= v <= hi for n, v in finals.items()}
    return out
