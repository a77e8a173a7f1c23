"""Export a child to ONNX (dynamo exporter), check it, verify it in onnxruntime, atomically.

The file appears at ``path`` only after ``onnx.checker`` passed and onnxruntime (CPU provider)
reproduced, on ``example_inputs``, the outputs of the module it was exported from, computed by
torch in the graph's dtype, within that dtype's tolerance (``tolerance.tolerance_for``:
max |a − b| ≤ tol·max(1, max |a|)); otherwise nothing is written.
Batch and sequence axes stay dynamic (``fixed_sizes=True``: the example's sizes). Mixture-of-experts (grouped) matmuls export through
``onnx_moe`` (an exact per-expert translation). Weights go to an external data file beside the model
when they exceed protobuf's 2 GB limit. The destination is checked before exporting
(``outputs.check_destination``); an existing file is replaced only with ``overwrite=True``.

The graph's dtype (``dtype=None`` chooses; ``dtype=torch.float32`` / ``torch.float16`` forces):

- a float32 child → a float32 graph;
- a bfloat16 child → a **float32** graph: onnxruntime's CPU provider has no bfloat16 kernels
  (``Mul``, ``MatMul``, ...). The child's weights are widened exactly and every bfloat16 dtype
  literal of its graph (a cast inside a norm) becomes float32;
- a float16 child → a float16 graph when onnxruntime's CPU provider runs it, else (a missing
  kernel) float32, as for bfloat16.

Why the reference is the child *in the graph's dtype*: a float32 graph of a bfloat16 child
computes the child's function without the child's bfloat16 rounding, so it differs from the
bfloat16 child by that rounding, not by any fault of the export. On a real checkpoint the
rounding is large: the demo's 135M-parameter parent in bfloat16, subcloned to 20 layers, differs
from the same child computed in float32 by 26% of its largest logit (2 × 32 tokens). Most of it
enters at ``scaled_dot_product_attention``: queries and keys carry bfloat16's ~2% rounding after
a few layers, and attention logits up to |q·k|/√d ≈ 33 turn that into 7% of an attention output
(the kernel itself adds 0.25%). The bfloat16 child is what it is (``save_hf``'s bfloat16 folder
reproduces it exactly); the graph is checked against what it computes: the child's weights
widened exactly, its graph run in float32 by torch, at float32's tolerance. That check is tight
(a wrong slice or a dropped cast shows), where a 3% tolerance against the bfloat16 child failed
correct exports (``OnnxMismatchError`` at 1.45 on logits of 29.5) and would let a 2% fault
through on small ones.
"""
from __future__ import annotations

import contextlib
import copy
import io as stdio
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from subclone_graph.export.onnx_grouped_mm import portable_grouped_mm, translation_table
from subclone_graph.export.destination import check_destination, staging_folder
from subclone_graph.passes.fx_utils import as_input_tuple, eval_mode
from subclone_graph.passes.rewrite.lower_complex import complex_blocker, has_complex_values, lower_complex
from subclone_graph.progress import Phases
from subclone_graph.export.tolerance import max_difference, model_dtype, tolerance_for
from subclone_graph.tracing import dynamic_shapes_for, fast_export_settings

__all__ = ["export_onnx", "OnnxExportError", "OnnxMismatchError", "run_onnx", "graph_dtype"]

_TWO_GB = 2 * 1024**3
_GRAPH_DTYPES = (torch.float32, torch.float16)


class OnnxExportError(RuntimeError):
    """The child could not be exported to an ONNX graph that onnxruntime runs."""


class OnnxMismatchError(OnnxExportError):
    """onnxruntime's outputs differ from the child's beyond the tolerance."""


@contextlib.contextmanager
def _quiet_export():
    """The exporter's own chatter (deprecation warnings, progress lines) is not the user's business."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)          # "torchvision is not installed. Skipping ..." lines
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(stdio.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


_TORCHLIB_OPS: dict = {}


@contextlib.contextmanager
def _torchlib_ops_read_once():
    """torch.onnx builds its op registry anew on each export, and onnxscript parses the source of
    every torchlib function to list them (about a second, more than translating a tiny child).
    Within our exports the list is read once per process and count of onnxscript's registered
    functions: a function registered with onnxscript since is seen. Where torch's internals moved, nothing is patched."""
    try:
        from onnxscript.function_libs.torch_lib import registration
        from torch.onnx._internal.exporter import _registration
        apis = _registration.onnxscript_apis
        read = apis.get_torchlib_ops
    except (ImportError, AttributeError):
        yield
        return

    def read_once():
        key = (id(registration.default_registry), sum(len(f.overloads) + len(f.complex)
                                                      for _, f in registration.default_registry.items()))
        if key not in _TORCHLIB_OPS:
            _TORCHLIB_OPS.clear()
            _TORCHLIB_OPS[key] = read()
        return _TORCHLIB_OPS[key]

    apis.get_torchlib_ops = read_once
    try:
        yield
    finally:
        apis.get_torchlib_ops = read


def _tensors(output) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor)]


def _ort_errors() -> tuple:
    from onnxruntime.capi import onnxruntime_pybind11_state as state
    return tuple(getattr(state, n) for n in ("Fail", "NotImplemented", "InvalidGraph", "RuntimeException",
                                             "InvalidArgument") if hasattr(state, n))


def run_onnx(path: str | os.PathLike, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    import onnxruntime

    # as many threads as torch computes with (onnxruntime's own default is every core, whatever
    # torch.set_num_threads says: on a tiny graph, setting up that pool costs more than the run)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)})


def graph_dtype(child: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype of the ONNX graph for ``child`` before trying onnxruntime (see module doc)."""
    if dtype is not None:
        if dtype not in _GRAPH_DTYPES:
            raise ValueError(f"export_onnx: dtype={dtype} is not supported; allowed: torch.float32, "
                             f"torch.float16, or None (bfloat16 → float32, float16 → float16 if onnxruntime "
                             f"runs it)")
        return dtype
    return torch.float16 if model_dtype(child) == torch.float16 else torch.float32


def _cast_literals(value, source: torch.dtype, target: torch.dtype):
    return pytree.tree_map(lambda x: target if x is source else x, value)


def _as_dtype(child: torch.nn.Module, target: torch.dtype) -> torch.nn.Module:
    """A copy of ``child`` computing in ``target``: floating weights cast, and for a GraphModule
    every dtype literal of the child's own dtype in its graph rewritten (a norm's cast back)."""
    source = model_dtype(child)
    if source == target:
        return child
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        clone = copy.deepcopy(child)
    if isinstance(clone, fx.GraphModule):
        for node in clone.graph.nodes:
            node.args = _cast_literals(node.args, source, target)
            node.kwargs = _cast_literals(node.kwargs, source, target)
            if node.op == "get_attr":
                owner, _, name = node.target.rpartition(".")
                holder = clone.get_submodule(owner) if owner else clone
                value = getattr(holder, name)
                if isinstance(value, torch.Tensor) and value.dtype == source and not isinstance(
                        value, torch.nn.Parameter) and name not in dict(holder.named_buffers(recurse=False)):
                    setattr(holder, name, value.to(target))
        clone.recompile()
    return clone.to(target)


def _cast_inputs(args: tuple, kwargs: dict, source: torch.dtype, target: torch.dtype):
    cast = lambda t: t.to(target) if isinstance(t, torch.Tensor) and t.dtype == source else t  # noqa: E731
    return pytree.tree_map(cast, args), pytree.tree_map(cast, kwargs)


def _export_and_run(module, args: tuple, kwargs: dict, staged: Path, opset: int | None, optimize: bool,
                    phases: Phases, fixed_sizes: bool = False) -> list:
    import onnx

    phases.begin("write")
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    if isinstance(module, fx.GraphModule):
        module = portable_grouped_mm(module)      # a new graph when it has expert matmuls (onnx_moe)
        module = _real_arithmetic(module)
    # export's fake-tensor cache and per-node stack traces cost ~30% here and change no graph (tracing.py)
    with torch.no_grad(), eval_mode(module), _quiet_export(), fast_export_settings(), _torchlib_ops_read_once():
        try:
            torch.onnx.export(module, args, str(staged), kwargs=kwargs, dynamo=True, opset_version=opset, optimize=optimize,
                              dynamic_shapes=None if fixed_sizes else dynamic_shapes_for(module, args, kwargs),
                              custom_translation_table=translation_table(),
                              external_data=size > _TWO_GB, verbose=False)
        except Exception as error:   # the exporter wraps every failure in its own types
            raise OnnxExportError(f"torch.onnx.export failed: {type(error).__name__}: "
                                  f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}") from error
    onnx.checker.check_model(str(staged))
    phases.begin("check")
    return run_onnx(staged, [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)])


def _real_arithmetic(module: fx.GraphModule) -> fx.GraphModule:
    """``module``, or a copy whose complex arithmetic is pairs of real tensors (``lower_complex``;
    a traced model's already is): ONNX has no complex values. One op without a real form is
    refused by name."""
    blocker = complex_blocker(module)
    if blocker:
        raise OnnxExportError(f"ONNX has no complex values, and {blocker} has no real form")
    if not has_complex_values(module):
        return module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = copy.deepcopy(module)
    lower_complex(module)
    return module


def _reference(module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    with torch.no_grad(), eval_mode(module):
        return _tensors(module(*args, **kwargs))


def _exported(child, args, kwargs, staged: Path, dtype: torch.dtype, opset: int | None,
              optimize: bool, phases: Phases, fixed_sizes: bool = False) -> tuple[list, list, torch.dtype]:
    """(onnxruntime's outputs, the exported module's outputs in torch, the graph's dtype)."""
    source = model_dtype(child)
    module = _as_dtype(child, dtype)
    margs, mkwargs = _cast_inputs(args, kwargs, source, dtype)
    try:
        got = _export_and_run(module, margs, mkwargs, staged, opset, optimize, phases, fixed_sizes)
        return got, _reference(module, margs, mkwargs), dtype
    except _ort_errors() as error:
        if dtype == torch.float16 and source == torch.float16:
            for file in staged.parent.iterdir():
                file.unlink()
            return _exported(child, args, kwargs, staged, torch.float32, opset, optimize, phases,   # widen: no kernel
                             fixed_sizes)
        raise OnnxExportError(f"onnxruntime cannot run the exported graph: {str(error).splitlines()[0]}") from error


def export_onnx(child: torch.nn.Module, example_inputs, path, *, example_kwargs: dict | None = None,
                rtol: float | None = None, overwrite: bool = False, opset: int | None = None,
                dtype: torch.dtype | None = None, optimize: bool = True, fixed_sizes: bool = False,
                progress=None) -> float:
    """Write ``child`` as ONNX at ``path``; return the max |difference| found in onnxruntime.

    The reference is the child computed by torch in the graph's dtype (the child itself when
    the graph keeps its dtype; module doc). ``rtol`` defaults to ``tolerance_for(graph's
    dtype)``; ``dtype`` chooses the graph's dtype (see module doc); ``opset`` the ONNX opset
    (None: the exporter's default); ``optimize=False`` skips the exporter's graph optimisation
    (faster; the parity check is the same); ``fixed_sizes=True`` exports at the example's sizes, no
    dynamic axes (a child subcloned with ``fixed_sizes=True`` runs at those only; a static graph also
    exports faster: 3.9 s against 11.3 s for a tiny grown decoder on this 2-core CPU). ``progress``
    (``subclone_graph.progress``) sees the
    phases ``write`` (the export) and ``check`` (onnxruntime and the reference). Raises ``FileExistsError`` for an existing ``path``
    without ``overwrite``, ``OnnxMismatchError`` / ``OnnxExportError`` (nothing written) when
    the check fails.
    """
    path = check_destination(path, overwrite=overwrite)
    args = as_input_tuple(example_inputs)
    kwargs = dict(example_kwargs or {})
    target = graph_dtype(child, dtype)
    with staging_folder(path.parent) as staging:
        (staging / "graph").mkdir()
        phases = Phases(progress)
        try:
            got, expected, used = _exported(child, args, kwargs, staging / "graph" / path.name, target, opset,
                                            optimize, phases, fixed_sizes)
        except BaseException as error:
            phases.end(error)
            raise
        phases.end()
        tol = tolerance_for(used) if rtol is None else rtol
        diff, scale = max_difference(expected, got)
        if len(got) != len(expected) or not diff <= tol * scale:
            computed = "" if used == model_dtype(child) else f" (computed in {str(used)[6:]}, the graph's dtype)"
            raise OnnxMismatchError(f"onnxruntime output differs from the child{computed} by {diff:.3g} "
                                    f"(> {tol:g} × {scale:.3g}); nothing written to {path}")
        for file in (staging / "graph").iterdir():
            os.replace(file, path.parent / file.name)
        return diff
