"""The family checks (``models/family_checks.py``) on small Hugging Face classes of our own whose
code specialises on the sequence length, checked as the refusal tells a user to (``fixed_sizes``):

1. a Python loop over the sequence pins the traced length: every check is ``ok`` and names the
   limit (``fixed sequence length 8``); the graph children are compared at another batch at that
   length, and ``save_hf``'s reloaded class at the other batch and sequence size gives, on its
   first 8 positions, the graph child's outputs on them (the class is causal, as its parent);
2. a reloaded class that differs from the graph child on that prefix is ``wrong`` (the check
   above is a numerical one, not "it ran");
3. a length padded up to a multiple of 4 by a branch the trace takes only for multiples of 4:
   the allowed sizes are read from the guards (``subclone_graph.input_sizes``), the other size
   is 12 rather than 13, and the identity child equals the parent there;
4. the README table marks such a family's ✓ and names the limit under "why".
"""
from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

import subclone_graph as sg
from subclone_graph.input_sizes import another_example, fitting_size
from subclone_graph.models import family_checks
from subclone_graph.passes import state

VOCAB = 40


class ScanConfig(PretrainedConfig):
    model_type = "subclone_tiny_scan"

    def __init__(self, hidden_size=16, intermediate_size=32, num_hidden_layers=2, chunk=1, **kwargs):
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_hidden_layers, self.chunk = num_hidden_layers, chunk
        super().__init__(**kwargs)


class ScanLayer(nn.Module):
    """A causal recurrence run position by position in Python (a selective scan's reference
    loop: it pins the traced length), then an MLP."""

    def __init__(self, config):
        super().__init__()
        self.norm, self.mix_in = nn.RMSNorm(config.hidden_size), nn.Linear(config.hidden_size, config.hidden_size)
        self.decay = nn.Parameter(torch.rand(config.hidden_size) * 0.5 + 0.25)
        self.mix_out = nn.Linear(config.hidden_size, config.hidden_size)
        self.mlp_norm = nn.RMSNorm(config.hidden_size)
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        u = self.mix_in(self.norm(x))
        state, outs = torch.zeros_like(u[:, 0]), []
        for t in range(x.shape[1]):
            state = self.decay * state + u[:, t]
            outs.append(state)
        x = x + self.mix_out(torch.stack(outs, 1))
        return x + self.down(F.gelu(self.up(self.mlp_norm(x))))


class PaddedLayer(nn.Module):
    """Causal means over chunks of ``chunk`` positions, the sequence padded up to a multiple of it
    (the trace at a multiple takes the branch without padding and is confined to multiples)."""

    def __init__(self, config):
        super().__init__()
        self.chunk, self.norm = config.chunk, nn.RMSNorm(config.hidden_size)
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        b, s, d = x.shape
        h = self.norm(x)
        if s % self.chunk:
            h = F.pad(h, (0, 0, 0, self.chunk - s % self.chunk))
        chunks = h.view(b, -1, self.chunk, d)
        causal = chunks.cumsum(2) / torch.arange(1, self.chunk + 1, dtype=h.dtype).view(1, 1, -1, 1)
        h = causal.reshape(b, -1, d)[:, :s]
        return x + self.down(F.gelu(self.up(h)))


class ScanModel(PreTrainedModel):
    config_class = ScanConfig

    def __init__(self, config):
        super().__init__(config)
        layer = PaddedLayer if config.chunk > 1 else ScanLayer
        self.embed = nn.Embedding(VOCAB, config.hidden_size)
        self.layers = nn.ModuleList(layer(config) for _ in range(config.num_hidden_layers))
        self.norm, self.head = nn.RMSNorm(config.hidden_size), nn.Linear(config.hidden_size, VOCAB)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def _inputs(batch, seq, seed):
    return (torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


def _checks(model, checks=family_checks.CHECKS[:-1]):
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {o.check: o for o in family_checks.run_checks(model, _inputs, checks=checks)}
    finally:
        logging.disable(logging.NOTSET)


def test_a_pinned_length_is_checked_at_fixed_sizes_and_named():
    torch.manual_seed(0)
    got = _checks(ScanModel(ScanConfig()).eval())
    assert {c: o.status for c, o in got.items()} == {c: "ok" for c in got}, {c: o.detail for c, o in got.items()}
    limit = "limit: fixed sequence length 8: the class's code specialises on it"
    assert got["trace"].detail == limit
    assert all(o.detail.endswith(limit) for o in got.values())
    assert "at (3, 13) the class's first 8 positions = the graph child's on them" in got["save_hf"].detail


def test_a_reloaded_class_that_differs_on_the_prefix_is_wrong(monkeypatch):
    # the reloaded class run at the other size gives another answer on the first positions than
    # the graph child: what a class whose code differs from the graph's beyond the traced length shows
    real = family_checks.run

    def shifted(module, inputs):
        out = real(module, inputs)
        return out + 1 if isinstance(module, ScanModel) and inputs[0].shape[1] == 13 and module.config.hidden_size < 16 \
            else out

    monkeypatch.setattr(family_checks, "run", shifted)
    torch.manual_seed(0)
    got = _checks(ScanModel(ScanConfig()).eval(), ("trace", "shrink", "save_hf"))
    assert got["save_hf"].status == "wrong"
    assert "at (3, 13), its first 8 positions against the graph child's on them" in got["save_hf"].detail


def test_allowed_sizes_are_read_from_the_guards():
    torch.manual_seed(0)
    model = ScanModel(ScanConfig(chunk=4)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = sg.trace(model, _inputs(2, 8, 0))
    assert state.INPUT_SIZES.get(gm) == {("input_ids", 1): tuple(range(8, 65, 4))}   # export also rejects 4 (one chunk)
    assert fitting_size(gm, 3, 13) == (3, 12) and fitting_size(gm, 4, 16) == (4, 16)
    assert another_example(gm, _inputs(2, 8, 0))[0].shape == (3, 12)
    got = _checks(model, ("trace", "identity"))
    assert got["identity"].status == "ok"
    assert got["trace"].detail.startswith("limit: sequence length in {8, 12, 16, 20, …}: the class's code specialises on it")


def test_the_table_marks_the_limit():
    from benchmarks.family_sweep import summary, table

    limit = "limit: fixed sequence length 8: the class's code specialises on it"
    checks = {c: {"status": "ok", "detail": limit, "seconds": 1.0} for c in family_checks.CHECKS}
    families = {"scan": {"build": "ok", "class": "ScanModel", "seconds": 9.0, "checks": checks, "commit": "x"}}
    result = {"families": families, "summary": summary(families), "limit_s": 240,
              "versions": {"transformers": "5", "torch": "2"}, "cpu": {"model": "cpu", "cores": 2}}
    assert result["summary"]["pass_with_limit"] == ["scan"]
    row = next(line for line in table(result).splitlines() if line.startswith("| scan |"))
    assert row.count("✓ᶠ") == len(family_checks.CHECKS) - 1 and row.endswith(f"| {limit} |")
