"""The errors passes raise: a pass cannot run here, or what it returned breaks its invariant."""
from __future__ import annotations

__all__ = ["PassError", "PreconditionError", "PostconditionError", "StaleStateError"]


class PassError(RuntimeError):
    """A pass cannot run on this graph, or produced a graph that breaks its invariant."""


class PreconditionError(PassError):
    """What a pass needs is missing: the message names the pass to run first."""


class StaleStateError(PreconditionError):
    """Metadata written against another analysis run (another channel graph) was read."""


class PostconditionError(PassError):
    """A rewrite returned a graph that breaks the invariant it promises (``ensures()``)."""
