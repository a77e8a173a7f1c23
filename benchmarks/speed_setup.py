"""The benchmark's fixed parts: the children, the initialisations, the settings, the parent and
its data, and how every initialisation of one child is built (see ``train_speed``)."""
from __future__ import annotations

import copy
import dataclasses
import re
import time

import torch

import subclone_graph as sg
from subclone_graph import data

__all__ = ["CHILDREN", "INITS", "GRIDS", "Settings", "load_parent", "prepare_data", "pick_held_out",
           "child_config", "random_child", "shape_signature", "scored_parent", "finish_subclone",
           "logits_of", "build_children"]

CHILDREN = {
    "A": dict(hidden=432, layers=20, heads=6, kv_heads=2, ffn=1024),   # paper regime
    "B": dict(hidden=288, layers=6, heads=3, kv_heads=1, ffn=768),     # aggressive
    "tiny": dict(hidden=48, layers=2, heads=2, kv_heads=1, ffn=64),    # for models.build("llama")
}

# name -> how the child is made (None: random init); every subclone variant uses the same target.
INITS = {
    "random": None,
    "subcloning": dict(selection="score", depth="middle", rescale=True, calibrate=True),
    "weight_selection": dict(selection="uniform", depth="first", rescale=False, calibrate=False),
    "no_reordering": dict(selection="first", depth="middle", rescale=True, calibrate=True),
    "no_rescale": dict(selection="score", depth="middle", rescale=False, calibrate=True),
    "measured": dict(selection="score", depth="measured", rescale=True, calibrate=True),
    "measured_no_rescale": dict(selection="score", depth="measured", rescale=False, calibrate=True),
}

# (lr, weight decay[, warm-up fraction]) per init; "default" for every subcloned variant.
# The H100 sweep (README) found 1e-3 best for every subcloned init of A and 1e-3..4e-3 equal for random.
GRIDS = {
    "random": [(2e-3, 0.1), (1e-3, 0.1)],
    "default": [(1e-3, 1e-3), (3e-4, 1e-3)],
}


@dataclasses.dataclass
class Settings:
    parent: str = "smollm2"
    children: tuple = ("A",)
    inits: tuple = ("random", "subcloning", "weight_selection", "no_reordering", "no_rescale")
    steps: int = 100
    eval_every: int = 10
    batch: int = 8
    window: int = 128
    held_out: int = 24
    held_out_pick: str = "start"       # start | spread | end of the held-out quarter
    calibration_batches: int = 4
    calibration_batch_size: int = 4
    warmup: float = 0.1
    clip: float = 1.0
    seed: int = 0
    device: str = "cpu"
    threads: int = 2
    grids: dict = dataclasses.field(default_factory=lambda: copy.deepcopy(GRIDS))
    deadline: float | None = None      # time.time() after which no new training run starts
    partial: str | None = None         # where to write the result so far after every run
    resume: str | None = None          # a partial JSON whose finished runs are taken over
    transform_cost: bool = True
    cost_timeout_s: int = 150          # Torch-Pruning's limit; sg.subclone gets 3×


# ---------------------------------------------------------------------------------- parent, data
class ByteTokenizer:
    """Bytes modulo a vocabulary size: a tokenizer for tiny test parents."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab for b in text.encode("utf-8")]


def load_parent(name: str):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct, or the tiny random ``models.build("llama")``."""
    if name == "smollm2":
        from subclone_graph.models.smollm2 import load_smollm2
        return load_smollm2()
    if name == "tiny":
        from subclone_graph.models import build
        model, _ = build("llama")
        return model, ByteTokenizer(model.config.vocab_size)
    raise ValueError(f"parent {name!r}: choose smollm2 or tiny")


def prepare_data(tokenizer, s: Settings) -> dict:
    text = data.english_corpus()
    if s.parent == "tiny":
        text = text[:60_000]
    windows = data.text_windows(text, tokenizer, s.window)
    train, held = data.split_windows(windows, 0.25)
    calibration = data.calibration_batches(train, s.calibration_batch_size, s.calibration_batches)
    return {"train": train, "held": pick_held_out(held, s.held_out, s.held_out_pick), "calibration": calibration}


def pick_held_out(held: torch.Tensor, count: int, how: str) -> torch.Tensor:
    """``count`` windows of the held-out part: its first ones (the default, used for the committed
    results), ``count`` evenly spread ones, or its last ones. The choice matters: random init at
    ~100 steps is about a unigram model, and the unigram loss of these sets differs (see README)."""
    if how == "start":
        return held[:count]
    if how == "end":
        return held[-count:]
    if how == "spread":
        return held[torch.linspace(0, len(held) - 1, min(count, len(held))).round().long()]
    raise ValueError(f"held_out_pick={how!r}: choose start, spread or end")


# ------------------------------------------------------------------------------------- children
def child_config(parent_config, target: dict):
    """The child's HF ``LlamaConfig``: the parent's, with the child's sizes (head_dim kept)."""
    from transformers import LlamaConfig
    cfg = parent_config.to_dict()
    for key in ("quantization_config", "architectures", "_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    cfg.update(hidden_size=target["hidden"], num_hidden_layers=target["layers"],
               num_attention_heads=target["heads"], num_key_value_heads=target["kv_heads"],
               intermediate_size=target["ffn"], head_dim=parent_config.head_dim,
               tie_word_embeddings=True, use_cache=False)
    config = LlamaConfig(**cfg)
    config._attn_implementation = "sdpa"
    return config


def random_child(parent_config, target: dict, seed: int):
    """A fresh ``LlamaForCausalLM`` of the child's architecture, with HF's default init."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(child_config(parent_config, target))


def shape_signature(module: torch.nn.Module) -> dict:
    """{normalised parameter name: shape}: layer indices renumbered 0.., the tied embedding
    under one name, so an HF model and a subcloned GraphModule compare equal."""
    params = {id(p): (n, p) for n, p in module.named_parameters()}.values()
    layer_ids = sorted({int(m.group(1)) for n, _ in params for m in [re.search(r"layers\.(\d+)\.", n)] if m})
    rank = {i: r for r, i in enumerate(layer_ids)}
    out = {}
    for name, p in params:
        name = re.sub(r"layers\.(\d+)\.", lambda m: f"layers.{rank[int(m.group(1))]}.", name)
        name = "embedding" if name in ("model.embed_tokens.weight", "lm_head.weight") else name
        out[name] = tuple(p.shape)
    return out


def scored_parent(parent, example, target: dict, calibration) -> torch.fx.GraphModule:
    """The parent traced, analysed and scored once: every subcloned variant starts from it.

    ``sg.subclone`` = these passes, then choose → drop → keep → rescale; running the shared
    prefix once gives the same children (tests/test_benchmark_quick.py checks it) in a fraction
    of the time. Weight selection's uniform picks and first layers read no scores.
    """
    key = (id(parent), id(calibration))
    if key not in _SCORED:        # the prefix passes read no Target: one per parent and data
        gm = sg.trace(parent, example)
        passes = sg.subclone_passes(sg.Target(**target), calibration)
        _SCORED[key] = sg.run_passes(gm, passes[:_split(passes)])
    return _SCORED[key]


_SCORED: dict = {}


def _split(passes) -> int:
    return next(i for i, p in enumerate(passes) if isinstance(p, sg.ChooseKeepPass))


def finish_subclone(scored: torch.fx.GraphModule, target: dict, spec: dict, calibration) -> torch.fx.GraphModule:
    """One variant (selection, depth, rescale) from the scored parent."""
    passes = sg.subclone_passes(sg.Target(**target), calibration, depth=spec["depth"],
                                rescale=spec["rescale"], selection=spec["selection"])
    return sg.run_passes(copy.deepcopy(scored), passes[_split(passes):])


def logits_of(model):
    """``ids -> logits`` for an HF model or a traced child."""
    if isinstance(model, torch.fx.GraphModule):
        return lambda ids: model(ids).logits
    return lambda ids: model(input_ids=ids, use_cache=False).logits


def build_children(parent, d: dict, target: dict, s: Settings, log) -> dict:
    """{init name: {"model", "seconds"}} — every init of ``s.inits`` for one child target."""
    made, reference, scored = {}, None, None
    for name in s.inits:
        spec = INITS[name]
        start = time.perf_counter()
        if spec is None:
            model = random_child(parent.config, target, s.seed)
        else:
            if scored is None:
                scored = scored_parent(parent, d["calibration"][0], target, d["calibration"])
            model = finish_subclone(scored, target, spec, d["calibration"])
            reference = reference or model
        made[name] = {"model": model, "seconds": time.perf_counter() - start}
        log(f"  built {name} in {made[name]['seconds']:.1f} s")
    if reference is not None and "random" in made:
        a, b = shape_signature(made["random"]["model"]), shape_signature(reference)
        if a != b:
            raise AssertionError(f"random child and subcloned child differ: {sorted(set(a.items()) ^ set(b.items()))[:6]}")
    for entry in made.values():
        model = entry["model"]
        entry["model"] = sg.move_to_device(model, s.device) if isinstance(model, torch.fx.GraphModule) else model.to(s.device)
    return made
