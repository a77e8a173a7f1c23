"""Complex arithmetic as pairs of real tensors (``passes/rewrite/lower_complex.py``), on a decoder of
our own whose rotary embedding multiplies ``view_as_complex`` queries and keys by
``polar(1, positions · inv_freq)`` and reads them back with ``view_as_real``.

Before, the complex ops had no channel rule (the heads froze: ``Target.heads`` was refused
naming ``view_as_complex``) and no ONNX translation (``torch.onnx.export`` failed). Now:

1. the trace holds no complex value, and its logits are the model's at two sizes, in float32,
   bfloat16 and float16; so does the trace of an ``ExportedProgram`` or of a graph torch.export
   made, and the caller's graph keeps its complex ops (the trace lowers a copy);
2. the pass alone: modified exactly when it lowered, a second run changes nothing, and an op
   with no real form (a complex division) leaves the graph as it was, named;
3. a planted-dead kv group and dead MLP neurons are removed with the logits unchanged;
4. ``export_onnx`` of the child matches torch in onnxruntime; a graph whose complex op has no
   real form is refused in one line naming it.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from subclone_testing import groups_of, plant_dead, plant_dead_heads, relative_error, run
from torch import nn

import subclone_graph as sg
from subclone_graph.passes.rewrite import LowerComplexPass, lower_complex

VOCAB, D, HEADS, KV_HEADS, FFN, LAYERS = 40, 32, 4, 2, 48, 2
HEAD = D // HEADS


def _complex_nodes(gm) -> list:
    return [n for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].is_complex()]


def rotate(x, freqs_cis, divide: bool = False):
    z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    z = z / freqs_cis[:, :, None, :] if divide else z * freqs_cis[:, :, None, :]
    return torch.view_as_real(z).flatten(3).type_as(x)


class Layer(nn.Module):
    def __init__(self, divide: bool):
        super().__init__()
        self.divide = divide
        self.norm1, self.norm2 = nn.RMSNorm(D), nn.RMSNorm(D)
        self.q, self.k = nn.Linear(D, D, bias=False), nn.Linear(D, KV_HEADS * HEAD, bias=False)
        self.v, self.o = nn.Linear(D, KV_HEADS * HEAD, bias=False), nn.Linear(D, D, bias=False)
        self.gate, self.up, self.down = nn.Linear(D, FFN), nn.Linear(D, FFN), nn.Linear(FFN, D)

    def forward(self, x, freqs_cis):
        b, s, _ = x.shape
        h = self.norm1(x)
        q = rotate(self.q(h).view(b, s, HEADS, HEAD), freqs_cis, self.divide).transpose(1, 2)
        k = rotate(self.k(h).view(b, s, KV_HEADS, HEAD), freqs_cis, self.divide).transpose(1, 2)
        v = self.v(h).view(b, s, KV_HEADS, HEAD).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, D))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class ComplexRotaryDecoder(nn.Module):
    def __init__(self, divide: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(Layer(divide) for _ in range(LAYERS))
        self.norm, self.head = nn.RMSNorm(D), nn.Linear(D, VOCAB, bias=False)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, HEAD, 2).float() / HEAD), persistent=False)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)[None].float()
        freqs = positions[..., None] * self.inv_freq           # (1, s, HEAD / 2)
        freqs_cis = torch.polar(torch.ones_like(freqs), freqs)
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, freqs_cis)
        return self.head(self.norm(x))


def _ids(batch, seq, seed):
    return (torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


def _exported(model):
    """The exported graph as torch.export leaves it (complex values in it)."""
    return torch.export.export(model, _ids(2, 8, 0), strict=False,
                               dynamic_shapes=({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},)).module()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_trace_has_no_complex_value_and_its_logits_are_the_models(dtype):
    # the rotary computes in float32 whatever the model's dtype (``x.float()``): the parts do too
    model = ComplexRotaryDecoder().eval().to(dtype)
    gm = sg.trace(model, _ids(2, 8, 0))
    assert not _complex_nodes(gm)
    for batch, seq in ((2, 8), (3, 13)):
        got, want = run(gm, _ids(batch, seq, 3)), run(model, _ids(batch, seq, 3))
        assert got.dtype == dtype and relative_error(got.float(), want.float()) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_an_exported_program_and_an_exported_graph_are_lowered_and_the_callers_graph_is_not():
    model = ComplexRotaryDecoder().eval()
    program = torch.export.export(model, _ids(2, 8, 0), strict=False,
                                  dynamic_shapes=({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},))
    theirs = _exported(model)
    before = [(n.name, n.target) for n in theirs.graph.nodes]
    for given in (program, theirs):
        gm = sg.trace(given, _ids(2, 8, 0))
        assert not _complex_nodes(gm) and gm is not theirs
        assert relative_error(run(gm, _ids(3, 13, 3)), run(model, _ids(3, 13, 3))) < 1e-6
    assert [(n.name, n.target) for n in theirs.graph.nodes] == before and _complex_nodes(theirs)
    sg.analyze_channels(gm := sg.trace(theirs, _ids(2, 8, 0)))
    assert len(groups_of(gm, "heads")) == LAYERS


def test_the_pass_lowers_once_and_names_an_op_without_a_real_form():
    model = ComplexRotaryDecoder().eval()
    gm = _exported(model)
    assert _complex_nodes(gm)
    result = LowerComplexPass()(gm)
    assert result.modified and result.graph_module is gm and not _complex_nodes(gm)
    assert not any(n.target in (torch.ops.aten.view_as_complex.default, torch.ops.aten.view_as_real.default,
                                torch.ops.aten.polar.default) for n in gm.graph.nodes)
    assert not LowerComplexPass()(gm).modified
    for batch, seq in ((2, 8), (3, 13)):
        assert relative_error(run(gm, _ids(batch, seq, 3)), run(model, _ids(batch, seq, 3))) < 1e-6

    dividing = _exported(ComplexRotaryDecoder(divide=True).eval())
    before = [(n.name, n.target) for n in dividing.graph.nodes]
    assert lower_complex(dividing) == "aten.div.Tensor (div in layers.0)"
    assert [(n.name, n.target) for n in dividing.graph.nodes] == before
    assert not LowerComplexPass()(dividing).modified


def test_a_dead_kv_group_and_dead_neurons_go_with_the_logits_unchanged():
    gm = sg.trace(ComplexRotaryDecoder().eval(), _ids(2, 8, 0))
    sg.analyze_channels(gm)
    assert len(groups_of(gm, "heads")) == LAYERS         # before, view_as_complex froze them
    plant_dead(gm, {g.id: list(range(1, g.size, 2)) for g in groups_of(gm, "ffn")})
    heads, kv_heads = plant_dead_heads(gm)
    calibration = [_ids(2, 8, 0), _ids(3, 13, 7), _ids(4, 16, 100)]
    child = sg.subclone(gm, _ids(2, 8, 0), sg.Target(ffn=0.5, heads=heads, kv_heads=kv_heads), calibration=calibration)
    assert sg.count_parameters(child) < sg.count_parameters(gm)
    for batch, seq in ((2, 8), (3, 13)):
        assert relative_error(run(child, _ids(batch, seq, 7)), run(gm, _ids(batch, seq, 7))) < 1e-4


def test_onnx_of_the_child_matches_torch_and_an_op_without_a_real_form_is_refused(tmp_path):
    model = ComplexRotaryDecoder().eval()
    child = sg.subclone(model, _ids(2, 8, 0), sg.Target(heads=0.5, kv_heads=0.5, ffn=0.5),
                        calibration=[_ids(2, 8, 0), _ids(4, 16, 100)])
    diff = sg.export_onnx(child, _ids(3, 13, 5), tmp_path / "child.onnx", optimize=False)
    assert diff < 1e-4 and (tmp_path / "child.onnx").exists()

    dividing = _exported(ComplexRotaryDecoder(divide=True).eval())
    with pytest.raises(sg.OnnxExportError, match=r"no complex values, and aten\.div\.Tensor \(div in layers\.0\) "
                                                 r"has no real form"):
        sg.export_onnx(dividing, _ids(2, 8, 0), tmp_path / "dividing.onnx", optimize=False)
    assert not (tmp_path / "dividing.onnx").exists()
