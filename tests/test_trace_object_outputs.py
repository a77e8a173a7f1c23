"""A model that returns an object next to its logits (a key/value cache it fills whatever the
caller asks), as some Hugging Face classes do with a ``DynamicCache``.

torch.export cannot return an object that is neither a tensor nor a pytree of tensors; before,
``trace`` refused such a model. Now the traced forward returns ``None`` in the object's place,
with a warning naming its type and place, and:

1. the traced model's logits are the model's, at the traced size and at another batch and length;
2. the model given is unchanged (its ``forward`` is the class's again, or the one it had);
3. planted-dead MLP neurons and a planted-dead kv group are removed with the logits unchanged;
4. an output in which torch's pytree finds no tensor at all (a transformers output class first
   defined while torch.export ran, which transformers then never registers) is a one-line
   ``TraceError`` naming it, not a graph returning ``None`` (in a fresh interpreter: the suite's
   conftest imports those classes first).
"""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from subclone_testing import groups_of, plant_dead, plant_dead_heads, relative_error, run
from torch import nn

import subclone_graph as sg

VOCAB, D, HEADS, KV_HEADS, FFN, LAYERS = 40, 32, 4, 2, 48, 2
HEAD = D // HEADS


class KeyValueStore:
    """A cache as the classes keep one: a plain object holding the tensors each layer appended."""

    def __init__(self):
        self.keys, self.values = [], []

    def update(self, key, value):
        self.keys.append(key)
        self.values.append(value)
        return key, value


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.q, self.k = nn.Linear(D, D), nn.Linear(D, KV_HEADS * HEAD)
        self.v, self.o = nn.Linear(D, KV_HEADS * HEAD), nn.Linear(D, D)
        self.up, self.down = nn.Linear(D, FFN), nn.Linear(FFN, D)

    def forward(self, x, cache: KeyValueStore):
        b, s, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, s, HEADS, HEAD).transpose(1, 2)
        k = self.k(h).view(b, s, KV_HEADS, HEAD).transpose(1, 2)
        v = self.v(h).view(b, s, KV_HEADS, HEAD).transpose(1, 2)
        k, v = cache.update(k, v)
        k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
        v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, D))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class CachingModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
        self.norm, self.head = nn.LayerNorm(D), nn.Linear(D, VOCAB)

    def forward(self, ids):
        cache, x = KeyValueStore(), self.embed(ids)
        for layer in self.layers:
            x = layer(x, cache)
        return {"logits": self.head(self.norm(x)), "cache": cache}


def _ids(batch, seq, seed):
    return (torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


def _trace(model):
    with pytest.warns(UserWarning, match=r"CachingModel returns a KeyValueStore at output\['cache'\], not a tensor"):
        gm = sg.trace(model, _ids(2, 8, 0))
    sg.analyze_channels(gm)
    return gm


def test_a_cache_in_the_output_traces_and_the_logits_are_the_models():
    model = CachingModel().eval()
    gm = _trace(model)
    assert "forward" not in model.__dict__        # the model given is left as it was
    assert isinstance(model(*_ids(2, 8, 0))["cache"], KeyValueStore)
    for batch, seq in ((2, 8), (3, 13)):
        with torch.no_grad():
            out, want = gm(*_ids(batch, seq, 3)), model(*_ids(batch, seq, 3))
        assert out["cache"] is None
        assert relative_error(out["logits"], want["logits"]) < 1e-6


def test_an_instance_forward_of_the_model_is_restored():
    model = CachingModel().eval()
    own = model.forward
    model.forward = lambda ids: own(ids)
    patched = model.forward
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sg.trace(model, _ids(2, 8, 0))
    assert model.__dict__["forward"] is patched


def test_dead_neurons_and_a_dead_kv_group_go_with_the_logits_unchanged():
    gm = _trace(CachingModel().eval())
    plant_dead(gm, {g.id: list(range(1, g.size, 2)) for g in groups_of(gm, "ffn")})
    heads, kv_heads = plant_dead_heads(gm)
    calibration = [_ids(2, 8, 0), _ids(3, 13, 7), _ids(4, 16, 100)]
    child = sg.subclone(gm, _ids(2, 8, 0), sg.Target(ffn=0.5, heads=heads, kv_heads=kv_heads), calibration=calibration)
    assert sg.count_parameters(child) < sg.count_parameters(gm)
    for batch, seq in ((2, 8), (3, 13)):
        assert relative_error(run(child, _ids(batch, seq, 7)), run(gm, _ids(batch, seq, 7))) < 1e-4


LAZY_OUTPUT = """
import sys, torch, subclone_graph as sg
assert "transformers.modeling_outputs" not in sys.modules

class Lazy(torch.nn.Module):
    def forward(self, x):
        from transformers.modeling_outputs import BaseModelOutput     # first defined while exporting
        return BaseModelOutput(last_hidden_state=2 * x)

try:
    sg.trace(Lazy(), (torch.ones(2, 3),))
except sg.TraceError as error:
    print(error)
"""


def test_an_output_class_defined_during_the_export_is_a_one_line_error():
    done = subprocess.run([sys.executable, "-c", LAZY_OUTPUT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    line = done.stdout.strip()
    assert "\n" not in line and line.startswith("could not trace Lazy: TraceError: Lazy returns a BaseModelOutput "
                                                 "in which torch's pytree finds no tensor"), line
