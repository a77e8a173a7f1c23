"""Dropping a layer that computes a value the later layers read (not through its output).

Some models make a mask or a position tensor from the inputs in the first layer that needs it
and hand it on to the next layers. That value is not the layer's computation: ``DropBlocksPass``
keeps it (as code outside the layer) and removes the rest of the layer exactly. A value made
from the layer's stream or weights and handed on (a second stream) still refuses the drop.
Shown on small models of our own, planted exact: a dropped layer whose branch is dead leaves the
outputs unchanged, and every one of its weights is gone.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from subclone_testing import relative_error, run
from torch import nn

import subclone_graph as sg

VOCAB, WIDTH = 30, 16


class Layer(nn.Module):
    def __init__(self, hands_on: str):
        super().__init__()
        self.hands_on = hands_on
        self.norm = nn.RMSNorm(WIDTH)
        self.up, self.down = nn.Linear(WIDTH, 32), nn.Linear(32, WIDTH)

    def forward(self, x, ids, shared):
        if shared is None:       # made by the first layer that needs it, then handed on
            if self.hands_on == "mask":
                shared = (ids % 3 != 0).to(x.dtype).unsqueeze(-1) * (1 + torch.arange(ids.shape[1], dtype=x.dtype) / 8).unsqueeze(-1)
            else:                # from the layer's own stream and weights: a second stream
                shared = torch.sigmoid(self.up(x)[..., :1])
        return x + self.down(F.gelu(self.up(self.norm(x)))) * shared, shared


class Model(nn.Module):
    def __init__(self, hands_on: str, layers: int = 3):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.layers = nn.ModuleList(Layer(hands_on) for _ in range(layers))
        self.norm, self.head = nn.RMSNorm(WIDTH), nn.Linear(WIDTH, VOCAB)

    def forward(self, ids):
        x, shared = self.embed(ids), None
        for layer in self.layers:
            x, shared = layer(x, ids, shared)
        return self.head(self.norm(x))


def _ids(batch, seq, seed):
    return (torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


def test_a_mask_made_in_the_dropped_layer_stays_and_the_layer_goes_exactly():
    torch.manual_seed(0)
    model = Model("mask").eval()
    with torch.no_grad():
        model.layers[0].down.weight.zero_()          # layer 0's branch is dead: dropping it is exact
        model.layers[0].down.bias.zero_()
    child = sg.subclone(model, _ids(2, 8, 0), drop_layers=[0])
    names = {n for n, _ in child.named_parameters()}
    assert not any(n.startswith("layers.0.") for n in names) and len(child.meta["subclone.layers"]) == 2
    for x in (_ids(2, 8, 0), _ids(3, 11, 5)):
        assert relative_error(run(child, x), run(model, x)) < 1e-6


def test_a_value_made_from_the_layers_stream_still_refuses_the_drop():
    model = Model("stream").eval()
    with pytest.raises(ValueError, match=r"layer 0 \(layers\.0\) cannot be removed: \w+ computed in it is read after it"):
        sg.subclone(model, _ids(2, 8, 0), drop_layers=[0])
