"""Tensors to wire frames and back: the one tensor encoding pac uses between processes.

A set of named tensors becomes a msgpack-able header, one entry ``[name, dtype, shape, nbytes, crc32 | None]``
per tensor, plus one frame per tensor holding the raw bytes of ``t.contiguous()`` (no copy for a contiguous
CPU tensor). The data plane (:mod:`pac.net.dataplane`) puts the entries in its header and the frames in their
own ZeroMQ frames or ``torch.distributed`` sends; the control plane's ``data`` message (:mod:`pac.net.protocol`)
carries both as msgpack fields.

Receiving checks every entry (known dtype, shape, byte count), the frame count, each frame's length and, where
present, its CRC32 before a tensor is built, so a garbage or truncated frame is a :class:`CodecError` that
names the tensor and the fault, never an exception from inside numpy or torch.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pac.errors import PacError

# The dtypes that go on the wire, by the name the header carries; anything else is refused both ways.
DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
    )
}
_DTYPE_NAMES = {d: name for name, d in DTYPES.items()}


class CodecError(PacError):
    """Tensors that cannot be encoded, or a header or frame that does not describe a tensor; says which and why."""


@dataclass(frozen=True)
class TensorSpec:
    """One parsed header entry: what its frame must hold."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    crc: int | None


def encode(
    tensors: Mapping[str, torch.Tensor], *, crc: bool = False, device: torch.device | str = "cpu"
) -> tuple[list[list[Any]], list[torch.Tensor]]:
    """Header entries and one flat uint8 frame per tensor (on ``device``), in ``tensors`` order.

    A contiguous tensor already on ``device`` is not copied: its frame is a view, so it must not be changed
    until the frame has been sent. ``crc`` adds the CRC32 of each frame, for transports that lack one.
    """
    if not isinstance(tensors, Mapping):
        raise CodecError(f"tensors must be a dict of str -> torch.Tensor, got {type(tensors).__name__}")
    entries: list[list[Any]] = []
    frames: list[torch.Tensor] = []
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise CodecError(f"tensors must be a dict of str -> torch.Tensor, got {name!r}: {type(t).__name__}")
        dtype = _DTYPE_NAMES.get(t.dtype)
        if dtype is None or t.layout != torch.strided:
            raise CodecError(
                f"tensor {name!r} is {t.dtype} ({t.layout}), which pac's wire format does not carry: "
                f"convert it to a dense tensor of one of {', '.join(DTYPES)}"
            )
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8).to(device)
        entries.append([name, dtype, list(t.shape), raw.numel(), _crc32(raw) if crc else None])
        frames.append(raw)
    return entries, frames


def buffer(frame: torch.Tensor) -> memoryview:
    """The bytes of a CPU frame from :func:`encode`, without a copy (msgpack and ZeroMQ take memoryviews)."""
    return memoryview(frame.numpy())


def parse_header(entries: Any) -> list[TensorSpec]:
    """Validate received header entries; CodecError names the first one that is wrong."""
    if not isinstance(entries, list):
        raise CodecError(f"the tensor list is a {type(entries).__name__}, not a list")
    specs: list[TensorSpec] = []
    names: set[str] = set()
    for entry in entries:
        if not isinstance(entry, list) or len(entry) != 5:
            raise CodecError(f"tensor entry {entry!r} is not [name, dtype, shape, nbytes, crc32]")
        name, dtype_name, shape, nbytes, crc = entry
        if not isinstance(name, str) or name in names:
            raise CodecError(f"tensor name {name!r} is not a string or repeats")
        names.add(name)
        dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise CodecError(f"tensor {name!r} has dtype {dtype_name!r}, not one of {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CodecError(f"tensor {name!r} has shape {shape!r}")
        if not _is_int(nbytes) or nbytes != math.prod(shape) * dtype.itemsize:
            raise CodecError(f"tensor {name!r} declares {nbytes!r} bytes for {dtype_name}{shape}")
        if crc is not None and not _is_int(crc):
            raise CodecError(f"tensor {name!r} has checksum {crc!r}")
        specs.append(TensorSpec(name, dtype, tuple(shape), nbytes, crc))
    return specs


def decode_frame(spec: TensorSpec, frame: Any, *, require_crc: bool = False) -> torch.Tensor:
    """The tensor ``spec`` describes, from its frame: a bytes-like object or a flat uint8 tensor (e.g. received
    by ``torch.distributed``). A writable, aligned buffer is used in place (the tensor keeps it alive); others
    are copied. The CRC32 is checked when the header has one, and must be there with ``require_crc``."""
    raw = frame if isinstance(frame, torch.Tensor) else _bytes_tensor(spec, frame)
    if raw.dtype != torch.uint8 or raw.dim() != 1:
        raise CodecError(f"the frame of tensor {spec.name!r} is a {raw.dtype} tensor of shape {list(raw.shape)}")
    if raw.numel() != spec.nbytes:
        raise CodecError(f"tensor {spec.name!r} has {raw.numel()} bytes, its header says {spec.nbytes}")
    if (require_crc or spec.crc is not None) and (spec.crc is None or _crc32(raw) != spec.crc):
        raise CodecError(f"tensor {spec.name!r} fails its CRC32 check")
    # Bytes other than 0 and 1 make bool tensors that compare and sum inconsistently.
    if spec.dtype == torch.bool and raw.numel() and int(raw.max()) > 1:
        raise CodecError(f"tensor {spec.name!r} is bool but its frame holds bytes other than 0 and 1")
    # Torch kernels must not see unaligned memory as a wider dtype; zmq may hand out such buffers.
    if raw.data_ptr() % spec.dtype.itemsize:
        raw = raw.clone()
    return raw.view(spec.dtype).reshape(spec.shape)


def decode(specs: Sequence[TensorSpec], frames: Sequence[Any], *, require_crc: bool = False) -> dict[str, torch.Tensor]:
    """The named tensors of a message: one frame per spec of :func:`parse_header`, as :func:`decode_frame` takes."""
    if not isinstance(frames, list | tuple):  # bytes are a Sequence too, of ints
        raise CodecError(f"the tensor frames are a {type(frames).__name__}, not a list")
    if len(frames) != len(specs):
        raise CodecError(f"{len(frames)} tensor frames for {len(specs)} tensors")
    return {spec.name: decode_frame(spec, f, require_crc=require_crc) for spec, f in zip(specs, frames, strict=True)}


def _bytes_tensor(spec: TensorSpec, frame: Any) -> torch.Tensor:
    try:
        view = memoryview(frame).cast("B")
    except (TypeError, ValueError):
        raise CodecError(f"the frame of tensor {spec.name!r} is a {type(frame).__name__}, not bytes") from None
    if not view.nbytes:
        return torch.empty(0, dtype=torch.uint8)  # torch.frombuffer refuses an empty buffer
    # torch.frombuffer warns about read-only buffers (msgpack's bytes): tensors may be written, so copy those.
    return torch.frombuffer(bytearray(view) if view.readonly else view, dtype=torch.uint8)


def _crc32(raw: torch.Tensor) -> int:
    return zlib.crc32(raw.cpu().numpy())


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
