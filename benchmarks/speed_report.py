"""The benchmark's outputs besides the JSON: the machine and versions, the plot, the markdown table."""
from __future__ import annotations

import os
import pathlib
import platform

import torch

try:
    from benchmarks.speed_setup import Settings
except ImportError:            # run as a script from benchmarks/
    from speed_setup import Settings  # type: ignore[no-redef]

__all__ = ["environment", "plot", "table"]


def environment(s: Settings) -> dict:
    import transformers
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__}
    for name in ("torch_pruning", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:
            versions[name] = None
    try:
        versions["subclone_graph"] = __import__("importlib.metadata").metadata.version("subclone-graph")
    except Exception:
        versions["subclone_graph"] = None
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": s.device,
               "load_average_at_end": os.getloadavg()}
    if s.device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name(0)
    return {"machine": machine, "versions": versions}


def plot(result: dict, path: pathlib.Path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    names = [n for n, info in result["children"].items() if info["best_run"]]
    if not names:
        return "no finished runs: no plot"
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.5), squeeze=False)
    for ax, child in zip(axes[0], names):
        info = result["children"][child]
        for name, i in info["best_run"].items():
            run = info["runs"][i]
            steps, losses = zip(*run["curve"])
            ax.plot(steps, losses, marker="o", ms=3, label=f"{name} (lr {run['lr']:g}, wd {run['weight_decay']:g})")
        t = info["target"]
        ax.set(title=f"{child}: hidden {t['hidden']}, {t['layers']} layers, {t['heads']}/{t['kv_heads']} heads, "
                     f"MLP {t['ffn']}", xlabel="step", ylabel="held-out loss (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    m = result["machine"]
    where = m.get("gpu") or f"CPU, {m['cpu_count']} cores, {m['torch_threads']} threads"
    fig.suptitle(f"{result['parent']['name']} → children, {where}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _at(curve: list, step: int):
    return next((f"{loss:.2f}" for s_, loss in curve if s_ == step), "–")


def table(result: dict) -> str:
    """Markdown: one row per init's tuned run, per child."""
    lines = []
    for label, info in result["children"].items():
        if not info["best_run"]:
            continue
        every, t = info["eval_every"], info["target"]
        evaluated = {step for step, _ in info["runs"][0]["curve"]}
        marks = sorted(m for m in {every, 10, info["steps"] // 2} if m in evaluated and 0 < m < info["steps"])
        head = " | ".join(f"loss @{m}" for m in marks)
        lines += [f"**{label}** (hidden {t['hidden']}, {t['layers']} layers, {t['heads']}/{t['kv_heads']} heads, "
                  f"MLP {t['ffn']}; {info['params'] / 1e6:.1f}M params, "
                  f"{info['non_embedding_params'] / 1e6:.1f}M non-embedding; {info['steps']} steps, "
                  f"eval every {every})", "",
                  f"| init | lr / wd (best of grid) | loss @0 | {head} | final | steps to random's final | speed-up |",
                  "|---|---|---|" + "---|" * len(marks) + "---|---|---|"]
        for name, i in info["best_run"].items():
            run = info["runs"][i]
            up = info["speedup"].get(name)
            grid = sorted({r["lr"] for r in info["runs"] if r["init"] == name})
            if up is None:
                reach, value = str(info["speedup"] and next(iter(info["speedup"].values()))["steps_random"]), "1 (baseline)"
            else:
                reach = "never" if up["steps_init"] is None else str(up["steps_init"])
                sign = {"lower": "≥ ", "upper": "< ", "eval_granularity": "≈ "}[up["bound"]]
                value = f"{sign}{up['value']:.1f}×"
            warm = "" if run["warmup"] == 0.1 else f", warm-up {run['warmup']:g}"
            lines.append(f"| {name} | {run['lr']:g} / {run['weight_decay']:g}{warm}"
                         f" (of {', '.join(f'{g:g}' for g in grid)}) | {_at(run['curve'], 0)} | "
                         + " | ".join(_at(run["curve"], m) for m in marks)
                         + f" | {run['final']:.2f} | {reach} | {value} |")
        lines.append("")
    return "\n".join(lines)
