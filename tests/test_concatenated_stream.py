"""A residual stream made by concatenating several tables (hash-bucket embeddings, each a slice of
the width), one of which loses every channel.

The stream is one group; each table's width is a part of it. When the kept channels of the
stream include none of one table's, that part is kept at zero: the √(D/d) rescale reads the
stream's D/d, not the empty part's (which divided by zero). Shown on a model of our own, planted
exact: one whole table dead, removed with the stream's other dead channels, outputs unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from subclone_testing import analysed, groups_of, plant_dead, relative_error, run
from torch import nn

import subclone_graph as sg

VOCAB, PARTS, PART = 50, 4, 4


class Layer(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm, self.up, self.down = nn.RMSNorm(width), nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class HashedStream(nn.Module):
    def __init__(self):
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(VOCAB, PART) for _ in range(PARTS))
        self.layers = nn.ModuleList(Layer(PARTS * PART) for _ in range(2))
        self.norm, self.head = nn.RMSNorm(PARTS * PART), nn.Linear(PARTS * PART, VOCAB)

    def forward(self, ids):
        x = torch.cat([table((ids * (7 + 2 * i)) % VOCAB) for i, table in enumerate(self.tables)], dim=-1)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def _ids(batch, seq, seed):
    return (torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


def test_a_table_whose_channels_all_go_is_removed_exactly():
    torch.manual_seed(0)
    gm = analysed(HashedStream().eval(), _ids(2, 8, 0))
    (stream,) = groups_of(gm, "residual")
    dead = [4, 5, 6, 7, 13]                  # all of the second table, one channel of the fourth
    plant_dead(gm, {stream.id: dead})
    child = sg.subclone(gm, _ids(2, 8, 0), sg.Target(hidden=stream.size - len(dead)),
                        calibration=[_ids(4, 16, 1)])
    tables = {k: v.shape for k, v in child.state_dict().items() if k.startswith("tables.")}
    assert tables.get("tables.1.weight", (VOCAB, 0))[1] == 0 and tables["tables.3.weight"][1] == PART - 1
    for x in (_ids(2, 8, 0), _ids(3, 11, 5)):
        assert relative_error(run(child, x), run(gm, x)) < 1e-4
