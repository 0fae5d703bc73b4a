"""The Open Inference Protocol's tensors and parameters, as rnnserve's models take them.

- ``model_metadata``: what ModelMetadata says of a model version (tensor names, datatypes,
  shapes with -1 for the step axis).
- ``decode_request``: a ModelInferRequest's one input as the model's chunk (an rnnserve.v1
  Tensor that ``ServedModel.decode_chunk`` then checks), which outputs it asks for, and its
  sequence parameters.
- ``build_response``: a ModelInferResponse from a chunk's outputs and state; the output's bytes
  are the engine's, never converted.

Errors are ``ServingError`` with the status and wording Triton gives for the same mistake.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from inference import grpc_service_pb2 as oip
from rnnserve.server.errors import ServingError, invalid, quoted
from rnnserve.server.model import ServedModel
from rnnserve.v1 import rnnserve_pb2 as pb

#: ModelMetadata's platform: an ONNX graph run by ONNX Runtime (Triton's name for it).
PLATFORM = "onnxruntime_onnx"
#: The sequence parameters of Triton's sequence extension.
SEQUENCE_ID, SEQUENCE_START, SEQUENCE_END = "sequence_id", "sequence_start", "sequence_end"
#: The sequence parameters; another one that starts with "sequence" is refused, so a misspelled
#: flag never passes silently. Other parameters (priority, timeout, a client's own) are
#: accepted and ignored, as Triton's ONNX Runtime backend ignores them.
SEQUENCE_PARAMETERS = (SEQUENCE_ID, SEQUENCE_START, SEQUENCE_END)
#: Protocol datatype names of the numpy dtypes rnnserve's models use.
DATATYPE = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
#: The InferTensorContents field that holds each datatype's elements, and its numpy type.
_CONTENTS = {"FP32": ("fp32_contents", np.float32), "INT64": ("int64_contents", np.int64)}


@dataclass(frozen=True)
class Sequence:
    """A request's sequence parameters: its id (an int or a string) and flags."""

    id: int | str
    start: bool
    end: bool


class Decoded:
    """What a ModelInferRequest asks of a model version (a plain class: one per step)."""

    __slots__ = ("batched", "inputs", "states", "want_output")

    def __init__(
        self, inputs: pb.Tensor, batched: bool, states: tuple[str, ...], want_output: bool
    ) -> None:
        self.inputs = inputs
        #: The input came as ``[1, T, ...]`` (a batch of one): the outputs carry the same axis.
        self.batched = batched
        #: Names of the memory-cell tensors to send back after the steps.
        self.states = states
        #: Whether the model's step output is asked for (it is when no output is named).
        self.want_output = want_output


def input_shape(model: ServedModel) -> list[int]:
    """The step input's shape: ``[-1]`` token ids or ``[-1, features]``."""
    m = model.manifest
    return [-1] if model.tokens else [-1, m.input_size]


def model_metadata(model: ServedModel, versions: list[str]) -> oip.ModelMetadataResponse:
    """ModelMetadata of one model version: the step input, the step output, and the memory
    cell's tensors as outputs a request may ask for."""
    m = model.manifest
    meta = oip.ModelMetadataResponse(name=m.name, versions=versions, platform=PLATFORM)
    meta.inputs.add(
        name=m.input_name, datatype=DATATYPE[model.input_dtype], shape=input_shape(model)
    )
    meta.outputs.add(name=m.output_name, datatype="FP32", shape=[-1, m.output_size])
    for s in m.states:
        meta.outputs.add(name=s.name, datatype=DATATYPE[np.dtype(s.dtype)], shape=s.shape)
    return meta


def sequence_of(request: oip.ModelInferRequest) -> Sequence | None:
    """The request's sequence parameters, None when it names no sequence (id 0 or "")."""
    params = request.parameters
    for key in params:
        if key.startswith("sequence") and key not in SEQUENCE_PARAMETERS:
            raise invalid(
                f"parameter {quoted(key)!r} is not a sequence parameter; they are "
                + ", ".join(SEQUENCE_PARAMETERS)
            )
    if SEQUENCE_ID not in params:
        return None
    p = params[SEQUENCE_ID]
    kind = p.WhichOneof("parameter_choice")
    sid: int | str
    if kind == "int64_param":
        sid = p.int64_param
        if sid < 0:
            raise invalid(f"sequence_id {sid} is negative; correlation IDs are unsigned")
    elif kind == "uint64_param":
        sid = p.uint64_param
    elif kind == "string_param":
        sid = p.string_param
    else:
        raise invalid("sequence_id must be an int64, uint64 or string parameter")
    if sid in (0, ""):
        return None
    return Sequence(sid, _flag(request, SEQUENCE_START), _flag(request, SEQUENCE_END))


def _flag(request: oip.ModelInferRequest, key: str) -> bool:
    if key not in request.parameters:
        return False
    p = request.parameters[key]
    if p.WhichOneof("parameter_choice") != "bool_param":
        raise invalid(f"{key} must be a bool parameter")
    return p.bool_param


def decode_request(
    model: ServedModel, request: oip.ModelInferRequest, raw: bytes | None
) -> Decoded:
    """The request's input as the model's chunk, and the outputs it asks for. ``raw`` is the
    input's ``raw_input_contents`` entry (None when the request sends ``contents``)."""
    m = model.manifest
    label = f"model '{m.name}'"
    if len(request.inputs) != 1:
        raise invalid(f"expected 1 inputs but got {len(request.inputs)} inputs for {label}")
    tensor = request.inputs[0]
    if tensor.name != m.input_name:
        raise invalid(
            f"unexpected inference input '{quoted(tensor.name)}' for {label}; "
            f"its input is '{m.input_name}'"
        )
    want = DATATYPE[model.input_dtype]
    if tensor.datatype != want:
        raise invalid(
            f"inference input '{m.input_name}' data-type is '{quoted(tensor.datatype)}', "
            f"but {label} expects '{want}'"
        )
    shape = list(tensor.shape)
    expected = input_shape(model)
    batched = len(shape) == len(expected) + 1 and shape[0] == 1
    steps_shape = shape[1:] if batched else shape
    if len(steps_shape) != len(expected) or any(
        e != -1 and d != e for d, e in zip(steps_shape, expected, strict=True)
    ):
        raise invalid(
            f"unexpected shape for input '{m.input_name}' for {label}. Expected "
            f"{_dims(expected)} (or {_dims([1, *expected])}), got {_dims(shape)}"
        )
    if any(d < 0 for d in shape):
        raise invalid(f"input '{m.input_name}' shape {_dims(shape)} has a negative dimension")
    count = math.prod(steps_shape)
    itemsize = model.input_dtype.itemsize
    if raw is None:
        field, dtype = _CONTENTS[want]
        values = getattr(tensor.contents, field)
        if len(values) != count:
            raise invalid(
                f"unexpected number of elements for input '{m.input_name}': shape "
                f"{_dims(shape)} needs {count}, the request's {field} holds {len(values)}"
            )
        raw = np.asarray(values, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
    elif len(raw) != count * itemsize:
        raise invalid(
            f"unexpected total byte size {len(raw)} for input '{m.input_name}', expecting "
            f"{count * itemsize}"
        )
    chunk = pb.Tensor(dtype=model.input_code, shape=steps_shape, raw_data=raw)
    if not request.outputs:  # the common case: the step output only
        return Decoded(chunk, batched, (), True)
    states = {s.name for s in m.states}
    asked = [o.name for o in request.outputs]
    for name in asked:
        if name != m.output_name and name not in states:
            raise invalid(
                f"unexpected inference output '{quoted(name)}' for {label}; its outputs are "
                + ", ".join(f"'{n}'" for n in [m.output_name, *sorted(states)])
            )
    return Decoded(chunk, batched, tuple(n for n in asked if n in states), m.output_name in asked)


def _dims(shape: list[int]) -> str:
    return "[" + ",".join(map(str, shape)) + "]"


def raw_inputs(request: oip.ModelInferRequest) -> list[bytes | None]:
    """Each input's raw bytes (None where it sends ``contents``); INVALID_ARGUMENT when the
    request mixes the two forms or sends the wrong number of raw entries."""
    raws = request.raw_input_contents
    if not raws:
        return [None] * len(request.inputs)
    if len(raws) != len(request.inputs):
        raise invalid(
            f"expected {len(request.inputs)} raw_input_contents entries (one per input), "
            f"got {len(raws)}"
        )
    for tensor in request.inputs:
        if tensor.HasField("contents"):
            raise invalid(
                f"contents field must not be specified when using raw_input_contents for "
                f"'{quoted(tensor.name)}'"
            )
    return list(raws)


def build_response(
    model: ServedModel,
    request: oip.ModelInferRequest,
    decoded: Decoded,
    outputs: npt.NDArray[np.float32],
    state: dict[str, npt.NDArray[np.float32]] | None,
    out: oip.ModelInferResponse | None = None,
) -> oip.ModelInferResponse:
    """The ModelInferResponse of one applied chunk (filled into ``out`` when given)."""
    m = model.manifest
    reply = out if out is not None else oip.ModelInferResponse()
    reply.model_name = m.name
    reply.model_version = m.version
    reply.id = request.id
    lead = [1] if decoded.batched else []
    if decoded.want_output:
        reply.outputs.add(name=m.output_name, datatype="FP32", shape=[*lead, *outputs.shape])
        reply.raw_output_contents.append(outputs.tobytes())
    for name in decoded.states:
        value = np.asarray(state[name] if state is not None else (), dtype="<f4")
        reply.outputs.add(name=name, datatype="FP32", shape=[*lead, *value.shape])
        reply.raw_output_contents.append(value.tobytes())
    return reply


def error_message(err: ServingError) -> str:
    """The text of an in-band stream error (``ModelStreamInferResponse.error_message``)."""
    return err.message
