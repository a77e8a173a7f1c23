"""Reading parameters a checkpoint stores converted (``subclone_graph.checkpoint.converted``).

1. on every family of ``models/hf_families.py`` whose checkpoint ``transformers`` stores converted
   (per-expert tensors fused at load time), every converted parameter read whole equals the one
   ``from_pretrained`` builds, bit for bit, and read cut to per-dim kept indices (unsorted, with
   duplicates) equals that parameter cut the same way; a per-expert (experts, k) take on the
   inner dim, replayed (``tensor_edits.EditProgram``), equals each kept expert cut to its own rows; also with 12 experts (loading's natural
   order of expert numbers is not the sorted order) and in bfloat16;
2. a fused (experts, 2·inner, hidden) tensor cut to kept experts and kept inner rows reads only
   the kept rows of the kept experts' gate and up tensors: the reads asked of the checkpoint are
   exactly those, and the bytes read are exactly their size;
3. a conversion operation the reader does not replay is refused with one line naming the op and
   the tensor, and nothing is written; a checkpoint missing one expert's tensor is refused with
   one line naming the file and the tensor.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import subclone_graph as sg
from subclone_graph.checkpoint.files import CheckpointReader
from subclone_graph.models import hf_families, hf_zoo
from subclone_graph.checkpoint.converted import ConvertingReader, Joined
from subclone_graph.checkpoint.weightless_parent import parent_class
from subclone_graph.passes.tensor_edits import EditProgram, Take

MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "glm4_moe"]


def _saved(name: str, folder: Path, shard: str = "20KB", experts: int | None = None, dtype=torch.float32):
    model = hf_families.FAMILIES[name].build(0)
    if experts is not None:         # more than 10: loading's natural key order differs from sorted order
        model.config.num_experts = experts
        torch.manual_seed(1)
        model = type(model)(model.config).eval()
    model = model.to(dtype)
    model.save_pretrained(folder, max_shard_size=shard)
    return model


def _loaded(folder: Path) -> dict:
    from transformers.utils import logging as hf_logging

    _, cls = parent_class(folder)
    hf_logging.set_verbosity_error()
    return dict(cls.from_pretrained(folder).named_parameters())


def _converting_reader(folder: Path) -> ConvertingReader:
    from accelerate import init_empty_weights

    config, cls = parent_class(folder)
    with init_empty_weights(include_buffers=False):
        model = cls(config)
    reader = ConvertingReader(CheckpointReader(folder))
    reader.learn(model, [n for n, _ in model.named_parameters()])
    return reader


def _cut(tensor: torch.Tensor, index: tuple) -> torch.Tensor:
    for dim, kept in enumerate(index):
        if kept is not None:
            tensor = tensor.index_select(dim, kept)
    return tensor


@pytest.mark.parametrize("name, experts, dtype", [*((n, None, torch.float32) for n in MOE),
                                                   ("qwen3_moe", 12, torch.float32), ("mixtral", None, torch.bfloat16)],
                         ids=lambda v: str(v).removeprefix("torch."))
def test_converted_parameters_read_as_from_pretrained_builds_them(name, experts, dtype, tmp_path):
    _saved(name, tmp_path, experts=experts, dtype=dtype)
    loaded, reader = _loaded(tmp_path), _converting_reader(tmp_path)
    assert {p.dtype for p in reader.plans.values()} == {dtype}
    assert reader.plans and all(isinstance(p, Joined) for p in reader.plans.values())
    assert all(n not in reader.tensors for n in reader.plans)        # only what is not stored as is
    assert any("gate_up" in n for n in reader.plans) and any("down" in n for n in reader.plans)
    generator = torch.Generator().manual_seed(0)
    for pname, plan in reader.plans.items():
        parameter = loaded[pname].detach()
        assert reader.info(pname).shape == tuple(parameter.shape)
        assert parameter.dtype == dtype and torch.equal(reader.read(pname), parameter), pname
        index = tuple(torch.randint(0, size, (max(1, size // 2) + 1,), generator=generator)
                      for size in parameter.shape)          # unsorted, may repeat, every dim cut
        assert torch.equal(reader.read(pname, index), _cut(parameter, index)), pname
        partial = (torch.tensor([3, 1]), None, torch.tensor([0, 5, 2]))
        assert torch.equal(reader.read(pname, partial), _cut(parameter, partial)), pname
        # per-expert rows, replayed entry by entry: expert 3 keeps rows (4, 0), expert 1 keeps rows (1, 2)
        program = EditProgram(pname, tuple(parameter.shape)).then(Take(0, torch.tensor([3, 1])))
        program = program.then(Take(1, torch.tensor([[4, 0], [1, 2]]), rows=0))
        expected = torch.stack([parameter[3][[4, 0]], parameter[1][[1, 2]]])
        assert torch.equal(program.replay(reader.read), expected), pname


def test_a_fused_expert_tensor_reads_only_its_kept_slices(tmp_path, monkeypatch):
    _saved("qwen3_moe", tmp_path)
    parameter = _loaded(tmp_path)["model.layers.1.mlp.experts.gate_up_proj"].detach()
    reader = _converting_reader(tmp_path)
    experts, fused, hidden = parameter.shape
    inner = fused // 2
    asked = []
    original = CheckpointReader.read

    def spy(self, key, index=()):
        asked.append((key, tuple(None if i is None else i.tolist() for i in index)))
        return original(self, key, index)

    monkeypatch.setattr(CheckpointReader, "read", spy)
    rows = [3, 4, 5, 6]
    index = (torch.tensor([2, 0]), torch.tensor(rows + [inner + r for r in rows]), None)
    before = reader.bytes_read
    got = reader.read("model.layers.1.mlp.experts.gate_up_proj", index)
    assert torch.equal(got, _cut(parameter, index))
    prefix = "model.layers.1.mlp.experts"
    assert sorted(asked) == sorted((f"{prefix}.{e}.{p}.weight", (rows, None))
                                   for e in (2, 0) for p in ("gate_proj", "up_proj"))
    assert reader.bytes_read - before == 2 * 2 * len(rows) * hidden * parameter.element_size()
    assert reader.bytes_read - before < parameter.numel() * parameter.element_size() // 4
    assert experts == 4


def test_an_unsupported_conversion_is_refused_with_one_line(tmp_path, monkeypatch):
    import transformers.conversion_mapping as mapping
    from transformers.core_model_loading import Interleave, WeightConverter

    model = _saved("qwen3_moe", tmp_path / "parent")
    real = mapping.get_model_conversion_mapping

    def with_interleave(model, *args, **kwargs):
        transforms = real(model, *args, **kwargs)
        for k, transform in enumerate(transforms):
            if isinstance(transform, WeightConverter) and len(transform.source_patterns) == 2:
                transforms[k] = WeightConverter(transform._original_source_patterns,
                                                transform._original_target_patterns,
                                                operations=[*transform.operations, Interleave(dim=1)])
        return transforms

    monkeypatch.setattr(mapping, "get_model_conversion_mapping", with_interleave)
    inputs = hf_zoo.example_inputs(model, 2, 8)
    with pytest.raises(sg.CheckpointError) as error:
        sg.subclone_checkpoint(tmp_path / "parent", tmp_path / "child", sg.Target(hidden=48), [inputs])
    message = str(error.value)
    assert "\n" not in message and "Interleave" in message and "experts.gate_up_proj" in message
    assert not (tmp_path / "child").exists()


def test_a_missing_expert_tensor_is_refused_with_one_line(tmp_path):
    model = _saved("qwen3_moe", tmp_path / "parent", shard="10GB")
    shard = tmp_path / "parent" / "model.safetensors"
    tensors = load_file(shard)
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    inputs = hf_zoo.example_inputs(model, 2, 8)
    with pytest.raises(sg.CheckpointError) as error:
        sg.subclone_checkpoint(tmp_path / "parent", tmp_path / "child", sg.Target(hidden=48), [inputs])
    message = str(error.value)
    assert "\n" not in message and str(shard) in message and "experts.gate_up_proj" in message
    assert "3 tensors from model.layers.1.mlp.experts.0.up_proj.weight" in message
    assert not (tmp_path / "child").exists()
    assert json.loads((tmp_path / "parent" / "config.json").read_text())["model_type"] == "qwen3_moe"
