"""Generic, not green: every op met has a rule, unknown ops freeze, no family names in the library."""
from __future__ import annotations

import pathlib
import re

import pytest
import torch

import subclone_graph as sg
from subclone_graph import models
from subclone_graph.passes.rules import RULES
from subclone_testing import calibration, run, traced

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAMILIES = ["llama", "gpt", "bert", "vit", "qwen", "phi", "mistral", "gemma", "smollm", "bloom", "falcon",
            "mixtral", "deepseek", "roberta", "deit", "swin", "whisper", "mamba"]
TARGET_KINDS = ("residual", "ffn", "heads", "kv_heads")


def test_every_op_met_in_the_zoo_has_a_rule():
    met, unknown = set(), []
    for name in models.MODEL_NAMES:
        _, _, gm = traced(name)
        met |= {n.target for n in gm.graph.nodes if n.op == "call_function"}
        unknown += [f"{name}: {op}" for op in gm.meta["subclone.unknown_ops"]]
        graph = gm.meta["subclone.channel_graph"]
        frozen = [g.reason for g in graph.groups.values() if g.kind == "frozen"]
        assert not frozen, f"{name}: a prunable group is frozen: {frozen}"
    assert not unknown, unknown
    print("ops met:", sorted(str(op) for op in met))
    assert len(met) >= 40 and all(op in RULES for op in met if op.__module__ != "_operator")


@torch.library.custom_op("subclone_tests::odd", mutates_args=())
def odd(x: torch.Tensor) -> torch.Tensor:
    """An op of our own, so that no rule is ever written for it (sinc was one, until it got a rule)."""
    return torch.sinc(x)


@odd.register_fake
def _(x):
    return torch.empty_like(x)


class OddStream(torch.nn.Module):
    """A residual model that runs an op with no rule (``subclone_tests::odd``) on its stream."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 32)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                                              torch.nn.Linear(64, 32)) for _ in range(2))
        self.head = torch.nn.Linear(32, 50)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block(x)
        return self.head(odd(x))


def test_an_op_without_a_rule_freezes_what_it_touches_and_says_so():
    torch.manual_seed(0)
    model, ids = OddStream().eval(), torch.randint(0, 50, (2, 6))
    gm = sg.trace(model, (ids,))
    graph = sg.analyze_channels(gm)
    assert any("subclone_tests.odd.default" in op for op in gm.meta["subclone.unknown_ops"])
    frozen = [g for g in graph.groups.values() if g.kind == "frozen"]
    assert frozen and all("subclone_tests.odd.default" in g.reason and "no rule" in g.reason for g in frozen)
    with pytest.raises(ValueError, match=r"Target.hidden cannot shrink this model: .*subclone_tests\.odd\.default .*no rule"):
        sg.subclone(model, (ids,), sg.Target(hidden=16))
    child = sg.subclone(model, (ids,), sg.Target(ffn=32), calibration=[(ids,)])   # the MLP is untouched
    assert child.get_parameter("blocks.0.0.weight").shape == (32, 32)
    assert run(child, (ids,)).shape == (2, 6, 50)


def test_summary_lists_the_groups_by_kind():
    _, _, gm = traced("llama")
    table = gm.meta["subclone.channel_graph"].summary()
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["group", "kind", "size", "layer", "tensors"]
    kinds = [line.split()[1] for line in lines[1:]]
    assert kinds.count("residual") == 1 and kinds.count("ffn") == 3 and kinds.count("heads") == 3
    assert kinds.count("kv_heads") == 3 and "model.embed_tokens.weight dim 1" in table


def test_no_model_family_names_in_the_library():
    pattern = re.compile(r"\b(" + "|".join(FAMILIES) + r")", re.IGNORECASE)
    hits = []
    for folder in ("passes", "subclone_graph"):
        for path in (ROOT / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_a_group_knows_every_tensor_it_slices_through_fused_layouts():
    _, _, gm = traced("phi3")
    graph = gm.meta["subclone.channel_graph"]
    site = gm.meta["subclone.attention"][0]
    names = {(name, dim) for name, dim, _ in graph.slices(site.kv_heads)}
    assert ("model.layers.0.self_attn.qkv_proj.weight", 0) in names      # fused q|k|v rows
    assert ("model.layers.0.self_attn.o_proj.weight", 1) in names
    ffn = next(g for g in graph.groups.values() if g.kind == "ffn" and g.layer == 0)
    names = {(name, dim) for name, dim, _ in graph.slices(ffn.id)}
    assert names >= {("model.layers.0.mlp.gate_up_proj.weight", 0), ("model.layers.0.mlp.down_proj.weight", 1)}


def test_an_exported_program_or_traced_module_is_accepted_as_input():
    model, inputs = models.build("llama_like")
    program = torch.export.export(model, inputs, strict=False, dynamic_shapes=models.dynamic_shapes(model))
    reference = sg.subclone(model, inputs, sg.Target(ffn=64), calibration=calibration(model))
    for source in (program, program.module()):
        child = sg.subclone(source, inputs, sg.Target(ffn=64), calibration=calibration(model))
        torch.testing.assert_close(run(child, inputs), run(reference, inputs))
