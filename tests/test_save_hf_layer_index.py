"""``save_hf`` refuses a child whose moved layer would get a constant the class derives from its index.

A class may compute a plain number from the index it gives a layer (``0.8 − 0.6·exp(−0.3·i)``, a
per-layer initial λ), not a weight any checkpoint sets. A child that dropped a middle layer runs
the parent's layer 2 as its layer 1, and the class built from its folder gives that layer index
1's constant: it computes something else, and ``save_hf`` refuses, naming the attribute, both
values and what to do (``export/hf/layer_constants.py``). A child that dropped only the last layer
keeps every index, and saves. Shown on a small Hugging Face class of our own.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from subclone_testing import relative_error, run
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

import subclone_graph as sg
from subclone_graph.export.hf import HFExportError

VOCAB = 40


class IndexConfig(PretrainedConfig):
    model_type = "subclone_tiny_layer_index"

    def __init__(self, hidden_size=16, intermediate_size=32, num_hidden_layers=3, **kwargs):
        self.hidden_size, self.intermediate_size, self.num_hidden_layers = hidden_size, intermediate_size, num_hidden_layers
        super().__init__(**kwargs)


class Layer(nn.Module):
    def __init__(self, config, index):
        super().__init__()
        self.branch_scale = 0.8 - 0.6 * math.exp(-0.3 * index)       # from the layer's index
        self.norm = nn.RMSNorm(config.hidden_size, eps=1e-6)
        self.up, self.down = nn.Linear(config.hidden_size, config.intermediate_size), nn.Linear(
            config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return x + self.branch_scale * self.down(F.gelu(self.up(self.norm(x))))


class IndexModel(PreTrainedModel):
    config_class = IndexConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(VOCAB, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_hidden_layers))
        self.head = nn.Linear(config.hidden_size, VOCAB)
        self.post_init()

    def _init_weights(self, module):
        pass

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _ids(batch, seq, seed):
    return (torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


def _child(dropped):
    torch.manual_seed(0)
    model = IndexModel(IndexConfig()).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, 0.0 if p.dim() > 1 else 1.0, 0.3)
    inputs = _ids(2, 8, 0)
    return sg.subclone(model, inputs, sg.Target(ffn=0.5), drop_layers=[dropped], calibration=[inputs, _ids(4, 16, 1)])


def test_a_constant_the_class_derives_from_a_moved_layers_index_is_named(tmp_path):
    child = _child(1)
    with pytest.raises(HFExportError, match=r"the class derives layers\.1\.branch_scale \(0\.3555; the child keeps "
                                            r"layers\.2's 0\.4707\) from the index of a layer that the child moved"):
        sg.save_hf(child, tmp_path / "child")
    assert not (tmp_path / "child").exists()


def test_a_child_whose_layers_keep_their_indices_saves(tmp_path):
    child = _child(2)
    loaded = IndexModel.from_pretrained(sg.save_hf(child, tmp_path / "child")).eval()
    for x in (_ids(2, 8, 0), _ids(3, 11, 5)):
        assert relative_error(run(loaded, x), run(child, x)) < 1e-5
