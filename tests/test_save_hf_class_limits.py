"""``save_hf`` on a small Hugging Face class of our own that shows two constructs the family sweep
met (decoder-only runs of encoder-decoder classes, LM heads beside a pooler, per-layer kind lists):

1. tensors of the class the traced graph never reads (a per-layer cross-attention, a pooler) are
   missing from a shrunk child; ``save_hf`` leaves them to the class's initialisation and the
   reloaded model equals the child at another size;
2. a config class that raises ``IndexError`` for a candidate (a per-layer list read by index,
   shorter than the layer count of that candidate) only rejects that candidate: the child with a
   layer fewer saves and reloads equal;
3. a composite config whose sizes live in a sub-config (``text_config``): the sub-config's fields
   are searched and written, and the reloaded composite model equals the child;
4. an embedding module that returns ``(rows, scaling)`` (a quantisation-aware embedding): no
   plain lookup to measure an embedding scale on, so none is folded, and the child saves;
5. a buffer the class computes from its width instead of loading it (a sinusoidal position table):
   the child's kept channels of the parent's differ from it, and ``save_hf`` refuses naming it;
6. a field the config class derives from the layer count (a backbone's ``out_features``) is
   derived anew for the child (a tiny DINOv2 built from a config);
7. a field left None that the search sets to a width and the class reads as an object (a dtype:
   ``AttributeError``) only rejects that candidate; the child saves and reloads equal.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from subclone_testing import relative_error, run
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

import subclone_graph as sg

VOCAB = 40


class TinyConfig(PretrainedConfig):
    model_type = "subclone_tiny_unread"

    def __init__(self, hidden_size=32, intermediate_size=48, num_hidden_layers=3, layer_kinds=None, **kwargs):
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.layer_kinds = layer_kinds if layer_kinds is not None else ["a", "b", "a"][:num_hidden_layers]
        super().__init__(**kwargs)


class Layer(nn.Module):
    def __init__(self, config, index):
        super().__init__()
        self.kind = config.layer_kinds[index]          # IndexError for a list shorter than the layers
        self.norm = nn.RMSNorm(config.hidden_size)
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)
        self.cross = nn.Linear(config.hidden_size, config.hidden_size)       # read only with encoder states

    def forward(self, x, encoder_states=None):
        x = x + self.down(F.gelu(self.up(self.norm(x))))
        if encoder_states is not None:
            x = x + self.cross(encoder_states)
        return x


class TinyModel(PreTrainedModel):
    config_class = TinyConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(VOCAB, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_hidden_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)      # never read by the LM head
        self.norm, self.head = nn.RMSNorm(config.hidden_size), nn.Linear(config.hidden_size, VOCAB)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def _ids(batch, seq, seed):
    return (torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


def test_unread_tensors_and_a_rejected_candidate(tmp_path):
    torch.manual_seed(0)
    model = TinyModel(TinyConfig()).eval()
    inputs = _ids(2, 8, 0)
    child = sg.subclone(model, inputs, sg.Target(hidden=0.5, ffn=0.5, layers=2), calibration=[inputs])
    assert not any("cross" in n or "pooler" in n for n in child.state_dict())
    path = sg.save_hf(child, tmp_path / "child")
    loaded = TinyModel.from_pretrained(path).eval()
    assert loaded.config.num_hidden_layers == 2 and len(loaded.config.layer_kinds) == 2
    assert loaded.config.hidden_size == 16 and loaded.config.intermediate_size == 24
    x = _ids(3, 11, 5)
    assert relative_error(run(loaded, x), run(child, x)) < 1e-5


class TinyCompositeConfig(PretrainedConfig):
    model_type = "subclone_tiny_composite"
    sub_configs = {"text_config": TinyConfig}

    def __init__(self, text_config=None, **kwargs):
        if isinstance(text_config, dict):
            text_config = TinyConfig(**text_config)
        self.text_config = text_config if text_config is not None else TinyConfig()
        super().__init__(**kwargs)


class TinyComposite(PreTrainedModel):
    config_class = TinyCompositeConfig

    def __init__(self, config):
        super().__init__(config)
        self.language_model = TinyModel(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.embed

    def forward(self, input_ids):
        return self.language_model(input_ids)


def test_sizes_in_a_sub_config_are_found_and_written(tmp_path):
    torch.manual_seed(0)
    model = TinyComposite(TinyCompositeConfig()).eval()
    inputs = _ids(2, 8, 0)
    child = sg.subclone(model, inputs, sg.Target(hidden=0.5, ffn=0.5), calibration=[inputs])
    path = sg.save_hf(child, tmp_path / "child")
    loaded = TinyComposite.from_pretrained(path).eval()
    assert (loaded.config.text_config.hidden_size, loaded.config.text_config.intermediate_size) == (16, 24)
    x = _ids(3, 11, 5)
    assert relative_error(run(loaded, x), run(child, x)) < 1e-5


class TupleEmbedding(nn.Embedding):
    def forward(self, ids):
        return super().forward(ids), None


class TupleEmbeddingModel(TinyModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed = TupleEmbedding(VOCAB, config.hidden_size)
        self.post_init()

    def forward(self, input_ids):
        x, _ = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def test_an_embedding_that_returns_a_tuple_saves(tmp_path):
    torch.manual_seed(0)
    model = TupleEmbeddingModel(TinyConfig()).eval()
    inputs = _ids(2, 8, 0)
    child = sg.subclone(model, inputs, sg.Target(hidden=0.5), calibration=[inputs])
    loaded = TupleEmbeddingModel.from_pretrained(sg.save_hf(child, tmp_path / "child")).eval()
    x = _ids(3, 11, 5)
    assert relative_error(run(loaded, x), run(child, x)) < 1e-5


class SinusoidConfig(PretrainedConfig):
    model_type = "subclone_tiny_sinusoid"

    def __init__(self, hidden_size=32, intermediate_size=48, num_hidden_layers=2, **kwargs):
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_hidden_layers = num_hidden_layers
        super().__init__(**kwargs)


class SinusoidModel(PreTrainedModel):
    """A position table the class computes from its width (a non-persistent buffer, never loaded)."""

    config_class = SinusoidConfig

    def __init__(self, config):
        super().__init__(config)
        d = config.hidden_size
        self.embed = nn.Embedding(VOCAB, d)
        angles = torch.arange(64)[:, None] / 100 ** (torch.arange(d)[None] / d)
        self.positions = nn.Buffer(torch.sin(angles), persistent=False)
        self.layers = nn.ModuleList(nn.Sequential(nn.RMSNorm(d), nn.Linear(d, config.intermediate_size), nn.GELU(),
                                                  nn.Linear(config.intermediate_size, d))
                                    for _ in range(config.num_hidden_layers))
        self.norm, self.head = nn.RMSNorm(d), nn.Linear(d, VOCAB)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids):
        x = self.embed(input_ids) + self.positions[: input_ids.shape[1]]
        for layer in self.layers:
            x = x + layer(x)
        return self.head(self.norm(x))


def test_a_buffer_the_class_computes_from_the_width_is_named_in_the_refusal(tmp_path):
    """5. the child keeps channels of the parent's sinusoid; the class computes a new one for the
    narrower width: a limit of the class, refused naming the buffer, nothing written."""
    torch.manual_seed(0)
    model = SinusoidModel(SinusoidConfig()).eval()
    inputs = _ids(2, 8, 0)
    child = sg.subclone(model, inputs, sg.Target(hidden=0.5), calibration=[inputs])
    with pytest.raises(sg.HFExportError, match=r"the class computes positions from its config instead of loading "
                                                 r"it, and the child's \(kept channels of the parent's\) differ"):
        sg.save_hf(child, tmp_path / "child")
    assert not (tmp_path / "child").exists()


def test_a_field_the_config_derives_from_the_layer_count_is_derived_anew(tmp_path):
    """6. a backbone config's ``out_features: ['stage3']`` names the last of its layers: a child
    with a layer fewer gets the field the class derives for two layers, not the parent's."""
    from transformers import Dinov2Config, Dinov2ForImageClassification

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                          image_size=32, patch_size=8, num_labels=5)
    model = Dinov2ForImageClassification(config).eval()
    pixels = (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
    child = sg.subclone(model, pixels, sg.Target(layers=2), calibration=[pixels])
    path = sg.save_hf(child, tmp_path / "child")
    loaded = Dinov2ForImageClassification.from_pretrained(path).eval()
    assert loaded.config.num_hidden_layers == 2 and loaded.config.out_features == ["stage2"]
    other = (torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)),)
    assert relative_error(run(loaded, other), run(child, other)) < 1e-5


class KindsConfig(PretrainedConfig):
    model_type = "subclone_tiny_needs_a_kind"

    def __init__(self, hidden_size=32, intermediate_size=48, num_hidden_layers=3, layer_kinds=None, **kwargs):
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.layer_kinds = layer_kinds if layer_kinds is not None else ["a", "b", "a"][:num_hidden_layers]
        super().__init__(**kwargs)


class NeedsKindModel(TinyModel):
    """A class whose forward needs a layer of kind "b" (as a hybrid class's mask code needs an
    attention layer); the graph child runs without one."""

    config_class = KindsConfig

    def forward(self, input_ids):
        if "b" not in self.config.layer_kinds:
            raise ValueError("the masks need a layer of kind b, and the config has none")
        return super().forward(input_ids)


def test_a_class_that_cannot_run_the_childs_config_is_refused_naming_it(tmp_path):
    torch.manual_seed(0)
    model = NeedsKindModel(KindsConfig()).eval()
    inputs = _ids(2, 8, 0)
    child = sg.subclone(model, inputs, drop_layers=[1])        # the only layer of kind "b"
    assert run(child, _ids(3, 11, 5)).shape == (3, 11, VOCAB)           # the graph child runs
    with pytest.raises(sg.HFExportError, match=r"^NeedsKindModel built from the child's config does not run \(ValueError: "
                                               r"the masks need a layer of kind b, and the config has none\): a limit "
                                               r"of the class with the child's layers and sizes"):
        sg.save_hf(child, tmp_path / "child")
    assert not (tmp_path / "child").exists()


class UnsetFieldsConfig(PretrainedConfig):
    """An inner width left None (it defaults to the hidden size) and a dtype left None (read as a
    ``torch.dtype`` when set)."""

    model_type = "subclone_tiny_unset_fields"

    def __init__(self, hidden_size=32, inner_dtype=None, inner_size=None, num_hidden_layers=2, **kwargs):
        self.hidden_size, self.inner_dtype, self.inner_size = hidden_size, inner_dtype, inner_size    # searched in this order
        self.num_hidden_layers = num_hidden_layers
        super().__init__(**kwargs)


class UnsetFieldsLayer(nn.Module):
    def __init__(self, hidden, inner):
        super().__init__()
        self.norm, self.up, self.down = nn.RMSNorm(hidden), nn.Linear(hidden, inner), nn.Linear(inner, hidden)

    def forward(self, x):
        return x + self.down(F.relu(self.up(self.norm(x))))


class UnsetFieldsModel(PreTrainedModel):
    config_class = UnsetFieldsConfig

    def __init__(self, config):
        super().__init__(config)
        if config.inner_dtype is not None and not config.inner_dtype.is_floating_point:
            raise ValueError("inner_dtype must be a floating dtype")
        inner = config.inner_size if config.inner_size is not None else config.hidden_size
        self.embed = nn.Embedding(VOCAB, config.hidden_size)
        self.layers = nn.ModuleList(UnsetFieldsLayer(config.hidden_size, inner) for _ in range(config.num_hidden_layers))
        self.norm, self.head = nn.RMSNorm(config.hidden_size), nn.Linear(config.hidden_size, VOCAB)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def test_a_candidate_the_class_reads_as_an_object_is_rejected(tmp_path):
    # the stream and the inner width shrink apart: only setting the unset inner_size expresses
    # that, and the search also tries a width for the unset inner_dtype, which the class reads as a
    # dtype (AttributeError: 'int' object has no attribute 'is_floating_point'): a rejected candidate
    torch.manual_seed(0)
    model = UnsetFieldsModel(UnsetFieldsConfig()).eval()
    inputs = _ids(2, 8, 0)
    child = sg.subclone(model, inputs, sg.Target(hidden=0.5, ffn=0.25), calibration=[inputs])
    assert child.get_parameter("layers.0.up.weight").shape == (8, 16)
    path = sg.save_hf(child, tmp_path / "child")
    loaded = UnsetFieldsModel.from_pretrained(path).eval()
    assert (loaded.config.hidden_size, loaded.config.inner_size, loaded.config.inner_dtype) == (16, 8, None)
    x = _ids(3, 11, 5)
    assert relative_error(run(loaded, x), run(child, x)) < 1e-5
