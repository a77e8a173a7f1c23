"""The command line grows as the API does: ``--hidden x2`` (a factor) or a multiple of the parent's
size; the child written equals the parent; bad growth targets and noise on the streamed path are
one-line errors with exit status 2; a safetensors folder streams into a grown Hugging Face child.
"""
from __future__ import annotations

import sys
import textwrap
import warnings

import pytest
import torch

from subclone_graph.cli.main import main
from subclone_graph.export import pt2
from subclone_graph.models import hf_zoo

FACTORY = textwrap.dedent('''
    import torch
    from subclone_graph.models import TinyLlama

    def build():
        torch.manual_seed(0)
        model = TinyLlama().eval()
        return model, (torch.randint(0, model.vocab, (2, 8)),)
''')


@pytest.fixture
def factory(tmp_path, monkeypatch):
    (tmp_path / "grow_tiny_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("grow_tiny_factory", None)
    return "grow_tiny_factory:build"


def _one_line_error(capsys, code: int, fragment: str) -> None:
    err = capsys.readouterr().err
    # (a library's own load warnings may precede it: the error is the one line of ours)
    ours = [line for line in err.splitlines() if line.startswith("subclone:")]
    assert code == 2 and len(ours) == 1 and ours[0].startswith("subclone: error: ") and fragment in ours[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("noise", [[], ["--grow-noise-db", "20"]])
def test_run_grows_by_a_factor_and_by_a_multiple(factory, tmp_path, capsys, noise):
    import grow_tiny_factory

    parent, _ = grow_tiny_factory.build()
    out = tmp_path / "out"
    code = main(["run", factory, "--hidden", "x2", "--ffn", "256", "--heads", "x2", "--kv-heads", "x2", *noise,
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    child = pt2.load(out / "child.pt2")
    assert child.get_parameter("embed.weight").shape == (97, 128)
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = child(ids), parent(ids)
    assert float((got - want).abs().max() / want.abs().max()) < (1e-5 if not noise else 1e-4)


@pytest.mark.parametrize("args, fragment", [
    (["--hidden", "100"], "--hidden 100 cannot grow a width of 64 by cloning: not a whole multiple"),
    (["--hidden", "x1"], "a growth factor is an integer of at least 2"),
    (["--experts", "x2"], "experts are not grown"),
])
def test_bad_growth_targets_are_one_line_errors(factory, tmp_path, capsys, args, fragment):
    _one_line_error(capsys, main(["run", factory, *args, "--out", str(tmp_path / "o")]), fragment)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_a_safetensors_folder_streams_into_a_grown_hugging_face_child(tmp_path, capsys):
    from transformers import LlamaForCausalLM

    parent = hf_zoo.llama()
    parent.save_pretrained(tmp_path / "parent")
    code = main(["run", str(tmp_path / "parent"), "--hidden", "x2", "--heads", "x2", "--kv-heads", "x2",
                 "--grow-noise-db", "10", "--format", "hf", "--out", str(tmp_path / "noisy")])
    _one_line_error(capsys, code, "--grow-noise-db: the streamed writer replays slices and scales only")
    code = main(["run", str(tmp_path / "parent"), "--hidden", "x2", "--ffn", "x2", "--heads", "x2", "--kv-heads", "x2",
                 "--format", "hf", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        child = LlamaForCausalLM.from_pretrained(tmp_path / "out" / "hf").eval()
    assert child.config.hidden_size == 2 * parent.config.hidden_size
    assert child.config.num_key_value_heads == 2 * parent.config.num_key_value_heads
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got, want = child(ids).logits, parent(ids).logits
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5
