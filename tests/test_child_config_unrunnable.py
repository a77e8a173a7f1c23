"""A child subcloned again derives its own config (``child_config``, the parent's with the child's
sizes) so that its children save; where two configs give the child's parameter shapes, each is
measured by building the class from it. A config the class cannot even run with the child's
weights is no match (infinitely far), not a crash of the second subclone.

Shown on a small Hugging Face class of our own with a QK-norm whose width is a config field of its
own (``qk_norm_dim``): the projection of ``heads · head_dim`` rows cannot tell ``heads=2,
head_dim=16`` from ``heads=4, head_dim=8``, and the class built from the second normalises 8
channels with a 16-wide weight — it raises. The grandchild is subcloned, saved, and reloads equal.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from subclone_testing import relative_error, run
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

import subclone_graph as sg

VOCAB = 40


class NormedConfig(PretrainedConfig):
    model_type = "subclone_tiny_qk_norm_width"

    def __init__(self, hidden_size=32, intermediate_size=16, num_attention_heads=4, head_dim=16,
                 qk_norm_dim=16, num_hidden_layers=2, rms_norm_eps=1e-6, **kwargs):
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_attention_heads, self.head_dim, self.qk_norm_dim = num_attention_heads, head_dim, qk_norm_dim
        self.num_hidden_layers, self.rms_norm_eps = num_hidden_layers, rms_norm_eps
        super().__init__(**kwargs)


class Layer(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, self.heads, self.head_dim = config.hidden_size, config.num_attention_heads, config.head_dim
        self.norm, self.mlp_norm = (nn.RMSNorm(d, eps=config.rms_norm_eps) for _ in range(2))
        self.q_norm, self.k_norm = (nn.RMSNorm(config.qk_norm_dim, eps=config.rms_norm_eps) for _ in range(2))
        self.q, self.k, self.v = (nn.Linear(d, self.heads * self.head_dim) for _ in range(3))
        self.o = nn.Linear(self.heads * self.head_dim, d)
        self.up, self.down = nn.Linear(d, config.intermediate_size), nn.Linear(config.intermediate_size, d)

    def forward(self, x):
        h = self.norm(x)
        q, k, v = (p(h).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).flatten(-2))
        return x + self.down(F.gelu(self.up(self.mlp_norm(x))))


class NormedModel(PreTrainedModel):
    config_class = NormedConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(VOCAB, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.head = nn.Linear(config.hidden_size, VOCAB)
        self.post_init()

    def _init_weights(self, module):
        pass

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def _ids(batch, seq, seed):
    return (torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


def test_a_config_the_class_cannot_run_is_no_match_for_the_grandchild(tmp_path):
    torch.manual_seed(0)
    model = NormedModel(NormedConfig()).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, 0.0 if p.dim() > 1 else 1.0, 0.3)
    inputs = _ids(2, 8, 0)
    calibration = [inputs, _ids(4, 16, 1)]
    child = sg.subclone(model, inputs, sg.Target(ffn=0.5, heads=0.5), calibration=calibration)
    grandchild = sg.subclone(child, inputs, sg.Target(hidden=0.5), calibration=calibration)
    path = sg.save_hf(grandchild, tmp_path / "grandchild")
    loaded = NormedModel.from_pretrained(path).eval()
    config = loaded.config
    assert (config.num_attention_heads, config.head_dim, config.qk_norm_dim) == (2, 16, 16)
    assert (config.hidden_size, config.intermediate_size) == (16, 8)
    for x in (inputs, _ids(3, 11, 5)):
        assert relative_error(run(loaded, x), run(grandchild, x)) < 1e-5
