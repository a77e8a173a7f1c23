"""Bad input in the Python API and on the command line, one line each; views as inputs; widths
rounded as the README says (issue 23).

1. ``drop_layers=5`` / ``drop_layers=[1.0]``, token ids outside the vocabulary, float ids,
   ``subclone_checkpoint`` with bad arguments: one-line ``TypeError`` / ``ValueError`` naming the
   argument, before anything runs;
2. an example input that is a view (``ids[:2, :8]``) and calibration batches that are views work
   like copies: the same child, bit for bit;
3. fractions round half up on exact rationals (``0.29 × 50 = 14.5 → 15``); ``Target(multiple_of=…)``
   / ``--multiple-of`` round widths from fractions and refuse an absolute width that is not a
   multiple;
4. grouped expert kernels (``torch._grouped_mm``: 16-byte strides): Mixtral at ``ffn=0.3`` gets an
   inner width of 38 unrounded; at ``ffn=0.27`` (34.56) 36 in float32 (a multiple of 4) and 32 in bfloat16 (of 8), and ``save_hf`` saves it;
   an absolute width that is not such a multiple is refused in one line naming the kernel.
"""
from __future__ import annotations

import pytest
import torch

import subclone_graph as sg
from subclone_graph.cli.main import main
from subclone_graph.models import hf_families, hf_zoo
from subclone_graph.passes.target import relative_size
from subclone_testing import relative_error, run

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def llama():
    model = hf_zoo.llama()
    return model, hf_zoo.example_inputs(model, 2, 8, 0)


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ----- 1. bad input in Python ---------------------------------------------------------------
@pytest.mark.parametrize("drop, kind, fragment", [
    (5, TypeError, "drop_layers=5: expected a list of layer indices"),
    ([1.0], TypeError, "1.0 is not a layer index"),
    ("1", TypeError, "expected a list of layer indices"),
    ([True], TypeError, "True is not a layer index"),
])
def test_drop_layers_that_are_not_indices(llama, drop, kind, fragment):
    model, example = llama
    with pytest.raises(kind) as error:
        sg.subclone(model, example, drop_layers=drop)
    assert fragment in _one_line(error)


def test_token_ids_outside_the_vocabulary_or_floats(llama):
    model, example = llama
    vocab = model.get_input_embeddings().num_embeddings
    with pytest.raises(ValueError) as error:
        sg.subclone(model, (torch.full((2, 8), vocab),), sg.Target(ffn=0.5))
    assert f"example_inputs holds token id {vocab}, outside the model's vocabulary 0..{vocab - 1}" in _one_line(error)
    with pytest.raises(ValueError) as error:
        sg.subclone(model, example, sg.Target(ffn=0.5), calibration=[example, (torch.full((2, 8), -3),)])
    assert "calibration batch 1 holds token id -3" in _one_line(error)
    with pytest.raises(TypeError) as error:
        sg.subclone(model, (example[0].float(),), sg.Target(ffn=0.5))
    assert "the first input is float32" in _one_line(error) and "token ids" in str(error.value)


def test_subclone_checkpoint_with_bad_arguments(llama, tmp_path):
    model, example = llama
    model.save_pretrained(tmp_path / "parent")
    vocab = model.get_input_embeddings().num_embeddings
    cases = [
        (dict(drop_layers=5), TypeError, "drop_layers=5"),
        (dict(drop_layers=[7]), ValueError, "out of range"),
        (dict(example_inputs=(torch.full((2, 8), vocab),)), ValueError, "outside the model's vocabulary"),
        (dict(example_inputs=(example[0].float(),)), TypeError, "token ids"),
        (dict(calibration=[]), ValueError, "calibration: no batches given"),
        (dict(calibration=[], example_inputs=None), ValueError, "give example_inputs"),
        (dict(target="small"), TypeError, "subclone_graph.Target"),
    ]
    for kwargs, kind, fragment in cases:
        arguments = {"calibration": None, "example_inputs": example, **kwargs}
        target = arguments.pop("target", sg.Target(ffn=0.5))
        with pytest.raises(kind) as error:
            sg.subclone_checkpoint(tmp_path / "parent", tmp_path / "child", target, **arguments)
        assert fragment in _one_line(error), kwargs
    assert not (tmp_path / "child").exists()


# ----- 1. bad input on the command line -------------------------------------------------------
def test_token_ids_from_a_factory_are_one_line_on_the_cli(tmp_path, monkeypatch, capsys):
    (tmp_path / "bad_ids_factory.py").write_text(
        "import torch\nfrom subclone_graph.models import hf_zoo\n"
        "def floats():\n    m = hf_zoo.llama()\n    return m, (torch.rand(2, 8),)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["run", "bad_ids_factory:floats", "--ffn", "0.5", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "token ids" in err, err
    assert not (tmp_path / "o").exists()


# ----- 2. views ------------------------------------------------------------------------------
def test_views_as_inputs_work_like_copies(llama):
    model, _ = llama
    ids = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(3))
    view = ids[:2, :8]
    assert view._base is not None
    batches = [(ids[2:4, :8],), (ids[:2, 8:],)]
    copies = [tuple(t.clone() for t in b) for b in batches]
    from_views = sg.subclone(model, (view,), sg.Target(ffn=0.5, hidden=48), calibration=batches)
    from_copies = sg.subclone(model, (view.clone(),), sg.Target(ffn=0.5, hidden=48), calibration=copies)
    assert {n: p.shape for n, p in from_views.named_parameters()} == {n: p.shape for n, p in from_copies.named_parameters()}
    assert all(torch.equal(a, b) for a, b in zip(from_views.parameters(), from_copies.parameters()))
    same = sg.subclone(model, (view,), sg.Target(ffn=0.5), calibration=[(view,)])     # calibrating on the slice
    other = torch.randint(0, 97, (3, 5))
    assert relative_error(run(same, (other,)), run(sg.subclone(model, (view.clone(),), sg.Target(ffn=0.5),
                                                              calibration=[(view.clone(),)]), (other,))) == 0


# ----- 3. rounding -------------------------------------------------------------------------------
def test_fractions_round_half_up_on_exact_rationals():
    assert 0.29 * 50 < 14.5                                     # the float is just below the half
    assert relative_size(0.29, 50) == 15 and relative_size(0.57, 50) == 29 and relative_size(0.7, 5) == 4
    assert relative_size(0.15, 10) == 2 and relative_size(0.35, 10) == 4 and relative_size(0.45, 10) == 5
    assert sg.Target(ffn=0.29).size_of("ffn", 50) == 15


def test_multiple_of_rounds_widths_from_fractions(llama):
    model, example = llama
    target = sg.Target(hidden=0.3, ffn=0.3, heads=0.5, multiple_of=8)
    assert target.size_of("hidden", 64) == 16 and target.size_of("ffn", 128) == 40
    assert target.size_of("heads", 4) == 2                      # counts are not rounded
    child = sg.subclone(model, example, target)
    widths = {p.shape[0] for n, p in child.named_parameters() if n.endswith("gate_proj.weight")}
    assert widths == {40} and child.get_parameter("model.embed_tokens.weight").shape[1] == 16
    with pytest.raises(ValueError) as error:
        sg.Target(ffn=100, multiple_of=64)
    assert "Target.ffn=100 is not a multiple of Target.multiple_of=64; give 64 or 128" == _one_line(error)
    with pytest.raises(ValueError):
        sg.Target(multiple_of=0)


def test_multiple_of_on_the_command_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "multiple_factory.py").write_text(
        "from subclone_graph.models import hf_zoo\n"
        "def llama():\n    m = hf_zoo.llama()\n    return m, hf_zoo.example_inputs(m, 2, 8, 0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "o"
    assert main(["run", "multiple_factory:llama", "--ffn", "0.3", "--multiple-of", "16", "--out", str(out)]) == 0
    child = sg.load(out / "child.pt2")
    assert {p.shape[0] for n, p in child.named_parameters() if n.endswith("gate_proj.weight")} == {32}
    capsys.readouterr()
    code = main(["run", "multiple_factory:llama", "--ffn", "40", "--multiple-of", "16", "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert code == 2 and "--ffn 40 is not a multiple of --multiple-of 16; give 32 or 48" in err, err


# ----- 4. grouped expert kernels -------------------------------------------------------------
@pytest.mark.parametrize("dtype, width", [(torch.float32, 36), (torch.bfloat16, 32)])
def test_grouped_expert_widths_are_rounded_for_the_kernel(dtype, width, tmp_path):
    model = hf_families.build("mixtral").to(dtype)
    example = hf_zoo.example_inputs(model, 2, 8, 0)
    child = sg.subclone(model, example, sg.Target(ffn=0.27))           # 0.27 × 128 = 34.56 → 35 unrounded
    downs = [p for n, p in child.named_parameters() if n.endswith("experts.down_proj")]
    assert downs and {p.shape[-1] for p in downs} == {width}
    assert width % (16 // torch.empty(0, dtype=dtype).element_size()) == 0
    loaded = type(model).from_pretrained(sg.save_hf(child, tmp_path / "hf"), dtype=dtype).eval()
    assert loaded.config.intermediate_size == width


def test_an_absolute_width_the_grouped_kernel_cannot_take_is_one_line():
    model = hf_families.build("mixtral")
    example = hf_zoo.example_inputs(model, 2, 8, 0)
    with pytest.raises(ValueError) as error:
        sg.subclone(model, example, sg.Target(ffn=38))
    assert _one_line(error) == ("Target.ffn=38: this model's expert matmuls (torch._grouped_mm) need widths that "
                                "are multiples of 4 (16 bytes); give 36 or 40")
