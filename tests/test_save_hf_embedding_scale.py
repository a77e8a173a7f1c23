"""save_hf of a child whose token embedding is scaled by a constant the class derives from the
config (√hidden): with the hidden size reduced, the class computes another scale; the ratio is
folded into the embedding table and, when the head is tied to it, back out of the final norm's
gain (a ``(1 + w)`` gain measured as such). The reloaded model must equal the child (1e-5)."""
from __future__ import annotations

import pytest
import torch
import transformers

import subclone_graph as sg
from subclone_testing import relative_error, run

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _gemma(tied: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GemmaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=64, tie_word_embeddings=tied,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.GemmaForCausalLM(config).eval()
    with torch.no_grad():       # gains away from their init, so that a wrong fold shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_an_embedding_scale_from_the_config_is_folded(tied, tmp_path):
    model = _gemma(tied)
    inputs = (torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0)),)
    child = sg.subclone(model, inputs, sg.Target(hidden=24), rescale=False)
    path = sg.save_hf(child, tmp_path / "child")
    loaded = transformers.GemmaForCausalLM.from_pretrained(path).eval()
    assert loaded.config.hidden_size == 24
    assert (loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight) == tied
    assert relative_error(run(loaded, inputs), run(child, inputs)) < 1e-5
    other = (torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(1)),)
    assert relative_error(run(loaded, other), run(child, other)) < 1e-5


def test_a_tied_head_reading_a_post_norm_layer_takes_the_fold_in_that_layers_norm(tmp_path):
    """A post-norm decoder with no final norm: the head reads the last layer's output, which is
    that layer's last norm's; the layer module returns it too but has no gain, its norm has."""
    torch.manual_seed(0)
    config = transformers.BartConfig(vocab_size=97, d_model=64, decoder_layers=2, decoder_attention_heads=4,
                                     decoder_ffn_dim=96, encoder_layers=1, encoder_attention_heads=4,
                                     encoder_ffn_dim=96, max_position_embeddings=64, scale_embedding=True,
                                     tie_word_embeddings=True, use_cache=False, pad_token_id=0, bos_token_id=1,
                                     eos_token_id=2)
    model = transformers.BartForCausalLM(config).eval()
    with torch.no_grad():       # gains away from their init, so that a wrong fold shows
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layernorm" in name:
                p.normal_(0.5 if name.endswith("weight") else 0.0, 0.3)
    inputs = (torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(0)),)
    child = sg.subclone(model, inputs, sg.Target(hidden=32, heads=2), rescale=False)
    path = sg.save_hf(child, tmp_path / "child")
    loaded = transformers.BartForCausalLM.from_pretrained(path).eval()
    assert loaded.config.d_model == 32
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    other = (torch.randint(3, 97, (3, 5), generator=torch.Generator().manual_seed(1)),)
    for x in (inputs, other):
        assert relative_error(run(loaded, x), run(child, x)) < 1e-5
