"""Calibration streamed from disk (subclone_graph.data.token_stream): the same windows as reading the
whole text, read lazily, capped by tokens; token folders of .pt / .safetensors; bad files are
one-line errors naming them."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from subclone_graph import data
from subclone_graph.data import token_stream as data_stream
from subclone_graph.cli.main import main
from subclone_graph.data.token_stream import TokenStream


class CharTokenizer:
    """One token per character: concatenative, so chunking at whitespace changes nothing."""

    def encode(self, text):
        return [ord(c) % 97 for c in text]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(data.english_corpus()[:5000])
    return path


def test_streamed_text_windows_equal_whole_text_windows(corpus, monkeypatch):
    monkeypatch.setattr(data_stream, "CHUNK_CHARS", 300)      # many chunks
    whole = data.text_windows(corpus.read_text(), CharTokenizer(), window=16)
    streamed = torch.cat([b[0] for b in TokenStream(corpus, CharTokenizer(), window=16, batch_size=3)])
    assert torch.equal(streamed, whole)
    again = torch.cat([b[0] for b in TokenStream(corpus, CharTokenizer(), window=16, batch_size=3)])
    assert torch.equal(again, whole)          # re-iterable: a second pass reads the same


def test_the_text_is_read_lazily_and_capped_by_tokens(corpus, monkeypatch):
    monkeypatch.setattr(data_stream, "CHUNK_CHARS", 300)
    calls = []
    real = data.encode
    monkeypatch.setattr(data, "encode", lambda text, tok: calls.append(len(text)) or real(text, tok))
    first = next(iter(TokenStream(corpus, CharTokenizer(), window=16, batch_size=2)))
    assert first[0].shape == (2, 16) and len(calls) == 1            # one chunk read, not the file
    capped = list(TokenStream(corpus, CharTokenizer(), window=16, batch_size=4, max_tokens=100))
    assert sum(b[0].numel() for b in capped) == 96                  # whole windows within the cap
    assert [b[0].shape[0] for b in capped] == [4, 2]


def test_a_folder_of_pt_and_safetensors_token_files(tmp_path):
    folder = tmp_path / "tokens"
    folder.mkdir()
    a = torch.arange(0, 40).reshape(2, 20)
    b = torch.arange(40, 60)
    torch.save(a, folder / "a.pt")
    save_file({"ids": b}, folder / "b.safetensors")
    batches = list(TokenStream(folder, window=10, batch_size=3))
    rows = torch.cat([x[0] for x in batches])
    assert torch.equal(rows, torch.arange(0, 60).reshape(6, 10))
    assert len(list(TokenStream(folder, window=10, batch_size=3, max_batches=1))) == 1


@pytest.mark.parametrize("make, fragment", [
    (lambda f: torch.save(torch.randn(2, 10), f / "floats.pt"), "floats.pt [0]: holds torch.float32 values"),
    (lambda f: (f / "junk.safetensors").write_bytes(b"not a safetensors file"), "junk.safetensors: not a safetensors"),
    (lambda f: (f / "junk.pt").write_bytes(b"garbage"), "junk.pt: not a tensor file of token ids"),
    (lambda f: torch.save(torch.full((2, 10), 500), f / "big.pt"), "big.pt [0]: holds token ids outside"),
])
def test_a_file_that_is_not_tokens_is_named(tmp_path, make, fragment):
    folder = tmp_path / "tokens"
    folder.mkdir()
    make(folder)
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        list(TokenStream(folder, window=5, vocab=97))


def test_cli_streams_a_token_folder_capped_and_names_a_bad_file(tmp_path, capsys):
    folder = tmp_path / "tokens"
    folder.mkdir()
    torch.save(torch.randint(0, 97, (16, 8), generator=torch.Generator().manual_seed(0)), folder / "a.pt")
    args = ["run", "subclone_graph.models:TinyLlama", "--hidden", "32", "--calib", str(folder), "--seq-len", "8",
            "--batch-size", "2", "--calib-tokens", "64"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "streaming windows of 8 tokens" in out and "calibration: 1 rank, 64 tokens in" in out
    assert "tokens/s" in out
    torch.save(torch.randn(4, 8), folder / "b.pt")
    assert main([*args, "--calib-tokens", "1000", "--out", str(tmp_path / "bad")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1].split("\r")[-1]   # after the progress bar
    assert last.startswith("subclone: error: ") and "b.pt [0]: holds torch.float32 values" in last
    assert not (tmp_path / "bad").exists()
