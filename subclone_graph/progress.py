"""Progress of a long call, phase by phase: the ``progress=`` protocol.

``progress`` is any callable with tqdm's signature::

    progress(iterable, desc=phase_name, total=steps_or_None) -> an iterable of the same items

``sg.subclone``, ``sg.subclone_checkpoint`` and ``sg.export_onnx`` call it once per phase, when
the phase starts, and draw one item from what it returns when each step starts (``total``
items for ``total`` steps); the iterable ends when the phase ends. So ``progress=tqdm`` shows one bar per phase
with its steps and elapsed time, and a plain function sees each phase begin and end. The phases,
in order (a call runs those it has):

    trace      torch.export of the parent (and the channel analysis)           1 step
    calibrate  the calibration batches (streamed: segments × batches)          1 step a batch
    rewrite    choose, drop, duplicate, slice and rescale                      1 step
    write      the output written (``export_onnx``; ``subclone_checkpoint``)   1 step
    check      the written output run and compared with the child            1 step

The command line adds ``load`` (reading MODEL) before them. ``PhaseTimes`` is a ``progress``
that records each phase's seconds (and forwards to another ``progress``, such as ``tqdm``).
"""
from __future__ import annotations

import contextlib
import time

__all__ = ["PHASES", "Phases", "PhaseTimes"]

PHASES = ("load", "trace", "calibrate", "rewrite", "write", "check")


class Phases:
    """The caller's side of the protocol: ``with phases("trace"):`` reports one phase;
    ``with phases("calibrate", total) as tick:`` one with steps, ``tick()`` after each. Code
    that reads better as a sequence calls ``tick = phases.begin(name, total)`` (which ends the
    phase before it) and ``phases.end()``. ``progress=None`` reports nothing (and costs nothing)."""

    def __init__(self, progress=None) -> None:
        self.progress = progress
        self._open = None

    def begin(self, name: str, total: int | None = 1):
        """End the running phase, if any, start ``name``; return its ``tick``."""
        self.end()
        self._open = self(name, total)
        return self._open.__enter__()

    def end(self, error: BaseException | None = None) -> None:
        """End the running phase (nothing when none runs); ``error``: it failed with that."""
        if self._open is not None:
            opened, self._open = self._open, None
            opened.__exit__(type(error) if error else None, error, error.__traceback__ if error else None)

    @contextlib.contextmanager
    def __call__(self, name: str, total: int | None = 1):
        if self.progress is None:
            yield lambda: None
            return
        running, done = [True], [0]

        def counting():                  # item k: step k + 1 has started; the end stops it
            count = 0
            while running[0]:
                yield count
                count += 1

        def tick():                      # after the last of ``total`` steps, the end draws
            done[0] += 1
            if total is None or done[0] < total:
                next(steps, None)

        bar = self.progress(counting(), desc=name, total=total)
        steps = iter(bar)
        next(steps, None)                # the phase has started: nothing done yet
        try:
            yield tick
        except BaseException:
            close = getattr(bar, "close", None)
            if callable(close):          # a failed phase's bar stops where it was
                close()
            raise
        running[0] = False
        for _ in steps:                  # the end: a tqdm bar shows its total and time
            pass

    def iterate(self, name: str, iterable, total: int | None = None):
        """``iterable``'s items, as the steps of phase ``name`` (one tick after each)."""
        with self(name, total) as tick:
            for item in iterable:
                yield item
                tick()


class PhaseTimes:
    """A ``progress`` that records ``seconds[phase]`` (wall time from the phase's start to its
    end; a phase met twice adds up) and forwards to ``then`` (another ``progress``, or None)."""

    def __init__(self, then=None) -> None:
        self.then = then
        self.seconds: dict[str, float] = {}

    def __call__(self, iterable, desc: str = "", total: int | None = None):
        inner = iterable if self.then is None else self.then(iterable, desc=desc, total=total)
        return self._timed(inner, desc)

    def _timed(self, inner, name: str):
        start = time.perf_counter()
        try:
            yield from inner
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
