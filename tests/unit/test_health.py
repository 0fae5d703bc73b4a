"""HealthService.Watch against a shutdown that begins while a write waits."""

from __future__ import annotations

import asyncio
from typing import Any

from grpc_health.v1 import health_pb2
from rnnserve.server.health import NOT_SERVING, SERVING, HealthService


async def test_a_shutdown_during_a_write_still_sends_not_serving() -> None:
    # The watch reads SERVING and writes it; the shutdown begins while that write waits. The
    # watch must still send NOT_SERVING before it ends (it used to end at once: a load
    # balancer then never heard that the replica was going).
    service = HealthService()
    sent: list[int] = []
    shutdown: list[asyncio.Task[None]] = []

    class Context:
        async def write(self, message: Any) -> None:
            sent.append(message.status)
            if len(sent) == 1:
                shutdown.append(asyncio.create_task(service.enter_graceful_shutdown()))
                await asyncio.sleep(0)  # the shutdown runs while this write waits

    await asyncio.wait_for(service.Watch(health_pb2.HealthCheckRequest(), Context()), 5)
    assert sent == [SERVING, NOT_SERVING]
    await asyncio.wait_for(shutdown[0], 5)  # and the shutdown saw the watch end
