"""Check a written Hugging Face folder: it runs as its class and computes the child.

``check_folder`` runs the written folder as its class and compares it with the reference
within ``tolerance.tolerance_for`` the child's dtype, on the example inputs and on the example at
another batch and sequence length (``input_sizes.another_example``: one more row, five more
positions, or the nearest sizes a child traced with fixed sizes runs at) — a class that computes
something slightly else (an ε its norms over another width read too) can stay under the tolerance
at one size and not at another: loaded with ``from_pretrained`` as a user
loads it, or — for a child larger than the memory it may take (``subclone_checkpoint``'s
``memory_budget``) — segment by segment: the class traced with fake weights from the written
``config.json`` (``checkpoint.weightless_parent``) and run by the same segment runner, each
segment's weights read from the written shards, so its peak memory is one segment's weights,
not the child. (The writer's config search and embedding fold, ``write.py`` steps 2 and 3, still
build the class whole when they must measure its outputs: only for a field the shapes do not
decide, or a fold.)
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from subclone_graph.passes import state as pass_state
from subclone_graph.passes.analysis import FindResidualBlocksPass
from subclone_graph.passes.analysis.score_channels import flat_inputs
from subclone_graph.passes.analysis.segments import run_segments
from subclone_graph.passes.fx_utils import get_attribute

from subclone_graph.checkpoint.weightless_parent import CheckpointWeights, weightless_parent
from subclone_graph.export.hf.common import HFExportError, example_inputs, quiet_transformers, required, tensor_outputs
from subclone_graph.export.hf.layer_constants import moved_layer_constants
from subclone_graph.export.hf.stream_scale import stream_fold_limit
from subclone_graph.export.hf.weights import hf_names
from subclone_graph.export.tolerance import max_difference, model_dtype, tolerance_for

if TYPE_CHECKING:
    from subclone_graph.export.hf.write import Written

__all__ = ["check_folder", "segment_outputs"]


def segment_outputs(gm: fx.GraphModule, inputs: list[tuple], weights) -> list[dict]:
    """``gm`` run by the segment runner on each of ``inputs``, its weights from ``weights``."""
    flat = [flat_inputs(gm, x, i) for i, x in enumerate(inputs)]
    with torch.no_grad():
        return [tensor_outputs(gm.graph._codegen.process_outputs(out)) for out in run_segments(gm, flat, weights)]


def _run_whole(child, staging: Path, inputs: list[tuple]) -> list[dict]:
    """The written folder loaded as users load it (``from_pretrained``) and run on ``inputs``."""
    cls, dtype = required(child, pass_state.PARENT_CLASS), model_dtype(child)
    with quiet_transformers():
        loaded = cls.from_pretrained(staging, dtype=dtype).eval()
    if type(loaded) is not cls or model_dtype(loaded) != dtype:
        raise HFExportError(f"{staging.name} loads as {type(loaded).__name__} in {model_dtype(loaded)}, "
                            f"not {cls.__name__} in {dtype}")
    with torch.no_grad():
        return [tensor_outputs(loaded(*x)) for x in inputs]


def _run_by_segments(child, staging: Path, inputs: list[tuple]) -> list[dict]:
    """The class traced with fake weights from the written ``config.json`` and run segment by
    segment, each segment's weights read from the written shards: one segment in memory."""
    weights = CheckpointWeights()
    with quiet_transformers():
        loaded = weightless_parent(staging, weights.open(staging), example_inputs(child))
    FindResidualBlocksPass()(loaded)
    return segment_outputs(loaded, inputs, weights)


def check_folder(child: fx.GraphModule, staging: Path, written: Written, out_dir, *, by_segments: bool = False) -> float:
    """Run the written folder as its class and compare it with the reference; ``HFExportError``
    naming ``out_dir`` when it differs. Returns the max |difference|. ``by_segments``: run it
    segment by segment (module docstring) rather than loaded whole with ``from_pretrained`` —
    for a child larger than the memory it may take."""
    cls, dtype = required(child, pass_state.PARENT_CLASS), model_dtype(child)
    checked = written.checked or [(example_inputs(child), written.reference)]
    try:
        runs = (_run_by_segments if by_segments else _run_whole)(child, staging, [x for x, _ in checked])
    except HFExportError as error:
        raise HFExportError(f"{error}; nothing written to {out_dir}") from error
    except Exception as error:
        first = str(error).splitlines()[0] if str(error) else ""
        raise HFExportError(f"the written folder does not run as {cls.__name__} ({type(error).__name__}: {first}); "
                            f"nothing written to {out_dir}") from error
    largest = 0.0
    for (inputs, expected), got in zip(checked, runs):
        if set(expected) - set(got):
            raise HFExportError(f"the saved {cls.__name__} lacks the child's outputs {sorted(set(expected) - set(got))}; "
                                f"nothing written to {out_dir}")
        diff, scale = max_difference(list(expected.values()), [got[k] for k in expected])
        if not diff <= tolerance_for(dtype) * scale:
            raise HFExportError(f"the saved {cls.__name__} differs from the child by {diff:.3g} (> {tolerance_for(dtype):g} "
                                f"× {scale:.3g}) at inputs of size {_sizes(inputs)}: {_why_different(child, staging)}; "
                                f"nothing written to {out_dir}")
        largest = max(largest, diff)
    return largest


def _sizes(inputs: tuple) -> tuple:
    first = next((x for x in inputs if isinstance(x, torch.Tensor)), None)
    return tuple(first.shape) if first is not None else ()


def _recomputed_buffers(child, staging: Path) -> list[str]:
    """The written tensors the class does not load but computes from its config (a
    non-persistent buffer: a sinusoidal table of the width) and that differ from the child's."""
    cls = required(child, pass_state.PARENT_CLASS)
    try:
        with quiet_transformers():
            loaded = cls.from_pretrained(staging, dtype=model_dtype(child))
    except Exception:                   # the caller's error already says it does not load
        return []
    tensors = child.state_dict()
    # a constant the graph reads but does not hold as state keeps its attribute name
    ours = {n.target: get_attribute(child, n.target) for n in child.graph.nodes if n.op == "get_attr"}
    ours.update({hf: tensors[name] for name, hf in hf_names(child).items() if name in tensors})
    persistent = set(loaded.state_dict())
    return [name for name, buffer in loaded.named_buffers() if name in ours and name not in persistent
            and (buffer.shape != ours[name].shape or not torch.equal(buffer, ours[name].to(buffer.dtype)))]


def _moved_constants(child, staging: Path) -> list[str]:
    try:
        config = type(required(child, pass_state.PARENT_CONFIG)).from_pretrained(staging)
    except Exception:                   # no config written: the caller's error says why
        return []
    return moved_layer_constants(child, config)


def _why_different(child, staging: Path) -> str:
    """What the class cannot express, as precisely as the child's state says."""
    recomputed = _recomputed_buffers(child, staging)
    if recomputed:
        return (f"the class computes {', '.join(recomputed[:3])} from its config instead of loading it, and the "
                "child's (kept channels of the parent's) differ")
    moved = _moved_constants(child, staging)
    if moved:
        return (f"the class derives {', '.join(moved[:2])} from the index of a layer that the child moved (a "
                "dropped layer before it); keep the layers in place, or drop only the last ones")
    rescale = pass_state.RESCALE.get(child)
    if rescale is not None and rescale.inserted:
        limit = stream_fold_limit(child)
        return (f"the child multiplies the output of {len(rescale.inserted)} norm(s) without a weight of their own "
                f"({', '.join(rescale.inserted[:3])}) by √(D/d), a multiply the class has no weight to hold"
                + (f", nor can the stream's scale take it ({limit})" if limit else "") + "; subclone with rescale=False")
    if rescale is not None and rescale.eps_scale != 1:
        return (f"the child's norms add the rescale's ε·D/d (× {rescale.eps_scale:.4g}) and the class's cannot, nor can "
                "it be folded into the stream's scale (a stream read otherwise than through norms); or the class "
                "derives a constant or a fused layout from a size the child changed")
    return ("the class computes something else than the child (a constant or a fused projection's layout it "
            "derives from a size the child changed)")
