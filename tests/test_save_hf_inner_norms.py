"""``save_hf`` of a child whose sub-norms over a shrunk inner width got the rescale's ε·k.

A sub-norm over the attention output (``heads · head_dim`` wide) or over the MLP's inner width
gets ``ε·k`` from ``RescaleResidualPass`` when heads or neurons go (k = 2 and 4/3 here), while the
stream's norms get the stream's ``ε·D/d`` and the class has one ``rms_norm_eps`` for them all. ``norm(x, ε·k) =
norm(x/√k, ε)``: the writer gives every norm back the parent's ε and scales the weights the
sub-norm's values are linear in — the value projection (attention is linear in its values), the
MLP's ``up`` (one factor of ``act(gate)·up``) — by 1/√k (``export/hf/norm_inputs.py``). Shown on
a small Hugging Face class of our own: the reloaded class equals the child at two sizes, in
float32 and bfloat16, with the parent's ε; a sub-norm whose values pass a nonlinearity first has
no such weights, and ``save_hf`` refuses in one line, writing nothing.
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
from subclone_graph.passes import state

VOCAB, HEAD_DIM = 40, 8


class SubNormConfig(PretrainedConfig):
    model_type = "subclone_tiny_sub_norms"

    def __init__(self, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_hidden_layers=2,
                 rms_norm_eps=0.05, nonlinear=False, **kwargs):
        self.hidden_size, self.intermediate_size, self.num_hidden_layers = hidden_size, intermediate_size, num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.rms_norm_eps, self.nonlinear = rms_norm_eps, nonlinear
        super().__init__(**kwargs)


class Layer(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, self.heads, eps = config.hidden_size, config.num_attention_heads, config.rms_norm_eps
        inner = self.heads * HEAD_DIM
        self.nonlinear = config.nonlinear
        self.norm, self.mlp_norm = nn.RMSNorm(d, eps=eps), nn.RMSNorm(d, eps=eps)
        self.q, self.k, self.v, self.o = nn.Linear(d, inner), nn.Linear(d, inner), nn.Linear(d, inner), nn.Linear(inner, d)
        self.attn_sub_norm = nn.RMSNorm(inner, eps=eps)            # over the heads' width
        self.gate, self.up = nn.Linear(d, config.intermediate_size), nn.Linear(d, config.intermediate_size)
        self.ffn_sub_norm = nn.RMSNorm(config.intermediate_size, eps=eps)     # over the MLP's width
        self.down = nn.Linear(config.intermediate_size, d)

    def forward(self, x):
        h = self.norm(x)
        q, k, v = (p(h).unflatten(-1, (self.heads, HEAD_DIM)).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(-2)
        x = x + self.o(self.attn_sub_norm(F.gelu(a) if self.nonlinear else a))
        h = self.mlp_norm(x)
        return x + self.down(self.ffn_sub_norm(F.silu(self.gate(h)) * self.up(h)))


class SubNormModel(PreTrainedModel):
    config_class = SubNormConfig

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
        return self.head(self.norm(x))


def _ids(batch, seq, seed):
    return (torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


def _child(nonlinear=False, dtype=torch.float32):
    torch.manual_seed(0)
    model = SubNormModel(SubNormConfig(nonlinear=nonlinear)).eval()
    with torch.no_grad():           # small values, where an ε shows
        for p in model.parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if p.dim() == 1 else 0.1 * torch.randn_like(p))
    model = model.to(dtype)
    inputs = _ids(2, 8, 0)
    # the MLP's inner width, normalised, is a latent group
    child = sg.subclone(model, inputs, sg.Target(hidden=0.5, heads=0.5, latent=0.75),
                        calibration=[inputs, _ids(4, 16, 1)])
    scales = sorted({round(k, 6) for _, _, k in state.RESCALE.need(child).eps})
    assert scales == [round(48 / 36, 6), 2.0], "the stream and the heads' sub-norm took ε·2, the MLP's ε·4/3"
    return model, child


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_sub_norms_over_shrunk_inner_widths_save_with_their_eps_folded_into_their_inputs(dtype, tolerance, tmp_path):
    model, child = _child(dtype=dtype)
    path = sg.save_hf(child, tmp_path / "child")
    loaded = SubNormModel.from_pretrained(path, dtype=dtype).eval()
    assert loaded.config.rms_norm_eps == model.config.rms_norm_eps, "the parent's ε, for every norm"
    assert (loaded.config.hidden_size, loaded.config.intermediate_size) == (16, 36)
    assert loaded.layers[0].attn_sub_norm.weight.shape == (2 * HEAD_DIM,)
    for x in (_ids(2, 8, 0), _ids(3, 11, 5)):
        assert relative_error(run(loaded, x).float(), run(child, x).float()) < tolerance


def test_a_sub_norm_after_a_nonlinearity_is_refused_in_one_line(tmp_path):
    _, child = _child(nonlinear=True)
    with pytest.raises(HFExportError, match=r"^the saved SubNormModel differs from the child by [^\n]*$"):
        sg.save_hf(child, tmp_path / "child")
    assert not (tmp_path / "child").exists()
