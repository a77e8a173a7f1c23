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
