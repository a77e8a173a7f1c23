"""The child's size: ``Target``. ``None`` keeps the parent's size of that kind.

- ``hidden``: the residual stream's width (one order for the whole network);
- ``layers``: the number of residual layers (fewer: layers are dropped; more: repeated);
- ``heads`` / ``kv_heads``: query heads and key/value heads per attention op. ``heads=None``
  keeps the parent's query heads per kv head; ``kv_heads=None`` keeps the parent's kv heads.
  ``heads`` must be ``kv_heads × k`` with ``k`` at most the parent's query heads per kv head;
- ``ffn``: every MLP's inner width (dense, shared and routed experts alike);
- ``latent``: every low-rank bottleneck that a norm averages over (latent attention's query and
  key/value ranks); the √(D/d) correction of that norm is ``RescaleResidualPass``'s.

Every field is either an absolute count (an integer of any integral type, stored as ``int``)
or a fraction in (0, 1): keep that share of *every* group of that kind, each rounded on its
own (``relative_size``: the nearest whole size, halves round up, at least 1). For heads the
child's kv heads are ``kv_heads × parent kv heads`` rounded so; its query heads are
``heads × parent query heads`` rounded to the nearest multiple of the child's kv heads between
``1`` and the parent's query heads per kv head per group (whole kv groups, whole query heads
per group). ``layers`` as a fraction keeps that share of the parent's residual layers.
An absolute count on a model whose groups of that kind differ in width is refused (the error
lists the widths and suggests the fraction).

Growing (HyperCloning, arXiv 2409.12903): a width above the parent's — an absolute count that
is an integer multiple of it, or ``Times(n)`` (``n`` copies of *every* group of that kind) —
clones each channel, neuron, head or kv group ``n`` times, preserving the function exactly
(``passes/analysis/grow.py``). ``Times`` applies to ``hidden``, ``ffn``, ``latent``, ``heads``
and ``kv_heads``; deeper is ``layers`` above the parent's (layers repeated).

Rounding is exact: the fraction is read as the decimal it was written as (``0.29`` is 29/100,
not the binary float just below it), so ``0.29 × 50 = 14.5`` rounds up to 15.

``multiple_of`` (``--multiple-of``): every width a fraction gives (``hidden``, ``ffn``,
``latent``) is rounded to the nearest multiple of it (halves up; at least one multiple, at most
the parent's width) — 8 or 64 make matmuls faster on most hardware; an absolute width must then
be a multiple of it. Counts (``layers``, ``heads``, ``kv_heads``, ``experts``) are not rounded.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from fractions import Fraction

__all__ = ["Target", "Times", "TARGET_FIELDS", "WIDTH_FIELDS", "relative_size", "is_fraction", "is_relative"]

TARGET_FIELDS = ("hidden", "layers", "heads", "kv_heads", "ffn", "latent", "experts")
WIDTH_FIELDS = ("hidden", "ffn", "latent")        # what ``multiple_of`` rounds


def is_fraction(value) -> bool:
    """A relative target (a float in (0, 1)), as opposed to an absolute count."""
    return isinstance(value, float)


@dataclass(frozen=True)
class Times:
    """A growth factor: ``Target(hidden=Times(2))`` clones every group of that kind twice over
    (an integer of at least 2: a whole number of copies is what keeps the function exact)."""

    factor: int

    def __post_init__(self):
        if isinstance(self.factor, bool) or not isinstance(self.factor, numbers.Integral) or self.factor < 2:
            raise ValueError(f"Times({self.factor!r}): a growth factor is an integer of at least 2 "
                             "(each channel cloned that many times)")
        object.__setattr__(self, "factor", int(self.factor))

    def __str__(self) -> str:
        return f"x{self.factor}"


def is_relative(value) -> bool:
    """A target resolved per group (a fraction or a ``Times`` factor), not an absolute count."""
    return isinstance(value, (float, Times))


def relative_size(fraction: float, size: int, multiple: int = 1) -> int:
    """``fraction × size`` rounded to the nearest multiple of ``multiple`` (halves up), at least
    ``multiple`` and at most ``size``; computed on exact rationals, the fraction read as the
    shortest decimal that is this float (``0.29`` → 29/100)."""
    exact = Fraction(repr(float(fraction))) * size / multiple
    units = math.floor(exact + Fraction(1, 2))
    return min(size, max(1, units) * multiple)


@dataclass(frozen=True)
class Target:
    """The child's size. ``None`` keeps the parent's; a float in (0, 1) keeps that share."""

    hidden: int | float | None = None
    layers: int | float | None = None
    heads: int | float | None = None
    kv_heads: int | float | None = None
    ffn: int | float | None = None
    latent: int | float | None = None
    experts: int | float | None = None
    multiple_of: int | None = None        # round widths from fractions to a multiple of this

    def __post_init__(self):
        self._check_multiple()
        for name in TARGET_FIELDS:
            value = getattr(self, name)
            if value is None or isinstance(value, Times) and name != "experts":
                continue
            if isinstance(value, Times):
                raise ValueError(f"Target.experts={value}: experts are not grown (a router's softmax and "
                                 "top-k over cloned experts would change what each token gets)")
            if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)):
                if not 0.0 < float(value) < 1.0:
                    raise ValueError(f"Target.{name}={value}: a fraction must lie in (0, 1) "
                                     "(or give an absolute count, or None to keep the parent's)")
                object.__setattr__(self, name, float(value))
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"Target.{name} must be an int, a fraction in (0, 1), Times(n) or None, "
                                f"got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"Target.{name}={value}: must be at least 1 (or None to keep the parent's)")
            object.__setattr__(self, name, int(value))

    def _check_multiple(self) -> None:
        multiple = self.multiple_of
        if multiple is None:
            return
        if isinstance(multiple, bool) or not isinstance(multiple, numbers.Integral) or multiple < 1:
            raise ValueError(f"Target.multiple_of={multiple!r}: must be a whole number of at least 1 (or None)")
        object.__setattr__(self, "multiple_of", int(multiple))
        for name in WIDTH_FIELDS:
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value % multiple:
                low = max(multiple, value - value % multiple)
                raise ValueError(f"Target.{name}={value} is not a multiple of Target.multiple_of={multiple}; "
                                 f"give {low} or {low + multiple}")

    def size_of(self, name: str, parent_size: int) -> int | None:
        """The child's size of one group of kind ``name`` whose parent size is ``parent_size``
        (``None``: keep it); an absolute count is returned as given."""
        value = getattr(self, name)
        if isinstance(value, Times):
            return value.factor * parent_size
        if value is None or not is_fraction(value):
            return value
        multiple = self.multiple_of if name in WIDTH_FIELDS and self.multiple_of else 1
        return relative_size(value, parent_size, multiple)
