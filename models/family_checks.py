"""The checks a model family must pass, one implementation shared by the family sweep
(``benchmarks/family_sweep.py``) and the tests (``tests/test_family_sweep.py``).

``run_checks(model, make_inputs, report)`` runs, in order, on a tiny model:

1. ``trace``: trace and analyse (the unknown ops and frozen groups are noted);
2. ``identity``: ``Target()`` reproduces the parent, at the example size and at another batch and
   sequence size;
3. ``shrink``: every kind the analysis found shrinks at once (hidden, ffn, heads and kv heads
   halved — hidden and heads together, so that a class deriving its head width from them can
   hold the child —, experts 0.5, one layer fewer), calibrated; the child runs at another batch and
   sequence size with the parent's output shape, finite, with fewer parameters. A kind the model
   refuses (``Target.heads cannot shrink this model: <op and module>``) makes the check
   ``refused``, and the rest of the target is tried again so that the later checks get a child;
4. ``dead``: every other FFN neuron and the last kv group (or head) of every attention op
   planted dead — the last half of each op's where the ops differ in width, asked as a share —,
   then removed: outputs unchanged at both sizes (the checked inputs are in the
   calibration: a live ReLU neuron silent on other batches would tie with the dead ones); heads
   whose keys and values are one copy broadcast over them (multi-query) are not planted: their
   outputs mix the shared values, so no weight makes them dead to an activation score; nor are
   channels a LayerNorm normalises over (a QK LayerNorm over the whole query projection): a zeroed
   channel still counts in its mean, so removing it is exact for no model (``centring_norm_over``);
5. ``grandchild``: the shrunk child, subcloned again with the shrink's target less the kinds the
   child's own analysis no longer finds (its experts kept: the router's top-k),
   runs at another size with the child's output shape, finite, with fewer parameters;
6. ``save_hf``: the shrunk child written by ``save_hf`` and loaded by ``from_pretrained`` equals
   the child at another size (within ``save_hf``'s own tolerance, ``subclone_graph.export.tolerance``);
7. ``onnx``: ``export_onnx`` of the shrunk child (parity in onnxruntime).

A model whose trace torch.export confines to input sizes its eager code is not confined to (a
loop over the sequence pins the traced length) is checked as its refusal tells a user to: every
subclone with ``fixed_sizes=True``, the graph children calibrated and compared at the sizes the
guards allow (``subclone_graph.input_sizes``: the other batch at the traced length when the length
is pinned), ONNX exported at fixed sizes; ``save_hf``'s reloaded class is compared with the graph
child at an allowed size, and at the other batch and sequence size — where the class runs, as its
parent does — it must give the parent's output shape, finite, and, where the parent's outputs at
the first positions do not depend on later ones (a causal model), the graph child's outputs on
that prefix. Every ``ok`` of such a family names the limit (``limit: fixed sequence length 8:
the class's code specialises on it``).

Each check's outcome: ``ok``, ``refused`` (a one-line error of the library naming what it cannot
do: a ``ValueError``/``TypeError``, a ``TraceError``, ``HFExportError``, ``OnnxExportError`` or a
``PassError`` that is not an internal failure), ``wrong`` (an output differs where it must not),
``crash`` (any other exception: a bug), or ``skip`` (the family has nothing of that kind). A check
that needs an earlier one's result is skipped when that one did not pass.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

import subclone_graph as sg
from subclone_graph.input_sizes import fitting_size
from subclone_graph.passes import state
from subclone_graph.passes.errors import PassError, PostconditionError
from subclone_graph.export.tolerance import max_difference, model_dtype, tolerance_for

from .planting import (centring_norm_over, groups_of, heads_share_values, plant_dead, plant_dead_head_share, plant_dead_heads,
                       relative_error, run)

__all__ = ["Outcome", "run_checks", "classify", "CHECKS", "shrink_target"]

CHECKS = ("trace", "identity", "shrink", "dead", "grandchild", "save_hf", "onnx")
EXAMPLE, OTHER, CALIBRATION = (2, 8), (3, 13), ((4, 16), (4, 16))
EXACT, DEAD = 1e-5, 1e-4


@dataclass
class Outcome:
    check: str
    status: str          # ok | refused | wrong | crash | skip
    detail: str = ""
    seconds: float = 0.0


class Wrong(AssertionError):
    """An output differs where the check's invariant says it must not."""


def _line(error: BaseException) -> str:
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {text}"[:400]


def classify(error: BaseException) -> tuple[str, str]:
    """(status, one line) of an exception raised by a check (module docstring)."""
    if isinstance(error, Wrong) or isinstance(error, sg.OnnxMismatchError):
        return "wrong", _line(error)
    internal = isinstance(error, PostconditionError) or (isinstance(error, PassError) and " failed (after: " in str(error))
    refusal = (ValueError, TypeError, sg.TraceError, sg.HFExportError, sg.OnnxExportError, PassError)
    if isinstance(error, refusal) and not internal:
        return "refused", _line(error)
    return "crash", _line(error)


def _close(got: torch.Tensor, want: torch.Tensor, tolerance: float, what: str) -> None:
    if got.shape != want.shape:
        raise Wrong(f"{what}: output shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    error = relative_error(got.float(), want.float())
    if not error <= tolerance:
        raise Wrong(f"{what}: relative difference {error:.3g} > {tolerance:g}")


def shrink_target(gm) -> sg.Target:
    """Every kind the analysis found, shrunk at once (frozen groups included: they must refuse)."""
    graph = gm.meta["subclone.channel_graph"]
    roles = {g.role for g in graph.groups.values()}
    fields = {"hidden": 0.5 if "residual" in roles else None, "ffn": 0.5 if "ffn" in roles else None,
              "experts": 0.5 if "experts" in roles else None}
    if gm.meta.get("subclone.attention"):
        fields["heads"] = fields["kv_heads"] = 0.5
    layers = len(gm.meta.get("subclone.layers") or ())
    if layers >= 2:
        fields["layers"] = layers - 1
    asked = {k: v for k, v in fields.items() if v is not None}
    # nothing found to shrink: ask for the narrower stream anyway, so the library's own one-line
    # refusal is what the sweep records (an empty target would only return the parent)
    return sg.Target(**(asked or {"hidden": 0.5}))


class _Family:
    """What the checks share: the model, its inputs, the traced parent and the shrunk child."""

    def __init__(self, model, make_inputs: Callable[[int, int, int], tuple]) -> None:
        self.model, self.make_inputs = model, make_inputs
        self.example = make_inputs(*EXAMPLE, 0)
        self.other = self.anywhere = make_inputs(*OTHER, 7)       # anywhere: where the parent's class runs
        self.calibration = [self.example, self.other] + [make_inputs(b, s, 100 + i) for i, (b, s) in enumerate(CALIBRATION)]
        self.gm = self.child = None
        self.target = None
        self.limit = ""         # the sizes the trace is confined to, when it is (module docstring)

    def confine(self) -> None:
        """Check at the sizes the traced graph runs at (``fixed_sizes=True``), naming the limit."""
        if not state.INPUT_GUARDS.get(self.gm):
            return
        self.limit = _limit(self.gm)
        self.other = self.make_inputs(*fitting_size(self.gm, *OTHER), 7)
        self.calibration = [self.example, self.other] + [self.make_inputs(*fitting_size(self.gm, b, s), 100 + i)
                                                         for i, (b, s) in enumerate(CALIBRATION)]

    def subclone(self, model, target: sg.Target, **kwargs):
        return sg.subclone(model, self.example, target, fixed_sizes=bool(self.limit), **kwargs)

    def copy(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return copy.deepcopy(self.gm)


def _limit(gm) -> str:
    """``fixed sequence length 8: the class's code specialises on it`` (or the sizes allowed)."""
    parts = []
    for (name, dim), sizes in sorted((state.INPUT_SIZES.get(gm) or {}).items()):
        axis = "batch" if dim == 0 else "sequence length" if dim == 1 else f"{name} axis {dim}"
        shown = ", ".join(map(str, sizes[:4])) + (", …" if len(sizes) > 4 else "")
        parts.append(f"fixed {axis} {sizes[0]}" if len(sizes) == 1 else f"{axis} in {{{shown}}}")
    return f"limit: {'; '.join(dict.fromkeys(parts)) or 'fixed input sizes'}: the class's code specialises on it"


def _trace(f: _Family) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f.gm = sg.trace(f.model, f.example)
        sg.analyze_channels(f.gm)
    f.confine()
    graph = f.gm.meta["subclone.channel_graph"]
    frozen = sorted({g.reason.split(": ")[0] for g in graph.groups.values() if g.kind == "frozen" and g.reason})
    unknown = sorted(set(f.gm.meta.get("subclone.unknown_ops") or ()))
    notes = [f.limit] if f.limit else []
    notes += [f"unknown ops: {', '.join(unknown)}"] if unknown else []
    notes += [f"frozen by: {'; '.join(frozen[:3])}"] if frozen else []
    return " | ".join(notes)


def _identity(f: _Family) -> str:
    child = f.subclone(f.copy(), sg.Target())
    for x in (f.example, f.other):
        _close(run(child, x), run(f.model, x), EXACT, f"identity child at {tuple(x[0].shape)}")
    return ""


class Refused(ValueError):
    """Part of a check was refused (its one-line reasons); what could run, ran."""


def _shrunk_child(f: _Family, target: sg.Target) -> tuple[sg.Target, list[str]]:
    """Subclone with ``target``; a field the model refuses (``Target.heads cannot shrink this model:
    <op and module>``) is dropped and the rest tried again, so the later checks get a child."""
    refusals = []
    while True:
        try:
            f.child = f.subclone(f.copy(), target, calibration=f.calibration)
            return target, refusals
        except ValueError as error:
            field = re.search(r"Target\.(\w+)", str(error))
            fields = {"heads", "kv_heads"} if field and field.group(1) in ("heads", "kv_heads") else \
                {field.group(1)} if field else set()
            if not fields or all(getattr(target, k, None) is None for k in fields):
                raise
            refusals.append(_line(error))
            target = dataclasses.replace(target, **{k: None for k in fields})
            if target == sg.Target():
                raise


def _shrink(f: _Family) -> str:
    f.target, refusals = _shrunk_child(f, shrink_target(f.gm))
    got, want = run(f.child, f.other), run(f.model, f.other)
    if got.shape != want.shape or not torch.isfinite(got).all():
        raise Wrong(f"shrunk child at {tuple(f.other[0].shape)}: shape {tuple(got.shape)} (parent {tuple(want.shape)}), "
                    f"finite: {bool(torch.isfinite(got).all())}")
    if not sg.count_parameters(f.child) < sg.count_parameters(f.model):
        raise Wrong("the shrunk child has as many parameters as the parent")
    if refusals:        # the rest of the target ran (and the later checks use that child)
        raise Refused(f"{'; '.join(refusals)} (the rest shrank: {_fields(f.target)})")
    return _fields(f.target)


def _fields(target: sg.Target) -> str:
    return ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(target).items() if v is not None)


def _dead(f: _Family) -> str:
    gm, fields, planted = f.copy(), {}, []
    graph = gm.meta["subclone.channel_graph"]
    ffn = [g for g in groups_of(gm, "ffn") if g.size >= 2 and centring_norm_over(gm, g.id) is None]
    if ffn:
        plant_dead(gm, {g.id: list(range(1, g.size, 2)) for g in ffn})
        fields["ffn"], planted = 0.5, ["ffn neurons"]
    sites = [s for s in gm.meta.get("subclone.attention") or () if graph.groups[s.heads].kind == "heads"]
    shared = any(heads_share_values(gm, s) for s in sites)      # no weight kills such a head's activation
    centred = next(filter(None, (centring_norm_over(gm, s.heads) for s in sites)), None)
    if sites and not shared and not centred and len(sites) == len(gm.meta["subclone.attention"]) and all(
            graph.groups[s.kv_heads].size >= 2 or graph.groups[s.heads].size >= 2 for s in sites):
        widths = {(graph.groups[s.heads].size, graph.groups[s.kv_heads].size) for s in sites}
        if len(widths) == 1:
            fields["heads"], fields["kv_heads"] = plant_dead_heads(gm)
            planted.append("heads")
        elif (share := plant_dead_head_share(gm)) is not None:     # no one count fits every op
            fields["heads"] = fields["kv_heads"] = share
            planted.append("heads (half of each attention op's)")
    if not fields:
        return "skip"
    child = f.subclone(gm, sg.Target(**fields), calibration=f.calibration)
    if not sg.count_parameters(child) < sg.count_parameters(gm):
        raise Wrong("planted-dead child has as many parameters as the parent")
    for x in (f.example, f.other):
        _close(run(child, x), run(gm, x), DEAD, f"dead {' and '.join(planted)} removed, at {tuple(x[0].shape)}")
    return " and ".join(planted) + (" (heads not planted: one key/value head shared by all)" if shared else "") + (
        f" (heads not planted: a LayerNorm centres over them, {centred}: a zeroed head still moves its mean)"
        if centred else "")


def _grandchild(f: _Family) -> str:
    # the child's target, less the kinds the child no longer has (a hybrid whose dropped layer held
    # its only attention op has no heads to ask for)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysed = sg.trace(copy.deepcopy(f.child), f.example)
        sg.analyze_channels(analysed)
    found = {k for k, v in dataclasses.asdict(shrink_target(analysed)).items() if v is not None}
    gone = {k: None for k in ("hidden", "ffn", "heads", "kv_heads") if k not in found}
    # an absolute layer count the child already has asks for nothing (a family whose widths all
    # froze and only its layers shrank would otherwise get its own child back)
    if isinstance(f.target.layers, int) and f.target.layers >= len(analysed.meta["subclone.layers"]):
        gone["layers"] = None
    target = dataclasses.replace(f.target, experts=None, **gone)
    if target == sg.Target():
        return "skip"
    smaller = f.subclone(f.child, target, calibration=f.calibration)
    got = run(smaller, f.other)
    if got.shape != run(f.child, f.other).shape or not torch.isfinite(got).all():
        raise Wrong(f"shrunk grandchild: shape {tuple(got.shape)}, finite {bool(torch.isfinite(got).all())}")
    if not sg.count_parameters(smaller) < sg.count_parameters(f.child):
        raise Wrong("the grandchild has as many parameters as the child")
    return ""


def _save_hf(f: _Family) -> str:
    with tempfile.TemporaryDirectory() as folder:
        path = sg.save_hf(f.child, Path(folder) / "child")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = type(f.model).from_pretrained(path).eval()
        _saved_close(run(loaded, f.other), run(f.child, f.other), f.child, f"at {tuple(f.other[0].shape)}")
        return _anywhere(f, loaded) if f.other is not f.anywhere else ""


def _saved_close(got, want, child, where: str) -> None:
    # save_hf's own promise (subclone_graph.export.tolerance): max |difference| ≤ tolerance × max(1, max |output|)
    diff, scale = max_difference([want], [got])
    if not diff <= tolerance_for(model_dtype(child)) * scale:
        raise Wrong(f"from_pretrained of save_hf's folder {where}: max |difference| "
                    f"{diff:.3g} > {tolerance_for(model_dtype(child)):g} × {scale:.3g}")


def _anywhere(f: _Family, loaded) -> str:
    """The reloaded class at the other batch and sequence size, where the graph child cannot run
    (module docstring): the parent's shape, finite, and on a prefix the graph child's outputs
    when the parent's first positions do not depend on later ones."""
    x = f.anywhere
    got, parent = run(loaded, x), run(f.model, x)
    where = f"at {tuple(x[0].shape)}"
    if got.shape != parent.shape or not torch.isfinite(got).all():
        raise Wrong(f"from_pretrained of save_hf's folder {where}: shape {tuple(got.shape)} (parent "
                    f"{tuple(parent.shape)}), finite: {bool(torch.isfinite(got).all())}")
    batch, length = x[0].shape[:2]
    rows, positions = fitting_size(f.gm, batch, length)
    if rows > batch or positions >= length or parent.dim() < 2 or parent.shape[:2] != (batch, length):
        return f"{where} the class runs (the parent's shape, finite; no output per position to compare)"
    per_position = lambda t: isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[:2] == (batch, length)  # noqa: E731
    prefix = tuple(t[:rows, :positions] if per_position(t) else t for t in x)
    if relative_error(parent[:rows, :positions], run(f.model, prefix)) > EXACT:
        return f"{where} the class runs (the parent's shape, finite; its first positions depend on later ones)"
    _saved_close(got[:rows, :positions], run(f.child, prefix), f.child,
                 f"{where}, its first {positions} positions against the graph child's on them")
    return f"{where} the class's first {positions} positions = the graph child's on them"


def _onnx(f: _Family) -> str:
    with tempfile.TemporaryDirectory() as folder:
        diff = sg.export_onnx(f.child, f.example, Path(folder) / "child.onnx", optimize=False,
                              fixed_sizes=bool(f.limit))
    return f"max |difference| {diff:.2g}"


_STEPS = {"trace": (_trace, None), "identity": (_identity, "trace"), "shrink": (_shrink, "trace"),
          "dead": (_dead, "trace"), "grandchild": (_grandchild, "shrink"), "save_hf": (_save_hf, "shrink"),
          "onnx": (_onnx, "shrink")}


def run_checks(model, make_inputs: Callable[[int, int, int], tuple], report: Callable[[Outcome], None] | None = None,
               checks=CHECKS) -> list[Outcome]:
    """Run ``checks`` (module docstring) on ``model``; ``make_inputs(batch, seq, seed)`` makes its
    inputs. Each outcome is passed to ``report`` as soon as it is known, and all are returned."""
    family, outcomes, passed = _Family(model, make_inputs), [], set()
    for name in checks:
        step, needs = _STEPS[name]
        start = time.perf_counter()
        if needs is not None and needs not in passed:
            outcome = Outcome(name, "skip", f"needs {needs}")
        else:
            try:
                detail = step(family)
                outcome = Outcome(name, "skip", "nothing to plant") if detail == "skip" else Outcome(name, "ok", detail)
                if family.limit and name != "trace" and outcome.status == "ok":
                    outcome.detail = "; ".join(filter(None, (detail, family.limit)))
            except Exception as error:      # the outcome says what it was
                outcome = Outcome(name, *classify(error))
        outcome.seconds = round(time.perf_counter() - start, 2)
        if outcome.status == "ok" or (outcome.status == "refused" and name == "shrink" and family.child is not None):
            passed.add(name)        # a partly refused shrink still made a child for the later checks
        outcomes.append(outcome)
        if report is not None:
            report(outcome)
    return outcomes


def as_dict(outcome: Outcome) -> dict:
    return asdict(outcome)
