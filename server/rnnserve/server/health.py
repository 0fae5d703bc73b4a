"""``grpc.health.v1.Health`` whose ``Watch`` calls end as soon as shutdown starts.

grpcio's own ``health.aio.HealthServicer`` sends NOT_SERVING to watchers on
``enter_graceful_shutdown`` but keeps their calls open, so one watching client (a load
balancer, ``grpc_health_probe -watch``, Kubernetes' gRPC probe in watch mode) holds a SIGTERM
shutdown for the whole grace period. Here a watch sends NOT_SERVING and then ends at once.

It ends with OK, not an error status: a client's gRPC core may drop a stream's last message
when an error status arrives right behind it (the watcher saw UNAVAILABLE without ever
reading the NOT_SERVING, once in a CI run), while a message ahead of OK is always delivered.
The NOT_SERVING it has read tells the client to look elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, TypeAlias

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

Status: TypeAlias = health_pb2.HealthCheckResponse.ServingStatus
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
#: The longest a shutdown waits for open watches to send NOT_SERVING and end.
WATCHERS_GRACE_S = 1.0


class HealthService(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """Serving status by service name (``""`` is the whole server)."""

    def __init__(self) -> None:
        self._status: dict[str, Status] = {"": SERVING}
        self._shutting_down = False
        # Replaced on every change: a watcher waits on the one current when it last looked.
        self._changed = asyncio.Event()
        #: Open Watch calls, and set once the last has ended after shutdown began.
        self._watching = 0
        self._watchers_done = asyncio.Event()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def set(self, service: str, status: Status) -> None:
        """Set one service's status; ignored once shutdown has started (it stays NOT_SERVING)."""
        if self._shutting_down:
            return
        self._status[service] = status
        self._notify()

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING for good; open watches get it and then end."""
        if self._shutting_down:
            return
        self._shutting_down = True
        for service in self._status:
            self._status[service] = NOT_SERVING
        self._notify()
        # Let every open watch send its NOT_SERVING and end before the server itself starts
        # shutting down (a CI run once saw a watch end without it when it did not wait).
        if self._watching:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._watchers_done.wait(), WATCHERS_GRACE_S)

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        last: Status | None = None
        self._watching += 1
        try:
            while True:
                changed = self._changed  # taken before reading, so no change slips between
                status = self._status.get(request.service, SERVICE_UNKNOWN)
                if status != last:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                    # Look again: the status may have changed while the write waited (a
                    # shutdown that began then would otherwise end the watch without its
                    # NOT_SERVING; seen in CI on a loaded machine).
                    continue
                if self._shutting_down:
                    return
                await changed.wait()
        finally:
            self._watching -= 1
            if self._shutting_down and not self._watching:
                self._watchers_done.set()
