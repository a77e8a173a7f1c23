"""MoveToDevicePass: a traced child runs on the device it is moved to, and computes the same.

This machine has no GPU, so the move is checked with the ``meta`` device: a plain
``module.to("meta")`` leaves ``device=cpu`` literals in the graph and the child fails on its
first call; after the pass it runs and gives the right shapes. Where CUDA is present the moved
child's outputs are compared with the CPU child's.
"""
import copy

import pytest
import torch

import subclone_graph as sg
from subclone_graph import models
from subclone_graph.passes.rewrite.move_to_device import MoveToDevicePass

from subclone_testing import output_tensor, run


@pytest.fixture(scope="module")
def child():
    model, inputs = models.build("llama")
    return model, sg.subclone(model, inputs, sg.Target(hidden=48, layers=2, kv_heads=1, ffn=64))


def _device_literals(gm):
    found = []
    for node in gm.graph.nodes:
        torch.fx.node.map_aggregate((node.args, node.kwargs),
                                    lambda v: found.append(v) if isinstance(v, torch.device) else None)
    return found


def test_plain_to_leaves_the_traced_device_behind(child):
    model, gm = child
    moved = copy.deepcopy(gm).to("meta")
    assert torch.device("cpu") in _device_literals(moved)
    with pytest.raises(Exception):
        moved(*[t.to("meta") for t in models.make_inputs(model, 2, 9)])


def test_moved_child_runs_on_the_new_device(child):
    model, gm = child
    moved = copy.deepcopy(gm)
    result = MoveToDevicePass("meta")(moved)
    assert result.modified and result.graph_module is moved
    assert set(_device_literals(moved)) == {torch.device("meta")}
    assert all(t.is_meta for t in (*moved.parameters(), *moved.buffers()))
    inputs = models.make_inputs(model, 3, 11)
    out = output_tensor(moved(*[t.to("meta") for t in inputs]))
    assert out.is_meta and out.shape == run(gm, inputs).shape
    assert not MoveToDevicePass("meta")(moved).modified        # a second run changes nothing


def test_same_device_is_a_no_op(child):
    model, gm = child
    moved = copy.deepcopy(gm)
    inputs = models.make_inputs(model, 2, 7)
    assert not MoveToDevicePass("cpu")(moved).modified
    torch.testing.assert_close(run(moved, inputs), run(gm, inputs), rtol=0, atol=0)


def test_bad_device_is_one_line():
    with pytest.raises(sg.PassError, match="'gpu9' is not a device"):
        MoveToDevicePass("gpu9")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_child_matches_cpu(child):
    model, gm = child
    moved = sg.move_to_device(copy.deepcopy(gm), "cuda")
    inputs = models.make_inputs(model, 2, 9)
    out = run(moved, [t.cuda() for t in inputs]).cpu()
    torch.testing.assert_close(out, run(gm, inputs), rtol=1e-4, atol=1e-4)
