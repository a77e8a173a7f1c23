"""The one Hugging Face writer (``export/hf/write.py``): what the folder holds besides the weights.

1. a tensor the class ties (the output head tied to the embedding) is stored once, and the
   reloaded model has it tied;
2. the parent folder's ``generation_config.json`` and tokenizer files are copied byte for byte;
3. every config field that changed is listed with why (the residual size, the ε the √(D/d)
   rescale scaled: ``rms_norm_eps`` 1e-6 → 2e-6 at half the width);
4. a bfloat16 Gemma-style child with a narrower stream and trained-like ``(1 + w)`` gains saves
   and reloads within the bfloat16 tolerance (it was refused: "differs from the child by 2.14");
5. the embedding-scale probe cannot be fooled: a one-token example, or one token repeated,
   makes an untrained uniform-gain norm look like a scale only to a probe of one row; the
   child's scale is measured on distinct tokens (1 where there is none, √hidden for Gemma);
6. the written folder is checked at the example's size and at another batch and sequence length:
   a class that differs from the child only beyond the example's length (as a class whose ε its
   norms over another width read too differed by 8.6e-5 at the example, 1.7e-4 at (3, 13)) is
   refused in one line naming that size, in memory and streamed segment by segment, nothing
   written.
"""
from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

import subclone_graph as sg
from subclone_graph.export.hf.embedding_scale import child_scales
from subclone_graph.models import hf_zoo
from subclone_testing import relative_error, run

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
TARGET = sg.Target(hidden=32, ffn=64, heads=2, kv_heads=1)


def _parent_folder(model, folder: Path) -> Path:
    model.generation_config.max_new_tokens = 7            # not the default: a copy shows
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "made up"}}')
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    return folder


def _child(model, inputs, target=TARGET, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sg.subclone(model, inputs, target, **options)


def _stored(folder: Path) -> set[str]:
    with safe_open(folder / "model.safetensors", "pt") as handle:
        return set(handle.keys())


def test_tied_weights_stored_once_and_companions_copied_and_changes_listed(tmp_path):
    parent = _parent_folder(hf_zoo.llama(0), tmp_path / "parent")
    model = transformers.LlamaForCausalLM.from_pretrained(parent).eval()
    assert model.config.tie_word_embeddings
    inputs = hf_zoo.example_inputs(model, 2, 8)
    saved = sg.save_hf(_child(model, inputs, calibration=[inputs]), tmp_path / "child")
    stored = _stored(saved)
    assert "model.embed_tokens.weight" in stored and "lm_head.weight" not in stored
    loaded = transformers.LlamaForCausalLM.from_pretrained(saved).eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (saved / name).read_bytes() == (parent / name).read_bytes(), name
    assert json.loads((saved / "generation_config.json").read_text())["max_new_tokens"] == 7
    changes = {change.field: change for change in saved.config_changes}
    assert (changes["hidden_size"].parent, changes["hidden_size"].child) == (64, 32)
    assert "residual" in changes["hidden_size"].why
    eps = changes["rms_norm_eps"]
    assert eps.child == pytest.approx(2 * eps.parent) and "ε" in eps.why and "√(D/d)" in eps.why
    assert set(changes) == {"hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                            "rms_norm_eps"}


def _gemma(dtype, hidden=128) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GemmaConfig(vocab_size=97, hidden_size=hidden, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=64, tie_word_embeddings=True,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.GemmaForCausalLM(config).eval()
    with torch.no_grad():        # trained-like (1 + w) gains
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.3)
    return model.to(dtype)


def test_a_bfloat16_gemma_child_with_a_narrower_stream_saves(tmp_path):
    model = _gemma(torch.bfloat16)
    inputs = (torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0)),)
    child = _child(model, inputs, sg.Target(hidden=64), calibration=[inputs])
    saved = sg.save_hf(child, tmp_path / "child")
    loaded = transformers.GemmaForCausalLM.from_pretrained(saved, dtype=torch.bfloat16).eval()
    assert loaded.config.hidden_size == 64 and loaded.dtype == torch.bfloat16
    expected = run(child, inputs).float()
    assert float((run(loaded, inputs).float() - expected).abs().max()) <= 3e-2 * max(1.0, float(expected.abs().max()))


@pytest.mark.parametrize("ids", [torch.tensor([[5]]), torch.full((2, 6), 5)], ids=["one token", "one token repeated"])
def test_the_embedding_scale_probe_is_not_fooled_by_one_token(ids, tmp_path):
    model = hf_zoo.llama(0)                    # untrained: every norm gain is 1
    child = _child(model, (ids,), TARGET)
    assert set(child_scales(child).values()) == {1.0}
    saved = sg.save_hf(child, tmp_path / "child")
    loaded = transformers.LlamaForCausalLM.from_pretrained(saved).eval()
    assert relative_error(run(loaded, (ids,)), run(child, (ids,))) < 1e-5
    gemma = _child(_gemma(torch.float32, hidden=64), (ids,), sg.Target(hidden=32), rescale=False)
    assert list(child_scales(gemma).values()) == [pytest.approx(64 ** 0.5)]


def _drifting_beyond_the_example(monkeypatch, narrower_than: int) -> None:
    """From now on a LlamaForCausalLM narrower than ``narrower_than`` adds 1e-3 per position beyond
    the example's 8 to its logits: a class whose code differs from the child at other sizes only."""
    real = transformers.LlamaForCausalLM.forward

    @functools.wraps(real)              # its signature (the trace turns use_cache off by it)
    def forward(self, input_ids=None, *args, **kwargs):
        out = real(self, input_ids, *args, **kwargs)
        if self.config.hidden_size < narrower_than:
            out.logits = out.logits + 1e-3 * (input_ids.shape[1] - 8)
        return out

    monkeypatch.setattr(transformers.LlamaForCausalLM, "forward", forward)


def test_a_class_that_differs_only_at_another_size_is_refused(tmp_path, monkeypatch):
    model = hf_zoo.llama(0)
    inputs = hf_zoo.example_inputs(model, 2, 8)
    child = _child(model, inputs, calibration=[inputs])
    sg.save_hf(child, tmp_path / "before")                 # the class as it is: the same at both sizes
    _drifting_beyond_the_example(monkeypatch, model.config.hidden_size)
    with pytest.raises(sg.HFExportError, match=r"differs from the child by 0\.005.* at inputs of size \(3, 13\)"):
        sg.save_hf(child, tmp_path / "child")
    assert not (tmp_path / "child").exists()
    parent = _parent_folder(model, tmp_path / "parent")
    with pytest.raises(sg.HFExportError, match=r"at inputs of size \(3, 13\).*nothing written"):
        sg.subclone_checkpoint(parent, tmp_path / "streamed", TARGET, [inputs], memory_budget=0)
    assert not (tmp_path / "streamed").exists()
