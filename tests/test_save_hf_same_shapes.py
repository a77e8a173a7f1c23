"""``save_hf`` where two configs of the class give the child's parameter shapes.

A projection of ``heads · head_dim`` rows cannot tell ``heads=2, head_dim=16`` from ``heads=4,
head_dim=8``: both hold 32 rows. When the child shrank another width that equals ``head_dim``
(here the MLP's 16 → 8), the config search's coordinate descent can stop at either, and the
class built from the wrong one splits the same weights into other heads. The writer measures
every config with the child's shapes (``export/hf/config.py``, ``_same_shapes``) and keeps the
one whose class computes the child. Shown on a small Hugging Face class of our own whose config
lists the head counts before ``head_dim`` (the order the search visits them in), at two sizes.

The same config keeps ``init_std = 0.25`` although the graph holds a ``0.5`` (an output scale)
and the stream's ε scale is 2: only a float that a norm of the graph adds is a rescaled ε.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from subclone_testing import relative_error, run
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

import subclone_graph as sg

VOCAB = 40


class HeadsConfig(PretrainedConfig):
    model_type = "subclone_tiny_same_shapes"

    def __init__(self, hidden_size=32, intermediate_size=16, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, num_hidden_layers=2, rms_norm_eps=1e-6, init_std=0.25, **kwargs):
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_attention_heads, self.num_key_value_heads = num_attention_heads, num_key_value_heads
        self.head_dim, self.num_hidden_layers, self.rms_norm_eps = head_dim, num_hidden_layers, rms_norm_eps
        self.init_std = init_std            # read by no computation: only where weights start
        super().__init__(**kwargs)


class Layer(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, self.heads, self.kv, self.head_dim = (config.hidden_size, config.num_attention_heads,
                                                 config.num_key_value_heads, config.head_dim)
        self.norm, self.mlp_norm = (nn.RMSNorm(d, eps=config.rms_norm_eps) for _ in range(2))
        self.q, self.o = nn.Linear(d, self.heads * self.head_dim), nn.Linear(self.heads * self.head_dim, d)
        self.k, self.v = (nn.Linear(d, self.kv * self.head_dim) for _ in range(2))
        self.up, self.down = nn.Linear(d, config.intermediate_size), nn.Linear(config.intermediate_size, d)

    def forward(self, x):
        h = self.norm(x)
        q = self.q(h).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        k, v = (p(h).unflatten(-1, (self.kv, self.head_dim)).transpose(1, 2) for p in (self.k, self.v))
        k, v = (t.repeat_interleave(self.heads // self.kv, dim=1) for t in (k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).flatten(-2))
        return x + self.down(F.gelu(self.up(self.mlp_norm(x))))


class HeadsModel(PreTrainedModel):
    config_class = HeadsConfig

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
        return self.head(self.norm(x)) * 0.5


def _ids(batch, seq, seed):
    return (torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


def test_of_two_configs_with_the_childs_shapes_the_one_that_computes_the_child_is_saved(tmp_path):
    torch.manual_seed(0)
    model = HeadsModel(HeadsConfig()).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, 0.0 if p.dim() > 1 else 1.0, 0.3)
    inputs = _ids(2, 8, 0)
    child = sg.subclone(model, inputs, sg.Target(hidden=0.5, ffn=0.5, heads=0.5, kv_heads=0.5),
                        calibration=[inputs, _ids(4, 16, 1)])
    path = sg.save_hf(child, tmp_path / "child")
    loaded = HeadsModel.from_pretrained(path).eval()
    config = loaded.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 16)
    assert config.intermediate_size == 8 and config.hidden_size == 16
    assert config.init_std == 0.25 and config.rms_norm_eps == 2e-6
    for x in (inputs, _ids(3, 11, 5)):
        assert relative_error(run(loaded, x), run(child, x)) < 1e-5
