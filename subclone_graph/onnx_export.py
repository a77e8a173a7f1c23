"""Export a child to ONNX (dynamo exporter), check it, verify it in onnxruntime, atomically.

The file appears at ``path`` only after ``onnx.checker`` passed and onnxruntime reproduced the
child's outputs on ``example_inputs`` within ``rtol`` of the outputs' magnitude (max |a − b| ≤
rtol·max(1, max |a|)); otherwise nothing is written. Batch and
sequence axes stay dynamic. Weights go to an external data file beside the model when they
exceed protobuf's 2 GB limit.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.utils._pytree as pytree

from .passes.fx_utils import as_input_tuple, eval_mode
from .tracing import dynamic_shapes_for

__all__ = ["export_onnx", "OnnxMismatchError"]

_TWO_GB = 2 * 1024**3


class OnnxMismatchError(RuntimeError):
    """onnxruntime's outputs differ from the child's beyond the tolerance."""


def _tensors(output) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor)]


def run_onnx(path: str | os.PathLike, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)})


def export_onnx(child: torch.nn.Module, example_inputs, path, *, example_kwargs: dict | None = None,
                rtol: float = 1e-4, overwrite: bool = True, opset: int | None = None) -> float:
    """Write ``child`` as ONNX at ``path``; return the max |difference| found in onnxruntime."""
    import onnx

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    args = as_input_tuple(example_inputs)
    kwargs = dict(example_kwargs or {})
    size = sum(p.numel() * p.element_size() for p in child.parameters())
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".onnx-", dir=path.parent))
    try:
        staged = staging / path.name
        with torch.no_grad(), eval_mode(child):
            torch.onnx.export(child, args, str(staged), kwargs=kwargs, dynamo=True, opset_version=opset,
                              dynamic_shapes=dynamic_shapes_for(child, args, kwargs),
                              external_data=size > _TWO_GB, verbose=False)
            expected = _tensors(child(*args, **kwargs))
        onnx.checker.check_model(str(staged))
        got = run_onnx(staged, [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)])
        diff = max(float(np.max(np.abs(e.detach().numpy() - g))) for e, g in zip(expected, got))
        scale = max([1.0] + [float(e.abs().max()) for e in expected if e.numel()])
        if len(got) != len(expected) or not diff <= rtol * scale:
            raise OnnxMismatchError(f"onnxruntime output differs from the child by {diff:.3g} "
                                    f"(> {rtol:g} × {scale:.3g}); "
                                    f"nothing written to {path}")
        for file in staging.iterdir():
            os.replace(file, path.parent / file.name)
        return diff
    finally:
        shutil.rmtree(staging, ignore_errors=True)
