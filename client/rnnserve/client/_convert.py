"""Caller's inputs -> checked numpy chunks, and the server's outputs -> numpy results.

Everything is validated here, before a call, so a wrong shape or dtype costs no round trip and
the message names what the model expects (from the model's own metadata).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import grpc
import numpy as np
import numpy.typing as npt
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.wire import TensorError, from_tensor, to_tensor

from .errors import InvalidInput, RnnserveError
from .models import ModelInfo

Array = npt.NDArray[np.generic]


def encode_inputs(model: ModelInfo, x: object) -> tuple[Array, bool]:
    """Check and convert one step or a chunk; returns ``(chunk, single_step)``.

    Feature models: ``[features]`` is one step and ``[T, features]`` a chunk; for a one-feature
    model a scalar is one step and any 1-D array a chunk of T steps. Token models: an int is one
    step; a str (each character a vocabulary symbol), a list of symbols or a 1-D int array is a
    chunk. The chunk has the model's input dtype and at least one step.
    """
    if model.is_tokens:
        return _encode_tokens(model, x)
    return _encode_features(model, x)


def _expected(model: ModelInfo) -> str:
    step = model.input.describe()
    one = ", ".join(str(d) for d in model.step_shape)
    return f"model {model.name} expects {step} (or [{one}] for one step)"


def _encode_features(model: ModelInfo, x: object) -> tuple[Array, bool]:
    step_shape = model.step_shape
    if isinstance(x, str | bytes):
        raise InvalidInput(f"{_expected(model)}; got a string")
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"{_expected(model)}; the input is not an array ({exc})") from None
    if arr.dtype.kind not in "fiu":
        raise InvalidInput(f"{_expected(model)}; got dtype {arr.dtype.name}")
    if step_shape == (1,) and arr.ndim == 0:
        chunk, single = arr.reshape(1, 1), True
    elif step_shape == (1,) and arr.ndim == 1:
        chunk, single = arr.reshape(-1, 1), False
    elif arr.shape == step_shape:
        chunk, single = arr[np.newaxis], True
    elif arr.ndim == len(step_shape) + 1 and arr.shape[1:] == step_shape:
        chunk, single = arr, False
    else:
        raise InvalidInput(f"{_expected(model)}; got shape {list(arr.shape)}")
    if chunk.shape[0] == 0:
        raise InvalidInput(f"{_expected(model)}; got an empty chunk (T = 0)")
    out = chunk.astype(model.input.dtype, copy=False)
    if not np.isfinite(out).all():
        bad = int(np.argwhere(~np.isfinite(out))[0][0])
        raise InvalidInput(f"model {model.name}: input step {bad} is NaN or infinite")
    return out, single


def _encode_tokens(model: ModelInfo, x: object) -> tuple[Array, bool]:
    vocab_size = len(model.vocabulary)
    expected = (
        f"model {model.name} expects token ids {model.input.describe()} below {vocab_size}, "
        "an int for one step, or text made of its vocabulary"
    )
    single = False
    ids: npt.NDArray[np.int64]
    if isinstance(x, str):
        ids = _lookup(model, list(x))
    elif isinstance(x, Sequence) and x and all(isinstance(s, str) for s in x):
        ids = _lookup(model, [str(s) for s in x])
    else:
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError):
            raise InvalidInput(f"{expected}; the input is not an array") from None
        if arr.dtype.kind not in "iu":
            raise InvalidInput(f"{expected}; got dtype {arr.dtype.name}")
        if arr.ndim > 1:
            raise InvalidInput(f"{expected}; got shape {list(arr.shape)}")
        single = arr.ndim == 0
        ids = np.atleast_1d(arr).astype(np.int64, copy=False)
        out_of_range = (ids < 0) | (ids >= vocab_size)
        if np.any(out_of_range):
            bad = int(ids[np.argmax(out_of_range)])
            raise InvalidInput(f"{expected}; got token id {bad}")
    if ids.shape[0] == 0:
        raise InvalidInput(f"{expected}; got an empty chunk (T = 0)")
    return ids.astype(model.input.dtype, copy=False), single


def _lookup(model: ModelInfo, symbols: list[str]) -> npt.NDArray[np.int64]:
    table = model.token_ids
    ids = np.empty(len(symbols), dtype=np.int64)
    for i, symbol in enumerate(symbols):
        token = table.get(symbol)
        if token is None:
            raise InvalidInput(
                f"model {model.name}: {symbol!r} (position {i}) is not in its vocabulary of "
                f"{len(table)} symbols"
            )
        ids[i] = token
    return ids


def split_chunks(model: ModelInfo, chunk: Array) -> Iterator[Array]:
    """Cut a chunk into pieces no longer than the server's ``max_chunk_length``."""
    limit = model.max_chunk_length if model.max_chunk_length > 0 else chunk.shape[0]
    for start in range(0, chunk.shape[0], limit):
        yield chunk[start : start + limit]


def join_outputs(parts: Sequence[Array], single: bool) -> Array:
    """The caller's result: ``[outputs]`` for one step, ``[T, outputs]`` for a chunk."""
    out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    return out[0] if single else out


def decode_outputs(model: ModelInfo, tensor: pb.Tensor, steps: int) -> Array:
    """The outputs of a chunk of ``steps`` steps, checked against the model's output shape.

    A reply that does not fit is an error, never passed on: garbage must not look like data.
    """
    try:
        out = from_tensor(tensor)
    except TensorError as exc:
        raise RnnserveError(grpc.StatusCode.DATA_LOSS, f"malformed outputs: {exc}") from None
    expected = (steps, *model.output.shape[1:])
    if out.shape != expected:
        raise RnnserveError(
            grpc.StatusCode.DATA_LOSS,
            f"server returned outputs of shape {list(out.shape)} for a chunk of {steps} steps; "
            f"model {model.name} declares {model.output.describe()}",
        )
    # A writable copy: the decoded array is a read-only view of the message's bytes.
    return np.array(out)


def encode_state(model: ModelInfo, state: Mapping[str, npt.ArrayLike]) -> dict[str, pb.Tensor]:
    """Check a memory cell against the model's state specs and encode it."""
    specs = {s.name: s for s in model.states}
    unknown = sorted(set(state) - set(specs))
    missing = sorted(set(specs) - set(state))
    if unknown or missing:
        wanted = ", ".join(f"{s.name} {s.describe()}" for s in model.states)
        raise InvalidInput(
            f"model {model.name} has the state tensors {wanted}; got {sorted(state)}"
        )
    out = {}
    for name, value in state.items():
        spec = specs[name]
        arr = np.asarray(value)
        if arr.shape != spec.shape or arr.dtype.kind not in "fiu":
            raise InvalidInput(
                f"state {name!r} of model {model.name} must be {spec.describe()}, got "
                f"{arr.dtype.name} {list(arr.shape)}"
            )
        out[name] = to_tensor(arr.astype(spec.dtype, copy=False))
    return out


def decode_state(tensors: Mapping[str, pb.Tensor]) -> dict[str, Array]:
    """A memory cell from the wire, as writable arrays."""
    result = {}
    for name, tensor in tensors.items():
        try:
            result[name] = np.array(from_tensor(tensor))
        except TensorError as exc:
            raise RnnserveError(grpc.StatusCode.DATA_LOSS, f"state {name!r}: {exc}") from None
    return result
