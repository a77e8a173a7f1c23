"""``save_hf`` of a class whose config overrides some layers in a dict keyed by layer index.

A sparse ``per_layer_config`` (transformers' heterogeneous configs: ``{2: {"intermediate_size": 24}}``,
only layer 2's MLP is wider; ``config.per_layer_config[i]`` is layer i's config) names layers by their index in the parent. A child without layer 1 has the parent's layer 2 as
its layer 1: the writer re-keys the dict by the child's layers (``export/hf/config.py``), and a
dropped layer's override goes with it. Shown on a small Hugging Face class of our own: the
reloaded class equals the child at two sizes, and its config names the child's indices.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from subclone_testing import relative_error, run
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

import subclone_graph as sg

VOCAB = 40


class PerLayerConfig(PretrainedConfig):
    model_type = "subclone_tiny_per_layer_config"

    def __init__(self, hidden_size=32, intermediate_size=16, num_hidden_layers=3, **kwargs):
        self.hidden_size, self.intermediate_size, self.num_hidden_layers = hidden_size, intermediate_size, num_hidden_layers
        super().__init__(**kwargs)      # per_layer_config: transformers' own per-layer overrides

    def inner(self, index: int) -> int:
        return self.per_layer_config[index].intermediate_size


class Layer(nn.Module):
    def __init__(self, config, index):
        super().__init__()
        self.norm = nn.RMSNorm(config.hidden_size, eps=1e-6)
        self.up = nn.Linear(config.hidden_size, config.inner(index))
        self.down = nn.Linear(config.inner(index), config.hidden_size)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class PerLayerModel(PreTrainedModel):
    config_class = PerLayerConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(VOCAB, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_hidden_layers))
        self.norm, self.head = nn.RMSNorm(config.hidden_size, eps=1e-6), nn.Linear(config.hidden_size, VOCAB)
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


@pytest.mark.parametrize("dropped, saved", [(1, {"1": {"intermediate_size": 24}}), (2, {})])
def test_a_per_layer_dict_is_keyed_by_the_childs_layers(dropped, saved, tmp_path):
    torch.manual_seed(0)
    model = PerLayerModel(PerLayerConfig(per_layer_config={2: {"intermediate_size": 24}})).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, 0.0 if p.dim() > 1 else 1.0, 0.1)
    inputs = _ids(2, 8, 0)
    child = sg.subclone(model, inputs, sg.Target(hidden=0.5), drop_layers=[dropped],
                        calibration=[inputs, _ids(4, 16, 1)])
    path = sg.save_hf(child, tmp_path / "child")
    config = json.loads((path / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["hidden_size"] == 16
    assert config["per_layer_config"] == saved
    loaded = PerLayerModel.from_pretrained(path).eval()
    for x in (_ids(2, 8, 0), _ids(3, 11, 5)):
        assert relative_error(run(loaded, x), run(child, x)) < 1e-5
