"""ONNX parity: every zoo model, subcloned with a real reduction, exports and runs in onnxruntime.

For each model: ``sg.export_onnx`` returns the max difference on the example inputs (≤ 1e-4),
``onnx.checker`` passes on the file, its graph inputs keep symbolic batch (and, for text,
sequence) dims, and onnxruntime matches the child at a *second* batch/seq size (< 1e-4). A
mismatch beyond the tolerance raises and writes nothing. The whole zoo is ``slow``; a hand-
written text model and a Hugging Face vision model stay in the fast run.
"""
from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
import torch
import torch.utils._pytree as pytree

import subclone_graph as sg
from subclone_graph import models
from subclone_graph.export import onnx_export
from subclone_graph.export.onnx_export import OnnxMismatchError, run_onnx

ATOL = 1e-4
GQA = {"llama_like", "llama", "qwen3", "mistral", "phi3"}
VISION = {"vit_like", "vit"}
FAST = ("llama_like", "vit")
ZOO = [name if name in FAST else pytest.param(name, marks=pytest.mark.slow) for name in models.MODEL_NAMES]


def target(name: str) -> sg.Target:
    """Half the width, MLP and heads (and kv heads), two layers: a real reduction everywhere."""
    return sg.Target(hidden=32, ffn=32, heads=2, kv_heads=1 if name in GQA else None, layers=2)


def tensors(out) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


@functools.lru_cache(maxsize=None)
def subcloned(name: str):
    model, inputs = models.build(name)
    return model, inputs, sg.subclone(model, inputs, target(name))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (model, child, path, diff), exported once per model."""
    cache = {}

    def get(name):
        if name not in cache:
            model, inputs, child = subcloned(name)
            path = tmp_path_factory.mktemp(name) / "child.onnx"
            cache[name] = model, child, path, sg.export_onnx(child, inputs, path)
        return cache[name]
    return get


@pytest.mark.parametrize("name", ZOO)
def test_onnx_matches_the_child_at_another_size(exported, name):
    model, child, path, diff = exported(name)
    assert 0.0 <= diff <= ATOL
    assert sg.count_parameters(child) < sg.count_parameters(model)
    onnx.checker.check_model(str(path), full_check=True)
    inputs = models.make_inputs(model, 3, 11, seed=21)
    with torch.no_grad():
        expected = tensors(child(*inputs))
    got = run_onnx(path, list(inputs))
    assert len(got) == len(expected)
    for want, have in zip(expected, got):
        assert have.shape == tuple(want.shape)
        assert np.abs(have - want.numpy()).max() < ATOL


@pytest.mark.parametrize("name", ZOO)
def test_batch_and_sequence_dims_stay_symbolic(exported, name):
    _, _, path, _ = exported(name)
    graph = onnx.load(str(path), load_external_data=False).graph
    (first,) = graph.input
    dims = first.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")
    if name in VISION:
        assert [d.dim_value for d in dims[1:]] == list(models.make_inputs(subcloned(name)[0])[0].shape[1:])
    else:
        assert dims[1].dim_param and dims[1].dim_param != dims[0].dim_param
    assert all(out.type.tensor_type.shape.dim[0].dim_param == dims[0].dim_param for out in graph.output)


def _perturbed(monkeypatch, amount: float) -> None:
    real = onnx_export.run_onnx
    monkeypatch.setattr(onnx_export, "run_onnx", lambda path, inputs: [o + amount for o in real(path, inputs)])


def test_a_mismatch_beyond_the_tolerance_raises_and_writes_nothing(monkeypatch, tmp_path):
    _, inputs, child = subcloned("vit")
    _perturbed(monkeypatch, 1e-6)
    path = tmp_path / "child.onnx"
    with pytest.raises(OnnxMismatchError, match=r"differs from the child by [0-9.e+-]+ \(> 0 × [0-9.e+-]+\); nothing written"):
        sg.export_onnx(child, inputs, path, rtol=0.0)
    assert list(tmp_path.iterdir()) == []
    diff = sg.export_onnx(child, inputs, path)           # the same difference is within 1e-4
    assert 1e-7 < diff < ATOL
    assert [p.name for p in tmp_path.iterdir()] == ["child.onnx"]


def test_an_existing_file_is_kept_without_overwrite(tmp_path):
    _, inputs, child = subcloned("vit")
    path = tmp_path / "child.onnx"
    path.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        sg.export_onnx(child, inputs, path, overwrite=False)
    assert path.read_bytes() == b"mine"
    assert [p.name for p in tmp_path.iterdir()] == ["child.onnx"]


def test_the_torchlib_op_list_is_read_once_per_process_and_restored():
    """torch.onnx's registry reads onnxscript's torchlib list on each export (parsing every
    function's source); within ours it is read once and is the same list, and the exporter's own
    reader is back afterwards."""
    from torch.onnx._internal.exporter import _registration

    apis = _registration.onnxscript_apis
    plain = apis.get_torchlib_ops
    expected = [(m.qualified_name, m.function) for m in plain()]
    with onnx_export._torchlib_ops_read_once():
        first, second = apis.get_torchlib_ops(), apis.get_torchlib_ops()
        assert first is second
        assert [(m.qualified_name, m.function) for m in first] == expected
    assert apis.get_torchlib_ops is plain


def test_onnxruntime_runs_with_as_many_threads_as_torch(monkeypatch, tmp_path):
    """The parity check's session takes torch's thread count, not onnxruntime's default (every core)."""
    import onnxruntime

    seen, real = [], onnxruntime.InferenceSession

    def session(path, options=None, **kwargs):
        seen.append(options.intra_op_num_threads)
        return real(path, options, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "linear.onnx"
    torch.onnx.export(model, (torch.ones(1, 3),), str(path), dynamo=True, verbose=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        run_onnx(path, [torch.ones(1, 3)])
    finally:
        torch.set_num_threads(threads)
    assert seen == [1]
