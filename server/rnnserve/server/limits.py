"""Fair share between principals: how fast each may open sessions and how many Stream calls
each may hold open. (How many sessions each may hold is SessionManager's, which owns them.)

Every refusal is RESOURCE_EXHAUSTED naming the setting that was reached.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from rnnserve.server.auth import current_principal
from rnnserve.server.errors import quoted, resource_exhausted

if TYPE_CHECKING:
    Continuation = Callable[
        [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
    ]

#: Buckets of principals idle this long are forgotten (a full bucket is the default anyway).
FORGET_AFTER_S = 60.0


def _who(principal: str) -> str:
    return f"principal {quoted(principal)}" if principal else "the anonymous principal"


class OpenRate:
    """A token bucket per principal: ``rate`` opens (OpenSession, ForkSession, PutState) per
    second, bursts of up to ``rate`` (at least one). ``rate`` 0: no limit."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(1.0, rate)
        self._buckets: dict[str, tuple[float, float]] = {}  # principal -> (tokens, when)
        self._swept = time.monotonic()

    def take(self, principal: str) -> None:
        """Spend one open of ``principal``'s; RESOURCE_EXHAUSTED when none is left."""
        if not self.rate:
            return
        now = time.monotonic()
        tokens, when = self._buckets.get(principal, (self.burst, now))
        tokens = min(self.burst, tokens + (now - when) * self.rate)
        if tokens < 1.0:
            self._buckets[principal] = (tokens, now)
            wait = (1.0 - tokens) / self.rate
            raise resource_exhausted(
                f"{_who(principal)} opens sessions faster than principal_open_rate "
                f"({self.rate:g} per second) allows; retry in {wait:.2f} s"
            )
        self._buckets[principal] = (tokens - 1.0, now)
        if now - self._swept > FORGET_AFTER_S:
            self._swept = now
            stale = [p for p, (_, t) in self._buckets.items() if now - t > FORGET_AFTER_S]
            for p in stale:
                del self._buckets[p]


class StreamLimit(grpc.aio.ServerInterceptor):
    """At most ``limit`` open Stream calls per principal; one more ends at once with
    RESOURCE_EXHAUSTED. Runs after TokenAuth, so the principal is known."""

    def __init__(self, limit: int, method: str) -> None:
        self.limit = limit
        self.method = method
        self.open: dict[str, int] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method != self.method:
            return handler
        behaviour: Any = handler.stream_stream  # typed for sync servers; aio's is async
        counts = self.open
        limit = self.limit

        async def limited(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            principal = current_principal()
            held = counts.get(principal, 0)
            if held >= limit:
                err = resource_exhausted(
                    f"{_who(principal)} has {held} Stream calls open, the most "
                    "principal_max_streams allows; multiplex sessions on one stream or close one"
                )
                await context.abort(err.code, err.message)
            counts[principal] = held + 1
            try:
                async for reply in behaviour(requests, context):
                    yield reply
            finally:
                left = counts[principal] - 1
                if left:
                    counts[principal] = left
                else:
                    del counts[principal]

        return grpc.stream_stream_rpc_method_handler(
            limited, handler.request_deserializer, handler.response_serializer
        )
