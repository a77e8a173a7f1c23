"""Streamed subcloning of a safetensors checkpoint folder (``sg.subclone_checkpoint``).

1. on every family of ``models/hf_zoo.py`` and ``models/hf_families.py``, saved sharded with
   ``save_pretrained``: the streamed scores equal the in-memory path's, and the streamed folder
   equals the one ``save_hf`` writes for ``sg.subclone``'s child, byte for byte (every file:
   shards, index, config, generation config, manifest), with the same config changes. Where
   ``save_hf`` cannot write the in-memory child as its parent's class, the streamed path
   refuses the same way and writes nothing, and the child without rescaling is compared instead
   (where the class cannot take the rescale's ε·D/d and the ε is folded into the stream's scale,
   both paths write the folded child: opt, gemma3, qwen3_moe — the streamed path refused or wrote
   the unfolded one before it used ``save_hf``'s writer);
   where the class cannot hold that child either (its shapes, or ops it cannot express), the
   streamed weights are compared with the class checks skipped. The MoE families, whose
   checkpoints store experts converted (one tensor per expert, fused at load time), are included;
2. in float16 and bfloat16, on every family: the one pipeline run on a graph holding the
   parent's weights (in memory) and on the same graph holding fake tensors read on demand
   (streamed) give the same scores and child tensors whose *bits* are equal — the edits applied
   now and the edit programs replayed from disk are one computation (one trace of each parent
   shared by both paths; one calibration batch);
2b. a bfloat16 parent gives a bfloat16 child whose reloaded outputs match the child graph;
3. the calibration state spilled to disk (a zero budget) gives the same child bit for bit (and,
   the child being larger than that budget, the written folder is checked segment by segment);
4. several output shards with an index when the shard size is small;
5. bad input — a missing shard, a truncated shard, a tensor whose shape disagrees with
   config.json — raises one line naming the file and the tensor, and writes nothing.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from subclone_graph.passes import state

import subclone_graph as sg
from subclone_graph.api import run_passes, subclone_passes
from subclone_graph.checkpoint.files import CheckpointReader
from subclone_graph.checkpoint.weightless_parent import CheckpointWeights, resident_copy, weightless_parent
from subclone_graph.export.hf import Written, child_state_dict
from subclone_graph.export.hf.write import write_folder
from subclone_graph.models import hf_families, hf_zoo

GQA = {"hidden": 32, "ffn": 64, "heads": 2, "kv_heads": 1, "layers": 2}
MHA = {"hidden": 32, "ffn": 64, "heads": 2, "layers": 2}
MHA_ZOO = {"gpt2", "bert", "vit"}
SLOW = {"mamba", "gemma2", "gemma3", "convnext", "deit", "granite", "starcoder2", "stablelm", "gptj", "distilbert",
        "vit", "phi3", "mistral", "qwen3", "olmo2", "cohere", "falcon", "bloom", "opt", "phi", "gpt_neox",
        "roberta", "gpt2_eager", "llama_eager", "mixtral", "qwen2_moe"}
NAMES = [*hf_zoo.HF_FACTORIES, *hf_families.FAMILIES]


def _param(name):
    marks = [pytest.mark.slow] if name in SLOW else []
    return pytest.param(name, marks=marks)


def _family(name):
    """(parent, target). The families' own targets keep the stream at 48 while 2 heads of 16 make
    32 query rows, which a class that derives its head width from the stream cannot hold (only the
    weights could be compared); here the stream goes to 32, so every class that can hold a child
    does, and whole folders are compared."""
    if name in hf_zoo.HF_FACTORIES:
        return hf_zoo.HF_FACTORIES[name](0), (MHA if name in MHA_ZOO else GQA)
    family = hf_families.FAMILIES[name]
    return family.build(0), {**family.target, "hidden": 32} if family.target.get("hidden") == 48 else family.target


def _reloaded(model, folder: Path, dtype=torch.float32):
    """The parent as a user loads it (the folder does not store a family's eager-attention choice)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return type(model).from_pretrained(folder, dtype=dtype).eval()


def _saved(model, folder: Path, shard: str = "20KB") -> Path:
    model.save_pretrained(folder, max_shard_size=shard)
    return folder


def _batches(model, count=3):
    return [hf_zoo.example_inputs(model, 2, 8, seed=s) for s in range(count)]


def _written(folder: Path) -> dict:
    reader = CheckpointReader(folder)
    return {name: reader.read(name) for name in reader.tensors}


def _assert_same_child(reference, folder: Path) -> None:
    """The written tensors are the child's, bit for bit; a name the class ties to a stored one
    (an output head) is stored once, under the first."""
    expected, written = child_state_dict(reference), _written(folder)
    assert set(written) <= set(expected)
    stored = {expected[n].data_ptr(): n for n in written if expected[n].numel()}
    for name, tensor in expected.items():
        if name not in written:
            assert stored.get(tensor.data_ptr()) is not None, f"{name} is neither stored nor tied to a stored tensor"
            continue
        assert written[name].dtype == tensor.dtype, name
        assert torch.equal(written[name], tensor), name


def _assert_same_folder(a: Path, b: Path) -> None:
    """Two folders holding the same files with the same bytes."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs"


def _traced(model, inputs):
    """The parent traced once for every comparison of a test (``sg.subclone`` copies it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sg.trace(model, inputs)


def _compared(traced, parent, target, calibration, inputs, folder: Path, rescale: bool, limit: float = 1e-4) -> bool:
    """Subclone in memory and streamed; False when both refuse to write the child as the class."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # fixed_sizes: the parity of the two paths at the traced size (Mamba's trace pins its length)
        reference = sg.subclone(traced, inputs, sg.Target(**target), calibration=calibration, rescale=rescale,
                                fixed_sizes=True)
    try:
        saved = sg.save_hf(reference, folder / "in-memory", shard_size=20_000)
    except sg.HFExportError:
        with pytest.raises(sg.HFExportError):
            sg.subclone_checkpoint(parent, folder / "child", sg.Target(**target), calibration,
                                   example_inputs=inputs, rescale=rescale, fixed_sizes=True)
        assert not (folder / "child").exists()
        return False
    report = sg.subclone_checkpoint(parent, folder / "child", sg.Target(**target), calibration,
                                    example_inputs=inputs, rescale=rescale, shard_size=20_000,
                                    fixed_sizes=True)
    scores = state.SCORES.need(reference)
    assert set(report.scores) == set(scores)
    assert all(torch.equal(report.scores[g], scores[g]) for g in scores)
    _assert_same_folder(folder / "in-memory", folder / "child")       # one writer: the same bytes
    assert [str(c) for c in report.config_changes] == [str(c) for c in saved.config_changes]
    assert report.max_difference == saved.max_difference <= limit
    return True


@pytest.mark.parametrize("name", [_param(n) for n in NAMES])
def test_streamed_child_equals_the_in_memory_child(name, tmp_path, monkeypatch):
    model, target = _family(name)
    parent = _saved(model, tmp_path / "parent")
    assert len(list(parent.glob("model-*.safetensors"))) > 1          # really sharded
    calibration, inputs = _batches(model), hf_zoo.example_inputs(model, 2, 8)
    traced = _traced(_reloaded(model, parent), inputs)
    if _compared(traced, parent, target, calibration, inputs, tmp_path / "rescaled", True):
        return
    # the class cannot express the √(D/d) multiply: the child without it is compared
    if _compared(traced, parent, target, calibration, inputs, tmp_path / "plain", False):
        return
    # nor the child at all (its shapes or ops): the streamed weights are still the in-memory child's
    _compare_weights_only(traced, parent, target, calibration, inputs, tmp_path / "weights", monkeypatch)


def _compare_weights_only(traced, parent, target, calibration, inputs, folder: Path, monkeypatch):
    """The streamed child's weights and scores with the class checks (config, reload) skipped."""
    import subclone_graph.checkpoint.streamed as streaming

    def write_weights(gm, staged, out_dir, shard_size, *, weights, parent_folder, **_):
        staged.mkdir()
        try:
            write_folder(gm, staged, weights, shard_size=shard_size, parent_folder=parent_folder)
        except sg.HFExportError:          # raised after the shards are written: no config fits
            pass
        return Written(None, {}), 0.0

    monkeypatch.setattr(streaming, "write_checked", write_weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = sg.subclone(traced, inputs, sg.Target(**target), calibration=calibration, fixed_sizes=True)
    report = sg.subclone_checkpoint(parent, folder / "child", sg.Target(**target), calibration,
                                    example_inputs=inputs, fixed_sizes=True)
    scores = state.SCORES.need(reference)
    assert set(report.scores) == set(scores)
    assert all(torch.equal(report.scores[g], scores[g]) for g in scores)
    _assert_same_child(reference, folder / "child")


def _cast(inputs, dtype):
    return tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)


def _trained_like(model) -> None:
    """Norm gains and biases away from their initial values (a ``(1 + w)`` gain at w = 0 rounds
    the same way however it is computed: an untrained parent would hide a second rounding)."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().view(-1).view(torch.uint8) if tensor.numel() else tensor


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", [_param(n) for n in NAMES])
def test_half_precision_children_are_bit_identical_in_memory_and_streamed(name, dtype, tmp_path):
    model, target = _family(name)
    _trained_like(model)
    parent = _saved(model.to(dtype), tmp_path / "parent", "200KB")
    inputs = _cast(hf_zoo.example_inputs(model, 2, 8), dtype)
    weights = CheckpointWeights()
    streamed = weightless_parent(parent, weights.open(parent), inputs)
    in_memory = resident_copy(streamed, weights)
    run_passes(in_memory, subclone_passes(sg.Target(**target), [inputs]))
    run_passes(streamed, subclone_passes(sg.Target(**target), [inputs], weights=weights))
    scores = state.SCORES.need(in_memory)
    assert all(torch.equal(scores[g], state.SCORES.need(streamed)[g]) for g in scores)
    expected = in_memory.state_dict(keep_vars=True)
    written = streamed.state_dict(keep_vars=True)
    assert expected.keys() == written.keys()
    for key, tensor in expected.items():
        replayed = weights.tensor(streamed, written[key], key)
        assert replayed.dtype == tensor.dtype and replayed.shape == tensor.shape, key
        assert torch.equal(_bits(replayed), _bits(tensor)), f"{key}: the replayed program differs in {dtype}"


@pytest.mark.parametrize("name", ["gemma", "qwen3_moe"])
def test_bfloat16_folders_are_byte_identical_in_memory_and_streamed(name, tmp_path):
    """A narrower-stream child with trained-like (1 + w) gains and a folded embedding scale
    (Gemma), and a mixture of experts: one writer, the same bytes in bfloat16 too."""
    model, target = _family(name)
    _trained_like(model)
    parent = _saved(model.to(torch.bfloat16), tmp_path / "parent")
    calibration, inputs = _batches(model, 2), hf_zoo.example_inputs(model, 2, 8)
    traced = _traced(_reloaded(model, parent, torch.bfloat16), inputs)
    assert _compared(traced, parent, target, calibration, inputs, tmp_path / "bf16", True, limit=3e-2 * 100)


def test_bfloat16_parent_gives_a_bfloat16_child(tmp_path):
    model = hf_zoo.llama(0).to(torch.bfloat16)
    parent = _saved(model, tmp_path / "parent")
    calibration = _batches(model)
    report = sg.subclone_checkpoint(parent, tmp_path / "child", sg.Target(**GQA), calibration)
    written = _written(tmp_path / "child")
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "child" / "config.json").read_text())["dtype"] == "bfloat16"
    assert report.max_difference <= 16 * torch.finfo(torch.bfloat16).eps * 100
    child = type(model).from_pretrained(tmp_path / "child")
    assert child.dtype == torch.bfloat16 and child.config.hidden_size == GQA["hidden"]


def test_spilling_the_calibration_state_changes_nothing(tmp_path, monkeypatch):
    import subclone_graph.export.hf.check as checker

    model = hf_zoo.llama(0)
    parent = _saved(model, tmp_path / "parent")
    calibration, target = _batches(model), sg.Target(**GQA)
    kept = sg.subclone_checkpoint(parent, tmp_path / "kept", target, calibration)
    spill, by_segments = tmp_path / "spill", []
    real = checker._run_by_segments
    monkeypatch.setattr(checker, "_run_by_segments", lambda *args: by_segments.append(1) or real(*args))
    spilled = sg.subclone_checkpoint(parent, tmp_path / "spilled", target, calibration, memory_budget=0,
                                     spill_dir=spill)
    assert by_segments == [1]                          # a child over the budget: checked segment by segment
    assert kept.spilled_bytes == 0 and spilled.spilled_bytes > 0 and spilled.calibration_bytes == 0
    assert all(torch.equal(kept.scores[g], spilled.scores[g]) for g in kept.scores)
    a, b = _written(tmp_path / "kept"), _written(tmp_path / "spilled")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(spill.iterdir())                    # the spill files are gone


def test_small_shard_size_writes_an_index(tmp_path):
    model = hf_zoo.llama(0)
    parent = _saved(model, tmp_path / "parent")
    sg.subclone_checkpoint(parent, tmp_path / "child", sg.Target(**GQA), _batches(model), shard_size=10_000)
    index = json.loads((tmp_path / "child" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "child").glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    assert set(index["weight_map"].values()) == set(shards)
    assert type(model).from_pretrained(tmp_path / "child").config.hidden_size == GQA["hidden"]


def _broken(tmp_path, damage) -> tuple[Path, str, list[str]]:
    model = hf_zoo.llama(0)
    parent = _saved(model, tmp_path / "parent")
    index = json.loads((parent / "model.safetensors.index.json").read_text())["weight_map"]
    file = index["model.layers.1.mlp.up_proj.weight"]
    damage(parent, file)
    return parent, file, [t for t, f in index.items() if f == file]


def _missing(parent, file):
    (parent / file).unlink()


def _truncated(parent, file):
    data = (parent / file).read_bytes()
    (parent / file).write_bytes(data[:-10])


def _wrong_shape(parent, file):
    config = json.loads((parent / "config.json").read_text())
    config["intermediate_size"] += 8            # every MLP weight now disagrees; the first is named
    (parent / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage", [_missing, _truncated, _wrong_shape])
def test_bad_checkpoint_is_one_line_naming_file_and_tensor(damage, tmp_path):
    parent, file, tensors = _broken(tmp_path, damage)
    with pytest.raises(sg.CheckpointError) as error:
        sg.subclone_checkpoint(parent, tmp_path / "child", sg.Target(**GQA), _batches(hf_zoo.llama(0)))
    message = str(error.value)
    assert "\n" not in message and ".safetensors" in message and " model." in message
    if damage is not _wrong_shape:
        assert file in message and any(t in message for t in tensors)
    else:
        assert "mlp" in message and "shape" in message
    assert not (tmp_path / "child").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["parent"]        # no staging folder left either
