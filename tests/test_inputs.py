"""Bad input gets a one-line ValueError/TypeError naming the field (or op and module)."""
from __future__ import annotations

import pytest
import torch

import subclone_graph as sg
from subclone_graph import models
from subclone_testing import run


@pytest.fixture(scope="module")
def parent():
    return models.build("llama")


def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize("target, match", [
    # above the parent's size is a growth by cloning: an integer multiple, or refused
    (dict(hidden=1000), r"Target.hidden=1000 cannot grow a width of 64 by cloning: not a whole multiple of it "
                        r"\(allowed: 128, 192, …, or a factor: Times\(n\), xN on the command line\)"),
    (dict(ffn=4000), r"Target.ffn=4000 cannot grow a width of 128 by cloning"),
    (dict(heads=6), r"Target.heads=6 cannot grow a width of 4 by cloning"),
    (dict(heads=3), r"Target.heads=3 does not fit the kv grouping: the parent has 4 query heads in 2 kv groups"),
    (dict(heads=4, kv_heads=3), r"Target.heads=4 does not fit the kv grouping: 3 kv groups"),
    (dict(heads=4, kv_heads=4), r"growing one of query heads and kv heads while shrinking the other is refused"),
    (dict(experts=8), r"this model has no experts channel group"),
])
def test_impossible_targets_name_the_field(parent, target, match):
    model, inputs = parent
    with pytest.raises(ValueError, match=match) as error:
        sg.subclone(model, inputs, sg.Target(**target))
    _one_line(error)


@pytest.mark.parametrize("field", ["hidden", "layers", "heads", "kv_heads", "ffn"])
def test_zero_or_negative_sizes_are_refused(field):
    with pytest.raises(ValueError, match=rf"Target.{field}=0: must be at least 1") as error:
        sg.Target(**{field: 0})
    _one_line(error)
    with pytest.raises(TypeError, match=rf"Target.{field} must be an int, a fraction in \(0, 1\), Times\(n\) or None, got str"):
        sg.Target(**{field: "8"})


def test_mha_model_refuses_kv_heads_different_from_heads():
    model, inputs = models.build("gpt2")
    with pytest.raises(ValueError, match=r"Target.kv_heads=1 must equal Target.heads=2") as error:
        sg.subclone(model, inputs, sg.Target(heads=2, kv_heads=1))
    _one_line(error)


@pytest.mark.parametrize("drop, match", [([3], r"index 3 is out of range; allowed: 0..2"),
                                         ([-1], r"index -1 is out of range"),
                                         ([0, 1, 2], r"removes all 3 layers")])
def test_drop_layers_out_of_range(parent, drop, match):
    model, inputs = parent
    with pytest.raises(ValueError, match=match) as error:
        sg.subclone(model, inputs, drop_layers=drop)
    _one_line(error)


def test_calibration_inputs_of_the_wrong_shape(parent):
    model, inputs = parent
    bad = [(torch.randint(0, 97, (2, 8, 3)),)]
    with pytest.raises(ValueError, match=r"calibration batch 0, input 0 \(\w+\): expected shape") as error:
        sg.subclone(model, inputs, sg.Target(ffn=64), calibration=bad)
    _one_line(error)
    with pytest.raises(ValueError, match=r"calibration batch 1: .*expected|calibration batch 1: inputs do not match"):
        sg.subclone(model, inputs, sg.Target(ffn=64), calibration=[inputs, (inputs[0], inputs[0])])


def test_measured_depth_needs_calibration(parent):
    model, inputs = parent
    with pytest.raises(ValueError, match=r'depth="measured" needs calibration data'):
        sg.subclone(model, inputs, sg.Target(layers=2), depth="measured")


def test_unknown_depth_and_selection(parent):
    model, inputs = parent
    with pytest.raises(ValueError, match=r"depth='deep': allowed values are middle, measured, first"):
        sg.subclone(model, inputs, depth="deep")
    with pytest.raises(ValueError, match=r"selection='best': allowed values are score, first, uniform"):
        sg.subclone(model, inputs, selection="best")
    with pytest.raises(TypeError, match=r"target must be a subclone_graph.Target, got dict"):
        sg.subclone(model, inputs, {"hidden": 32})


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        if self.proj(x).sum() > 0:          # control flow on a value: export cannot trace it
            return x * 2
        return x


def test_an_untraceable_model_names_itself_and_the_construct():
    with pytest.raises(ValueError, match=r"could not trace DataDependent: \w+") as error:
        sg.subclone(DataDependent(), (torch.randn(2, 8),))
    _one_line(error)


def test_a_non_module_is_a_type_error():
    with pytest.raises(TypeError, match=r"expected a torch.nn.Module, GraphModule or ExportedProgram, got str"):
        sg.subclone("model.bin", (torch.zeros(1),))


def test_the_parent_is_left_untouched(parent):
    model, inputs = parent
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = run(model, inputs)
    sg.subclone(model, inputs, sg.Target(hidden=32, ffn=64, heads=2, kv_heads=1, layers=2), calibration=[inputs])
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(run(model, inputs), reference)


class _PerPosition(torch.nn.Module):
    """A recurrence written as a Python loop over the sequence: export fixes the length."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 8)
        self.mix = torch.nn.Linear(8, 8)

    def forward(self, ids):
        x = self.embed(ids)
        state, outs = torch.zeros_like(x[:, 0]), []
        for t in range(ids.shape[1]):
            state = torch.tanh(self.mix(state) + x[:, t])
            outs.append(state)
        return torch.stack(outs, 1)


def test_an_axis_the_model_fixes_is_named_at_trace_time():
    ids = torch.randint(0, 11, (2, 5))
    with pytest.warns(UserWarning, match=r"_PerPosition fixes axis 1 of input ids at 5 .*run at that size only"):
        gm = sg.trace(_PerPosition(), (ids,))
    assert run(gm, (torch.randint(0, 11, (3, 5)),)).shape == (3, 5, 8)     # the batch stays dynamic


def test_a_depth_change_without_residual_layers_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    with pytest.raises(sg.PassError, match="no residual layers .* depth cannot change") as error:
        sg.subclone(model, (torch.randn(2, 8),), sg.Target(layers=1))
    _one_line(error)


class _CacheByDefault(torch.nn.Module):
    """A forward that returns a cache object unless told not to, with no top-level config flag
    (a composite model's flag sits on its text sub-config)."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11)

    def forward(self, ids, use_cache=True):
        from transformers import DynamicCache
        logits = self.head(self.embed(ids))
        return (logits, DynamicCache()) if use_cache else (logits,)


def test_use_cache_is_turned_off_wherever_forward_takes_it():
    ids = torch.randint(0, 11, (2, 5))
    gm = sg.trace(_CacheByDefault().eval(), (ids,))
    out = gm(torch.randint(0, 11, (3, 7)))
    assert isinstance(out, tuple) and len(out) == 1 and out[0].shape == (3, 7, 11)
