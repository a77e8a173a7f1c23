"""Rewrite: move a traced model to another device — its tensors and the device literals in its code.

``torch.export`` writes the example's device into the graph as constants: ``arange(...,
device=cpu)``, ``_assert_tensor_metadata(x, device=cpu)``, ``to(..., device=cpu)``. A plain
``module.to("cuda")`` moves the parameters and leaves those literals, so the moved child fails
on its first call (or silently computes its masks on the old device). This pass moves both.

Invariant: after the pass, every ``torch.device`` constant in the graph (and in the graphs of
higher-order ops nested in it) is the target, and every parameter and buffer lives on the
target; the function computed is unchanged. The model is taken to run on one device: a
literal that moved one tensor to another device on purpose now names the target as well.

Node metadata (``val``) keeps the devices it was traced with; ``refresh_meta`` with inputs on
the new device renews it when a later pass needs it.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..errors import PassError, PostconditionError
from ..infra import SubclonePass

__all__ = ["MoveToDevicePass", "move_to_device"]


class MoveToDevicePass(SubclonePass):
    def __init__(self, device) -> None:
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise PassError(f"MoveToDevicePass: {device!r} is not a device ({error})") from None

    def run(self, gm: fx.GraphModule) -> bool:
        changed = False

        def retarget(value):
            nonlocal changed
            if isinstance(value, torch.device) and value != self.device:
                changed = True
                return self.device
            return value

        for module in gm.modules():      # nested graphs of higher-order ops (wrap, cond) too
            if not isinstance(module, fx.GraphModule):
                continue
            for node in module.graph.nodes:
                node.args = fx.node.map_aggregate(node.args, retarget)
                node.kwargs = fx.node.map_aggregate(node.kwargs, retarget)
            if module is not gm:
                module.recompile()
        moved = any(t.device != self.device for t in (*gm.parameters(), *gm.buffers()))
        gm.to(self.device)
        # constants torch.export lifted to plain attributes (neither parameter nor buffer)
        for module in gm.modules():
            for name, value in list(vars(module).items()):
                if isinstance(value, torch.Tensor) and value.device != self.device:
                    setattr(module, name, value.to(self.device))
                    moved = True
        return changed or moved

    def ensures(self, graph_module: fx.GraphModule) -> None:
        for module in graph_module.modules():
            if not isinstance(module, fx.GraphModule):
                continue
            for node in module.graph.nodes:
                found = []
                fx.node.map_aggregate((node.args, node.kwargs),
                                      lambda v: found.append(v) if isinstance(v, torch.device) else None)
                if any(d != self.device for d in found):
                    raise PostconditionError(f"MoveToDevicePass: node {node.name} still names {found}")
        for name, tensor in (*graph_module.named_parameters(), *graph_module.named_buffers()):
            if tensor.device != self.device:
                raise PostconditionError(f"MoveToDevicePass: {name} is on {tensor.device}, not {self.device}")


def move_to_device(gm: fx.GraphModule, device) -> fx.GraphModule:
    """Move a traced model (a child from ``sg.subclone``, or ``sg.trace``'s output) to ``device``,
    in place; returns it."""
    return MoveToDevicePass(device)(gm).graph_module
