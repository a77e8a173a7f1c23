"""Grow as well as shrink (HyperCloning, arXiv 2409.12903): a wider child computes the parent's function.

1. Every family of the tests (hand-written, ``hf_zoo``, ``hf_families``), one grown child each
   from the parent traced once: hidden × 2, MLP × 2, query heads and kv heads × 2 in one target →
   logits equal to the parent's (1e-5 relative, float32) at two batch/sequence sizes, every grown
   group exactly twice its parent size; ``save_hf`` reloads it as the parent's class with the
   width fields doubled, equal to the parent; its ONNX matches it in onnxruntime (on the families that hold every op of
   them all, and on any family with an op outside those); subcloned back
   to the parent's sizes it is the parent (one copy of each clone kept, its readers multiplied by
   the copies, ``analysis/clones.py``, no √(D/d)). A family whose heads cannot grow is refused
   naming the op and grows its other widths; a class that cannot hold the child (its ALiBi slopes
   derived from the number of heads) is refused by ``save_hf`` in one line, nothing written;
2. each width alone, on GQA, MHA and mixture-of-experts parents (query heads per kv group grown,
   kv groups grown with their query heads); the latent ranks of latent attention;
3. bfloat16 and float16 parents: equal within the dtype's tolerance;
4. combined with shrinking other widths and with depth in one target: the grown widths change
   nothing (equal to the child of the shrink alone);
5. the tied output head: the embedding is cloned whole, the head's 1/n sits in the final norm's
   gain, the child stays tied;
6. noise at a signal-to-noise ratio: the weights change by that ratio, the function does not;
7. refusals, one line each naming the op and module: a sum, a softmax, an unbiased variance and
   a two-activation contraction over a grown width; a width frozen by an op; a size that is no
   multiple; ``Times`` below 2 or on experts;
8. the pass contract: ``ScaleClonedReadsPass`` run again changes nothing;
9. the inverse: a grown child subcloned back by calibration keeps the parent's tensors bit for
   bit; a shrink below the parent's sizes folds and then shrinks as the parent would;
10. the streamed path (``subclone_checkpoint``) writes a grown child of a sharded checkpoint
    folder bit for bit what ``save_hf`` writes of the in-memory child, and it reloads equal to
    the parent;
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn

import subclone_graph as sg
from subclone_graph import models
from subclone_graph.models import hf_families, hf_zoo
from subclone_graph.passes import state
from subclone_graph.passes.fx_utils import get_attribute
from subclone_testing import family, groups_of, relative_error, run, traced

T2 = sg.Times(2)
ALL = dict(hidden=T2, ffn=T2, heads=T2, kv_heads=T2)
# a family whose heads cannot grow: the op its one-line refusal names (none today: ALiBi slopes
# from an arange over the heads grow as clones of the parent's slopes); its other widths grow
HEADS_REFUSED: dict[str, str] = {}
# a family whose class cannot hold the grown child: the writer's one-line refusal (BLOOM's class
# derives its ALiBi slopes from the number of heads: the grown heads' cloned slopes are not the
# ones it computes for twice as many)
SAVE_REFUSED = {"bloom": r"the saved BloomForCausalLM differs from the child by"}
DYNAMIC_ONNX = {"llama_like", "gpt2"}         # exported with dynamic batch and sequence axes
# ONNX parity of a grown child is checked on these families, whose grown graphs hold between them
# every op of every family's grown graph (ONNX_OPS, read off them with the constraints' versions);
# any other family is exported too as soon as its grown graph holds an op outside that set
ONNX_FAMILIES = {"llama_like", "gpt2", "llama", "qwen2_moe", "deepseek_v3", "mamba", "bloom", "deit", "torch_encoder",
                 "falcon", "phi3", "gemma", "cohere", "opt"}
ONNX_OPS = frozenset({
    "aten.__and__.Tensor", "aten._assert_tensor_metadata.default", "aten.add.Tensor", "aten.add_.Tensor",
    "aten.addmm.default", "aten.alias.default", "aten.arange.default", "aten.arange.start",
    "aten.baddbmm.default", "aten.bitwise_not.default", "aten.bmm.default", "aten.cat.default",
    "aten.chunk.default", "aten.contiguous.default", "aten.conv1d.default", "aten.conv2d.default",
    "aten.copy_.default", "aten.cos.default", "aten.cumsum.default", "aten.diff.default", "aten.div.Tensor",
    "aten.div_.Tensor", "aten.dropout.default", "aten.embedding.default", "aten.empty_like.default",
    "aten.eq.Tensor", "aten.exp.default", "aten.expand.default", "aten.flatten.using_ints",
    "aten.floor_divide.default", "aten.full.default", "aten.gather.default", "aten.ge.Scalar",
    "aten.gelu.default", "aten.gt.Tensor", "aten.histc.default", "aten.index.Tensor",
    "aten.index_put_.default", "aten.index_select.default", "aten.layer_norm.default", "aten.le.Tensor",
    "aten.linear.default", "aten.masked_fill.Scalar", "aten.matmul.default", "aten.mean.dim",
    "aten.mul.Tensor", "aten.ne.Scalar", "aten.neg.default", "aten.new_empty.default", "aten.new_ones.default",
    "aten.new_zeros.default", "aten.numpy_T.default", "aten.ones.default", "aten.permute.default",
    "aten.pow.Tensor_Scalar", "aten.pow.Tensor_Tensor", "aten.relu.default", "aten.repeat.default",
    "aten.repeat_interleave.self_int", "aten.reshape.default", "aten.rsqrt.default",
    "aten.scaled_dot_product_attention.default", "aten.scatter_.value", "aten.select.int",
    "aten.sigmoid.default", "aten.silu.default", "aten.sin.default", "aten.slice.Tensor", "aten.softmax.int",
    "aten.softplus.default", "aten.sort.default", "aten.split.Tensor", "aten.split_with_sizes.default",
    "aten.squeeze.dim", "aten.stack.default", "aten.sub.Tensor", "aten.sum.dim_IntList", "aten.sym_size.int",
    "aten.tanh.default", "aten.tensor_split.indices", "aten.to.device", "aten.to.dtype",
    "aten.to.dtype_layout", "aten.topk.default", "aten.transpose.int", "aten.type_as.default",
    "aten.unflatten.int", "aten.unsqueeze.default", "aten.view.default", "aten.where.ScalarOther",
    "aten.zeros.default", "aten.zeros_like.default", "getitem", "mul", "sub", "sym_min",
    "transformers.grouped_mm_fallback.default",
})
BACK = {"hidden": 0.5, "ffn": 0.5, "heads": 0.5, "kv_heads": 0.5}
NAMES = list(models.MODEL_NAMES) + list(hf_families.FAMILIES)
FAST = {"llama_like", "gpt_like", "vit_like", "llama", "gpt2", "bert", "gemma", "qwen2_moe", "deepseek_v3", "falcon"}
PARAMS = [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in NAMES]

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def subclone(*args, **kwargs):
    """sg.subclone accepting a family whose trace pins the sequence (Mamba's loop: its inputs here
    keep the traced length); every other family's trace confines nothing, so this changes nothing."""
    return sg.subclone(*args, fixed_sizes=True, **kwargs)


def parent(name):
    """(model, example inputs, analysed traced copy) — cached per session."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return traced(name) if name in models.MODEL_NAMES else family(name)


def inputs(model, name, batch, seq, seed=0):
    if name in models.MODEL_NAMES:
        return models.make_inputs(model, batch, seq, seed)
    if hf_families.FAMILIES[name].fixed_seq:
        seq = 8
    return hf_zoo.example_inputs(model, batch, seq, seed)


def full_target(gm, name) -> dict:
    target = {"hidden": T2}
    if groups_of(gm, "ffn"):
        target["ffn"] = T2
    if gm.meta["subclone.attention"] and name not in HEADS_REFUSED:
        target.update(heads=T2, kv_heads=T2)
    return target


def grown_sizes_are_doubled(child, kinds) -> None:
    graph, sizes = child.meta["subclone.channel_graph"], child.meta["subclone.sizes"]
    for group in graph.groups.values():
        if group.kind in kinds:
            assert sizes[group.id] == 2 * group.size, (group.kind, group.size, sizes[group.id])


def equal_to_parent(child, model, name, tolerance=1e-5) -> None:
    for batch, seq in ((2, 8), (3, 13)):
        x = inputs(model, name, batch, seq, seed=7)
        assert relative_error(run(child, x), run(model, x)) < tolerance, (batch, seq)


# ----- 1. every family: one grown child, every way out -------------------------------------------
def is_hf(model) -> bool:
    return hasattr(model, "config") and hasattr(type(model), "from_pretrained")


def saved_config_is_doubled(config: dict, parent_config: dict, target: dict) -> None:
    """The width fields the class reads doubled (a tiny MoE's dense intermediate_size may be unused)."""
    widths = [f for f in config if "intermediate_size" in f and isinstance(parent_config.get(f), int)]
    assert "ffn" not in target or not widths or any(config[f] == 2 * parent_config[f] for f in widths), widths
    # (a kv-head field is not checked: MLA and multi-query classes keep one they do not read)
    fields = {"hidden": ("hidden_size", "n_embd", "d_model", "dim"), "heads": ("num_attention_heads", "n_head")}
    for kind, names in fields.items():
        for field in names:
            if kind in target and isinstance(parent_config.get(field), int) and field in config:
                assert config[field] == 2 * parent_config[field], field
    if isinstance(parent_config.get("hidden_sizes"), list):             # a width per stage
        assert config["hidden_sizes"] == [2 * h for h in parent_config["hidden_sizes"]]


def saved_equals_the_parent(child, model, name, target, out) -> None:
    """save_hf reloads as the parent's class at the doubled sizes, equal to the parent."""
    if name in SAVE_REFUSED:
        with pytest.raises(sg.HFExportError, match=SAVE_REFUSED[name]) as raised:
            sg.save_hf(child, out)
        assert "\n" not in str(raised.value) and not out.exists()        # one line, nothing written
        return
    sg.save_hf(child, out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = type(model).from_pretrained(out).eval()
    assert type(back) is type(model)
    assert sg.count_parameters(back) == sg.count_parameters(child)
    saved_config_is_doubled(json.loads((out / "config.json").read_text()), model.config.to_dict(), target)
    equal_to_parent(back, model, name)


def subcloned_back_is_the_parent(child, model, example, name, target) -> None:
    back = subclone(child, example, sg.Target(**{k: BACK[k] for k in target}))
    assert sg.count_parameters(back) == sg.count_parameters(model)
    assert set(back.meta[state.FOLDED.name].values()) == {2}
    assert not back.meta.get(state.RESCALE.name)              # nothing was lost: no √(D/d)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert all(shapes[k] == tuple(v.shape) for k, v in back.state_dict().items() if k in shapes)
    equal_to_parent(back, model, name)


@pytest.mark.parametrize("name", PARAMS)
def test_every_family_grown_twice_equals_the_parent_in_every_format_and_back(name, tmp_path):
    """One grown child per family (the parent traced once): hidden, MLP, heads and kv heads × 2
    equal the parent; save_hf reloads it as the parent's class at the doubled sizes; its ONNX
    matches it in onnxruntime (``ONNX_FAMILIES``, or an op outside ``ONNX_OPS``); subcloned back to
    the parent's sizes it is the parent."""
    model, example, gm = parent(name)
    if name in HEADS_REFUSED:
        with pytest.raises(ValueError, match=f"Target.heads cannot grow this model: {HEADS_REFUSED[name]}") as raised:
            subclone(gm, example, sg.Target(heads=T2))
        assert "\n" not in str(raised.value)
    target = full_target(gm, name)
    child = subclone(gm, example, sg.Target(**target))
    kinds = {"residual"} | ({"ffn"} if "ffn" in target else set()) | ({"heads", "kv_heads"} if "heads" in target else set())
    grown_sizes_are_doubled(child, kinds)
    assert sg.count_parameters(child) > sg.count_parameters(model)
    equal_to_parent(child, model, name)
    if is_hf(model):
        saved_equals_the_parent(child, model, name, target, tmp_path / "hf")
    if name in ONNX_FAMILIES or not op_names(child) <= ONNX_OPS:
        onnx_equals_the_child(child, example, name, tmp_path)
    subcloned_back_is_the_parent(child, model, example, name, target)


def op_names(gm) -> set[str]:
    """The ops a graph calls: an ATen op as torch prints it, a Python function by its name."""
    return {str(n.target) if isinstance(n.target, torch._ops.OpOverload) else n.target.__name__
            for n in gm.graph.nodes if n.op == "call_function"}


def onnx_equals_the_child(child, example, name, tmp_path) -> None:
    # static axes but on two families: dynamic axes triple the export's time (they are checked at
    # another size on the core models' children in test_onnx); the parity checked here, the grown
    # graph at the example's sizes, is the same either way
    difference = sg.export_onnx(child, example, tmp_path / "child.onnx", optimize=False,
                                fixed_sizes=name not in DYNAMIC_ONNX)
    assert difference <= 1e-4 * max(1.0, float(run(child, example).abs().max()))


# ----- 2. each width alone -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "gpt2", pytest.param("qwen2_moe", marks=pytest.mark.slow)])
@pytest.mark.parametrize("target, kinds", [
    (dict(hidden=T2), {"residual"}), (dict(ffn=T2), {"ffn"}), (dict(heads=T2), {"heads"}),
    (dict(kv_heads=T2), {"kv_heads"}), (dict(hidden=sg.Times(3)), set())])
def test_each_width_alone(name, target, kinds):
    model, example, gm = parent(name)
    if "kv_heads" in target and not groups_of(gm, "kv_heads"):
        target = dict(heads=T2, kv_heads=T2)          # MHA: kv heads are the query heads
    child = subclone(gm, example, sg.Target(**target))
    grown_sizes_are_doubled(child, kinds)
    equal_to_parent(child, model, name)
    sites, graph = child.meta["subclone.attention"], child.meta["subclone.channel_graph"]
    sizes = child.meta["subclone.sizes"]
    for site in sites:
        want_heads = graph.groups[site.heads].size * (2 if "heads" in target or "kv_heads" in target else 1)
        assert sizes[site.heads] == want_heads
    if target == dict(hidden=sg.Times(3)):
        (stream,) = groups_of(gm, "residual")
        assert child.meta["subclone.sizes"][stream.id] == 3 * stream.size


def test_an_absolute_size_that_is_a_multiple_grows():
    model, example, gm = parent("llama")
    child = subclone(gm, example, sg.Target(hidden=128, ffn=384, heads=8, kv_heads=4))
    assert child.get_parameter("model.embed_tokens.weight").shape == (97, 128)
    equal_to_parent(child, model, "llama")


def test_latent_ranks_grow():
    model, example, gm = parent("deepseek_v3")
    latent = groups_of(gm, "latent")
    assert latent
    child = subclone(gm, example, sg.Target(latent=T2))
    grown_sizes_are_doubled(child, {"latent"})
    equal_to_parent(child, model, "deepseek_v3")


def test_kv_groups_keep_their_query_heads():
    """kv group g's copies each read by g's query heads: the grown k_proj rows are g's twice."""
    model, example, gm = parent("llama")
    child = subclone(gm, example, sg.Target(kv_heads=T2))
    k, k2 = model.get_parameter("model.layers.0.self_attn.k_proj.weight"), \
        child.get_parameter("model.layers.0.self_attn.k_proj.weight")
    head_dim = 16
    blocks = k.view(-1, head_dim, k.shape[1])
    assert torch.equal(k2.view(-1, head_dim, k.shape[1]), blocks.repeat_interleave(2, dim=0))
    o, o2 = model.get_parameter("model.layers.0.self_attn.o_proj.weight"), \
        child.get_parameter("model.layers.0.self_attn.o_proj.weight")
    assert o2.shape == (o.shape[0], 2 * o.shape[1]) and torch.allclose(o2[:, :head_dim], o[:, :head_dim] / 2)


# ----- 3. half precision -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parents_grow_within_their_tolerance(dtype):
    model, example = models.build("llama")
    model = copy.deepcopy(model).to(dtype)
    child = subclone(model, example, sg.Target(**ALL))
    assert {p.dtype for p in child.parameters()} == {dtype}
    # 2 is a power of two: halving a half-precision weight is exact; the sums round as the parent's
    assert relative_error(run(child, example).float(), run(model, example).float()) < sg.tolerance_for(dtype)


# ----- 4. combined with shrinking and depth ------------------------------------------------------
def test_grown_widths_combine_with_shrinking_others_and_depth():
    model, example, gm = parent("llama")
    calibration = [models.make_inputs(model, 2, 8, seed=s) for s in range(3)]
    shrunk = subclone(gm, example, sg.Target(ffn=64, layers=4), calibration=calibration)
    both = subclone(gm, example, sg.Target(hidden=T2, heads=T2, kv_heads=T2, ffn=64, layers=4),
                       calibration=calibration)
    assert len(both.meta["subclone.layers"]) == 4
    assert sg.count_parameters(both) > sg.count_parameters(shrunk)
    for seed in (1, 2):
        x = models.make_inputs(model, 3, 11, seed=seed)
        assert relative_error(run(both, x), run(shrunk, x)) < 1e-5


def test_a_shrunk_stream_with_grown_mlp_keeps_its_rescale():
    model, example, gm = parent("llama")
    calibration = [models.make_inputs(model, 2, 8, seed=s) for s in range(3)]
    shrunk = subclone(gm, example, sg.Target(hidden=32), calibration=calibration)
    both = subclone(gm, example, sg.Target(hidden=32, ffn=T2), calibration=calibration)
    assert both.meta["subclone.rescale"] == shrunk.meta["subclone.rescale"]
    assert relative_error(run(both, example), run(shrunk, example)) < 1e-5


# ----- 5. the tied head --------------------------------------------------------------------------
def test_a_tied_head_takes_its_share_in_the_final_norm_gain():
    model, example, gm = parent("llama")
    assert model.config.tie_word_embeddings
    child = subclone(gm, example, sg.Target(hidden=T2))
    table = child.get_parameter("model.embed_tokens.weight")
    assert table is get_attribute(child, "lm_head.weight")                # still tied
    assert torch.equal(table, model.model.embed_tokens.weight.repeat_interleave(2, dim=1))   # cloned whole
    assert torch.equal(child.get_parameter("model.norm.weight"), model.model.norm.weight.repeat_interleave(2) / 2)
    assert not any(n.op == "call_function" and n.target is torch.ops.aten.mul.Tensor and 0.5 in n.args
                   for n in child.graph.nodes)                           # nothing inserted


# ----- 6. noise ----------------------------------------------------------------------------------
def test_noise_at_a_signal_to_noise_ratio_keeps_the_function():
    model, example, gm = parent("llama")
    exact = subclone(gm, example, sg.Target(**ALL))
    noisy = subclone(gm, example, sg.Target(**ALL), grow_noise_db=10.0)
    name = "model.layers.0.mlp.down_proj.weight"
    w, w_noisy = exact.get_parameter(name), noisy.get_parameter(name)
    ratio = 10 * torch.log10(w.pow(2).mean() / (w_noisy - w).pow(2).mean())
    assert abs(float(ratio) - 10.0) < 0.5
    # the noise cancels over each pair of copies of an input channel
    assert torch.allclose(w_noisy.view(w.shape[0], -1, 2).sum(-1), w.view(w.shape[0], -1, 2).sum(-1), atol=1e-6)
    assert relative_error(run(noisy, example), run(model, example)) < 1e-4
    again = subclone(gm, example, sg.Target(**ALL), grow_noise_db=10.0)
    assert torch.equal(again.get_parameter(name), w_noisy)               # seeded


# ----- 7. refusals -------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.norm = kind, nn.LayerNorm(16)
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        h = self.up(self.norm(x))
        h = torch.softmax(h, -1) if self.kind == "softmax" else torch.relu(h)
        out = x + self.down(h)
        if self.kind == "sum":
            out = out + x.sum(-1, keepdim=True)
        if self.kind == "gram":
            out = out + (x @ x.transpose(-1, -2)).softmax(-1) @ x
        if self.kind == "unbiased":
            out = (out - out.mean(-1, keepdim=True)) / out.std(-1, keepdim=True)
        if self.kind == "flip":
            out = out + self.down(h).flip(-1)
        return out


class _Net(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 16)
        self.layers = nn.ModuleList([_Block(kind) for _ in range(2)])
        self.head = nn.Linear(16, 50)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


@pytest.mark.parametrize("kind, target, match", [
    ("sum", dict(hidden=T2), r"aten.sum.dim_IntList \(sum\w* in layers.0\) sums over it: each of the n copies"),
    ("softmax", dict(ffn=T2), r"aten.softmax.int \(\w+ in layers.0\) takes a softmax over it"),
    ("gram", dict(hidden=T2), r"\(\w+ in layers.0\) contracts two activations over it"),
    ("unbiased", dict(hidden=T2), r"aten.std.\w+ \(\w+ in layers.0\) takes an unbiased variance"),
    ("flip", dict(hidden=T2), r"Target.hidden cannot grow this model: aten.flip.default"),
    ("plain", dict(hidden=40), r"Target.hidden=40 cannot grow a width of 16 by cloning: not a whole multiple"),
])
def test_what_cloning_cannot_keep_exact_is_refused_in_one_line(kind, target, match):
    model = _Net(kind).eval()
    example = (torch.randint(0, 50, (2, 8)),)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match) as raised:
        subclone(model, example, sg.Target(**target))
    assert "\n" not in str(raised.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())     # the parent untouched


def test_a_plain_net_grows_exactly():
    """The refusal nets' plain variant (LayerNorm with bias, an untied head) grows exactly."""
    model = _Net("plain").eval()
    example = (torch.randint(0, 50, (2, 8)),)
    child = subclone(model, example, sg.Target(hidden=sg.Times(3), ffn=T2))
    assert relative_error(run(child, example), run(model, example)) < 1e-5


def test_growth_factors_are_whole_numbers_and_experts_do_not_grow():
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="a growth factor is an integer of at least 2"):
            sg.Times(bad)
    with pytest.raises(ValueError, match="Target.experts=x2: experts are not grown"):
        sg.Target(experts=T2)
    assert sg.Target(hidden=T2).size_of("hidden", 576) == 1152


# ----- 8. the pass contract ----------------------------------------------------------------------
def test_scale_cloned_reads_runs_once():
    model, example, gm = parent("llama_like")
    child = subclone(gm, example, sg.Target(**ALL))
    assert child.meta[state.CLONED_READS.name]
    weights = {k: v.clone() for k, v in child.state_dict().items()}
    result = sg.ScaleClonedReadsPass()(child)
    assert result.modified is False and result.graph_module is child
    assert all(torch.equal(weights[k], v) for k, v in child.state_dict().items())


# ----- 9. the inverse: grown, then subcloned back ------------------------------------------------
def test_grown_then_subcloned_back_with_calibration_keeps_one_copy_each():
    model, example, gm = parent("llama")
    child = subclone(gm, example, sg.Target(**ALL))
    calibration = [models.make_inputs(model, 4, 16, seed=s) for s in range(3)]
    back = subclone(child, example, sg.Target(hidden=64, ffn=128, heads=4, kv_heads=2), calibration=calibration)
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key      # the parent's tensors, bit for bit
    equal_to_parent(back, model, "llama", tolerance=1e-6)


def test_a_grown_child_shrunk_below_its_parent_folds_then_shrinks_as_the_parent():
    model, example, gm = parent("llama")
    child = subclone(gm, example, sg.Target(**ALL))
    small = sg.Target(hidden=32, ffn=64, heads=2, kv_heads=1)
    direct = subclone(gm, example, small)
    via = subclone(child, example, small)
    assert via.meta["subclone.rescale"] == direct.meta["subclone.rescale"]
    assert relative_error(run(via, example), run(direct, example)) < 1e-5


class _SplitBlock(nn.Module):
    """A projection whose output is split into an MLP width and a width fixed by the vocabulary (as a
    state-space block's x_proj into a dt rank and a state size): growing the MLP copies that output's
    channels unevenly."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.up, self.down = nn.Linear(16, 32 + 50), nn.Linear(32, 16)

    def forward(self, x):
        h, side = self.up(self.norm(x)).split([32, 50], dim=-1)
        return x + self.down(torch.relu(h)), side


class _SplitNet(_Net):
    def __init__(self) -> None:
        super().__init__("plain")
        torch.manual_seed(0)
        self.layers = nn.ModuleList([_SplitBlock() for _ in range(2)])

    def forward(self, ids):
        x, logits = self.embed(ids), 0
        for layer in self.layers:
            x, side = layer(x)
            logits = logits + side
        return self.head(x) + logits


def test_an_unevenly_copied_composite_folds_back_without_a_rescale():
    """Folding the grown MLP shrinks the split output from 114 to 82 channels, all of them copies:
    nothing was lost, so no √(D/d) is recorded or applied (``clones.unfolded_sizes``)."""
    model = _SplitNet().eval()
    example = (torch.randint(0, 50, (2, 8)),)
    child = subclone(model, example, sg.Target(ffn=T2))
    assert child.get_parameter("layers.0.up.weight").shape == (114, 16)
    assert relative_error(run(child, example), run(model, example)) < 1e-5
    back = subclone(child, example, sg.Target(ffn=0.5))
    assert set(back.meta[state.FOLDED.name].values()) == {2}
    assert not back.meta.get(state.RESCALE.name)
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_distinct_channels_do_not_fold():
    """A parent without copies shrinks as before: nothing folded."""
    model, example, gm = parent("llama")
    child = subclone(gm, example, sg.Target(hidden=32, ffn=64))
    assert child.meta[state.FOLDED.name] == {}


# ----- 10. the streamed path ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "gemma", pytest.param("qwen2_moe", marks=pytest.mark.slow),
                                  pytest.param("gpt2", marks=pytest.mark.slow)])
def test_the_streamed_path_writes_a_grown_child(name, tmp_path):
    from subclone_graph.checkpoint.files import CheckpointReader

    model, example, gm = parent(name)
    target = sg.Target(**full_target(gm, name))
    model.save_pretrained(tmp_path / "parent", max_shard_size="20KB")
    reference = subclone(gm, example, target)
    sg.save_hf(reference, tmp_path / "in-memory")
    report = sg.subclone_checkpoint(tmp_path / "parent", tmp_path / "child", target, example_inputs=example)
    assert report.max_difference <= 1e-4
    written, saved = CheckpointReader(tmp_path / "child"), CheckpointReader(tmp_path / "in-memory")
    assert set(saved.tensors) <= set(written.tensors)      # the writer also names a tied head
    for tensor in saved.tensors:
        assert torch.equal(written.read(tensor), saved.read(tensor)), tensor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = type(model).from_pretrained(tmp_path / "child").eval()
    equal_to_parent(back, model, name)
