"""Transform cost: wall time and peak memory of ``sg.subclone`` and of Torch-Pruning, each measured
in a fresh process (``train_speed.py --cost-worker``) with a time limit."""
from __future__ import annotations

import json
import os
import pathlib
import resource
import subprocess
import sys
import threading
import time

import torch

import subclone_graph as sg

try:
    from benchmarks.speed_setup import CHILDREN, Settings, load_parent, prepare_data
except ImportError:            # run as a script from benchmarks/
    from speed_setup import CHILDREN, Settings, load_parent, prepare_data  # type: ignore[no-redef]

__all__ = ["measure", "cost_worker", "transform_costs", "COST_TARGETS"]

WORKER = pathlib.Path(__file__).resolve().with_name("train_speed.py")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(fn) -> dict:
    """Wall time and memory of ``fn()``: ru_maxrss delta, and the peak of RSS sampled every 10 ms
    above the RSS at the start (catches a peak lower than one reached before)."""
    start_rss, start_max = _rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak, done = [start_rss], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            done.wait(0.01)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    done.set()
    thread.join()
    return {"seconds": seconds, "maxrss_delta_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - start_max,
            "sampled_rss_peak_above_start_mib": peak[0] - start_rss, "result": result}


def _gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config()
    config._attn_implementation = "sdpa"
    return GPT2LMHeadModel(config).eval()


# The comparable width reductions: our child A on SmolLM2; the same fractions on GPT-2 124M.
COST_TARGETS = {"smollm2": CHILDREN["A"], "gpt2": dict(hidden=576, layers=8, heads=9, kv_heads=9, ffn=2048)}


def cost_worker(which: str, parent: str) -> dict:
    """One transform-cost measurement (run in a fresh process by ``transform_costs``)."""
    torch.set_num_threads(int(os.environ.get("TRAIN_SPEED_THREADS", "2")))
    if parent == "gpt2":
        model = _gpt2()
        g = torch.Generator().manual_seed(0)
        calibration = [(torch.randint(0, 50257, (4, 128), generator=g),) for _ in range(4)]
    else:
        model, tok = load_parent(parent)
        calibration = prepare_data(tok, Settings(parent=parent))["calibration"]
    before = sg.count_parameters(model)
    if which == "subclone":
        target = sg.Target(**COST_TARGETS.get(parent, CHILDREN["tiny"]))
        m = measure(lambda: sg.subclone(model, calibration[0], target, calibration=calibration))
    else:
        m = measure(lambda: _torch_pruning(model, calibration[0][0], parent))
    after = sg.count_parameters(m.pop("result"))
    return {**m, "params_before": before, "params_after": after, "calibration_batches": len(calibration)}


def _torch_pruning(model, ids, parent: str):
    """Torch-Pruning's width pruning, 25% of channels (hidden, heads, MLP), L2 magnitude."""
    import torch_pruning as tp
    num_heads = {}
    for module in model.modules():
        if hasattr(module, "q_proj"):
            cfg = model.config
            num_heads[module.q_proj] = cfg.num_attention_heads
            num_heads[module.k_proj] = num_heads[module.v_proj] = cfg.num_key_value_heads
        if hasattr(module, "c_attn"):
            num_heads[module.c_attn] = model.config.n_head
    pruner = tp.pruner.MetaPruner(model, ids, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=0.25, ignored_layers=[model.lm_head], num_heads=num_heads,
                                  prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.25,
                                  output_transform=lambda out: out.logits)
    pruner.step()
    return model


def transform_costs(s: Settings, log) -> dict:
    """sg.subclone and Torch-Pruning on SmolLM2 and GPT-2, each in a subprocess with a time limit."""
    costs = {"memory_method": "resource.getrusage(RUSAGE_SELF).ru_maxrss delta around the call, in a "
                              "fresh process after the parent is loaded; plus RSS sampled every 10 ms",
             "timeout_s": {"subclone": 3 * s.cost_timeout_s, "torch_pruning": s.cost_timeout_s}, "targets": COST_TARGETS, "torch_pruning": "pruning_ratio=0.25, "
             "num heads pruned, L2 magnitude, lm_head ignored (no depth change)"}
    parents = ["tiny"] if s.parent == "tiny" else [s.parent, "gpt2"]
    env = dict(os.environ, TRAIN_SPEED_THREADS=str(s.threads), PYTHONWARNINGS="ignore")
    for tool in ("subclone", "torch_pruning"):
        for parent in parents:
            key = f"{tool}/{parent}"
            cmd = [sys.executable, str(WORKER), "--cost-worker", tool, "--parent", parent]
            t0 = time.perf_counter()
            try:
                limit = s.cost_timeout_s * (3 if tool == "subclone" else 1)
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env)
                last = [line for line in proc.stdout.splitlines() if line.startswith("{")]
                costs[key] = json.loads(last[-1]) if proc.returncode == 0 and last else {
                    "error": (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1][:400]}
            except subprocess.TimeoutExpired:
                costs[key] = {"timeout": True, "seconds": time.perf_counter() - t0,
                              "note": "killed at the time limit (parent loading included)"}
            log(f"  cost {key}: {costs[key]}")
    return costs
