"""save_hf: a child written as a Hugging Face directory loads back as the parent's class.

Round trips (child → save_hf → ``type(parent).from_pretrained`` → the child's logits within
1e-4 at two batch/seq sizes) for Llama (GQA, tied embeddings), Qwen3 (per-layer
``layer_types``), Phi-3 (fused qkv / gate_up), GPT-2 (``n_inner`` unset in the parent) and
BERT (tied decoder weight and bias), each with widths, heads and layers reduced; the config
fields that must change (sizes, the norm ε that RescaleResidualPass scaled) and the ones that
must not (a token id equal to a width); fields that share a parent size told apart; ties kept;
safetensors on disk; layers renumbered; a deepened child; a grandchild (a child subcloned
again); the tokenizer carried; and the
refusals (existing directory, a child the class cannot express, a child whose graph computes
something extra, missing metadata), each leaving nothing behind.
"""
from __future__ import annotations

import copy
import functools
import json

import pytest
import safetensors.torch
import torch

import subclone_graph as sg
from subclone_graph import models
from subclone_graph.export.hf import HFExportError, child_config, child_state_dict, save_hf
from subclone_graph.models import hf_zoo

SIZES = [(1, 5), (3, 11)]
ATOL = 1e-4

GQA = sg.Target(hidden=32, ffn=64, heads=2, kv_heads=1, layers=2)
MHA = sg.Target(hidden=32, ffn=64, heads=2, layers=2)

# name -> (target, config fields of the saved model). ε doubles with the width halved (D/d = 2:
# RescaleResidualPass scales the ε added to a shrunk statistic, the config must follow) — but
# Qwen3's QK-norms over the unshrunk head width read the same field: the writer folds the ε into
# the stream's scale instead (export/hf/stream_scale.py) and the parent's ε stays.
CASES = {
    "llama": (GQA, dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                        num_hidden_layers=2, head_dim=16, vocab_size=97, eos_token_id=2, bos_token_id=1,
                        tie_word_embeddings=True, rms_norm_eps=pytest.approx(2e-6, rel=1e-9))),
    "qwen3": (GQA, dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                        num_hidden_layers=2, head_dim=16, eos_token_id=2, max_window_layers=28,
                        layer_types=["full_attention"] * 2, rms_norm_eps=pytest.approx(1e-6, rel=1e-9))),
    "phi3": (GQA, dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                       num_hidden_layers=2, eos_token_id=2, rms_norm_eps=pytest.approx(2e-5, rel=1e-9))),
    "gpt2": (MHA, dict(n_embd=32, n_head=2, n_layer=2, n_inner=64, n_positions=64, vocab_size=97,
                       layer_norm_epsilon=pytest.approx(2e-5, rel=1e-9))),
    "bert": (MHA, dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64,
                       max_position_embeddings=64, layer_norm_eps=pytest.approx(2e-12, rel=1e-9))),
}
TIED = ("llama", "gpt2", "bert")


def logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


@functools.lru_cache(maxsize=None)
def subcloned(name: str, target: sg.Target, drop_layers: tuple | None = None, rescale: bool = True):
    model, inputs = models.build(name)
    child = sg.subclone(model, inputs, target, drop_layers=list(drop_layers) if drop_layers else None,
                        rescale=rescale)
    assert child.meta["subclone.parent_layer_count"] == hf_zoo.LAYERS
    return model, child


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (parent, child, directory), saved once per model."""
    cache = {}

    def get(name):
        if name not in cache:
            model, child = subcloned(name, CASES[name][0])
            out = tmp_path_factory.mktemp(name) / "child"
            assert save_hf(child, out) == out
            cache[name] = model, child, out
        return cache[name]
    return get


def assert_round_trip(model, child, out):
    loaded = type(model).from_pretrained(out)
    assert type(loaded) is type(model)
    assert not loaded.training
    for batch, seq in SIZES:
        inputs = models.make_inputs(model, batch, seq, seed=11)
        with torch.no_grad():
            want, got = logits(child(*inputs)), logits(loaded(*inputs))
        assert got.shape == want.shape
        assert (got - want).abs().max() < ATOL
    return loaded


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_outputs_equal_the_child(saved, name):
    model, child, out = saved(name)
    loaded = assert_round_trip(model, child, out)
    assert sg.count_parameters(loaded) == sg.count_parameters(child) < sg.count_parameters(model)


@pytest.mark.parametrize("name", list(CASES))
def test_config_fields_follow_the_child(saved, name):
    model, _, out = saved(name)
    config = type(model).from_pretrained(out).config
    for field, value in CASES[name][1].items():
        assert getattr(config, field) == value, field
    on_disk = json.loads((out / "config.json").read_text())
    assert on_disk["num_hidden_layers" if "num_hidden_layers" in on_disk else "n_layer"] == 2
    assert getattr(model.config, "num_hidden_layers", None) in (None, hf_zoo.LAYERS)   # the parent's is untouched


@pytest.mark.parametrize("name", TIED)
def test_tied_weights_stay_tied(saved, name):
    model, _, out = saved(name)
    loaded = type(model).from_pretrained(out)
    head, embedding = loaded.get_output_embeddings().weight, loaded.get_input_embeddings().weight
    assert head is embedding or head.data_ptr() == embedding.data_ptr()
    with torch.no_grad():
        embedding.add_(1.0)
    assert torch.equal(loaded.get_output_embeddings().weight, embedding)


def test_untied_head_stays_untied(saved):
    model, child, out = saved("qwen3")
    loaded = type(model).from_pretrained(out)
    assert loaded.get_output_embeddings().weight.data_ptr() != loaded.get_input_embeddings().weight.data_ptr()
    assert not loaded.config.tie_word_embeddings


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_weights_are_one_safetensors_file_with_ties_saved_once(saved, name):
    model, child, out = saved(name)
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and "config.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth"))]
    tensors = safetensors.torch.load_file(out / "model.safetensors")
    loaded = type(model).from_pretrained(out)
    assert set(tensors) < set(loaded.state_dict())      # tied names are stored once
    assert sum(t.numel() for t in tensors.values()) == sg.count_parameters(child)


def test_layers_are_renumbered_in_order():
    model, child = subcloned("llama", sg.Target(ffn=64), drop_layers=(0,))
    assert [layer.key for layer in child.meta["subclone.layers"]] == ["model.layers.1", "model.layers.2"]
    state = dict(child.named_parameters())
    loaded_state = child_state_dict(child)
    assert torch.equal(loaded_state["model.layers.0.mlp.up_proj.weight"], state["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(loaded_state["model.layers.1.mlp.up_proj.weight"], state["model.layers.2.mlp.up_proj.weight"])
    assert not any(n.startswith("model.layers.2.") for n in loaded_state)


def test_dropping_the_first_layer_round_trips(tmp_path):
    model, child = subcloned("llama", sg.Target(ffn=64), drop_layers=(0,))
    save_hf(child, tmp_path / "out")
    loaded = assert_round_trip(model, child, tmp_path / "out")
    assert loaded.config.num_hidden_layers == 2 and loaded.config.intermediate_size == 64
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.weight,
                       dict(child.named_parameters())["model.layers.1.mlp.up_proj.weight"])


def test_deepened_child_round_trips(tmp_path):
    model, child = subcloned("llama", sg.Target(layers=hf_zoo.LAYERS + 1, ffn=64))
    save_hf(child, tmp_path / "deep")
    loaded = assert_round_trip(model, child, tmp_path / "deep")
    assert loaded.config.num_hidden_layers == hf_zoo.LAYERS + 1
    up = [layer.mlp.up_proj.weight for layer in loaded.model.layers]
    assert torch.equal(up[1], up[2]) and not torch.equal(up[2], up[3])     # the copy runs right after layer 1


def test_a_grandchild_round_trips(saved, tmp_path):
    # the child's derived config is the grandchild's parent config: sizes and ε follow twice
    model, child, _ = saved("llama")
    grandchild = sg.subclone(child, child.meta["subclone.example_inputs"], sg.Target(hidden=16, ffn=32))
    save_hf(grandchild, tmp_path / "grand")
    loaded = assert_round_trip(model, grandchild, tmp_path / "grand")
    config = loaded.config
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (16, 32, 2)
    assert (config.num_attention_heads, config.num_key_value_heads) == (2, 1)
    assert config.rms_norm_eps == pytest.approx(4e-6, rel=1e-9)       # D/d = 2, twice
    assert child.meta["subclone.parent_config"].hidden_size == hf_zoo.HIDDEN    # the child is untouched


def test_an_existing_directory_is_refused(saved, tmp_path):
    _, child, _ = saved("llama")
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_hf(child, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]       # no staging left
    with pytest.raises(FileExistsError, match="keep.txt"):       # overwrite never deletes the user's files
        save_hf(child, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    save_hf(child, out)                                          # an empty folder is written into
    (out / "model.safetensors").write_bytes(b"stale")
    save_hf(child, out, overwrite=True)                          # what save_hf wrote is replaced
    assert (out / "model.safetensors").read_bytes() != b"stale"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_a_child_that_computes_more_than_the_class_is_refused(saved, tmp_path):
    # What RescaleResidualPass does when a norm has no weight of its own: a scalar mul the
    # class cannot hold. Planted here by hand after the final norm.
    _, child, _ = saved("llama")
    child = copy.deepcopy(child)
    norm_weight = next(n for n in child.graph.nodes if n.op == "get_attr" and n.target == "model.norm.weight")
    product = next(iter(norm_weight.users))
    with child.graph.inserting_after(product):
        scaled = child.graph.call_function(torch.ops.aten.mul.Tensor, (product, 1.5))
    product.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
    child.recompile()
    with pytest.raises(HFExportError, match=r"differs from the child by [0-9.e+-]+ \(> 0.0001 × [0-9.]+\)"):
        save_hf(child, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_child_the_class_cannot_express_is_refused(tmp_path):
    # GPT-2 ties the attention width to n_embd: 2 heads of 16 in a width of 64 has no config.
    _, child = subcloned("gpt2", sg.Target(heads=2, layers=2))
    with pytest.raises(HFExportError, match="no config of GPT2LMHeadModel has the child's parameter shapes"):
        save_hf(child, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_missing_metadata_is_named(saved, tmp_path):
    _, child, _ = saved("llama")
    bare = copy.copy(child)
    bare.meta = {k: v for k, v in child.meta.items() if k != "subclone.parent_layer_count"}
    with pytest.raises(HFExportError, match="subclone.parent_layer_count"):
        save_hf(bare, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_child_config_leaves_unrelated_integers_alone(saved):
    # eos_token_id == 2 == the parent's kv heads, which became 1: the token id must stay.
    model, child, _ = saved("llama")
    config = child_config(child)
    assert (config.eos_token_id, config.num_key_value_heads) == (2, 1)
    assert config.max_position_embeddings == model.config.max_position_embeddings


def test_sizes_shared_by_several_fields_are_told_apart_by_the_shapes(tmp_path):
    # The parent's hidden == MLP width == 64 and heads == layers == 4; the child splits them.
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, num_hidden_layers=4, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config).eval()
    inputs = models.make_inputs(model)
    child = sg.subclone(model, inputs, sg.Target(hidden=32, ffn=48, heads=2, kv_heads=1, layers=3))
    assert child.meta["subclone.parent_layer_count"] == 4
    save_hf(child, tmp_path / "out")
    loaded = assert_round_trip(model, child, tmp_path / "out")
    got = loaded.config
    assert (got.hidden_size, got.intermediate_size, got.num_attention_heads, got.num_key_value_heads,
            got.num_hidden_layers, got.head_dim, got.eos_token_id) == (32, 48, 2, 1, 3, 16, 2)


def test_without_rescaling_the_epsilon_stays(tmp_path):
    model, child = subcloned("llama", sg.Target(hidden=48, layers=2), rescale=False)
    config = child_config(child)
    assert (config.hidden_size, config.num_hidden_layers) == (48, 2)
    assert config.rms_norm_eps == model.config.rms_norm_eps
    save_hf(child, tmp_path / "out")
    assert_round_trip(model, child, tmp_path / "out")


def test_the_tokenizer_is_carried(saved, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    import transformers

    words = {"[UNK]": 0, "the": 1, "cat": 2}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    _, child, _ = saved("llama")
    save_hf(child, tmp_path / "out", tokenizer=tokenizer)
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert reloaded("the cat dog").input_ids == [1, 2, 0]
