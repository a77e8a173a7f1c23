"""Import directions: the package's folders are layers, and a layer imports only layers below it.

The intended direction, lowest first (a module may import its own layer and any layer before it):

    passes      the compiler passes, op rules, pass state, the segment runner: imports nothing
                else of the package (device placement and the cross-rank reduction are handed
                to ScoreChannelsPass as arguments, never imported)
    progress    the progress= protocol (phases and their steps): imports nothing of the package
    runtime     where and how calibration runs: devices, ranks
    input_sizes the input sizes a traced graph runs at (read from its guards), and inputs made at them
    tracing     torch.export of a model into the graph the passes read
    data        calibration and evaluation data
    checkpoint  a safetensors checkpoint read and written tensor by tensor; a parent traced with
                fake weights, its tensors read through their edit programs
    export      the child as .pt2, ONNX, a Hugging Face folder (the one writer)
    convert     a GGUF file as an ordinary Hugging Face folder (``subclone convert``)
    api         the one pipeline (subclone, subclone_passes)
    streamed    checkpoint/streamed.py: the same pipeline on a checkpoint read on demand
    cli         the command line

``subclone_graph/__init__.py`` names everything lazily (PEP 562) and ``__main__`` starts the
command line; ``models/`` (fixtures, the demo) is an application of the package, not part of a
layer: only the command line (which runs the demo, and may use the package's top-level names)
imports it. Every import is read from the source with ``ast``:
absolute, relative, and inside functions (a lazy import is still a dependency).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["passes", "progress", "runtime", "input_sizes", "tracing", "data", "checkpoint", "export", "convert", "api", "streamed",
          "cli"]
TOP = {"__init__", "__main__"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "passes":                       # installed as subclone_graph.passes
        parts = ["subclone_graph", *parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, text: str | None = None) -> set[str]:
    """Every ``subclone_graph...`` module ``path`` imports (``from a import b``: ``a.b`` too)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if text is None else text, str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            found |= {f"{origin}.{alias.name}" for alias in node.names}
            if origin != "subclone_graph":     # ``from subclone_graph import data``: the module data
                found.add(origin)
    return {name for name in found if name == "subclone_graph" or name.startswith("subclone_graph.")}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None                 # the package itself
    name = "streamed" if parts[1:3] == ["checkpoint", "streamed"] else parts[1]
    return name if name in LAYERS else None


def _sources():
    for folder in ("passes", "subclone_graph"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield path, path.read_text()


def _violations(sources) -> list[str]:
    wrong = []
    for path, text in sources:
        module = _module_name(path)
        own = _layer(module)
        if own is None:
            assert module.split(".")[-1] in TOP or module == "subclone_graph", f"{module}: in no layer"
            continue
        for imported in sorted(_imports(path, text)):
            layer = _layer(imported)
            if own == "cli" and layer is None:
                continue                # the command line may use the package's names and its demo
            if imported.split(".")[1:2] == ["models"]:
                wrong.append(f"{module} imports {imported} (fixtures are not a layer)")
                continue
            if layer is None:
                wrong.append(f"{module} imports {imported} from the package top level "
                             "(import the module that defines it)")
                continue
            if LAYERS.index(layer) > LAYERS.index(own):
                wrong.append(f"{module} ({own}) imports {imported} ({layer}), a layer above it")
    return wrong


def test_every_import_points_down_the_layers():
    assert _violations(_sources()) == []


def test_the_pass_library_imports_nothing_outside_itself():
    outside = [(_module_name(path), name) for path in (ROOT / "passes").rglob("*.py") for name in _imports(path)
               if not name.startswith("subclone_graph.passes")]
    assert outside == []


def test_the_checker_sees_upward_imports():
    """The test can fail: the imports the pass library and the runtime had before are caught."""
    probes = [(ROOT / "passes" / "analysis" / "probe.py", "def f():\n    from subclone_graph.runtime import distributed\n"),
              (ROOT / "subclone_graph" / "runtime" / "probe.py", "from ..export import tolerance\n"),
              (ROOT / "subclone_graph" / "export" / "probe.py", "from subclone_graph import cli\n")]
    found = _violations(probes)
    flagged = {line.split(" ")[0] for line in found}
    assert flagged == {"subclone_graph.passes.analysis.probe", "subclone_graph.runtime.probe",
                       "subclone_graph.export.probe"}, found
    assert all("a layer above it" in line for line in found)
