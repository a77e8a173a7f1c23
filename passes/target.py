"""The child's size: ``Target``. ``None`` keeps the parent's size of that kind.

- ``hidden``: the residual stream's width (one order for the whole network);
- ``layers``: the number of residual layers (fewer: layers are dropped; more: repeated);
- ``heads`` / ``kv_heads``: query heads and key/value heads per attention op. ``heads=None``
  keeps the parent's query heads per kv head; ``kv_heads=None`` keeps the parent's kv heads.
  ``heads`` must be ``kv_heads × k`` with ``k`` at most the parent's query heads per kv head;
- ``ffn``: every MLP's inner width.

Integers of any integral type (``numpy.int64`` too) are accepted and stored as ``int``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

__all__ = ["Target", "TARGET_FIELDS"]

TARGET_FIELDS = ("hidden", "layers", "heads", "kv_heads", "ffn")


@dataclass(frozen=True)
class Target:
    """The child's size. ``None`` keeps the parent's."""

    hidden: int | None = None
    layers: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    ffn: int | None = None

    def __post_init__(self):
        for name in TARGET_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"Target.{name} must be an int or None, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"Target.{name}={value}: must be at least 1 (or None to keep the parent's)")
            object.__setattr__(self, name, int(value))
