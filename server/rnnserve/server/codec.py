"""rnnserve.v1 messages to and from what the server works with: a frame's inputs decoded in a
few numpy calls, and a chunk's reply built from its outputs."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from rnnserve.server.errors import invalid
from rnnserve.server.model import ServedModel
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.wire import TensorError, from_tensor, to_tensor


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
        low, high = int(arr.min()), int(arr.max())
        if low < 0 or high >= m.input_size:
            bad = low if low < 0 else high
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
