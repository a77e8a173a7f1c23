"""Where calibration runs: ``--device`` / ``device=`` resolved once, handed to ``ScoreChannelsPass``.

Invariant: the model given is never moved. The segment runner (``passes.analysis.segments``)
moves each weight it fetches and each batch to the device and reads the device literals
``torch.export`` wrote into the graph as it; the statistics come back to the CPU in float64,
and every later pass — and so the child — works on the CPU graph.

``resolve_device``: ``cpu``, ``cuda``, ``cuda:N``, ``meta`` or ``auto`` (CUDA when available,
else the CPU); a device this machine lacks is a one-line ``ValueError``.
"""
from __future__ import annotations

import torch

__all__ = ["resolve_device", "DEVICE_CHOICES"]

DEVICE_CHOICES = "cpu, cuda, cuda:N or auto"


def resolve_device(spec) -> torch.device:
    """The ``torch.device`` for ``spec`` (module docstring), checked against this machine."""
    if spec is None:
        return torch.device("cpu")
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {spec!r}: not a device (expected {DEVICE_CHOICES})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r}: CUDA is not available on this machine (use cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type not in ("cpu", "meta"):
        raise ValueError(f"device {spec!r}: not supported (expected {DEVICE_CHOICES})")
    return device
