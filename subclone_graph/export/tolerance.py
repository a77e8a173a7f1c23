"""How close a written child must be to the child in memory, by dtype.

Every output check (``save_hf``'s reload, ``export_onnx``'s onnxruntime run, ``save``'s
``.pt2`` round trip) passes when

    max |expected − got| ≤ tolerance_for(dtype) × max(1, max |expected|)

over every tensor output, where ``dtype`` is the child's (lowest-precision) floating dtype. A
user never tunes a tolerance to get a half-precision child out. The numbers, measured on the
four tiny Hugging Face fixtures of ``models/`` (two layers, subcloned), as the largest
relative difference between the child in its dtype and the same weights run in float32 — the
rounding noise any correct re-implementation of the child may show:

    float32   < 1e-6      → 1e-4  (the tolerance the project always used)
    float16   ≤ 9.6e-4    → 1e-2  (≈ 10× the noise, ≈ 10 ulp of float16's 2^-10)
    bfloat16  ≤ 6.6e-3    → 3e-2  (≈ 4.5× the noise, ≈ 4 ulp of bfloat16's 2^-7)

A real bug (a wrong slice, a lost scale factor) moves outputs by their own order of magnitude,
far above all three.
"""
from __future__ import annotations

import torch

__all__ = ["tolerance_for", "model_dtype", "TOLERANCES", "max_difference"]

TOLERANCES = {torch.float64: 1e-4, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def tolerance_for(dtype: torch.dtype) -> float:
    """The relative tolerance of an output check for a child computing in ``dtype``."""
    if dtype not in TOLERANCES:
        raise ValueError(f"no output tolerance for dtype {dtype}; expected one of "
                         f"{', '.join(str(d) for d in TOLERANCES)}")
    return TOLERANCES[dtype]


def model_dtype(module: torch.nn.Module) -> torch.dtype:
    """The least precise floating dtype among the module's parameters and buffers (float32 if none)."""
    found = {t.dtype for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()}
    if not found:
        return torch.float32
    return max(found, key=lambda d: tolerance_for(d) if d in TOLERANCES else 0.0)


def max_difference(expected, got) -> tuple[float, float]:
    """(max |expected − got|, max(1, max |expected|)) over paired tensors (numpy arrays allowed)."""
    diff, scale = 0.0, 1.0
    for want, have in zip(expected, got):
        want = torch.as_tensor(want).detach().double()
        have = torch.as_tensor(have).detach().double()
        if want.shape != have.shape:
            return float("inf"), scale
        if want.numel():
            step = float((want - have).abs().max())
            if step != step:              # a NaN where the child has a number (or the reverse)
                return float("inf"), scale
            diff = max(diff, step)
            scale = max(scale, float(want.abs().max()))
    return diff, scale
