"""The wire codec both ends share: numpy <-> Tensor, and the chunk digest."""

from __future__ import annotations

import numpy as np
import pytest
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.wire import TensorError, chunk_digest, from_tensor, to_tensor


@pytest.mark.parametrize("dtype", ["<f4", "<f8", "<f2", "<i4", "<i8", ">f4", ">i8"])
def test_round_trip_is_exact_and_little_endian_on_the_wire(dtype: str) -> None:
    rng = np.random.default_rng(0)
    arr = (rng.normal(size=(3, 4)) * 100).astype(dtype)
    msg = to_tensor(arr)
    assert list(msg.shape) == [3, 4]
    assert msg.raw_data == arr.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    back = from_tensor(msg)
    assert back.dtype.isnative and np.array_equal(back, arr)


def test_non_contiguous_arrays_travel_in_c_order() -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4).T  # Fortran-ordered view
    assert np.array_equal(from_tensor(to_tensor(arr)), arr)
    assert np.array_equal(from_tensor(to_tensor(arr[:, ::2])), arr[:, ::2])


def test_scalars_and_empty_tensors() -> None:
    assert from_tensor(to_tensor(np.float32(2.5))).shape == ()
    assert from_tensor(to_tensor(np.zeros((0, 3), np.float32))).shape == (0, 3)


@pytest.mark.parametrize(
    ("msg", "message"),
    [
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2], raw_data=b"\0" * 4), "needs 8 bytes"),
        (pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1], raw_data=b"\0" * 4), "not supported"),
        (pb.Tensor(dtype=99, shape=[1], raw_data=b"\0" * 4), "not supported"),  # type: ignore[arg-type]
        (pb.Tensor(dtype=pb.DTYPE_INT64, shape=[-1, -2], raw_data=b"\0" * 16), "negative"),
    ],
)
def test_malformed_tensors_say_what_to_fix(msg: pb.Tensor, message: str) -> None:
    with pytest.raises(TensorError, match=message):
        from_tensor(msg)


def test_unsupported_numpy_dtypes_are_named() -> None:
    with pytest.raises(TensorError, match="complex64 is not supported"):
        to_tensor(np.zeros(2, np.complex64))


def test_chunk_digest_tells_chunks_apart_by_bytes_shape_and_dtype() -> None:
    a = to_tensor(np.array([[1.0, 2.0]], np.float32))
    assert chunk_digest(a) == chunk_digest(to_tensor(np.array([[1.0, 2.0]], np.float32)))
    assert len(chunk_digest(a)) == 16
    others = [
        to_tensor(np.array([[1.0, 3.0]], np.float32)),
        to_tensor(np.array([[1.0], [2.0]], np.float32)),
        pb.Tensor(dtype=pb.DTYPE_INT32, shape=[1, 2], raw_data=a.raw_data),
    ]
    assert len({chunk_digest(a), *(chunk_digest(o) for o in others)}) == 4
