"""The training-speed benchmark's code path on a tiny random Llama (no SmolLM2, well under 60 s).

Checks the JSON schema ``benchmarks/train_speed.py --quick`` writes, that the random child and
the subcloned child have the same architecture, that the shared-prefix subcloning the benchmark
uses builds exactly what ``sg.subclone`` builds, and the speed-up arithmetic.
"""
import json
import math

import pytest
import torch

import subclone_graph as sg
from benchmarks import train_speed as ts
from models import build


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "quick.json"
    result = ts.main(["--quick", "--parent", "tiny", "--json", str(path), "--png", str(path.with_suffix(".png"))])
    return result, json.loads(path.read_text())


def test_quick_json_schema(quick_result):
    returned, written = quick_result
    assert written["speedup"] == returned["speedup"]
    assert _finite(written["speedup"]) and written["speedup"] > 0
    for key in ("machine", "versions", "settings", "parent", "data", "children", "transform_cost"):
        assert key in written, key
    child = written["children"]["tiny"]
    assert {r["init"] for r in child["runs"]} == {"random", "subcloning"}
    steps = written["settings"]["steps"]
    for run in child["runs"]:
        assert [s for s, _ in run["curve"]] == [0, 2, 4, 6] and steps == 6
        assert all(_finite(loss) for _, loss in run["curve"])
        assert len(run["train_loss"]) == steps and all(_finite(x) for x in run["train_loss"])
        assert run["final"] == run["curve"][-1][1]
    up = child["speedup"]["subcloning"]
    assert up["bound"] in ("lower", "eval_granularity", "upper") and _finite(up["value"])
    assert written["speedup"] == up["value"]


@pytest.fixture(scope="module")
def tiny():
    parent, example = build("llama")
    calibration = [example, (torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(1)),)]
    return parent, example, calibration


def test_shared_prefix_builds_what_subclone_builds(tiny):
    """Also: the random child has the subcloned child's architecture; relocation keeps outputs."""
    parent, example, calibration = tiny
    target = ts.CHILDREN["tiny"]
    scored = ts.scored_parent(parent, example, target, calibration)
    for name in ("subcloning", "weight_selection"):
        spec = ts.INITS[name]
        ours = ts.finish_subclone(scored, target, spec, calibration)
        theirs = sg.subclone(parent, example, sg.Target(**target),
                             calibration=calibration if spec["calibrate"] else None,
                             selection=spec["selection"], depth=spec["depth"], rescale=spec["rescale"])
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert torch.equal(ours(example[0]).logits, theirs(example[0]).logits), name
    random = ts.random_child(parent.config, target, seed=0)
    assert ts.shape_signature(random) == ts.shape_signature(ours)
    assert sg.count_parameters(random) == sg.count_parameters(ours)
    other = ts.random_child(parent.config, dict(target, ffn=32), seed=0)
    assert ts.shape_signature(other) != ts.shape_signature(ours)
    before = ours(example[0]).logits
    assert torch.equal(sg.move_to_device(ours, "cpu")(example[0]).logits, before)


def test_speedup_cases():
    random = [[0, 10.0], [10, 8.0], [20, 7.0], [30, 6.5], [40, 6.5]]
    below = ts.speedup(random, [[0, 6.0], [10, 5.0]], 40)
    assert below["below_at_step_0"] and below["bound"] == "lower" and below["value"] == 30
    first = ts.speedup(random, [[0, 9.0], [10, 6.4], [20, 6.0]], 40)
    assert first["steps_init"] == 10 and first["value"] == 3.0 and first["bound"] == "lower"
    later = ts.speedup(random, [[0, 9.0], [10, 7.0], [20, 6.5]], 40)
    assert later["value"] == 1.5 and later["bound"] == "eval_granularity"
    never = ts.speedup(random, [[0, 9.0], [10, 8.0], [40, 7.0]], 40)
    assert never["steps_init"] is None and never["bound"] == "upper" and never["value"] == 30 / 40


def test_schedule_and_data_order():
    factors = [ts.lr_at(k, 100, 0.1) for k in range(100)]
    assert factors[9] == 1.0 and factors[0] == pytest.approx(0.1) and factors[-1] < 0.01
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    one, two = ts.batch_order(50, 20, 8, seed=0), ts.batch_order(50, 20, 8, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(one, two)) and len(one) == 20
