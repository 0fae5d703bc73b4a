"""One ModelStreamInfer call: its replies waiting to be sent, and its backpressure.

The servicer serves a stream the way rnnserve.v1's Stream is served. Lockstep while the stream
carries one sequence (what a tritonclient app with one sequence per stream does): read a
request, run it, send its reply, read the next; one task, no hand-offs. From the first request
of a second sequence it reads ahead in a task of its own, up to ``max_stream_inflight`` replies
unsent, so requests of several sequences batch together; replies are sent as they are ready,
in order within each sequence.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from inference import grpc_service_pb2 as oip
from rnnserve.server.errors import ServingError, as_serving_error
from rnnserve.server.metrics import Metrics

if TYPE_CHECKING:
    from rnnserve.server.oip import OipServicer
    from rnnserve.server.oip_sequences import Caller

PROTOCOL = "oip"
METHOD = "ModelStreamInfer"


def stream_key(request: oip.ModelInferRequest) -> tuple[str, object]:
    """Which sequence a request names, cheaply (a stream changes mode when it changes)."""
    p = request.parameters.get("sequence_id")
    kind = None if p is None else p.WhichOneof("parameter_choice")
    return request.model_name, None if kind is None else getattr(p, kind)


class OipStream:
    """The replies of one ModelStreamInfer call and how many requests are unanswered."""

    __slots__ = (
        "caller",
        "ended",
        "items",
        "limit",
        "loop",
        "metrics",
        "ok",
        "outstanding",
        "reading",
        "room",
        "servicer",
        "unsent",
        "waiter",
    )

    def __init__(
        self,
        servicer: OipServicer,
        caller: Caller,
        metrics: Metrics,
        limit: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.servicer = servicer
        self.caller = caller
        self.metrics = metrics
        self.ok = metrics.request_child(METHOD, "OK", PROTOCOL)
        self.loop = loop
        self.items: list[oip.ModelStreamInferResponse] = []
        self.waiter: asyncio.Future[None] | None = None
        self.ended = False
        self.reading = True
        self.outstanding = 0
        #: Requests received and not yet handed back to gRPC, and the most the reader allows.
        self.unsent = 0
        self.limit = limit
        self.room: asyncio.Future[None] | None = None

    def accept(self, request: oip.ModelInferRequest) -> None:
        """Run one request; a bad one is answered in-band (after its sequence's earlier
        replies)."""
        started = time.perf_counter()
        self.outstanding += 1
        self.unsent += 1
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
        self.outstanding -= 1
        self.items.append(reply)
        self.ended = self.ended or (not self.reading and self.outstanding == 0)
        self._wake()

    def end_of_input(self) -> None:
        self.reading = False
        if self.outstanding == 0:
            self.ended = True
            self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list[oip.ModelStreamInferResponse]:
        """Every reply ready, waiting until there is one (or the stream has ended)."""
        while not self.items and not self.ended:
            self.waiter = self.loop.create_future()
            await self.waiter
            self.waiter = None
        items, self.items = self.items, []
        return items

    def sent(self, count: int) -> None:
        """``count`` replies went to gRPC; wake the reader if it waits for room."""
        self.unsent -= count
        room = self.room
        if room is not None and not room.done() and self.unsent < self.limit:
            room.set_result(None)

    async def wait_for_room(self) -> None:
        """Return once fewer than ``limit`` replies of this call are unsent (backpressure)."""
        while self.unsent >= self.limit:
            self.room = self.loop.create_future()
            await self.room
            self.room = None
