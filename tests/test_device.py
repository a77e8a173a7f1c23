"""``--device`` / ``device=``: calibration on a moved copy of the traced graph, the child on the
CPU and equal to a CPU run; an unavailable device is a one-line error."""
from __future__ import annotations

import pytest
import torch

import subclone_graph as sg
from subclone_graph.cli.main import main
from subclone_graph.passes.analysis.segments import ResidentWeights, run_segments
from subclone_graph.runtime.device import resolve_device
from subclone_graph.models import TinyLlama
from subclone_graph.passes import state

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
without_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")


def _parent():
    torch.manual_seed(0)
    model = TinyLlama().eval()
    batches = [(torch.randint(0, model.vocab, (2, 8), generator=torch.Generator().manual_seed(i)),) for i in range(3)]
    return model, batches


def test_resolve_device_names_and_auto():
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="'gpu0': not a device"):
        resolve_device("gpu0")


@without_cuda
def test_an_unavailable_cuda_device_is_a_one_line_error(tmp_path, capsys):
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device(spec)
    model, batches = _parent()
    with pytest.raises(ValueError, match="CUDA is not available"):
        sg.subclone(model, batches[0], sg.Target(hidden=32), calibration=batches, device="cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        sg.subclone_checkpoint(tmp_path / "missing", tmp_path / "out", calibration=batches, device="cuda")
    code = main(["run", "subclone_graph.models:TinyLlama", "--hidden", "32", "--device", "cuda",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "device 'cuda': CUDA is not available" in err
    assert not (tmp_path / "out").exists()


def test_the_runner_moves_weights_and_inputs_and_leaves_the_traced_graph_where_it_was():
    model, batches = _parent()
    gm = sg.trace(model, batches[0])
    seen = set()
    outputs = run_segments(gm, [list(batches[0])], ResidentWeights(), device="meta",
                           observe=lambda node, value, env: seen.add(value.device.type)
                           if isinstance(value, torch.Tensor) else None)
    assert seen == {"meta"} and all(o.device.type == "meta" for o in outputs[0] if isinstance(o, torch.Tensor))
    assert all(p.device.type == "cpu" for p in gm.parameters())


def test_cpu_device_gives_the_default_child_bit_for_bit():
    model, batches = _parent()
    target = sg.Target(hidden=48, ffn=96, heads=2, kv_heads=1)
    default = sg.subclone(model, batches[0], target, calibration=batches)
    on_cpu = sg.subclone(model, batches[0], target, calibration=batches, device="cpu")
    assert {k: v.tolist() for k, v in state.KEEP.need(default).items()} == \
        {k: v.tolist() for k, v in state.KEEP.need(on_cpu).items()}
    for name, tensor in default.state_dict().items():
        assert torch.equal(tensor, on_cpu.state_dict()[name])


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_calibration_chooses_the_cpu_keep_sets_and_returns_a_cpu_child(dtype):
    model, batches = _parent()
    model = model.to(dtype)
    target = sg.Target(hidden=48, ffn=96, heads=2, kv_heads=1)
    on_cpu = sg.subclone(model, batches[0], target, calibration=batches)
    on_gpu = sg.subclone(model, batches[0], target, calibration=batches, device="cuda")
    assert all(p.device.type == "cpu" for p in on_gpu.parameters())
    assert {k: v.tolist() for k, v in state.KEEP.need(on_cpu).items()} == \
        {k: v.tolist() for k, v in state.KEEP.need(on_gpu).items()}
    for name, tensor in on_cpu.state_dict().items():
        assert torch.equal(tensor, on_gpu.state_dict()[name])
