"""What both ends of the wire share: numpy <-> ``rnnserve.v1.Tensor`` and seq metadata.

Tensors travel as dtype + shape + little-endian C-order bytes, never as repeated floats.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt
from rnnserve.v1 import rnnserve_pb2 as pb

#: Trailing-metadata key of a unary error that tells the seq the session expects next.
NEXT_SEQ_KEY = "rnnserve-next-seq"
#: The metadata key that carries a session's route key, which a proxy hashes on so that all of
#: a session's calls reach one replica (rnnserve.proto, Routing).
ROUTE_HEADER = "x-rnnserve-route"


def route_of(session_id: str) -> str:
    """The route key of a session id (``<route key>.<secret>``): the part before the first
    ``.``, or the whole id for one without a route key."""
    return session_id.partition(".")[0]


#: The most dimensions a Tensor may have (rnnserve's tensors have 1 to 3; numpy stops at 64).
MAX_RANK = 8

_TO_NUMPY: dict[int, np.dtype[np.generic]] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
}
_TO_PROTO: dict[str, int] = {dt.name: code for code, dt in _TO_NUMPY.items()}
#: Keyed by the dtype object itself: the per-step path looks up without building names.
_CODE_OF: dict[np.dtype[np.generic], int] = {dt: code for code, dt in _TO_NUMPY.items()}
#: On a little-endian host (nearly all) wire bytes are native: no byte swapping at all.
_NATIVE_LE = sys.byteorder == "little"


class TensorError(ValueError):
    """A Tensor message cannot be decoded: the message says what to fix."""


def dtype_to_proto(dtype: npt.DTypeLike) -> int:
    """The ``Dtype`` enum value of a numpy dtype; TensorError for unsupported ones."""
    name = np.dtype(dtype).name
    try:
        return _TO_PROTO[name]
    except KeyError:
        supported = ", ".join(sorted(_TO_PROTO))
        raise TensorError(f"dtype {name} is not supported; use one of {supported}") from None


def dtype_from_proto(code: int) -> np.dtype[np.generic]:
    """The numpy dtype of a ``Dtype`` enum value; TensorError for unknown ones."""
    try:
        return _TO_NUMPY[code]
    except KeyError:
        # No list of dtypes here: each model takes one, and its TensorSpec (GetModel) says which.
        raise TensorError(f"tensor dtype {dtype_name(code)} is not supported") from None


def dtype_name(code: int) -> str:
    """A readable name of a ``Dtype`` value, for messages: ``float32``, ``int64``…"""
    dt = _TO_NUMPY.get(code)
    if dt is not None:
        return dt.name
    return (
        "DTYPE_UNSPECIFIED (not set)" if code == pb.DTYPE_UNSPECIFIED else f"unknown Dtype {code}"
    )


def to_tensor(array: npt.ArrayLike, out: pb.Tensor | None = None) -> pb.Tensor:
    """Encode an array as a Tensor (little-endian, C order). Fills ``out`` when given."""
    arr = np.asarray(array)
    code = _CODE_OF.get(arr.dtype)
    if code is None:
        code = dtype_to_proto(arr.dtype)  # a big-endian twin, or TensorError
    if not (_NATIVE_LE and arr.dtype.isnative):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    msg = out if out is not None else pb.Tensor()
    msg.dtype = code  # type: ignore[assignment]
    msg.shape[:] = arr.shape
    msg.raw_data = arr.tobytes()  # C order whatever the array's layout
    return msg


def from_tensor(msg: pb.Tensor) -> npt.NDArray[np.generic]:
    """Decode a Tensor into a read-only numpy array; TensorError says what is malformed."""
    dtype = _TO_NUMPY.get(msg.dtype)
    if dtype is None:
        dtype = dtype_from_proto(msg.dtype)  # raises TensorError
    shape = tuple(msg.shape)
    if len(shape) > MAX_RANK:
        raise TensorError(f"tensor has {len(shape)} dimensions; at most {MAX_RANK} are supported")
    if shape and min(shape) < 0:
        raise TensorError(f"tensor shape {list(shape)} has a negative dimension")
    count = math.prod(shape)
    raw = msg.raw_data  # read once: each read of a bytes field may copy
    if len(raw) != count * dtype.itemsize:
        raise TensorError(
            f"tensor of shape {list(shape)} and dtype {dtype.name} needs "
            f"{count * dtype.itemsize} bytes of raw_data, got {len(raw)}"
        )
    try:
        arr = np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)
    except ValueError:  # a zero-size shape whose other dimensions numpy cannot address
        raise TensorError(f"tensor shape {list(shape)} is too large to hold") from None
    return arr if _NATIVE_LE else arr.astype(dtype.newbyteorder("="))


def chunk_digest(msg: pb.Tensor) -> bytes:
    """A 16-byte digest of a chunk's inputs (dtype, shape and bytes).

    The server keeps it for the last applied chunk, so a retry (same seq, same inputs) is
    answered from the cache while a different chunk that reuses the seq is refused. It travels in
    snapshots, so every replica must compute it the same way: this function is that definition.
    """
    return _digest(msg.dtype, msg.shape, msg.raw_data)


def array_digest(array: npt.NDArray[np.generic]) -> bytes:
    """``chunk_digest`` of the Tensor ``to_tensor(array)`` would make, without making it."""
    arr = np.asarray(array)
    code = _CODE_OF.get(arr.dtype)
    if code is None:
        code = dtype_to_proto(arr.dtype)
    if not (_NATIVE_LE and arr.dtype.isnative):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return _digest(code, arr.shape, arr.tobytes())


def _digest(dtype: int, shape: Iterable[int], raw: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{dtype}:{','.join(map(str, shape))}:".encode())
    h.update(raw)
    return h.digest()
