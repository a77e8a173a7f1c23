"""Tests for the ``subclone`` command line (in process through ``main``, plus one subprocess)."""

from __future__ import annotations

import importlib.util
import json
import string
import subprocess
import sys
import textwrap

import pytest
import torch

import models
import subclone_graph as sg
from subclone_graph import data
from subclone_graph.export import pt2 as io
from subclone_graph.cli.main import main

TARGET_ARGS = ["--hidden", "32", "--layers", "2", "--heads", "2", "--kv-heads", "1", "--ffn", "48"]

FACTORY = textwrap.dedent('''
    """Tiny factories for the CLI tests."""
    import torch
    from subclone_graph.models import TinyLlama

    def build():
        torch.manual_seed(0)
        model = TinyLlama().eval()
        return model, (torch.randint(0, model.vocab, (2, 8)),)

    def bare():
        torch.manual_seed(0)
        return TinyLlama().eval()

    def not_a_model():
        return 42

    def deepseek():
        from subclone_graph.models import hf_families, hf_zoo
        model = hf_families.build("deepseek_v3")
        return model, hf_zoo.example_inputs(model, 2, 8, 0)

    def broken():
        raise RuntimeError("a bug inside the factory")
''')


@pytest.fixture
def factory(tmp_path, monkeypatch):
    """``cli_tiny_factory:<name>`` importable from tmp_path."""
    (tmp_path / "cli_tiny_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("cli_tiny_factory", None)
    return "cli_tiny_factory"


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "batches.pt"
    torch.save(torch.randint(0, 97, (8, 12), generator=torch.Generator().manual_seed(1)), path)
    return path


def _one_line_error(capsys, code: int, *fragments: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("subclone: error: ") and "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def _layer_indices(module) -> set[str]:
    return {name.split(".")[1] for name, _ in module.named_parameters() if name.startswith("layers.")}


# ----- run ----------------------------------------------------------------------------------
def test_run_writes_a_child_with_the_target_shapes(factory, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", f"{factory}:build", *TARGET_ARGS, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "weight magnitude" in printed
    assert "parent: " in printed and "child: " in printed
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["child.pt2"]
    child = io.load(out / "child.pt2")
    shapes = {name: tuple(p.shape) for name, p in child.named_parameters(remove_duplicate=False)}
    assert shapes["lm_head.weight"] == (97, 32)           # tied to the embedding: one tensor
    assert len(_layer_indices(child)) == 2
    first = sorted(_layer_indices(child), key=int)[0]
    assert shapes[f"layers.{first}.attn.q_proj.weight"] == (2 * 16, 32)
    assert shapes[f"layers.{first}.attn.k_proj.weight"] == (16, 32)
    assert shapes[f"layers.{first}.mlp.gate_proj.weight"] == (48, 32)
    assert shapes[f"layers.{first}.mlp.down_proj.weight"] == (32, 48)
    with torch.no_grad():
        assert child(torch.randint(0, 97, (3, 5))).shape == (3, 5, 97)
    parent_count = sum(p.numel() for p in models.TinyLlama().parameters())
    assert f"{parent_count:,}" in printed and f"{sg.count_parameters(child):,}" in printed


def test_run_with_tensor_calibration_and_onnx(factory, token_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", f"{factory}:build", *TARGET_ARGS, "--calib", str(token_file), "--batch-size", "4",
                 "--depth", "measured", "--onnx", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "calibration: 2 batches" in printed and "onnxruntime" in printed
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["child.onnx", "child.pt2"]


def test_bare_factory_takes_example_inputs_from_calibration(factory, token_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", f"{factory}:bare", "--ffn", "64", "--calib", str(token_file), "--out", str(out)]) == 0
    child = io.load(out / "child.pt2")
    assert {tuple(p.shape) for n, p in child.named_parameters() if n.endswith("gate_proj.weight")} == {(64, 64)}
    capsys.readouterr()
    code = main(["run", f"{factory}:bare", "--ffn", "64", "--out", str(tmp_path / "other")])
    _one_line_error(capsys, code, "cannot make example inputs")


def test_latent_experts_and_fractions_on_a_latent_attention_mixture_of_experts(factory, tmp_path, capsys):
    """--latent, --ffn and --experts take fractions: DeepSeek-V3's q/kv ranks (48, 32), every MLP and
    the routed experts (4) halve; fewer experts than the router's top-k is one line."""
    out = tmp_path / "out"
    code = main(["run", f"{factory}:deepseek", "--latent", "0.5", "--ffn", "0.5", "--experts", "0.5", "--format", "hf",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "hf" / "config.json").read_text())
    assert (config["q_lora_rank"], config["kv_lora_rank"]) == (24, 16)
    assert (config["intermediate_size"], config["moe_intermediate_size"]) == (64, 16)
    assert (config["n_routed_experts"], config["num_experts_per_tok"]) == (2, 2)
    code = main(["run", f"{factory}:deepseek", "--experts", "1", "--out", str(tmp_path / "o")])
    assert "--experts 1" in _one_line_error(capsys, code, "keep at least 2")


def test_every_target_field_is_an_option(factory, tmp_path, capsys):
    from subclone_graph.cli.parser import TARGET_HELP
    from subclone_graph.passes.target import TARGET_FIELDS

    assert sorted(TARGET_HELP) == sorted(TARGET_FIELDS)
    code = main(["run", f"{factory}:build", "--latent", "4", "--out", str(tmp_path / "o")])
    assert "--latent 4" in _one_line_error(capsys, code, "no latent channel group")


def test_overwrite_replaces_an_existing_child(factory, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "child.pt2").write_bytes(b"old")
    code = main(["run", f"{factory}:build", *TARGET_ARGS, "--out", str(out)])
    _one_line_error(capsys, code, str(out / "child.pt2"), "--overwrite")
    assert (out / "child.pt2").read_bytes() == b"old"
    assert main(["run", f"{factory}:build", *TARGET_ARGS, "--out", str(out), "--overwrite"]) == 0
    assert len(_layer_indices(io.load(out / "child.pt2"))) == 2


def _save_hf_folder(folder):
    """A tiny Hugging Face Llama with a character-level tokenizer, saved for from_pretrained."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from tokenizers import models as token_models
    from transformers import PreTrainedTokenizerFast

    model, _ = models.build("llama")
    model.save_pretrained(folder)
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    assert len(vocab) <= model.config.vocab_size
    tokenizer = Tokenizer(token_models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(folder)
    return model


def test_run_on_a_hugging_face_folder_with_text_calibration(tmp_path, capsys):
    parent = _save_hf_folder(tmp_path / "hf")
    text = tmp_path / "corpus.txt"
    text.write_text(data.english_corpus()[:20000])
    out = tmp_path / "out"
    code = main(["run", str(tmp_path / "hf"), *TARGET_ARGS, "--calib", str(text), "--seq-len", "16",
                 "--calib-batches", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "calibration: 2 batches" in capsys.readouterr().out
    child = io.load(out / "child.pt2")
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert child(ids).logits.shape == (2, 9, 97)
    assert sg.count_parameters(child) < sg.count_parameters(parent)


def test_run_on_an_image_model_with_an_image_folder(tmp_path, capsys):
    from PIL import Image

    parent, _ = models.build("vit")
    parent.save_pretrained(tmp_path / "vit")
    images = tmp_path / "images"
    images.mkdir()
    generator = torch.Generator().manual_seed(0)
    for index in range(6):
        pixels = torch.randint(0, 256, (20, 24, 3), dtype=torch.uint8, generator=generator)
        Image.fromarray(pixels.numpy()).save(images / f"{index}.png")
    out = tmp_path / "out"
    # --no-stream: this child (4 heads of 16 on a width of 32) is no ViTForImageClassification,
    # and the streamed path writes the child as its parent's class first
    code = main(["run", str(tmp_path / "vit"), "--hidden", "32", "--ffn", "48", "--calib", str(images),
                 "--out", str(out), "--no-stream"])
    assert code == 0, capsys.readouterr().err
    assert "calibration: 2 batches" in capsys.readouterr().out
    child = io.load(out / "child.pt2")
    size = parent.config.image_size
    pixels = torch.randn(3, 3, size, size, generator=generator)
    with torch.no_grad():
        assert child(pixels).logits.shape == parent(pixels).logits.shape == (3, parent.config.num_labels)
    assert sg.count_parameters(child) < sg.count_parameters(parent)


def test_format_hf_writes_a_checkpoint_beside_the_pt2(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _save_hf_folder(tmp_path / "parent")
    out = tmp_path / "out"
    code = main(["run", str(tmp_path / "parent"), *TARGET_ARGS, "--format", "pt2", "hf", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["child.pt2", "hf"]
    reloaded = AutoModelForCausalLM.from_pretrained(out / "hf", local_files_only=True).eval()
    assert AutoTokenizer.from_pretrained(out / "hf", local_files_only=True).encode("ab") is not None
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, io.load(out / "child.pt2")(ids).logits,
                                   rtol=1e-4, atol=1e-4)
    capsys.readouterr()
    code = main(["run", str(tmp_path / "parent"), *TARGET_ARGS, "--format", "hf", "--out", str(out)])
    _one_line_error(capsys, code, str(out / "hf"), "--overwrite")


# ----- inspect ------------------------------------------------------------------------------
def test_inspect_prints_groups_and_layers(factory, capsys):
    assert main(["inspect", f"{factory}:build"]) == 0
    printed = capsys.readouterr().out
    assert "channel groups" in printed
    for kind in ("residual", "ffn", "heads", "kv_heads"):
        assert f" {kind} " in printed
    assert "embedding rows are looked up by token id" in printed   # a frozen group's reason
    assert "layers (4)" in printed
    for index in range(4):
        assert f"layers.{index}:" in printed
    assert "top-5" not in printed


def test_inspect_with_calibration_prints_ratios_and_top_scores(factory, token_file, capsys):
    assert main(["inspect", f"{factory}:build", "--calib", str(token_file)]) == 0
    printed = capsys.readouterr().out
    ratios = printed.split("||f(x)|| / ||x + f(x)||")[1].split("top-5")[0]
    values = [float(line.split()[1]) for line in ratios.strip().splitlines()[1:] if line.strip()]
    assert len(values) == 4 and all(0 < v < 10 for v in values)
    score_lines = [line for line in printed.split("top-5")[1].splitlines()[1:] if line.strip()]
    assert sum(" ffn " in line for line in score_lines) == 4
    assert all(line.count(":") == 5 for line in score_lines if " ffn " in line)


# ----- errors -------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, fragments", [
    (["run", "{tmp}/nope.gguf", "--out", "{tmp}/o"], ["model not found", "nope.gguf"]),
    (["run", "{factory}:build", "--calib", "{tmp}/missing.pt", "--out", "{tmp}/o"],
     ["calibration data not found", "missing.pt"]),
    (["run", "{factory}:build", "--ffn", "0", "--out", "{tmp}/o"], ["--ffn", "'0'", "at least 1"]),
    (["run", "{factory}:build", "--hidden", "1000", "--out", "{tmp}/o"], ["--hidden 1000", "a width of 64", "not a whole multiple"]),
    (["run", "{factory}:build", "--ffn", "abc", "--out", "{tmp}/o"], ["--ffn", "abc"]),
    (["run", "{factory}:build", "--depth", "measured", "--out", "{tmp}/o"], ["measured", "calibration"]),
    (["run", "no_such_module_xyz:build", "--out", "{tmp}/o"], ["cannot import", "no_such_module_xyz"]),
    (["run", "{factory}:missing", "--out", "{tmp}/o"], ["no callable", "missing"]),
    (["run", "{factory}:not_a_model", "--out", "{tmp}/o"], ["int", "torch.nn.Module"]),
    (["inspect", "{tmp}"], ["cannot load a Hugging Face model"]),
    (["run", "{factory}:build"], ["--out"]),
    ([], ["COMMAND"]),
])
def test_user_errors_are_one_line_with_status_2(argv, fragments, factory, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, factory=factory) for a in argv]
    _one_line_error(capsys, main(argv), *fragments)
    assert not (tmp_path / "o").exists()


def test_format_hf_of_a_model_without_config_is_one_line(factory, tmp_path, capsys):
    code = main(["run", f"{factory}:build", "--format", "hf", "--out", str(tmp_path / "o")])
    _one_line_error(capsys, code, "--format hf needs a Hugging Face MODEL")


def test_text_calibration_without_tokenizer_is_one_line(factory, tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text("some text " * 100)
    code = main(["run", f"{factory}:build", "--calib", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "o")])
    _one_line_error(capsys, code, "tokenizer")


def test_traceback_flag_and_bugs_propagate(factory, tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["--traceback", "run", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "o")])
    with pytest.raises(RuntimeError, match="a bug inside the factory"):
        main(["run", f"{factory}:broken", "--out", str(tmp_path / "o")])


# ----- help ---------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [[], ["demo"], ["run"], ["inspect"]])
def test_help_has_an_example(command, capsys):
    assert main([*command, "--help"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage: subclone") and "example" in printed


def test_help_in_a_subprocess():
    done = subprocess.run([sys.executable, "-m", "subclone_graph", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(word in done.stdout for word in ("demo", "run", "inspect", "examples:"))


# the demo at reduced sizes runs in tests/test_trainable_hf.py (one run: perplexities and training)


def test_run_streams_a_safetensors_folder_and_no_stream_loads_it(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    _save_hf_folder(tmp_path / "parent")
    out = tmp_path / "out"
    code = main(["run", str(tmp_path / "parent"), *TARGET_ARGS, "--format", "hf", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "streaming" in printed.out and "calibrate" in printed.out and "read " in printed.out
    streamed = AutoModelForCausalLM.from_pretrained(out / "hf", local_files_only=True).eval()
    code = main(["run", str(tmp_path / "parent"), *TARGET_ARGS, "--format", "hf", "--out", str(tmp_path / "whole"),
                 "--no-stream"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "streaming" not in printed.out
    whole = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "hf", local_files_only=True).eval()
    for (name, a), (_, b) in zip(streamed.state_dict().items(), whole.state_dict().items()):
        assert torch.equal(a, b), name


def test_calib_dtype_reaches_the_streamed_and_the_in_memory_path(tmp_path, capsys, monkeypatch):
    import subclone_graph.cli.run_checkpoint as stream_cli

    seen = []
    streamed, in_memory = stream_cli.subclone_checkpoint, sg.subclone
    monkeypatch.setattr(stream_cli, "subclone_checkpoint",
                        lambda *a, **k: seen.append(("stream", k["compute_dtype"])) or streamed(*a, **k))
    monkeypatch.setattr(sg, "subclone", lambda *a, **k: seen.append(("memory", k["compute_dtype"])) or in_memory(*a, **k))
    _save_hf_folder(tmp_path / "parent")
    for extra in ([], ["--no-stream"]):
        code = main(["run", str(tmp_path / "parent"), *TARGET_ARGS, "--calib-dtype", "model", "--format", "hf",
                     "--out", str(tmp_path / f"out{len(extra)}"), *extra])
        assert code == 0, capsys.readouterr().err
    assert seen == [("stream", None), ("memory", None)]
    code = main(["run", str(tmp_path / "parent"), *TARGET_ARGS, "--calib-dtype", "int8", "--out", str(tmp_path / "bad")])
    assert code == 2 and "--calib-dtype" in capsys.readouterr().err and not (tmp_path / "bad").exists()
