"""The Open Inference Protocol's ModelStreamInfer, served as rnnserve.v1's Stream is (bidi.py):
lockstep while the stream carries one sequence (what a tritonclient app with one sequence per
stream does), read-ahead from the first request of a second, up to ``max_stream_inflight``
replies unsent, so requests of several sequences batch together; replies are sent as they are
ready, in order within each sequence.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError
from inference import grpc_service_pb2 as oip
from rnnserve.server.bidi import BidiCall, BidiServer
from rnnserve.server.errors import ServingError, as_serving_error, invalid
from rnnserve.server.metrics import Metrics
from rnnserve.server.oip_sequences import Caller, caller_of

if TYPE_CHECKING:
    from rnnserve.server.oip import OipServicer

PROTOCOL = "oip"
METHOD = "ModelStreamInfer"


def stream_key(request: oip.ModelInferRequest) -> tuple[str, object]:
    """Which sequence a request names, cheaply (a stream changes mode when it changes)."""
    p = request.parameters.get("sequence_id")
    kind = None if p is None else p.WhichOneof("parameter_choice")
    return request.model_name, None if kind is None else getattr(p, kind)


class OipStream(BidiCall[oip.ModelInferRequest, oip.ModelStreamInferResponse]):
    """One ModelStreamInfer call: its requests in, their replies out."""

    __slots__ = ("caller", "metrics", "ok", "servicer")

    def __init__(
        self,
        servicer: OipServicer,
        caller: Caller,
        metrics: Metrics,
        limit: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(limit, loop)
        self.servicer = servicer
        self.caller = caller
        self.metrics = metrics
        self.ok = metrics.request_child(METHOD, "OK", PROTOCOL)

    def key(self, request: oip.ModelInferRequest) -> object:
        return stream_key(request)

    def accept(self, request: oip.ModelInferRequest) -> None:
        """Run one request; a bad one is answered in-band (after its sequence's earlier
        replies)."""
        started = time.perf_counter()
        self.received()
        reply = oip.ModelStreamInferResponse()

        def answer(result: oip.ModelInferResponse | ServingError) -> None:
            self.answer(reply, result, started)

        try:
            self.servicer.accept(request, self.caller, answer, started, reply.infer_response)
        except Exception as exc:
            self.servicer.reject(request, self.caller, as_serving_error(exc, METHOD), answer)

    def answer(
        self,
        reply: oip.ModelStreamInferResponse,
        result: oip.ModelInferResponse | ServingError,
        started: float,
    ) -> None:
        """Queue ``reply``: ``result`` was built into it, or is an error to send in-band."""
        elapsed = time.perf_counter() - started
        if isinstance(result, ServingError):
            reply.Clear()
            reply.error_message = result.message
            self.metrics.observe_request(METHOD, result.code.name, elapsed, PROTOCOL)
        else:
            self.ok.observe(elapsed)
        self.put(reply)


class OipStreams(BidiServer[oip.ModelInferRequest, oip.ModelStreamInferResponse]):
    """Serves ModelStreamInfer calls."""

    shutdown_message = "server is shutting down; start each sequence again on another server"

    def __init__(self, servicer: OipServicer, metrics: Metrics, limit: int) -> None:
        super().__init__()
        self.servicer = servicer
        self.metrics = metrics
        self.limit = limit

    def new_call(self, context: grpc.aio.ServicerContext[Any, Any]) -> OipStream:
        caller = caller_of(context)  # ServingError for a malformed route key header
        return OipStream(
            self.servicer, caller, self.metrics, self.limit, asyncio.get_running_loop()
        )

    def read_error(self, exc: BaseException) -> ServingError:
        if isinstance(exc, DecodeError):
            return invalid(f"a message is not a valid inference.ModelInferRequest: {exc}")
        return as_serving_error(exc, METHOD)
