"""A post-norm layer whose first sublayer mixes tokens without weights (a Fourier transform's real
part, as in FNet): ``y = norm(x + real(fft(x)))``, then ``norm(y + mlp(y))``.

The weightless branch is no residual block (a block's branch reads a weight), so the layer's
first block is its MLP, whose skip ``y`` is computed inside the layer. The layer's stream input
is followed back to the one value of the stream's shape that enters the layer; before, it was
``y``, and dropping the layer left its Fourier half in the graph (``DropBlocksPass``'s
postcondition failed). Now:

1. dropping a layer gives exactly the parent with that layer skipped (at two sizes);
2. the FFT over the hidden dim has no rule: a narrower stream is refused in one line naming the
   op and its module, while MLP neurons planted dead are removed exactly.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from subclone_testing import groups_of, plant_dead, relative_error, run
from torch import nn

import subclone_graph as sg

VOCAB, D, FFN, LAYERS = 40, 32, 48, 3


class FourierLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix_norm, self.out_norm = nn.LayerNorm(D), nn.LayerNorm(D)
        self.up, self.down = nn.Linear(D, FFN), nn.Linear(FFN, D)

    def forward(self, x):
        y = self.mix_norm(x + torch.fft.fftn(x, dim=(1, 2)).real)
        return self.out_norm(y + self.down(F.gelu(self.up(y))))


class FourierNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(FourierLayer() for _ in range(LAYERS))
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids, skip: int | None = None):
        x = self.embed(ids)
        for index, layer in enumerate(self.layers):
            if index != skip:
                x = layer(x)
        return self.head(x)


def _ids(batch, seq, seed):
    return (torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


def test_dropping_a_layer_with_a_weightless_sublayer_removes_all_of_it():
    model = FourierNet().eval()
    child = sg.subclone(model, _ids(2, 8, 0), drop_layers=[1])
    assert not any("layers.1." in name for name, _ in child.named_parameters())
    for batch, seq in ((2, 8), (3, 11)):
        (ids,) = _ids(batch, seq, 5)
        with torch.no_grad():
            want = model(ids, skip=1)
        assert relative_error(run(child, (ids,)), want) < 1e-5


def test_its_stream_is_refused_naming_the_fft_and_dead_neurons_go():
    model = FourierNet().eval()
    with pytest.raises(ValueError, match=r"Target\.hidden cannot shrink this model: aten\.fft_fftn\.default .*layers\.0"):
        sg.subclone(model, _ids(2, 8, 0), sg.Target(hidden=16))
    gm = sg.trace(model, _ids(2, 8, 0))
    sg.analyze_channels(gm)
    plant_dead(gm, {g.id: list(range(1, g.size, 2)) for g in groups_of(gm, "ffn")})
    child = sg.subclone(gm, _ids(2, 8, 0), sg.Target(ffn=0.5))
    assert sg.count_parameters(child) < sg.count_parameters(gm)
    for batch, seq in ((2, 8), (3, 11)):
        assert relative_error(run(child, _ids(batch, seq, 7)), run(gm, _ids(batch, seq, 7))) < 1e-4
