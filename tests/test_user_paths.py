"""What a user does next must work: bad input is one line and exit 2 with nothing written;
outputs are checked first, staged, and moved into place whole; a killed run's leftovers go; a
``.pt2`` loads in a fresh interpreter; the CLI's step lines, ``inspect``'s kinds, ``--traceback``
after the command, Ctrl-C; ``Target`` takes numpy integers; a ``.pt2`` is a MODEL.

``BAD_INPUTS`` is the table in the README's "Reliability" section: every bad input tried, the
fragment its one-line error must contain.
"""
from __future__ import annotations

import copy
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import subclone_graph as sg
from subclone_graph import models
from subclone_graph.export import pt2 as io
from subclone_graph.export import destination as outputs
from subclone_graph.cli.main import main
from subclone_graph.export.onnx_export import OnnxExportError
from subclone_graph.export.destination import STAGING_PREFIX

TARGET = ["--hidden", "32", "--layers", "2", "--heads", "2", "--kv-heads", "1", "--ffn", "48"]

FACTORY = textwrap.dedent('''
    import torch
    from subclone_graph.models import TinyLlama

    def build():
        torch.manual_seed(0)
        model = TinyLlama().eval()
        return model, (torch.randint(0, model.vocab, (2, 8)),)

    def no_residual():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
        return model.eval(), (torch.randn(2, 8),)
''')


@pytest.fixture
def factory(tmp_path, monkeypatch):
    (tmp_path / "user_paths_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("user_paths_factory", None)
    return "user_paths_factory"


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(STAGING_PREFIX + "*"))


def _one_line(capsys, code: int) -> str:
    captured = capsys.readouterr()
    # a broken optional extension in this environment (torchao) reports itself at import time
    lines = [line for line in captured.err.strip().splitlines() if not line.startswith("Failed to load ")
             and "batch/s]" not in line]           # and the calibration progress bar
    assert code == 2, captured
    assert len(lines) == 1 and lines[0].startswith("subclone: error: "), captured.err
    assert "Traceback" not in captured.err and "weights_only" not in captured.err
    return lines[0]


# ----- bad input: one line, exit 2, nothing written --------------------------------------------
def _hf_folder(tmp_path: Path, name: str = "llama") -> Path:
    folder = tmp_path / f"hf_{name}"
    if not folder.exists():
        models.build(name)[0].save_pretrained(folder)
    return folder


def _truncated_safetensors(tmp_path):
    folder = _hf_folder(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return ["run", str(folder), "--out", "{out}"]


def _corrupt_header(tmp_path):
    folder = _hf_folder(tmp_path)
    weights = folder / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[8:40] = b"x" * 32
    weights.write_bytes(bytes(raw))
    return ["run", str(folder), "--out", "{out}"]


def _truncated_gguf(tmp_path):
    # a GGUF v3 header that promises 2 tensors and 1 metadata entry, then ends
    path = tmp_path / "cut.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2, 1) + b"\x05\x00")
    return ["run", str(path), "--out", "{out}"]


def _garbage_gguf(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"garbage" * 50)
    return ["run", str(tmp_path / "junk.gguf"), "--out", "{out}"]


def _pickle_pt(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as handle:
        pickle.dump(os.getcwd, handle)            # unpickling would call code: refused
    return ["run", "{factory}:build", "--calib", str(tmp_path / "evil.pt"), "--out", "{out}"]


def _garbage_pt(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 20)
    return ["run", "{factory}:build", "--calib", str(tmp_path / "junk.pt"), "--out", "{out}"]


def _out_of_range_ids(tmp_path):
    torch.save(torch.full((4, 8), 1000), tmp_path / "ids.pt")
    return ["run", str(_hf_folder(tmp_path)), "--calib", str(tmp_path / "ids.pt"), "--out", "{out}"]


def _negative_ids(tmp_path):
    torch.save(torch.full((4, 8), -1), tmp_path / "ids.pt")
    return ["run", str(_hf_folder(tmp_path)), "--calib", str(tmp_path / "ids.pt"), "--out", "{out}"]


def _out_under_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    return ["run", "nope_module_xyz:build", "--out", str(tmp_path / "afile" / "sub")]


def _out_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    return ["run", "nope_module_xyz:build", "--out", str(tmp_path / "afile")]


def _pass_error(tmp_path):
    return ["run", "{factory}:no_residual", "--layers", "1", "--out", "{out}"]


def _hf_export_error(tmp_path):
    return ["run", str(_hf_folder(tmp_path, "gpt2")), "--heads", "2", "--layers", "2", "--format", "hf",
            "--out", "{out}"]


def _calib_batches_zero(tmp_path):
    torch.save(torch.randint(0, 97, (8, 8)), tmp_path / "ids.pt")
    return ["run", "{factory}:build", "--calib", str(tmp_path / "ids.pt"), "--calib-batches", "0", "--out", "{out}"]


def _seq_len_zero(tmp_path):
    return ["inspect", "{factory}:build", "--seq-len", "0"]


def _kv_heads_too_many(tmp_path):
    return ["run", "{factory}:build", "--kv-heads", "3", "--out", "{out}"]


def _latin1_text(tmp_path):
    (tmp_path / "corpus.txt").write_bytes("café au lait ".encode("latin-1") * 50)
    return ["run", "{factory}:build", "--calib", str(tmp_path / "corpus.txt"), "--out", "{out}"]


def _garbage_pt2(tmp_path):
    (tmp_path / "junk.pt2").write_bytes(b"not a zip" * 10)
    return ["run", str(tmp_path / "junk.pt2"), "--out", "{out}"]


BAD_INPUTS = {
    # input: (setup, fragments of the one-line error)
    "truncated .safetensors": (_truncated_safetensors, ["hf_llama/model.safetensors", "truncated"]),
    "header-corrupt .safetensors": (_corrupt_header, ["model.safetensors", "corrupt safetensors header"]),
    "truncated .gguf": (_truncated_gguf, ["cut.gguf", "truncated or corrupt"]),
    "not a .gguf": (_garbage_gguf, ["junk.gguf", "GGUF"]),
    "pickle .pt (code inside)": (_pickle_pt, ["evil.pt", "only tensors"]),
    "garbage .pt": (_garbage_pt, ["junk.pt", "only tensors"]),
    "token id ≥ vocabulary": (_out_of_range_ids, ["ids.pt", "token id 1000", "0..96"]),
    "negative token id": (_negative_ids, ["ids.pt", "token id -1"]),
    "--out under a file": (_out_under_a_file, ["afile", "is a file"]),
    "--out is a file": (_out_is_a_file, ["afile", "is a file"]),
    "PassError (a model without residual layers)": (_pass_error, ["no residual layers"]),
    "HFExportError (child the class cannot express)": (_hf_export_error, ["GPT2LMHeadModel"]),
    "--calib-batches 0": (_calib_batches_zero, ["--calib-batches 0"]),
    "--seq-len 0": (_seq_len_zero, ["--seq-len 0"]),
    "--kv-heads above the parent's": (_kv_heads_too_many, ["--kv-heads 3", "larger than the parent"]),
    "non-UTF-8 text": (_latin1_text, ["corpus.txt", "UTF-8"]),
    "garbage .pt2 as MODEL": (_garbage_pt2, ["junk.pt2", ".pt2"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, factory, tmp_path, capsys):
    setup, fragments = BAD_INPUTS[case]
    out = tmp_path / "out"
    argv = [a.format(out=out, factory=factory) for a in setup(tmp_path)]
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    line = _one_line(capsys, main(argv))
    for fragment in fragments:
        assert fragment in line, line
    assert not out.exists() and _leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_onnxruntime_errors_are_one_line(factory, tmp_path, capsys, monkeypatch):
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    from subclone_graph.export import onnx_export

    def refuse(path, tensors):
        raise state.NotImplemented("Could not find an implementation for Foo(1) node with name 'x'")

    monkeypatch.setattr(onnx_export, "run_onnx", refuse)
    code = main(["run", f"{factory}:build", *TARGET, "--format", "pt2", "onnx", "--out", str(tmp_path / "out")])
    assert "onnxruntime cannot run the exported graph" in _one_line(capsys, code)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_the_output_is_checked_before_the_model_is_loaded(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    # the model does not exist either: the --out problem is reported first, before any loading
    code = main(["run", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "afile" / "sub")])
    assert "afile" in _one_line(capsys, code)


def test_traceback_after_the_command(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["run", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "o"), "--traceback"])


def test_ctrl_c_is_one_line_exit_130_and_nothing_written(factory, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "save", interrupted)
    code = main(["run", f"{factory}:build", *TARGET, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and len(err) == 1 and "interrupted" in err[0]
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


# ----- all-or-nothing writes -------------------------------------------------------------------
def test_a_failing_format_leaves_the_previous_set_untouched(factory, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(["run", f"{factory}:build", *TARGET, "--out", str(out)]) == 0
    old = (out / "child.pt2").read_bytes()

    def refuse(child, inputs, path, **kwargs):       # the second format fails after child.pt2 was written
        raise OnnxExportError("planted refusal")

    monkeypatch.setattr(sg, "export_onnx", refuse)
    capsys.readouterr()
    code = main(["run", f"{factory}:build", "--hidden", "48", "--format", "pt2", "onnx", "--overwrite",
                 "--out", str(out)])
    assert "planted refusal" in _one_line(capsys, code)
    assert (out / "child.pt2").read_bytes() == old and not (out / "child.onnx").exists()
    assert _leftovers(tmp_path) == []


def test_without_overwrite_an_earlier_runs_outputs_are_not_mixed_with_new_ones(factory, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "mine").mkdir(parents=True)
    (out / "mine" / "notes.txt").write_text("the user's")
    assert main(["run", f"{factory}:build", *TARGET, "--out", str(out)]) == 0
    capsys.readouterr()
    code = main(["run", f"{factory}:build", *TARGET, "--format", "onnx", "--out", str(out)])
    line = _one_line(capsys, code)
    assert "child.pt2" in line and "earlier run" in line and "--overwrite" in line
    # with --overwrite the earlier run's child.pt2 goes (it is not this run's format); the user's file stays
    assert main(["run", f"{factory}:build", *TARGET, "--format", "pt2", "--overwrite", "--out", str(out)]) == 0
    assert (out / "mine" / "notes.txt").read_text() == "the user's"


def _spawn_and_reap() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_killed_writer_leaves_staging_that_the_next_run_removes(tmp_path):
    script = textwrap.dedent(f'''
        import os, signal
        from pathlib import Path
        from subclone_graph.export import destination as outputs

        def write(path):
            path.write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGKILL)       # killed while writing

        outputs.write_all(Path({str(tmp_path / "out")!r}), {{"child.pt2": write}}, overwrite=False)
    ''')
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert not (tmp_path / "out").exists()                          # nothing under the output's name
    assert len(_leftovers(tmp_path)) == 1
    alive = tmp_path / f"{STAGING_PREFIX}{os.getpid()}-cafe"       # a live writer's staging is kept
    alive.mkdir()
    outputs.write_all(tmp_path / "out", {"a.txt": lambda p: p.write_text("a")}, overwrite=False)
    assert _leftovers(tmp_path) == [alive.name]
    assert (tmp_path / "out" / "a.txt").read_text() == "a"
    dead = tmp_path / f"{STAGING_PREFIX}{_spawn_and_reap()}-beef"
    dead.mkdir()
    assert outputs.remove_stale_staging(tmp_path) == [dead]


def test_overwrite_never_deletes_foreign_files_and_never_replaces_a_file_by_a_folder(tmp_path):
    model, inputs = models.build("llama")
    child = sg.subclone(model, inputs, sg.Target(hidden=32, layers=2))
    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(FileExistsError, match="is a file"):
        sg.save_hf(child, afile, overwrite=True)
    assert afile.read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    sg.save_hf(child, empty)                         # tempfile.TemporaryDirectory() pattern
    assert (empty / "config.json").is_file()
    (empty / "notes.md").write_text("the user's")
    with pytest.raises(FileExistsError, match="notes.md"):
        sg.save_hf(child, empty, overwrite=True)
    assert (empty / "notes.md").read_text() == "the user's"
    (empty / "notes.md").unlink()
    sg.save_hf(child, empty, overwrite=True)
    assert _leftovers(tmp_path) == []
    with pytest.raises(FileExistsError, match="overwrite=True"):
        sg.export_onnx(child, inputs, afile)         # export_onnx no longer overwrites by default
    assert afile.read_text() == "mine"


# ----- .pt2 ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_child():
    model, inputs = models.build("llama")
    return sg.subclone(model, inputs, sg.Target(hidden=32, layers=2, ffn=64))


def test_pt2_is_byte_reproducible_with_its_own_root_folder(hf_child, tmp_path):
    first, second = tmp_path / "a" / "child.pt2", tmp_path / "b" / "child.pt2"
    io.save(hf_child, first)
    io.save(hf_child, second)
    assert first.read_bytes() == second.read_bytes()
    assert {name.split("/")[0] for name in zipfile.ZipFile(first).namelist()} == {"child"}


def test_pt2_of_a_hugging_face_child_loads_in_a_fresh_interpreter(hf_child, tmp_path):
    io.save(hf_child, tmp_path / "child.pt2")
    script = ("import torch, subclone_graph as sg\n"
              f"child = sg.load({str(tmp_path / 'child.pt2')!r})\n"
              "print(type(child(torch.randint(0, 97, (2, 5)))).__name__)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "CausalLMOutputWithPast"
    assert "deserializ" not in done.stderr.lower()


def test_a_pt2_is_a_model_for_the_cli(factory, tmp_path, capsys):
    assert main(["run", f"{factory}:build", *TARGET, "--out", str(tmp_path / "child")]) == 0
    assert main(["run", str(tmp_path / "child" / "child.pt2"), "--layers", "1", "--ffn", "32",
                 "--out", str(tmp_path / "grandchild")]) == 0
    grandchild = io.load(tmp_path / "grandchild" / "child.pt2")
    shapes = {tuple(p.shape) for n, p in grandchild.named_parameters() if n.endswith("gate_proj.weight")}
    assert shapes == {(32, 32)}


# ----- the command line's output ---------------------------------------------------------------
def test_run_prints_timed_steps_and_a_summary(factory, tmp_path, capsys):
    assert main(["run", f"{factory}:build", *TARGET, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "[1] load user_paths_factory:build ..." in printed and "done in" in printed
    summary = printed.split("time per step:")[1]
    for step in ("load", "subclone", "write child.pt2", "total"):
        assert step in summary


def test_inspect_uses_the_readme_kind_names(factory, capsys):
    assert main(["inspect", f"{factory}:build"]) == 0
    printed = capsys.readouterr().out
    rows = [line.split() for line in printed.split("channel groups")[1].split("layers (")[0].splitlines()[2:]
            if line.strip()]
    kinds = {row[1] for row in rows}
    assert "fixed" not in kinds and "other" not in kinds
    assert kinds <= {"residual", "ffn", "heads", "kv_heads", "head_dim", "frozen", "heads×head_dim",
                     "kv_heads×head_dim", "kv_heads×other", "heads×other"}
    projections = [row for row in rows if row[5].endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight",
                                                           "o_proj.weight"))]
    assert len(projections) == 16                     # q, k, v, o of each of the 4 layers, none hidden
    assert all("×" in row[1] for row in projections)
    assert all(len(row) > 5 and row[5] == "part" for row in rows if row[1] == "heads")   # an example each
    assert "'other' groups hidden" in printed
    assert "scores: none without --calib" in printed


def test_hf_output_has_normal_permissions(tmp_path):
    model, inputs = models.build("llama")
    child = sg.subclone(model, inputs, sg.Target(hidden=32, layers=2))
    old = os.umask(0o022)
    try:
        sg.save_hf(child, tmp_path / "hf")
    finally:
        os.umask(old)
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o755


@pytest.mark.slow
def test_onnx_export_is_quiet(factory, tmp_path, capfd):
    assert main(["run", f"{factory}:build", *TARGET, "--format", "onnx", "--out", str(tmp_path / "out")]) == 0
    captured = capfd.readouterr()
    for noise in ("torchvision", "LeafSpec", "Warning", "[torch.onnx]"):
        assert noise not in captured.err + captured.out


def test_a_bug_in_the_class_is_not_read_as_a_rejection(hf_child, tmp_path):
    def broken_class(config):
        raise KeyError("a bug inside the model class")

    child = copy.copy(hf_child)
    child.meta = {**hf_child.meta, "subclone.parent_class": broken_class}
    with pytest.raises(KeyError, match="a bug inside the model class"):
        sg.save_hf(child, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and _leftovers(tmp_path) == []


# ----- small things ----------------------------------------------------------------------------
def test_target_accepts_numpy_integers():
    target = sg.Target(hidden=np.int64(32), layers=np.int32(2))
    assert target.hidden == 32 and type(target.hidden) is int and type(target.layers) is int
    with pytest.raises(ValueError, match=r"Target.ffn=2.0: a fraction must lie in \(0, 1\)"):
        sg.Target(ffn=np.float64(2.0))        # a float is a fraction now (relative targets)


def test_demo_output_is_git_ignored():
    ignored = (Path(__file__).parents[1] / ".gitignore").read_text().splitlines()
    assert "subclone-demo/" in ignored
