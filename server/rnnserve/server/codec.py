"""rnnserve.v1 messages to and from what the server works with: a chunk's, a frame's and a
state's tensors decoded and checked against their model (INVALID_ARGUMENT saying what to fix),
a chunk's reply built from its outputs, and the info messages of models and sessions."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from google.protobuf.timestamp_pb2 import Timestamp
from rnnserve.server.errors import invalid
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.wire import TensorError, dtype_to_proto, from_tensor, to_tensor

if TYPE_CHECKING:
    from rnnserve.server.model import ServedModel
    from rnnserve.server.session import Session

#: Chunks of at most this many values are checked in Python rather than numpy (measured
#: crossover: a Python min/max or sum over 64-128 values costs what one numpy reduction does).
_PY_CHECK_MAX = 64
#: memoryview casts read native order; wire bytes are little-endian.
_NATIVE_LE = sys.byteorder == "little"

_INPUT_KIND: dict[str, pb.InputKind.ValueType] = {
    "features": pb.INPUT_KIND_FEATURES,
    "tokens": pb.INPUT_KIND_TOKENS,
}
_OUTPUT_KIND: dict[str, pb.OutputKind.ValueType] = {
    "regression": pb.OUTPUT_KIND_REGRESSION,
    "logits": pb.OUTPUT_KIND_LOGITS,
}


def model_info(model: ServedModel) -> pb.ModelInfo:
    """What GetModel says about ``model`` (its versions are the repository's to add)."""
    m = model.manifest
    if model.tokens:
        in_spec = pb.TensorSpec(name=m.input_name, dtype=pb.DTYPE_INT64, shape=[-1])
    else:
        in_spec = pb.TensorSpec(name=m.input_name, dtype=pb.DTYPE_FLOAT32, shape=[-1, m.input_size])
    meta = {"family": m.family, "onnx_form": m.onnx_form, "opset": str(m.opset)}
    meta["rnn_nodes"] = ",".join(f"{k}={v}" for k, v in model.engine.node_providers.items())
    for key in ("dataset", "metrics", "parity"):
        for k, v in getattr(m, key).items():
            meta[f"{key}.{k}"] = str(v)
    for key in ("input_scaling", "output_scaling"):
        sc = getattr(m, key)
        if sc is not None:
            meta[f"{key}.mean"] = ",".join(map(str, sc.mean))
            meta[f"{key}.std"] = ",".join(map(str, sc.std))
    return pb.ModelInfo(
        name=m.name,
        version=m.version,
        cell=m.cell,
        input_kind=_INPUT_KIND[m.input_kind],
        output_kind=_OUTPUT_KIND[m.output_kind],
        input=in_spec,
        output=pb.TensorSpec(name=m.output_name, dtype=pb.DTYPE_FLOAT32, shape=[-1, m.output_size]),
        states=state_specs(model),
        vocabulary=m.vocabulary or [],
        max_chunk_length=model.max_chunk,
        provider=model.engine.provider,
        metadata={k: v for k, v in meta.items() if v},
    )


def state_specs(model: ServedModel) -> list[pb.TensorSpec]:
    """The TensorSpec of each state of ``model``."""
    return [
        pb.TensorSpec(name=s.name, dtype=dtype_to_proto(s.dtype), shape=s.shape)  # type: ignore[arg-type]
        for s in model.manifest.states
    ]


def session_info(session: Session, checkpoint_every: int) -> pb.SessionInfo:
    """The session as the API describes it (``checkpoint_every``: 0 without a store)."""
    expires = Timestamp()
    expires.FromNanoseconds(int((time.time() + session.deadline - time.monotonic()) * 1e9))
    m = session.model.manifest
    return pb.SessionInfo(
        session_id=session.id,
        model=m.name,
        version=m.version,
        expires_at=expires,
        states=state_specs(session.model),
        next_seq=session.next_seq,
        checkpoint_every=checkpoint_every,
    )


def decode_chunk(model: ServedModel, tensor: pb.Tensor) -> npt.NDArray[np.generic]:
    """The chunk's steps as an array ``[T, features]`` or ``[T]``; INVALID_ARGUMENT with
    what to fix when the tensor does not fit the model."""
    m = model.manifest
    shape = tensor.shape  # each read of a proto field builds a wrapper: read once
    raw = tensor.raw_data
    if tensor.dtype == model.input_code and len(shape) == model.input_rank:
        steps = shape[0]
        if (
            0 < steps <= model.max_chunk
            and len(raw) == steps * model.step_bytes
            and (model.tokens or shape[1] == m.input_size)
        ):
            # The common case, checked without the general codec: the layout was checked
            # above. Small chunks are range- or NaN-checked in Python over a memoryview of
            # the bytes (under a microsecond for a few values, where each numpy reduction
            # costs 2-4 µs); larger ones in numpy.
            count = len(raw) // model.input_dtype.itemsize
            if model.tokens:
                arr = np.frombuffer(raw, model.wire_dtype)
                if count <= _PY_CHECK_MAX and _NATIVE_LE:
                    values = memoryview(raw).cast("q")
                    if min(values) >= 0 and max(values) < m.input_size:
                        return arr
                elif arr.min() >= 0 and arr.max() < m.input_size:
                    return arr
            else:
                arr = np.frombuffer(raw, model.wire_dtype).reshape(steps, m.input_size)
                if not model.reject_nonfinite:
                    return arr
                if count <= _PY_CHECK_MAX and _NATIVE_LE:
                    # float64 sum of float32 values cannot overflow; NaN and Inf propagate.
                    if math.isfinite(sum(memoryview(raw).cast("f"))):
                        return arr
                else:
                    # The sum is the fast test; +Inf and -Inf together make it NaN (and an
                    # overflow makes it Inf): then the element-wise test decides, quietly.
                    with np.errstate(invalid="ignore", over="ignore"):
                        if np.isfinite(arr.sum()) or np.isfinite(arr).all():
                            return arr
    want = "int64 [T] token ids" if model.tokens else f"float32 [T, {m.input_size}]"
    try:
        arr = from_tensor(tensor)
    except TensorError as exc:
        raise invalid(f"inputs: {exc}; {model.label} takes {want}") from None
    if arr.dtype != model.input_dtype:
        raise invalid(f"inputs have dtype {arr.dtype.name}; {model.label} takes {want}")
    if arr.ndim != (1 if model.tokens else 2):
        raise invalid(
            f"inputs have shape {list(arr.shape)} (rank {arr.ndim}); {model.label} takes {want}"
        )
    steps = arr.shape[0]
    if steps == 0:
        raise invalid(f"inputs hold no steps; a chunk needs T >= 1 ({want})")
    if steps > model.max_chunk:
        raise invalid(
            f"chunk of {steps} steps is longer than the maximum of {model.max_chunk}; "
            "split it into several chunks"
        )
    if model.tokens:
        ids = arr.astype(np.int64, copy=False)
        bad = (ids < 0) | (ids >= m.input_size)
        if bad.any():
            i = int(np.argmax(bad))
            raise invalid(
                f"token id {int(ids[i])} at step {i} is outside the vocabulary "
                f"(ids 0..{m.input_size - 1})"
            )
    else:
        if arr.shape[1] != m.input_size:
            raise invalid(
                f"inputs have {arr.shape[1]} features per step; {model.label} takes {want}"
            )
        if model.reject_nonfinite and not np.isfinite(arr).all():
            i = int(np.argmax(~np.isfinite(arr).all(axis=1)))
            raise invalid(
                f"inputs hold NaN or Inf at step {i}; send finite values "
                "(or run the server with nan_policy=pass)"
            )
    return arr


def decode_state(
    model: ServedModel, tensors: Mapping[str, pb.Tensor]
) -> dict[str, npt.NDArray[np.float32]]:
    """A full memory cell from a client; INVALID_ARGUMENT naming the tensor to fix."""
    names = set(model._state_specs)
    given = set(tensors)
    if given != names:
        missing, extra = sorted(names - given), sorted(given - names)
        parts = [f"missing {missing}"] if missing else []
        parts += [f"unknown {extra}"] if extra else []
        raise invalid(
            f"state of {model.label} needs exactly the tensors {sorted(names)}: " + ", ".join(parts)
        )
    out = {}
    for name, spec in model._state_specs.items():
        try:
            arr = from_tensor(tensors[name])
        except TensorError as exc:
            raise invalid(
                f"state {name!r}: {exc}; {model.label} needs {spec.dtype} {spec.shape}"
            ) from None
        if arr.dtype != np.dtype(spec.dtype) or list(arr.shape) != spec.shape:
            raise invalid(
                f"state {name!r} is {arr.dtype.name} {list(arr.shape)}; "
                f"{model.label} needs {spec.dtype} {spec.shape}"
            )
        if not np.isfinite(arr).all():
            raise invalid(f"state {name!r} holds NaN or Inf")
        out[name] = arr.astype(np.float32, copy=False)
    return out


def step_response(
    reply: pb.StepResponse,
    session_id: str,
    seq: int,
    outputs: npt.NDArray[np.float32],
    state: dict[str, npt.NDArray[np.float32]] | None,
) -> pb.StepResponse:
    """Fill ``reply`` with a chunk's answer: its outputs float32 ``[T, outputs]`` (little-endian,
    as the batcher makes them) and, when given, the session's state by name."""
    reply.session_id = session_id
    reply.seq = seq
    reply.next_seq = seq + outputs.shape[0]
    out = reply.outputs
    out.dtype = pb.DTYPE_FLOAT32
    out.shape[:] = outputs.shape
    out.raw_data = outputs.tobytes()
    if state is not None:
        for name, value in state.items():
            to_tensor(value, reply.state[name])
    return reply


def frame_inputs(model: ServedModel, tensor: pb.Tensor, entries: int) -> npt.NDArray[np.generic]:
    """A frame's inputs as ``[N, T, features]`` or ``[N, T]``, checked against ``model`` as a
    chunk is (dtype, shape, T within the longest chunk, token ids in the vocabulary, finite
    features); INVALID_ARGUMENT saying what to fix."""
    m = model.manifest
    want = (
        "int64 [N, T] token ids" if model.tokens else f"float32 [N, T, {m.input_size}]"
    ) + f" with N = {entries}, the frame's session_ids"
    try:
        arr = from_tensor(tensor)
    except TensorError as exc:
        raise invalid(f"frame.inputs: {exc}; {model.label} takes {want}") from None
    if arr.dtype != model.input_dtype or arr.ndim != model.input_rank + 1:
        raise invalid(
            f"frame.inputs is {arr.dtype.name} {list(arr.shape)}; {model.label} takes {want}"
        )
    if arr.shape[0] != entries or (not model.tokens and arr.shape[2] != m.input_size):
        raise invalid(f"frame.inputs has shape {list(arr.shape)}; {model.label} takes {want}")
    steps = arr.shape[1]
    if not 0 < steps <= model.max_chunk:
        raise invalid(
            f"frame.inputs has {steps} steps per entry; each entry needs 1 to "
            f"{model.max_chunk} steps"
        )
    if model.tokens:
        # One pass: a negative id read as uint64 is above every vocabulary size.
        if int(arr.view(np.uint64).max()) >= m.input_size:
            low = int(arr.min())
            bad = low if low < 0 else int(arr.max())
            raise invalid(
                f"frame.inputs holds token id {bad}, outside the vocabulary "
                f"(ids 0..{m.input_size - 1})"
            )
    elif model.reject_nonfinite:
        with np.errstate(invalid="ignore", over="ignore"):
            finite = bool(np.isfinite(arr.sum())) or bool(np.isfinite(arr).all())
        if not finite:
            raise invalid(
                "frame.inputs holds NaN or Inf; send finite values "
                "(or run the server with nan_policy=pass)"
            )
    return arr
