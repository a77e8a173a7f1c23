"""``save_hf`` of a multi-stage model (a small Hugging Face class of our own, laid out as the image
families are: stages, each a downsampling then a list of residual layers, with per-stage lists in
its config), whose tiny config has as many stages as layers (``depths=[1, 1, 1]``):

1. a dropped layer empties its stage: the config's per-stage layer counts become the child's
   (``depths=[1, 0, 1]``), the per-stage widths stay one per stage (they are not cut as if they
   were per-layer lists), and the reloaded model equals the child;
2. the grandchild, whose parent config is derived the same way, shrinks again.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from subclone_testing import relative_error, run
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

import subclone_graph as sg


class StagesConfig(PretrainedConfig):
    model_type = "subclone_tiny_stages"

    def __init__(self, hidden_sizes=(8, 16, 32), depths=(1, 1, 1), num_labels=5, **kwargs):
        self.hidden_sizes, self.depths = list(hidden_sizes), list(depths)
        super().__init__(num_labels=num_labels, **kwargs)


class StageLayer(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):                      # (b, h, w, c)
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Stage(nn.Module):
    def __init__(self, width_in, width, depth):
        super().__init__()
        self.downsample = nn.Conv2d(width_in, width, kernel_size=2, stride=2)
        self.layers = nn.ModuleList(StageLayer(width) for _ in range(depth))

    def forward(self, x):                      # (b, c, h, w)
        x = self.downsample(x).permute(0, 2, 3, 1)
        for layer in self.layers:
            x = layer(x)
        return x.permute(0, 3, 1, 2)


class StagesModel(PreTrainedModel):
    config_class = StagesConfig
    main_input_name = "pixel_values"

    def __init__(self, config):
        super().__init__(config)
        widths = [3, *config.hidden_sizes]
        self.stages = nn.ModuleList(Stage(widths[i], widths[i + 1], d) for i, d in enumerate(config.depths))
        self.norm, self.head = nn.LayerNorm(widths[-1]), nn.Linear(widths[-1], config.num_labels)
        self.post_init()

    def forward(self, pixel_values):
        x = pixel_values
        for stage in self.stages:
            x = stage(x)
        return self.head(self.norm(x.mean((2, 3))))


def _images(batch, seed):
    return (torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed)),)


def test_a_dropped_layer_that_empties_its_stage_saves_with_the_childs_depths(tmp_path):
    torch.manual_seed(0)
    model = StagesModel(StagesConfig()).eval()
    inputs = _images(2, 0)
    child = sg.subclone(model, inputs, drop_layers=[1])
    assert not any(n.startswith("stages.1.layers.") for n in child.state_dict())
    assert "stages.1.downsample.weight" in child.state_dict()
    path = sg.save_hf(child, tmp_path / "child")
    loaded = StagesModel.from_pretrained(path).eval()
    assert loaded.config.depths == [1, 0, 1] and loaded.config.hidden_sizes == [8, 16, 32]
    x = _images(3, 5)
    assert relative_error(run(loaded, x), run(child, x)) < 1e-5
    grandchild = sg.subclone(child, inputs, drop_layers=[0])
    path = sg.save_hf(grandchild, tmp_path / "grandchild")
    assert StagesModel.from_pretrained(path).config.depths == [0, 0, 1]
