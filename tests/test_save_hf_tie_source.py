"""``save_hf`` of a class that registers its tied output head before its body.

The child's first name for the tied tensor is then the head's (``head.weight``); ``tie_weights``
overwrites the head from the token table when the class loads, so a folder storing the tensor
under the head's name loads with no token table. The writer stores a tied tensor under the
class's tie source (``all_tied_weights_keys``). Shown on a small Hugging Face class of our own:
the folder holds the table's name only, and the reloaded class equals the child at two sizes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors import safe_open
from subclone_testing import relative_error, run
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

import subclone_graph as sg

VOCAB = 40


class HeadFirstConfig(PretrainedConfig):
    model_type = "subclone_tiny_head_first"

    def __init__(self, hidden_size=32, intermediate_size=48, num_hidden_layers=2, tie_word_embeddings=True, **kwargs):
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_hidden_layers = num_hidden_layers
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class Layer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size)
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Body(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class HeadFirstModel(PreTrainedModel):
    config_class = HeadFirstConfig
    _tied_weights_keys = {"head.weight": "body.embed.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.head = nn.Linear(config.hidden_size, VOCAB, bias=False)        # registered before the body
        self.body = Body(config)
        self.post_init()

    def _init_weights(self, module):
        pass

    def get_input_embeddings(self):
        return self.body.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids):
        return self.head(self.body(input_ids))


def _ids(batch, seq, seed):
    return (torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


def test_a_tied_head_registered_first_is_stored_under_the_tables_name(tmp_path):
    torch.manual_seed(0)
    model = HeadFirstModel(HeadFirstConfig()).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, 0.0 if p.dim() > 1 else 1.0, 0.1)
    assert model.head.weight is model.body.embed.weight
    assert next(name for name, _ in model.named_parameters()) == "head.weight"
    inputs = _ids(2, 8, 0)
    child = sg.subclone(model, inputs, sg.Target(hidden=0.5, ffn=0.5), calibration=[inputs, _ids(4, 16, 1)])
    path = sg.save_hf(child, tmp_path / "child")
    with safe_open(str(path / "model.safetensors"), "pt") as file:
        names = set(file.keys())
    assert "body.embed.weight" in names and "head.weight" not in names
    loaded = HeadFirstModel.from_pretrained(path).eval()
    assert loaded.head.weight is loaded.body.embed.weight and loaded.config.hidden_size == 16
    for x in (inputs, _ids(3, 5, 2)):
        assert relative_error(run(loaded, x), run(child, x)) < 1e-5
