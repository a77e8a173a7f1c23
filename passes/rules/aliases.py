"""Ops that are other names of ops with rules: ``torch.multiply`` is ``torch.mul``.

ATen declares these as aliases (``native_functions.yaml``: "alias for ``mul``"): the same schema
and the same kernel under a second name. The trace rewrites each call of an alias as a call of
its canonical op (``passes/rewrite/canonical_aliases.py``), so that every rule and every pass that
recognises an op (a norm's ``mul``, a residual's ``add``) sees one name for it. ``ALIASES`` maps
alias → canonical op; only ops whose canonical op has a rule are listed, and a test checks that
each pair's schemas agree argument by argument.
"""
from __future__ import annotations

import torch

__all__ = ["ALIASES"]

aten = torch.ops.aten


def _pairs(alias: str, canonical: str, overloads: tuple[str, ...]) -> dict:
    """``aten.alias.overload`` → ``aten.canonical.overload``, and the in-place twins
    (``alias_`` → ``canonical_``), for each overload both ops have."""
    pairs = {}
    for suffix in ("", "_"):
        a, c = getattr(aten, alias + suffix, None), getattr(aten, canonical + suffix, None)
        if a is None or c is None:
            continue
        for overload in overloads:
            if overload in a.overloads() and overload in c.overloads():
                pairs[getattr(a, overload)] = getattr(c, overload)
    return pairs


ALIASES = {
    **_pairs("multiply", "mul", ("Tensor", "Scalar")),
    **_pairs("divide", "div", ("Tensor", "Scalar", "Tensor_mode")),
    **_pairs("true_divide", "div", ("Tensor", "Scalar")),
    **_pairs("subtract", "sub", ("Tensor", "Scalar")),
    **_pairs("greater", "gt", ("Tensor", "Scalar")),
    **_pairs("greater_equal", "ge", ("Tensor", "Scalar")),
    **_pairs("less", "lt", ("Tensor", "Scalar")),
    **_pairs("less_equal", "le", ("Tensor", "Scalar")),
    **_pairs("not_equal", "ne", ("Tensor", "Scalar")),
    **_pairs("clip", "clamp", ("default", "Tensor")),
    **_pairs("absolute", "abs", ("default",)),
    **_pairs("negative", "neg", ("default",)),
    **_pairs("arctan2", "atan2", ("default",)),
    **_pairs("special_expit", "sigmoid", ("default",)),
    **_pairs("arccos", "acos", ("default",)),
    **_pairs("arcsin", "asin", ("default",)),
    **_pairs("arctan", "atan", ("default",)),
    **_pairs("arccosh", "acosh", ("default",)),
    **_pairs("arcsinh", "asinh", ("default",)),
    **_pairs("arctanh", "atanh", ("default",)),
    **_pairs("fix", "trunc", ("default",)),
    **_pairs("concatenate", "cat", ("default",)),
    **_pairs("concat", "cat", ("default",)),
}
