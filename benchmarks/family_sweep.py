"""Sweep every family transformers ships: build it tiny, subclone it, check the child.

    python -m benchmarks.family_sweep                          # the whole registry (hours on 2 cores)
    python -m benchmarks.family_sweep --families llama,t5      # some families
    python -m benchmarks.family_sweep --sample 15 --seed 0     # a seeded subset
    python -m benchmarks.family_sweep --shuffle --resume       # all, in a seeded random order, going on
    python -m benchmarks.family_sweep --table                  # the README table from the JSON
    python -m benchmarks.family_sweep --readme                 # ... written into README.md

The families are the model types of transformers' auto registries, each built tiny by the generic
config rules of ``models/registry_families.py``; a family whose tiny model does not build is
listed with its reason. Each family runs in its own forked subprocess (``nice``-able; one at a time) under
a time limit, through the checks of ``models/family_checks.py`` (trace, identity, shrink, dead,
grandchild, save_hf, onnx): ``ok`` / ``refused`` / ``wrong`` / ``crash`` / ``skip``, and
``timeout`` for the check the limit cut (later ones are not run). Results, with the transformers
and torch versions, the CPU and the seconds per family and check, go to
``benchmarks/results/family_sweep.json``, rewritten after each family (``--resume`` goes on
from it; with ``--families`` it runs those again), each family with the commit it ran on.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "family_sweep.json"
LIMIT_S = 240.0
SUMMARY = ("pass", "refused", "wrong", "crash", "timeout")


def cpu() -> dict:
    import torch

    flags, model = set(), platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma")
    return {"model": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "capability": torch.backends.cpu.get_cpu_capability(),
            "flags": sorted(f for f in wanted if f in flags)}


def versions() -> dict:
    import torch
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__, "python": platform.python_version()}


# ----- one family, in a subprocess --------------------------------------------------------------
def worker(name: str, out: Path, checks: tuple) -> None:
    """Build ``name`` tiny and run the checks, appending one JSON line per result to ``out``."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    from subclone_graph.models import family_checks, registry_families
    from subclone_graph.models.registry_families import BuildError

    def emit(record: dict) -> None:
        with out.open("a") as file:
            file.write(json.dumps(record) + "\n")

    start = time.perf_counter()
    try:
        model = registry_families.build(name)
    except BuildError as error:
        emit({"build": str(error), "seconds": round(time.perf_counter() - start, 2)})
        return
    emit({"build": "ok", "class": type(model).__name__, "seconds": round(time.perf_counter() - start, 2),
          "parameters": sum(p.numel() for p in model.parameters())})
    family_checks.run_checks(model, lambda b, s, seed: registry_families.inputs(model, b, s, seed),
                             lambda outcome: emit(family_checks.as_dict(outcome)), checks)


def _child(name: str, out: Path, nice: int, checks: tuple) -> None:
    if nice:
        os.nice(nice)
    worker(name, out, checks)


def run_family(name: str, limit: float, nice: int, checks: tuple) -> dict:
    """One family in a forked subprocess (torch and transformers already imported) under ``limit``."""
    import multiprocessing

    out = Path(f"/tmp/family_sweep_{os.getpid()}_{name}.jsonl")
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    process = multiprocessing.get_context("fork").Process(target=_child, args=(name, out, nice, checks),
                                                             daemon=True)
    process.start()
    process.join(limit)
    status = "done"
    if process.is_alive():
        process.kill()
        process.join()
        status = "timeout"
    elif process.exitcode != 0:
        status = f"the worker exited with {process.exitcode}"
    seconds = round(time.perf_counter() - start, 1)
    lines = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    out.unlink(missing_ok=True)
    record = {"seconds": seconds, "checks": {}}
    if not lines:
        record["build"] = "timeout while building" if status == "timeout" else f"the worker died: {status}"
        return record
    record.update({k: v for k, v in lines[0].items() if k != "seconds"}, build_seconds=lines[0]["seconds"])
    for line in lines[1:]:
        record["checks"][line["check"]] = {k: line[k] for k in ("status", "detail", "seconds")}
    if record["build"] == "ok":
        cut = "timeout" if status == "timeout" else "crash"
        missing = [c for c in checks if c not in record["checks"]]
        for i, check in enumerate(missing):
            detail = (f"over the {limit:g} s limit" if cut == "timeout" else status) if i == 0 else "not run"
            record["checks"][check] = {"status": cut if i == 0 else "skip", "detail": detail, "seconds": 0.0}
    return record


def outcome(record: dict) -> str:
    """One family's outcome: not built, or the worst of its checks."""
    if record.get("build") != "ok":
        return "not built"
    statuses = {c["status"] for c in record["checks"].values()}
    for status in ("timeout", "crash", "wrong", "refused"):
        if status in statuses:
            return status
    return "pass"


def class_limit(record: dict) -> str:
    """The limit of the class a family passed under (``limit: fixed sequence length 8: ...``), or ""."""
    detail = record.get("checks", {}).get("trace", {}).get("detail", "")
    return next((part for part in detail.split(" | ") if part.startswith("limit: ")), "")


def subclone_seconds(record: dict) -> float:
    """The time to subclone the family: trace and analyse, then the shrunk child."""
    return round(sum(record["checks"].get(c, {}).get("seconds", 0.0) for c in ("trace", "shrink")), 1)


def summary(families: dict) -> dict:
    built = {k: v for k, v in families.items() if v.get("build") == "ok"}
    counts = {s: sum(outcome(v) == s for v in built.values()) for s in SUMMARY}
    slowest = max(built.items(), key=lambda kv: kv[1]["seconds"], default=(None, {"seconds": 0}))
    slowest_subclone = max(built, key=lambda k: subclone_seconds(built[k]), default=None)
    return {"tried": len(families), "built": len(built), **counts,
            "pass_with_limit": sorted(k for k, v in built.items() if outcome(v) == "pass" and class_limit(v)),
            "pass_share_of_built": round(counts["pass"] / len(built), 3) if built else None,
            "slowest": {"family": slowest[0], "seconds": slowest[1]["seconds"]},
            "slowest_subclone": {"family": slowest_subclone,
                                 "seconds": subclone_seconds(built[slowest_subclone]) if slowest_subclone else 0},
            "subclone_over_60_s": sorted(k for k, v in built.items() if subclone_seconds(v) > 60)}


def select(names: list[str], families: str | None, sample: int | None, seed: int, shuffle: bool = False) -> list[str]:
    if families:
        wanted = families.split(",")
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise SystemExit(f"family_sweep: unknown families {unknown}; see models/registry_families.py")
        return wanted
    if sample:
        return sorted(random.Random(seed).sample(names, sample))
    if shuffle:         # a run cut short has tried a seeded random share of the registry, not a prefix
        return random.Random(seed).sample(names, len(names))
    return names


def commit() -> str:
    """The code a family was checked with: the git commit, ``+`` when the worktree differs from it."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return head + ("+" if dirty else "")


def sweep(names: list[str], out: Path, limit: float, nice: int, resume: bool, checks: tuple,
          rerun: bool = False) -> dict:
    import transformers  # noqa: F401  (imported once here: each forked worker starts with it)

    import subclone_graph  # noqa: F401
    from subclone_graph.models import family_checks  # noqa: F401
    from subclone_graph.models.registry_families import registry_families

    registry = registry_families()
    result = json.loads(out.read_text()) if resume and out.exists() else {}
    result.update(versions=versions(), cpu=cpu(), limit_s=limit, checks=list(checks),
                  command="python -m benchmarks.family_sweep")
    families = result.setdefault("families", {})
    code = commit()
    for name in names:
        if resume and name in families and not rerun:
            continue
        record = run_family(name, limit, nice, checks)
        record.update(task=registry[name].task, registry_class=registry[name].class_name, commit=code)
        families[name] = record
        result["summary"] = summary(families)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        print(f"{name:28s} {outcome(record):9s} {record['seconds']:6.1f} s  " + " ".join(
            f"{c}={v['status']}" for c, v in record["checks"].items()), flush=True)
    return result


# ----- the README table ---------------------------------------------------------------------------
_MARK = {"ok": "✓", "skip": "–", "refused": "refused", "wrong": "**wrong**", "crash": "**crash**",
         "timeout": "timeout"}


def table(result: dict) -> str:
    """A markdown table of the sweep (README's "Families" section)."""
    from subclone_graph.models.family_checks import CHECKS

    s, v = result["summary"], result["versions"]
    lines = [f"transformers {v['transformers']}, torch {v['torch']} ({result['cpu']['model']}, "
             f"{result['cpu']['cores']} cores shared); {s['tried']} families tried, {s['built']} build tiny; of "
             f"those {s['pass']} pass every check ({100 * (s['pass_share_of_built'] or 0):.0f}%; "
             f"{len(s.get('pass_with_limit', ()))} of them at the input sizes their class's code specialises on, "
             f"marked ✓ᶠ and named under why), {s['refused']} "
             f"refused, {s['wrong']} wrong, {s['crash']} crash, {s['timeout']} over the {result['limit_s']:g} s "
             f"limit for all checks. Slowest subclone (trace + shrink): {s['slowest_subclone']['family']} "
             f"({s['slowest_subclone']['seconds']:.0f} s); over 60 s: {len(s['subclone_over_60_s'])}. "
             f"Checked on commits: {_commits(result['families'])}.", "",
             "| family | class | " + " | ".join(CHECKS[1:]) + " | subclone s | all s | why not |",
             "|---|---|" + "---|" * (len(CHECKS) - 1) + "---:|---:|---|"]
    for name, record in sorted(result["families"].items()):
        if record.get("build") != "ok":
            continue
        checks = record["checks"]
        fixed = "ᶠ" if class_limit(record) else ""
        marks = [_MARK.get(checks.get(c, {}).get("status", "skip"), "?") for c in CHECKS[1:]]
        marks = [m + fixed if m == "✓" else m for m in marks]
        why = next((f"{c}: {checks[c]['detail']}" for c in CHECKS
                    if checks.get(c, {}).get("status") in ("refused", "wrong", "crash", "timeout")), class_limit(record))
        why = why.replace("|", "\\|")[:160]
        lines.append(f"| {name} | {record['class']} | " + " | ".join(marks)
                     + f" | {subclone_seconds(record):.0f} | {record['seconds']:.0f} | {why} |")
    failed = sorted((n, r["build"]) for n, r in result["families"].items() if r.get("build") != "ok")
    lines += ["", f"Not built tiny ({len(failed)}): " + "; ".join(f"{n} ({why[:90]})" for n, why in failed) + "."]
    return "\n".join(lines)


def _commits(families: dict) -> str:
    counts: dict[str, int] = {}
    for record in families.values():
        counts[record.get("commit", "?")] = counts.get(record.get("commit", "?"), 0) + 1
    return ", ".join(f"{c} ({n})" for c, n in sorted(counts.items(), key=lambda kv: -kv[1]))


BEGIN, END = "<!-- family-sweep:begin -->", "<!-- family-sweep:end -->"


def write_readme(result: dict, readme: Path) -> None:
    """Replace the README's generated table (between the two markers) with the sweep's."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"family_sweep: {readme} has no {BEGIN} ... {END} section to fill")
    head, rest = text.split(BEGIN, 1)
    readme.write_text(head + BEGIN + "\n" + table(result) + "\n" + END + rest.split(END, 1)[1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", help="comma-separated model types (default: every one)")
    parser.add_argument("--sample", type=int, help="a seeded random subset of this many families")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shuffle", action="store_true", help="run the families in a seeded random order")
    parser.add_argument("--limit", type=float, default=LIMIT_S, help="seconds per family, all checks (default 240)")
    parser.add_argument("--nice", type=int, default=10, help="the workers' niceness (0: none)")
    parser.add_argument("--checks", default=None, help="comma-separated checks (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--resume", action="store_true",
                        help="keep the families already in --out (those named by --families are run again)")
    parser.add_argument("--table", action="store_true", help="print the README table of --out and stop")
    parser.add_argument("--readme", action="store_true", help="write that table into README.md and stop")
    args = parser.parse_args(argv)
    if args.table or args.readme:
        result = json.loads(args.out.read_text())
        result["summary"] = summary(result["families"])
        if args.readme:
            write_readme(result, Path(__file__).resolve().parents[1] / "README.md")
        else:
            print(table(result))
        return
    from subclone_graph.models.registry_families import registry_families

    from subclone_graph.models.family_checks import CHECKS

    checks = tuple(args.checks.split(",")) if args.checks else CHECKS
    if set(checks) - set(CHECKS):
        raise SystemExit(f"family_sweep: unknown checks {sorted(set(checks) - set(CHECKS))}; allowed: {', '.join(CHECKS)}")
    names = select(list(registry_families()), args.families, args.sample, args.seed, args.shuffle)
    result = sweep(names, args.out, args.limit, args.nice, args.resume, checks, rerun=bool(args.families))
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
