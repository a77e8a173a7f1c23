"""Where calibration runs: ``--device`` / ``device=`` resolved once, the traced graph copied there.

Invariant: the model given is never moved. Calibration on another device runs a *copy* of the
traced graph moved by ``MoveToDevicePass`` (its tensors and the device literals ``torch.export``
wrote into the graph), with each batch moved alongside; the statistics come back to the CPU in
float64, and every later pass — and so the child — works on the CPU graph.

``resolve_device``: ``cpu``, ``cuda``, ``cuda:N``, ``meta`` or ``auto`` (CUDA when available,
else the CPU); a device this machine lacks is a one-line ``ValueError``.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.fx as fx

from subclone_graph.passes.rewrite.move_to_device import MoveToDevicePass

__all__ = ["resolve_device", "calibration_copy", "to_device", "DEVICE_CHOICES"]

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


def calibration_copy(gm: fx.GraphModule, device) -> tuple[fx.GraphModule, torch.device]:
    """``(gm, cpu)`` when ``device`` is None or the CPU; else a copy of ``gm`` moved to it."""
    device = resolve_device(device)
    if device.type == "cpu":
        return gm, device
    with warnings.catch_warnings():          # torch's own pytree deprecation, raised by its deepcopy
        warnings.simplefilter("ignore", FutureWarning)
        moved = copy.deepcopy(gm)
    return MoveToDevicePass(device)(moved).graph_module, device


def to_device(values: list, device: torch.device) -> list:
    """A flat input list with its tensors on ``device`` (unchanged on the CPU)."""
    if device.type == "cpu":
        return values
    return [v.to(device) if isinstance(v, torch.Tensor) else v for v in values]
