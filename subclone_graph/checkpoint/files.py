"""Read a safetensors checkpoint folder tensor by tensor; write one as shards, tensor by tensor.

The invariant: no more than one tensor (and one bounded read chunk) of a checkpoint is in memory
because of this module, and nothing stays mapped. The safetensors format is an 8-byte
little-endian header length, a JSON header (``name -> {dtype, shape, data_offsets}``, offsets
relative to the end of the header) and the raw bytes. We read it with plain ``readinto`` into
tensors we own, rather than through a memory map: a map keeps every page it touched resident
while any tensor from it lives (transformers issue #34366), and the process's peak RSS is the
number that matters here.

A read keeps only what it is asked for: the rows between the first and last kept index of dim 0
are read in chunks (``CHUNK_BYTES``), and each chunk is cut to the kept indices of every dim
before the next is read. ``bytes_read`` counts what was read from disk.

Opening validates every shard (present, header parseable, every tensor's bytes inside the file)
and every error names the file and the tensor; the writer writes into a folder the caller
renames into place, so a failure leaves nothing half-written at the destination.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["CheckpointError", "CheckpointReader", "TensorInfo", "write_shards", "DTYPES", "CHUNK_BYTES"]

CHUNK_BYTES = 64 * 2**20
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """The checkpoint folder is incomplete or inconsistent; the message names the file and tensor."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple
    start: int          # absolute byte offset in the file
    end: int


def _read_header(path: Path, first_tensor: str | None) -> tuple[dict, int]:
    what = f" (holds {first_tensor})" if first_tensor else ""
    if not path.is_file():
        raise CheckpointError(f"{path}: shard is missing{what}")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file (its header does not fit){what}")
        length = struct.unpack("<Q", raw)[0]
        if length > size - 8:
            raise CheckpointError(f"{path}: truncated inside its header{what}")
        try:
            header = json.loads(handle.read(length))
        except ValueError as error:
            raise CheckpointError(f"{path}: corrupt safetensors header, not JSON ({error}){what}") from None
    return header, 8 + length


def _tensor_infos(path: Path, first_tensor: str | None) -> dict[str, TensorInfo]:
    header, base = _read_header(path, first_tensor)
    size = path.stat().st_size
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has an unsupported dtype {entry.get('dtype')!r}")
        shape, (start, end) = tuple(entry["shape"]), entry["data_offsets"]
        if end - start != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name}: {end - start} bytes for shape {shape} of {dtype}")
        if base + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {name} ends at byte {base + end}, the file has {size}")
        infos[name] = TensorInfo(path, dtype, shape, base + start, base + end)
    return infos


class CheckpointReader:
    """The tensors of a Hugging Face safetensors folder (sharded with an index, or one file)."""

    def __init__(self, folder) -> None:
        self.folder = Path(folder)
        self.bytes_read = 0
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as error:
                raise CheckpointError(f"{index}: not a safetensors index ({error})") from None
            files: dict[str, str] = {}
            for tensor, file in weight_map.items():
                files.setdefault(file, tensor)
        elif (self.folder / SINGLE_NAME).is_file():
            weight_map, files = None, {SINGLE_NAME: None}
        else:
            raise CheckpointError(f"{self.folder}: no {SINGLE_NAME} or {INDEX_NAME}: not a safetensors checkpoint folder")
        self.tensors: dict[str, TensorInfo] = {}
        for file, first in files.items():
            self.tensors.update(_tensor_infos(self.folder / file, first))
        for tensor, file in (weight_map or {}).items():
            if tensor not in self.tensors:
                raise CheckpointError(f"{self.folder / file}: tensor {tensor} is in {INDEX_NAME} but not in the shard")
        self.files = [self.folder / f for f in files]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise CheckpointError(f"{self.folder}: tensor {name} is not in the checkpoint")
        return self.tensors[name]

    def read(self, name: str, index: tuple = ()) -> torch.Tensor:
        """Tensor ``name``, cut to ``index`` (per dim: kept indices, or None for all)."""
        info = self.info(name)
        shape = info.shape
        index = tuple(index) or (None,) * len(shape)
        if not shape:
            out = torch.empty((), dtype=info.dtype)
            self._read_into(info, info.start, out)
            return out
        rows = index[0]
        out_shape = [s if i is None else len(i) for s, i in zip(shape, index)]
        out = torch.empty(out_shape, dtype=info.dtype)
        if out.numel() == 0:
            return out
        low, high = (0, shape[0]) if rows is None else (int(rows.min()), int(rows.max()) + 1)
        row_bytes = math.prod(shape[1:]) * info.dtype.itemsize
        step = max(1, CHUNK_BYTES // max(row_bytes, 1))
        for first in range(low, high, step):
            last = min(first + step, high)
            chunk = torch.empty((last - first, *shape[1:]), dtype=info.dtype)
            self._read_into(info, info.start + first * row_bytes, chunk)
            if rows is None:
                where, chosen = torch.arange(first, last), torch.arange(last - first)
            else:
                where = torch.nonzero((rows >= first) & (rows < last)).flatten()
                chosen = rows[where] - first
            piece = chunk.index_select(0, chosen)
            for dim, kept in enumerate(index[1:], start=1):
                if kept is not None:
                    piece = piece.index_select(dim, kept)
            out[where] = piece
            del chunk, piece
        return out

    def _read_into(self, info: TensorInfo, offset: int, out: torch.Tensor) -> None:
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        with open(info.file, "rb", buffering=0) as handle:
            handle.seek(offset)
            done = 0
            while done < len(view):
                got = handle.readinto(view[done:])
                if not got:
                    raise CheckpointError(f"{info.file}: truncated while reading a tensor at byte {offset + done}")
                done += got
        self.bytes_read += len(view)


def _plan(entries: list[tuple[str, tuple, torch.dtype]], shard_size: int) -> list[list]:
    shards, current, used = [], [], 0
    for entry in entries:
        size = math.prod(entry[1]) * entry[2].itemsize
        if current and used + size > shard_size:
            shards.append(current)
            current, used = [], 0
        current.append(entry)
        used += size
    return shards + [current] if current else shards


def _write_shard(path: Path, entries: list, produce) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape, dtype in entries:
            tensor = produce(name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise CheckpointError(f"{path}: tensor {name} came out {tuple(tensor.shape)} {tensor.dtype}, "
                                      f"planned {tuple(shape)} {dtype}")
            handle.write(memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
            del tensor


def write_shards(folder, entries: list[tuple[str, tuple, torch.dtype]], produce, shard_size: int) -> list[Path]:
    """Write ``entries`` ((name, shape, dtype), in order) into ``folder`` as safetensors shards of
    at most ``shard_size`` bytes (one tensor may exceed it alone), calling ``produce(name)`` for
    each tensor just before its bytes are written. One shard: ``model.safetensors``; more:
    ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``."""
    folder = Path(folder)
    shards = _plan(entries, shard_size)
    count = len(shards)
    names = [SINGLE_NAME] if count == 1 else [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]
    for name, shard in zip(names, shards):
        _write_shard(folder / name, shard, produce)
    if count > 1:
        total = sum(math.prod(s) * d.itemsize for _, s, d in entries)
        weight_map = {entry[0]: name for name, shard in zip(names, shards) for entry in shard}
        (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=2))
    return [folder / n for n in names]
