"""Random transformers (``random_transformers.Spec``) × random targets: every child right, or refused.

For each generated model: the identity target reproduces it (1e-5). For each target drawn:
either the call raises a one-line error naming a ``Target`` field or the op that forbids it, or
the child has exactly the target's sizes (heads per attention op, residual and ffn widths,
layers) and runs at another batch and sequence size. Once per model and kind (heads, ffn):
planted dead heads / ffn neurons are removed with outputs unchanged (1e-4). For the first accepted target of a model: onnxruntime parity
(``sg.export_onnx``), ``sg.save`` / ``sg.load`` round trip, and grandchild consistency (the
child subcloned again equals its metadata-free reloaded copy subcloned again).

CI runs a fixed derandomized set; ``pytest -m fuzz tests/test_generated.py`` runs the long one
(``FUZZ_MODELS`` models, ``FUZZ_TARGETS`` targets each, no new model after ``FUZZ_SECONDS``) and
writes its counts to ``FUZZ_REPORT`` (default ``generated_counts.json``) after every model.
"""
from __future__ import annotations

import collections
import copy
import json
import os
import re
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import subclone_graph as sg
from subclone_graph.passes import state
from random_transformers import CHOICES, VOCAB, Spec, build, inputs
from subclone_testing import count_heads, plant_dead, plant_dead_heads, relative_error, run

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

COUNTS: collections.Counter = collections.Counter()
FUZZ_STOP = time.monotonic() + float(os.environ.get("FUZZ_SECONDS", "inf"))   # the long run draws no model after it
REFUSALS: collections.Counter = collections.Counter()
FAILURES: list[str] = []          # the long run records wrong children here instead of stopping


@st.composite
def specs(draw) -> Spec:
    choice = {name: draw(st.sampled_from(values)) for name, values in CHOICES.items()}
    if draw(st.booleans()):
        choice["mixer"] = None          # most models have no channel-mixing op
    heads = draw(st.sampled_from([4, 6]))
    return Spec(**choice, heads=heads, head_dim=draw(st.sampled_from([4, 8])), layers=draw(st.sampled_from([2, 3])),
                seed=draw(st.integers(0, 1000)))


@st.composite
def targets(draw, spec: Spec) -> sg.Target:
    kind = draw(st.sampled_from(["hidden", "ffn", "heads", "kv_heads", "query_heads", "layers_down", "layers_up",
                                 "all"]))
    kv, per_group = spec.kv_heads, spec.heads // spec.kv_heads
    fields: dict[str, int] = {}
    if kind in ("hidden", "all"):
        fields["hidden"] = draw(st.sampled_from([8, 16, 24]))
    if kind in ("ffn", "all"):
        fields["ffn"] = draw(st.sampled_from([8, 24, 40]))
    if kind in ("heads", "all"):
        fields["heads"] = draw(st.integers(1, spec.heads))
    if kind == "kv_heads" and kv > 1:
        fields["kv_heads"] = draw(st.integers(1, kv - 1))
    if kind == "query_heads" and per_group > 1:
        fields["heads"] = kv * draw(st.integers(1, per_group - 1))
        fields["kv_heads"] = kv
    if kind in ("layers_down", "all"):
        fields["layers"] = draw(st.integers(1, spec.layers - 1))
    if kind == "layers_up":
        fields["layers"] = spec.layers + draw(st.integers(1, 2))
    return sg.Target(**fields)


def refusal_reason(message: str) -> str:
    """A short key for a refusal: the field and the op, without node names and sizes."""
    field = re.search(r"Target\.(\w+)", message)
    op = re.search(r"aten\.[\w.]+", message)
    cause = re.sub(r"\d+", "N", message.split(":")[-1].strip())[:70]
    return f"{field.group(1) if field else '-'} | {op.group(0) if op else '-'} | {cause}"


def _subclone_or_refusal(gm, example, target: sg.Target):
    try:
        return sg.subclone(gm, example, target), None
    except (ValueError, sg.PassError, sg.TraceError) as error:
        message = str(error)
        assert "\n" not in message.strip(), f"a refusal of {target} spans lines: {message}"
        assert re.search(r"Target\.\w+|aten\.\w+|drop_layers|layers", message), f"{target}: refusal names nothing: {message}"
        return None, message


def _check_sizes(child, spec: Spec, target: sg.Target) -> None:
    wanted = {"residual": target.hidden, "ffn": target.ffn}
    for change in state.SIZE_CHANGES.need(child):
        if wanted.get(change.kind) is not None:
            assert change.child == wanted[change.kind], (change, target)
    if target.layers is not None:
        assert len(state.LAYERS.need(child)) == target.layers
    heads = count_heads(child)
    if target.heads is not None:
        assert all(h == target.heads for h, _ in heads), (heads, target)
    if target.kv_heads is not None:
        assert all(kv == target.kv_heads for _, kv in heads), (heads, target)
    other = inputs(batch=3, seq=5, seed=7)
    out = run(child, other)
    assert out.shape == (3, 5, VOCAB) and torch.isfinite(out).all()


def _check_planted_dead(gm, example, target: sg.Target) -> None:
    """Dead heads (for a heads target) or dead ffn neurons (for an ffn target) go, outputs unchanged."""
    planted = copy.deepcopy(gm)
    if target.heads is not None or target.kv_heads is not None:
        if not state.ATTENTION.need(planted):
            return
        heads, kv_heads = plant_dead_heads(planted)
        dead_target = sg.Target(heads=heads, kv_heads=kv_heads)
    elif target.ffn is not None:
        graph = state.CHANNEL_GRAPH.need(planted)
        ffn = [g for g in graph.groups.values() if g.kind == "ffn" and g.size > 2]
        if not ffn:
            return
        plant_dead(planted, {g.id: [g.size - 2, g.size - 1] for g in ffn})
        dead_target = sg.Target(ffn=ffn[0].size - 2)
    else:
        return
    child, refusal = _subclone_or_refusal(planted, example, dead_target)
    if child is not None:
        for x in (example, inputs(batch=3, seq=5, seed=7)):
            assert relative_error(run(child, x), run(planted, x)) < 1e-4, (dead_target, "planted dead")


def _check_artifacts(child, example, tmp) -> None:
    """onnxruntime parity; save / load round trip; grandchild of the child = grandchild of its reload."""
    sg.export_onnx(child, example, os.path.join(tmp, "child.onnx"), optimize=False)   # parity is the check
    path = sg.save(child, os.path.join(tmp, "child.pt2"), overwrite=True)
    loaded = sg.load(path)
    assert relative_error(run(loaded, example), run(child, example)) < 1e-6
    again = sg.Target(layers=1)
    first, _ = _subclone_or_refusal(child, example, again)
    second, _ = _subclone_or_refusal(loaded, example, again)
    assert (first is None) == (second is None), "a grandchild and its reloaded twin disagree on refusing"
    if first is not None:
        other = inputs(batch=3, seq=5, seed=7)
        assert relative_error(run(first, other), run(second, other)) < 1e-5


def check_model(spec: Spec, target_list: list[sg.Target], tmp, failures: list | None = None) -> None:
    """Raise on the first wrong child; or, with ``failures`` (the long run), record it and go on."""
    try:
        _check_model(spec, target_list, tmp, failures)
    except Exception as error:
        if failures is None:
            raise
        failures.append(f"{spec} (model): {type(error).__name__}: {str(error)[:300]}")


def _check_model(spec: Spec, target_list: list[sg.Target], tmp, failures) -> None:
    model, example = build(spec), inputs()
    gm = sg.trace(model, example)
    sg.analyze_channels(gm)
    COUNTS["models"] += 1
    identity, refusal = _subclone_or_refusal(gm, example, sg.Target())
    assert refusal is None, f"{spec}: identity target refused: {refusal}"
    assert relative_error(run(identity, example), run(model, example)) < 1e-5, f"{spec}: identity changed outputs"
    artifacts_done, planted_done = False, set()
    for target in target_list:
        COUNTS["targets"] += 1
        try:
            child, refusal = _subclone_or_refusal(gm, example, target)
            if child is None:
                REFUSALS[refusal_reason(refusal)] += 1
                continue
            COUNTS["accepted"] += 1
            _check_sizes(child, spec, target)
            kind = "heads" if target.heads is not None or target.kv_heads is not None else "ffn" * (target.ffn is not None)
            if kind and kind not in planted_done:       # once per model and kind: it costs a subclone
                planted_done.add(kind)
                _check_planted_dead(gm, example, target)
            if not artifacts_done:
                artifacts_done = True
                _check_artifacts(child, example, tmp)
        except Exception as error:
            if failures is None:
                raise
            failures.append(f"{spec} {target}: {type(error).__name__}: {str(error)[:300]}")


@settings(derandomize=True, max_examples=int(os.environ.get("GENERATED_EXAMPLES", 4)), deadline=None,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_generated_models_are_right_or_refused(data, tmp_path_factory):
    spec = data.draw(specs(), label="spec")
    target_list = [data.draw(targets(spec), label=f"target{i}") for i in range(2)]
    check_model(spec, target_list, tmp_path_factory.mktemp("generated"))


@pytest.mark.fuzz
@settings(derandomize=False, max_examples=int(os.environ.get("FUZZ_MODELS", 100)), deadline=None,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_generated_models(data, tmp_path_factory):
    spec = data.draw(specs(), label="spec")
    # many targets per model: the model's trace, identity, ONNX and round-trip checks are paid once
    drawn = [data.draw(targets(spec), label=f"target{i}") for i in range(int(os.environ.get("FUZZ_TARGETS", 40)))]
    target_list = list(dict.fromkeys(drawn))        # a pair counts once: a repeated target tests nothing new
    if time.monotonic() > FUZZ_STOP:
        return          # past the time budget; drawn all the same, or hypothesis calls the data generation flaky
    check_model(spec, target_list, tmp_path_factory.mktemp("fuzz"), FAILURES)
    with open(os.environ.get("FUZZ_REPORT", "generated_counts.json"), "w") as report:
        json.dump({"counts": dict(COUNTS), "refusals": dict(REFUSALS.most_common()), "failures": FAILURES},
                  report, indent=1)
