"""Data-parallel calibration with ``torch.distributed`` (launched by ``torchrun``).

Invariant: the calibration statistics are sums over tokens (float64 per-channel sums of
|activation| with their token counts, per-layer sums of squares), so summing each rank's share
with ``all_reduce`` — the sums *and* the counts — gives every rank the statistics of the whole
set, up to the order of float64 additions, and therefore the same scores, layer ratios and
keep-sets. Nothing is divided or chosen before the reduction.

1. ``shard(batches)``: rank r of W takes batches r, r+W, r+2W, … (lazily; the batches of the
   other ranks are skipped, not kept) and counts the tokens it took; sharding a ``Shard`` again
   returns it unchanged, so a caller may shard before the pass does.
2. ``all_reduce_sums(sums)``: the statistics' sums added over every rank of the default group
   (``api.subclone_passes`` hands it to ``ScoreChannelsPass`` as its ``reduce``); a rank that
   ran no batch takes part with zeros (sizes agreed with
   ``all_gather_object``). A peer that died or stopped answering raises ``DistributedError``
   within the group's timeout, never a hang.
3. ``launch()``: under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the command line
   starts the default group — gloo on the CPU, NCCL for a CUDA device — with a timeout of
   ``SUBCLONE_DIST_TIMEOUT`` seconds (default 600); ``finish(ok)`` tells the other ranks whether
   rank 0 wrote its outputs and closes the group.

Without an initialised group every function is the single-process identity.
"""
from __future__ import annotations

import datetime
import math
import os
import time

import torch
import torch.distributed as dist

__all__ = ["Shard", "shard", "active", "rank", "world_size", "all_reduce_sums", "gather_counts",
           "launch", "finish", "abandon", "summary_line", "DistributedError", "batch_tokens", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = 600.0


class DistributedError(RuntimeError):
    """Another rank died, or did not answer within the process group's timeout."""


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def batch_tokens(batch) -> int:
    """Tokens in a calibration batch: the elements of its first input when it holds integer ids,
    else its rows (an image batch counts images)."""
    first = batch if isinstance(batch, torch.Tensor) else (
        next(iter(batch.values())) if isinstance(batch, dict) else batch[0])
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        return 1
    integer = not (first.is_floating_point() or first.is_complex() or first.dtype == torch.bool)
    return first.numel() if integer else first.shape[0]


class Shard:
    """This rank's share of ``batches`` (every ``world``-th from ``rank``), counted as it is read."""

    def __init__(self, batches, rank_index: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank_index, world
        self.count = self.tokens = 0
        self.seconds = 0.0      # from the first batch asked for to the last one's return

    def __len__(self) -> int:
        total = len(self.batches)
        return max(0, (total - self.rank + self.world - 1) // self.world)

    def __iter__(self):
        self.count = self.tokens = 0
        started = time.perf_counter()
        for index, batch in enumerate(self.batches):
            if index % self.world == self.rank:
                self.count += 1
                self.tokens += batch_tokens(batch)
                yield batch
        self.seconds = time.perf_counter() - started


def shard(batches) -> Shard:
    if isinstance(batches, Shard):
        return batches
    return Shard(batches, rank(), world_size())


def _backend_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce(tensor: torch.Tensor, what: str) -> torch.Tensor:
    moved = tensor.to(_backend_device())
    try:
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    except (RuntimeError, dist.DistError) as error:
        raise _dead_peer(what, error) from error
    return moved.cpu()


def _dead_peer(what: str, error: BaseException) -> DistributedError:
    first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return DistributedError(f"rank {rank()} of {world_size()}: {what} failed: another rank died or did not "
                            f"answer within the timeout ({first[:200]})")


def _gather(value, what: str) -> list:
    gathered = [None] * world_size()
    try:
        dist.all_gather_object(gathered, value)
    except (RuntimeError, dist.DistError) as error:
        raise _dead_peer(what, error) from error
    return gathered


def gather_counts(value):
    """Every rank's ``value`` (a number), in rank order (``[value]`` in one process)."""
    return _gather(value, "gathering counts") if active() else [value]


def summary_line(tokens: int, seconds: float) -> str:
    """'calibration: 2 ranks, 4,096 + 4,096 tokens in 1.5 s (5,461 tokens/s)' — a collective:
    every rank calls it, rank 0 prints it."""
    counts, times = gather_counts(int(tokens)), gather_counts(float(seconds))
    ranks = f"{len(counts)} rank{'s' if len(counts) > 1 else ''}"
    slowest = max(times)
    rate = f"{sum(counts) / slowest:,.0f} tokens/s" if slowest > 0 else "no time measured"
    return f"calibration: {ranks}, {' + '.join(f'{c:,}' for c in counts)} tokens in {slowest:.1f} s ({rate})"


def all_reduce_sums(sums: dict) -> dict:
    """``sums`` ({key: float64 tensor}, ``ActivationStatistics.sums``) added over every rank
    (module docstring, 2); the identity in one process."""
    if not active():
        return sums
    shapes: dict = {}
    for part in _gather({key: tuple(total.shape) for key, total in sums.items()}, "agreeing on statistics"):
        shapes.update(part)
    keys = sorted(shapes, key=repr)
    flat = [sums[k].reshape(-1).to(torch.float64).cpu() if k in sums
            else torch.zeros(math.prod(shapes[k]), dtype=torch.float64) for k in keys]
    joined = _reduce(torch.cat(flat) if flat else torch.zeros(0, dtype=torch.float64), "reducing statistics")
    reduced, offset = {}, 0
    for key in keys:
        size = math.prod(shapes[key])
        reduced[key], offset = joined[offset: offset + size].reshape(shapes[key]), offset + size
    return reduced


def _timeout() -> float:
    text = os.environ.get("SUBCLONE_DIST_TIMEOUT", "")
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT
    except ValueError:
        raise ValueError(f"SUBCLONE_DIST_TIMEOUT={text!r}: expected a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"SUBCLONE_DIST_TIMEOUT={text!r}: must be positive")
    return seconds


def launch(device: str | torch.device = "cpu") -> bool:
    """Start the default process group when ``torchrun`` started this process with more than one
    rank (module docstring, 3); returns whether it did. The device's backend: NCCL for CUDA (each
    rank on ``cuda:LOCAL_RANK``), gloo otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=_timeout()))
    return True


def abandon() -> None:
    """Close the group after an error, without a collective (a peer may be gone)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def finish(ok: bool) -> bool:
    """Rank 0 tells every rank whether it wrote the outputs (``ok``); returns rank 0's word on
    every rank and closes the group. Ranks other than 0 wait here while rank 0 writes."""
    if not active():
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], dtype=torch.float64, device=_backend_device())
    try:
        dist.broadcast(flag, src=0)
    except (RuntimeError, dist.DistError) as error:
        raise _dead_peer("waiting for rank 0 to write the outputs", error) from error
    finally:
        dist.destroy_process_group()
    return bool(flag.item())
