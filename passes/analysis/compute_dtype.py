"""What calibration of a half-precision parent computes in, and the one place it is applied.

Scores are statistics of activations; a bfloat16 parent computed in bfloat16 gives them with
bfloat16 noise, and on a CPU without bfloat16 matrix units it runs 10–30× slower than float32
(measured: 1–5 against ~80 GFLOP/s a core here). So calibration runs a half-precision graph
with a ``Precision``: every op in ``wide`` (float32 by default), from the same weights, and —
where the hardware multiplies the half dtype fast (bfloat16 matrix units, a GPU) — every
matrix product (``MATMULS``) in the half dtype, accumulated in float32 by the kernel, its
result widened back:

- every half-precision tensor an op reads is widened to ``wide`` (exact: widening adds no
  error), and every half-precision dtype literal the trace wrote (``_to_copy(dtype=bfloat16)``
  after a norm, ``full(dtype=…)``) is read as ``wide`` — so the whole graph runs in ``wide``;
- except the reads of a *gather* (``GATHERS``: an embedding lookup, an index): it copies rows,
  so it runs on the stored tensor and its result is widened — the same values, without a wide
  copy of a vocabulary-sized table;
- and, with ``Precision.matmul``, a matrix product reads its operands in that dtype (the stored
  weights as they are, the activations rounded once) and its result is widened.

``compute_dtype="auto"`` (the default) decides by a short measurement, once per process and
device (``matmul_rate``, about a second at most): the half dtype's matmuls when they run at least
``FAST_FACTOR`` × float32's rate, else float32 throughout (``choose_precision`` takes the rates,
so the rule is testable without the hardware); a device other than ``MEASURED_DEVICES`` is not
measured and gets float32 throughout. A float32 or float64 model runs as it is.

``call_widened`` is the one place this happens: the segment runner (``segments``) calls it for
every op, whatever the weights' source. The model is never changed: widened tensors are copies.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree

from ..fx_utils import written_arguments

__all__ = ["HALF_DTYPES", "GATHERS", "MATMULS", "COMPUTE_DTYPES", "FAST_FACTOR", "MEASURED_DEVICES", "Precision", "widen",
           "call_widened", "narrow_attributes", "matmul_rate", "choose_precision",
           "resolve_precision", "check_compute_dtype"]

HALF_DTYPES = (torch.float16, torch.bfloat16)
# the command line's --calib-dtype: a name -> compute_dtype ("model": the model's own dtype)
COMPUTE_DTYPES = {"auto": "auto", "float32": torch.float32, "float64": torch.float64, "model": None}
# the half dtype's matmuls are used when they run at least this many times float32's rate
FAST_FACTOR = 1.5
# the devices "auto" measures; on any other it computes in float32 throughout
MEASURED_DEVICES = ("cpu", "cuda")

aten = torch.ops.aten
# ops whose result is a copy of some of their first argument's entries: exact in any dtype
GATHERS = frozenset({aten.embedding.default, aten.index_select.default, aten.index.Tensor, aten.gather.default,
                     aten.select.int, aten.slice.Tensor})
# matrix products: with Precision.matmul they read their operands in the half dtype
MATMULS = frozenset({aten.linear.default, aten.mm.default, aten.addmm.default, aten.bmm.default,
                     aten.baddbmm.default, aten.matmul.default, aten.einsum.default})


@dataclass(frozen=True)
class Precision:
    """``wide``: what every op computes in (None: as the model is); ``matmul``: the dtype the
    matrix products read (None: ``wide``)."""
    wide: torch.dtype | None
    matmul: torch.dtype | None = None

    def __str__(self) -> str:
        if self.wide is None:
            return "the model's own dtype"
        name = str(self.wide).removeprefix("torch.")
        return name if self.matmul is None else f"{name}, matmuls in {str(self.matmul).removeprefix('torch.')}"


def _as_precision(value) -> Precision:
    return value if isinstance(value, Precision) else Precision(value)


def widen(tree, dtype: torch.dtype):
    """``tree`` with every half-precision tensor cast to ``dtype`` and every half dtype literal
    replaced by ``dtype``."""
    def one(value):
        if isinstance(value, torch.dtype):
            return dtype if value in HALF_DTYPES else value
        if isinstance(value, torch.Tensor) and value.dtype in HALF_DTYPES:
            return value.to(dtype)
        return value
    return pytree.tree_map(one, tree)


def _narrowed(tree, dtype: torch.dtype):
    return pytree.tree_map_only(torch.Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t, tree)


def call_widened(target, args, kwargs, precision):
    """A node's ATen op ``target(*args, **kwargs)`` run with ``precision`` (a ``Precision``, a
    wide dtype, or None: as it is; module docstring)."""
    precision = _as_precision(precision)
    dtype = precision.wide
    if dtype is None:
        return target(*args, **kwargs)
    if target in GATHERS:
        rest, kwargs = widen((args[1:], kwargs), dtype)
        return widen(target(args[0], *rest, **kwargs), dtype)
    if _writes_first(target):       # an in-place op must write into its tensor, not into a wide copy
        rest, kwargs = widen((args[1:], kwargs), dtype)
        return target(args[0], *rest, **kwargs)
    if precision.matmul is not None and target in MATMULS:
        args, kwargs = _narrowed((args, kwargs), precision.matmul)
        return widen(target(*args, **kwargs), dtype)
    args, kwargs = widen((args, kwargs), dtype)
    return target(*args, **kwargs)


def _writes_first(target) -> bool:
    return any(position == 0 for position, _ in written_arguments(target))


def narrow_attributes(gm, precision, live=None) -> set[str]:
    """The attribute targets of ``gm`` (among the readers in ``live`` node names, when given)
    that ``precision`` reads as stored: those only gathers read as their table, and — with
    ``Precision.matmul`` — those only matrix products read. A runner widens every other
    attribute once, up front, and these never."""
    precision = _as_precision(precision)
    readers: dict[str, set] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            readers.setdefault(node.target, set()).update(
                (user.target, user.args[0] is node) for user in node.users if live is None or user.name in live)

    def as_stored(op, first) -> bool:
        return (op in GATHERS and first) or (precision.matmul is not None and op in MATMULS)
    return {target for target, uses in readers.items() if uses and all(as_stored(op, first) for op, first in uses)}


_RATES: dict[tuple[str, torch.dtype], float] = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(a: torch.Tensor, b: torch.Tensor, device: torch.device) -> float:
    start = time.perf_counter()
    torch.mm(a, b)
    _sync(device)
    return time.perf_counter() - start


def matmul_rate(dtype: torch.dtype, device="cpu", long_enough: float = 0.05) -> float:
    """FLOP/s of a square ``dtype`` matmul on ``device``, measured once per process: sizes double
    from 128 until one product takes ``long_enough`` seconds (or the size reaches 4096), and the
    rate is the better of two products at that size. Small products are not compared: on a
    loaded machine a float32 product waits ~25 ms for its threads whatever its size, which made
    a slow half dtype look fast. Under a second per dtype where the dtype is slow, ~0.1 s where
    it is fast."""
    device = torch.device(device)
    key = (str(device), dtype)
    if key not in _RATES:
        generator = torch.Generator().manual_seed(0)
        size = 128
        while True:
            a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
            b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
            took = _seconds(a, b, device)           # the first also chooses kernels, touches memory
            if took >= long_enough or size >= 4096:
                took = min(took, _seconds(a, b, device))
                break
            size *= 2
        _RATES[key] = 2 * size ** 3 / max(took, 1e-9)
    return _RATES[key]


def choose_precision(half: torch.dtype, rates: dict[torch.dtype, float]) -> Precision:
    """float32 throughout, with ``half``'s matmuls where ``rates`` (FLOP/s per dtype) show them at
    least ``FAST_FACTOR`` × float32's."""
    fast = rates.get(half, 0.0) >= FAST_FACTOR * rates[torch.float32]
    return Precision(torch.float32, half if fast else None)


def check_compute_dtype(compute_dtype) -> None:
    """Raise a one-line ``ValueError`` unless ``compute_dtype`` is ``"auto"``, None, a floating
    dtype or a ``Precision``."""
    if compute_dtype is None or isinstance(compute_dtype, Precision) or compute_dtype == "auto":
        return
    if not (isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point):
        raise ValueError(f"compute_dtype must be \"auto\", None (the model's dtype) or a floating torch.dtype, "
                         f"got {compute_dtype!r}")


def resolve_precision(compute_dtype, model_dtypes, device="cpu", rates=None) -> Precision:
    """The ``Precision`` of a calibration asked for as ``compute_dtype`` (``"auto"``, a dtype, a
    ``Precision``, or None: as the model is) of a model holding tensors of ``model_dtypes``: a
    model with no half-precision floating tensor runs as it is. ``rates``: measured FLOP/s per
    dtype to decide ``"auto"`` with (default: ``matmul_rate`` on ``device``)."""
    halves = [d for d in HALF_DTYPES if d in set(model_dtypes)]
    if compute_dtype is None or not halves:
        return Precision(None)
    if isinstance(compute_dtype, Precision):
        return compute_dtype
    if compute_dtype != "auto":
        return Precision(compute_dtype)
    half = halves[0]
    if rates is None:
        if torch.device(device).type not in MEASURED_DEVICES:     # meta, …: nothing to measure
            return Precision(torch.float32)
        rates = {d: matmul_rate(d, device) for d in (torch.float32, half)}
    return choose_precision(half, rates)
