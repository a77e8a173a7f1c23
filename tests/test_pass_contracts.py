"""One shared check per pass, in the style of torch's pass tests (``test_cse_pass.check``):

- ``modified`` is true exactly when the graph or its tensors changed;
- a second run changes nothing (``modified`` false, same code and tensors);
- the outputs stay equal where the pass promises it (analysis passes, and rewrites on planted
  dead structure);
- ``ensures()`` catches its invariant broken on purpose (``PostconditionError``).
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import subclone_graph as sg
from subclone_graph import models
from subclone_graph.passes import state
from subclone_graph.passes.errors import PostconditionError
from subclone_graph.passes.fx_utils import get_attribute, set_attribute
from subclone_testing import calibration, run

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

TARGET = sg.Target(hidden=48, ffn=64, heads=2, kv_heads=1, layers=3)


def fingerprint(gm) -> tuple:
    return gm.code, tuple((k, v.shape, float(v.double().sum())) for k, v in sorted(gm.state_dict().items()))


def check_pass(gm, make_pass, inputs, *, promises_equal_outputs: bool) -> None:
    before, expected = fingerprint(gm), run(gm, inputs)
    result = make_pass()(gm)
    assert result.graph_module is gm                         # in place, as declared
    assert result.modified == (fingerprint(gm) != before)
    if promises_equal_outputs:
        assert torch.equal(run(gm, inputs), expected)
    again = fingerprint(gm)
    assert make_pass()(gm).modified is False
    assert fingerprint(gm) == again


def planned(name="llama_like", target=TARGET):
    """A traced model analysed, scored and decided (up to the rewrites)."""
    model, inputs = models.build(name)
    gm = sg.trace(model, inputs)
    for p in sg.subclone_passes(target, calibration(model))[:4]:
        p(gm)
    return gm, inputs


def test_analysis_passes_modify_nothing_and_run_twice_alike():
    model, inputs = models.build("llama_like")
    gm = sg.trace(model, inputs)
    for make in (sg.FindResidualBlocksPass, sg.AnalyzeChannelsPass, lambda: sg.ScoreChannelsPass(calibration(model)),
                 lambda: sg.ChooseKeepPass(TARGET)):
        check_pass(gm, make, inputs, promises_equal_outputs=True)


def test_drop_blocks_contract():
    gm, inputs = planned()
    check_pass(gm, sg.DropBlocksPass, inputs, promises_equal_outputs=False)
    assert len(state.LAYERS.need(gm)) == 3


def test_duplicate_layers_contract():
    gm, inputs = planned(target=sg.Target(layers=6))
    check_pass(gm, sg.DuplicateLayersPass, inputs, promises_equal_outputs=False)
    assert len(state.LAYERS.need(gm)) == 6


def test_keep_channels_contract():
    gm, inputs = planned()
    check_pass(gm, sg.KeepChannelsPass, inputs, promises_equal_outputs=False)


def test_rescale_residual_contract():
    gm, inputs = planned()
    sg.DropBlocksPass()(gm)
    sg.KeepChannelsPass()(gm)
    check_pass(gm, sg.RescaleResidualPass, inputs, promises_equal_outputs=False)


def test_rewrites_that_change_nothing_report_nothing():
    gm, inputs = planned(target=sg.Target())
    for make in (sg.DropBlocksPass, sg.DuplicateLayersPass, sg.KeepChannelsPass, sg.RescaleResidualPass):
        check_pass(gm, make, inputs, promises_equal_outputs=True)


# ----- ensures() sees its invariant broken on purpose --------------------------------------------
def test_keep_channels_ensures_catches_an_unsliced_tensor():
    gm, _ = planned()
    sg.DropBlocksPass()(gm)
    keep_pass = sg.KeepChannelsPass()
    keep_pass(gm)
    node = next(n for n in gm.graph.nodes if n.op == "get_attr" and get_attribute(gm, n.target).dim() == 2)
    tensor = get_attribute(gm, node.target)
    set_attribute(gm, node.target, torch.nn.Parameter(torch.zeros(tensor.shape[0] + 1, tensor.shape[1])))
    with pytest.raises(PostconditionError, match="KeepChannelsPass: .* has shape"):
        keep_pass.ensures(gm)


def test_keep_channels_ensures_catches_a_stale_literal():
    gm, _ = planned()
    sg.DropBlocksPass()(gm)
    keep_pass = sg.KeepChannelsPass()
    keep_pass(gm)
    graph, sizes = state.CHANNEL_GRAPH.need(gm), state.SIZES.need(gm)
    for node in gm.graph.nodes:
        literals = state.LITERALS.of(node, graph)
        if node.target is torch.ops.aten.view.default and literals is not None:
            shape, vertices = list(node.args[1]), literals.vertices[1]
            for i, vertex in enumerate(vertices):
                if isinstance(shape[i], int) and sizes.get(graph.find(vertex), 0) > 1:
                    shape[i] += 1
                    node.args = (node.args[0], shape)
                    with pytest.raises(PostconditionError, match="holds the size"):
                        keep_pass.ensures(gm)
                    return
    pytest.fail("no view with a literal size found")


def test_drop_blocks_ensures_catches_a_left_node_and_a_stale_site():
    gm, _ = planned()
    drop = sg.DropBlocksPass()
    dropped = state.LAYERS.need(gm)[state.DROP.need(gm)[0]].key
    drop(gm)
    sites = state.ATTENTION.need(gm)
    state.ATTENTION.set(gm, sites + (dataclasses.replace(sites[0], node="erased_node"),))
    with pytest.raises(PostconditionError, match="attention site erased_node"):
        drop.ensures(gm)
    state.ATTENTION.set(gm, sites)
    kept = next(n for n in gm.graph.nodes if n.op == "call_function" and n.meta.get("nn_module_stack")
                and isinstance(n.meta.get("val"), torch.Tensor))
    stack = dict(kept.meta["nn_module_stack"])
    stack["dropped"] = (dropped, object)
    kept.meta = {**kept.meta, "nn_module_stack": stack}
    with pytest.raises(PostconditionError, match="of a dropped layer is still in the graph"):
        drop.ensures(gm)


def test_duplicate_layers_ensures_catches_a_wrong_count():
    gm, _ = planned(target=sg.Target(layers=6))
    duplicate = sg.DuplicateLayersPass()
    duplicate(gm)
    state.LAYERS.set(gm, state.LAYERS.need(gm)[:-1])
    with pytest.raises(PostconditionError, match="DuplicateLayersPass: 5 layers"):
        duplicate.ensures(gm)


def test_rescale_residual_ensures_catches_a_missed_norm():
    gm, _ = planned()
    sg.DropBlocksPass()(gm)
    sg.KeepChannelsPass()(gm)
    rescale = sg.RescaleResidualPass()
    rescale(gm)
    rescale.handled.discard(sorted(rescale.handled)[0])
    with pytest.raises(PostconditionError, match="got no √\\(D/d\\) correction"):
        rescale.ensures(gm)


def test_choose_keep_ensures_catches_a_wrong_size():
    gm, _ = planned()
    choose = sg.ChooseKeepPass(TARGET)
    choose(gm)
    graph = state.CHANNEL_GRAPH.need(gm)
    residual = next(g for g in graph.groups.values() if g.kind == "residual")
    state.SIZES.set(gm, {**state.SIZES.need(gm), residual.id: 47})
    with pytest.raises(PostconditionError, match="residual group .* gets 47"):
        choose.ensures(gm)


def test_passes_run_in_torchs_pass_manager_with_the_same_guarantees():
    from torch.fx.passes.infra.pass_manager import PassManager

    model, inputs = models.build("llama_like")
    passes = sg.subclone_passes(TARGET, calibration(model))
    manager = PassManager(passes, run_checks_after_each_pass=True)
    manager.add_checks(lambda gm: gm.graph.lint())
    child = manager(sg.trace(model, inputs)).graph_module
    reference = sg.subclone(model, inputs, TARGET, calibration(model))
    assert torch.equal(run(child, inputs), run(reference, inputs))
    assert copy.deepcopy(child) is not child


def test_move_to_device_ensures_catches_a_left_device_literal():
    model, inputs = models.build("llama_like")
    gm = sg.trace(model, inputs)
    move = sg.MoveToDevicePass("meta")
    move(gm)
    node = next(n for n in gm.graph.nodes if isinstance(n.kwargs.get("device"), torch.device))
    node.kwargs = {**node.kwargs, "device": torch.device("cpu")}
    with pytest.raises(PostconditionError, match="MoveToDevicePass: node .* still names"):
        move.ensures(gm)
