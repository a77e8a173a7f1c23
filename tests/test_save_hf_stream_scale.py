"""``save_hf`` of a shrunk-stream child whose class cannot take the √(D/d) rescale's ε·D/d.

``RescaleResidualPass`` gives each norm over the shrunk stream the ε ``ε·D/d``. A class whose norms
take ε as a constant (``nn.LayerNorm(width)``), or from one config field that a norm over another,
unshrunk width reads too (a per-head norm), cannot hold it. ``norm(x, ε·k) = norm(x/√k, ε)``: the
writer folds the ε into the stream's scale (``export/hf/stream_scale.py``) — every write into the
stream × √(d/D), a norm right after the embedding and a tied head's final norm included — and
the reloaded class equals the child. Shown on small Hugging Face classes of our own:

1. constant ε: a post-embedding LayerNorm, pre-norm layers, position table, output head tied to
   the token table: the reloaded model equals the child at another size; the ε is the class's;
2. one ε field for the stream norms and a per-head RMSNorm (a QK-norm's form): the config keeps
   the parent's ε, the reloaded model equals the child; also where the stream's norms have no
   gain (the one after the embedding too: the rescale's inserted ``mul`` takes the scale);
3. the same with a gate whose weight is read cast to the stream's dtype (a router's form) and a
   down projection stored transposed (fused experts' form): the cast is no write into the stream
   (its scale would move the gate), the transposed projection is one;
4. a post-norm class (its layers read the stream itself, not through a norm: each such linear
   read takes √(D/d) back into its weight) saves the same way;
5. a class whose layers pass the stream itself through a nonlinearity cannot be folded (no scale
   passes a GELU): ``save_hf`` still refuses in one line, writing nothing;
6. a norm without a weight before an output head tied to the token table (which writes the
   stream): the √(D/d) after that norm has no weight to go into — the table takes the stream's
   scale for its write, and its read would need the inverse — so ``save_hf`` refuses, saying so.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from subclone_testing import relative_error, run
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

import subclone_graph as sg
from subclone_graph.export.hf import HFExportError
from subclone_graph.export.hf.stream_scale import fold_stream_scale
from subclone_graph.passes import state

VOCAB, HEADS = 40, 4


class StreamConfig(PretrainedConfig):
    model_type = "subclone_tiny_stream_eps"

    def __init__(self, hidden_size=32, intermediate_size=48, head_dim=8, num_hidden_layers=3, rms_norm_eps=1e-5,
                 form="constant", tie_word_embeddings=True, **kwargs):
        self.hidden_size, self.intermediate_size, self.head_dim = hidden_size, intermediate_size, head_dim
        self.num_hidden_layers, self.rms_norm_eps, self.form = num_hidden_layers, rms_norm_eps, form
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class Layer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.form, d, inner = config.form, config.hidden_size, HEADS * config.head_dim
        shared, self.gated = config.form in ("shared", "gated"), config.form == "gated"
        self.norm = nn.RMSNorm(d, eps=config.rms_norm_eps) if shared else nn.LayerNorm(d)
        self.head_norm = nn.RMSNorm(config.head_dim, eps=config.rms_norm_eps)      # over the head width
        self.v, self.o = nn.Linear(d, inner), nn.Linear(inner, d)
        self.up = nn.Linear(d, config.intermediate_size)
        if self.gated:              # a router-like gate, and a down projection read transposed
            self.gate, self.down_t = nn.Parameter(torch.empty(1, d)), nn.Parameter(torch.empty(d, config.intermediate_size))
        else:
            self.down = nn.Linear(config.intermediate_size, d)
        self.mlp_norm = nn.RMSNorm(d, eps=config.rms_norm_eps) if shared else nn.LayerNorm(d)

    def forward(self, x):
        if self.form == "nonlinear":     # the stream itself through a nonlinearity: no scale passes it
            x = x + self.o(self.v(F.gelu(x)))
            return x + self.down(F.gelu(self.up(self.normed(x, self.mlp_norm))))
        if self.form == "post":          # the stream read by the layer itself, normalised after
            x = self.norm(x + self.o(F.gelu(self.v(x))))
            return self.mlp_norm(x + self.down(F.gelu(self.up(x))))
        v = self.v(self.normed(x))
        v = self.head_norm(v.unflatten(-1, (HEADS, -1))).flatten(-2)
        x = x + self.o(v)
        h = self.normed(x, self.mlp_norm)
        if self.gated:
            gate = torch.sigmoid(F.linear(h, self.gate.to(torch.float32)))
            return x + gate * (F.gelu(self.up(h)) @ self.down_t.transpose(0, 1))
        return x + self.down(F.gelu(self.up(h)))

    def normed(self, x, norm=None):
        norm = norm or self.norm
        if self.form in ("weightless", "weightless_head"):
            return F.rms_norm(x, x.shape[-1:], eps=self.head_norm.eps)
        return norm(x)


class StreamModel(PreTrainedModel):
    config_class = StreamConfig
    _tied_weights_keys = {"head.weight": "embed.weight"}

    def __init__(self, config):
        super().__init__(config)
        d = config.hidden_size
        self.embed, self.positions = nn.Embedding(VOCAB, d), nn.Embedding(64, d)
        self.embed_norm = nn.LayerNorm(d)                # written into the stream itself
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, VOCAB, bias=False)
        self.post_init()

    def _init_weights(self, module):
        pass                              # the test's own values (below)

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids):
        x = self.embed(input_ids) + self.positions(torch.arange(input_ids.shape[1]))
        weightless = self.config.form in ("weightless", "weightless_head")
        if weightless:                            # a norm without a gain written into the stream
            x = F.rms_norm(x, x.shape[-1:], eps=self.config.rms_norm_eps)
        else:
            x = self.embed_norm(x)
        for layer in self.layers:
            x = layer(x)
        if self.config.form == "weightless_head":   # ... and read by the tied head
            return self.head(F.rms_norm(x, x.shape[-1:], eps=self.config.rms_norm_eps))
        return self.head(self.norm(x))


def _model(form):
    torch.manual_seed(0)
    # unit-scale stream after a weightless norm: an ε large enough to show
    model = StreamModel(StreamConfig(form=form, rms_norm_eps=0.05 if "weightless" in form else 1e-5)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:                             # gains and biases away from 1 and 0
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.05)
        model.embed_norm.weight.mul_(0.02)               # a small stream, where an ε shows
        model.embed_norm.bias.mul_(0.02)
    return model


def _ids(batch, seq, seed):
    return (torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


def _child(model):
    inputs = _ids(2, 8, 0)
    child = sg.subclone(model, inputs, sg.Target(hidden=0.5, layers=2), calibration=[inputs, _ids(4, 16, 1)])
    assert state.RESCALE.need(child).eps_scale == 2
    return child


@pytest.mark.parametrize("form", ["constant", "shared", "weightless", "gated", "post"])
def test_a_class_without_the_rescaled_eps_saves_with_it_folded_into_the_stream(form, tmp_path):
    model = _model(form)
    child = _child(model)
    path = sg.save_hf(child, tmp_path / "child")
    loaded = StreamModel.from_pretrained(path).eval()
    assert loaded.config.hidden_size == 16 and loaded.config.num_hidden_layers == 2
    assert loaded.config.rms_norm_eps == model.config.rms_norm_eps, "the parent's ε, for the per-head norm"
    assert loaded.head.weight.data_ptr() == loaded.embed.weight.data_ptr(), "still tied"
    for x in (_ids(2, 8, 0), _ids(3, 11, 5)):
        assert relative_error(run(loaded, x), run(child, x)) < 1e-5


def test_a_stream_read_through_a_nonlinearity_is_not_folded():
    # GELU(s·x) is not s·GELU(x): the fold gives up (None) rather than return a copy that computes
    # something else; save_hf then writes the child as it is, or refuses (its own reload check)
    assert fold_stream_scale(_child(_model("nonlinear"))) is None


def test_a_norm_without_a_weight_before_a_tied_head_is_refused_naming_the_tie(tmp_path):
    child = _child(_model("weightless_head"))
    assert fold_stream_scale(child) is None
    with pytest.raises(HFExportError, match=r"without a weight of their own \(rms_norm, rms_norm_\d+\) by √\(D/d\)[^\n]*, nor can the stream's "
                                            r"scale take it \((embed|head)\.weight writes the stream and is read again "
                                            r"in head \(tied\)[^\n]*; subclone with rescale=False"):
        sg.save_hf(child, tmp_path / "child")
    assert not (tmp_path / "child").exists()
