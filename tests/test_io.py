"""Tests for subclone_graph.export.pt2: save a child as .pt2, load it back, same outputs, trainable."""

from __future__ import annotations

import os
import stat

import pytest
import torch
import torch.nn.functional as F

import models
import subclone_graph as sg
from subclone_graph.export import pt2 as io

TARGET = sg.Target(hidden=32, layers=2, heads=2, kv_heads=1, ffn=48)
SIZES = [(2, 8), (3, 13)]


@pytest.fixture(scope="module", params=["llama_like", "llama"])
def child(request):
    """A subcloned child, and the parent (for fresh inputs)."""
    model, inputs = models.build(request.param)
    return sg.subclone(model, inputs, TARGET), model


def _logits(output) -> torch.Tensor:
    return getattr(output, "logits", output)


def _loss(module, ids: torch.Tensor) -> torch.Tensor:
    logits = _logits(module(ids))
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def test_round_trip_same_outputs_at_two_sizes(child, tmp_path):
    gm, parent = child
    path = io.save(gm, tmp_path / "child.pt2")
    assert path == tmp_path / "child.pt2" and path.is_file()
    loaded = io.load(path)
    assert sg.count_parameters(loaded) == sg.count_parameters(gm)
    with torch.no_grad():
        for batch, seq in SIZES:
            ids = models.make_inputs(parent, batch, seq, seed=batch)
            want, got = _logits(gm(*ids)), _logits(loaded(*ids))
            assert got.shape == want.shape == (batch, seq, want.shape[-1])
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_loaded_parameters_keep_names_and_shapes(child, tmp_path):
    gm, _ = child
    loaded = io.load(io.save(gm, tmp_path / "child.pt2"))
    want = {name: p.shape for name, p in gm.named_parameters()}
    got = {name: p.shape for name, p in loaded.named_parameters()}
    assert got == want


def _tied_names(module) -> list[set[str]]:
    names: dict[int, set[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), set()).add(name)
    return sorted((group for group in names.values() if len(group) > 1), key=sorted)


def test_tied_weights_stay_one_parameter(child, tmp_path):
    gm, _ = child
    tied = _tied_names(gm)
    assert tied, "both fixtures tie the embedding to the output head"
    loaded = io.load(io.save(gm, tmp_path / "child.pt2"))
    assert _tied_names(loaded) == tied
    assert len(list(loaded.parameters())) == len(list(gm.parameters()))


def test_existing_path_is_refused_and_left_alone(child, tmp_path):
    gm, _ = child
    path = tmp_path / "child.pt2"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError) as info:
        io.save(gm, path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "overwrite=True" in message
    assert path.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child.pt2"]


def test_overwrite_replaces_and_leaves_no_temp_files(child, tmp_path):
    gm, parent = child
    path = tmp_path / "child.pt2"
    path.write_bytes(b"old")
    io.save(gm, path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child.pt2"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask     # not a temp file's 0600
    ids = models.make_inputs(parent, 2, 8)
    with torch.no_grad():
        torch.testing.assert_close(_logits(io.load(path)(*ids)), _logits(gm(*ids)), rtol=0, atol=1e-6)


def test_failed_save_writes_nothing(tmp_path, monkeypatch):
    model, inputs = models.build("llama_like")
    gm = sg.subclone(model, inputs, TARGET)

    def broken(program, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch.export, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        io.save(gm, tmp_path / "child.pt2")
    assert list(tmp_path.iterdir()) == []


def test_loaded_module_trains(child, tmp_path):
    gm, parent = child
    loaded = io.load(io.save(gm, tmp_path / "child.pt2"))
    params = list(loaded.parameters())
    assert params and all(p.requires_grad for p in params)
    ids = models.make_inputs(parent, 4, 12, seed=7)[0]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    before = _loss(loaded, ids)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = _loss(loaded, ids)
    assert after.item() < before.item() - 1e-3


def test_explicit_example_inputs_and_missing_inputs(tmp_path):
    model, inputs = models.build("llama_like")
    gm = sg.subclone(model, inputs, TARGET)
    other = models.make_inputs(model, 3, 5, seed=3)
    gm.meta.pop("subclone.example_inputs")
    with pytest.raises(ValueError, match="example_inputs="):
        io.save(gm, tmp_path / "a.pt2")
    loaded = io.load(io.save(gm, tmp_path / "a.pt2", example_inputs=other))
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), gm(*inputs), rtol=0, atol=1e-6)


def test_load_missing_file_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        io.load(tmp_path / "nope.pt2")
    assert "\n" not in str(info.value) and "nope.pt2" in str(info.value)
