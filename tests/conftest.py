"""Fixtures shared by every suite: a generated model repository and a real rnnserve server.

- ``model_repo``: a fresh repository (tiny-gru/1, tiny-lstm/1, tiny-char/1) under tmp_path.
- ``server``: an async fixture; the real server on 127.0.0.1:0 with metrics on port 0.
- ``start_server``: an async factory, ``await start_server(session_ttl_s=0.5)``, for tests that
  need other settings; every server it starts is stopped after the test.
- ``server_thread``: the same server on its own event loop in a background thread, for
  synchronous tests (the sync client); ``server_thread_factory`` takes settings overrides.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rnnserve.server.app import RnnServer
from rnnserve.server.settings import Settings

from tests.support.modelgen import make_repo

# Real Redis / Envoy / Prometheus / replica processes: fixtures `procs`, `redis_proc`.
pytest_plugins = ["tests.support.procs"]


@dataclass
class RunningServer:
    """A started server: where it listens and what it was started with."""

    server: RnnServer
    settings: Settings
    address: str
    port: int
    metrics_port: int


def _settings(model_repo: Path, overrides: dict[str, Any]) -> Settings:
    fields: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_host": "127.0.0.1",
        "metrics_port": 0,
        "models": model_repo,
        "reload_interval_s": 0.2,
        "shutdown_grace_s": 2.0,
    }
    fields.update(overrides)
    return Settings(**fields)


async def _start(settings: Settings) -> RunningServer:
    srv = RnnServer(settings)
    port = await srv.start()
    return RunningServer(srv, settings, f"127.0.0.1:{port}", port, srv.metrics_port)


@pytest.fixture
def model_repo(tmp_path: Path) -> Path:
    """A fresh model repository: tiny-gru/1, tiny-lstm/1 and tiny-char/1."""
    return make_repo(tmp_path / "models")


StartServer = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
async def start_server(model_repo: Path) -> AsyncIterator[StartServer]:
    """Factory: ``await start_server(**settings_overrides)`` starts a server on model_repo."""
    started: list[RunningServer] = []

    async def start(**overrides: Any) -> RunningServer:
        running = await _start(_settings(model_repo, overrides))
        started.append(running)
        return running

    yield start
    for running in started:
        await running.server.stop(0)


@pytest.fixture
async def server(start_server: StartServer) -> RunningServer:
    """The real server with default test settings, stopped after the test."""
    return await start_server()


class _LoopThread:
    """An asyncio event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Awaitable[Any], timeout: float = 60.0) -> Any:
        async def wrapper() -> Any:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def server_thread_factory(model_repo: Path) -> Iterator[Callable[..., RunningServer]]:
    """Factory for sync tests: ``server_thread_factory(**overrides)`` -> a running server."""
    loops: list[tuple[_LoopThread, RunningServer]] = []

    def start(**overrides: Any) -> RunningServer:
        lt = _LoopThread()
        running: RunningServer = lt.call(_start(_settings(model_repo, overrides)))
        loops.append((lt, running))
        return running

    yield start
    for lt, running in loops:
        lt.call(running.server.stop(0))
        lt.close()


@pytest.fixture
def server_thread(server_thread_factory: Callable[..., RunningServer]) -> RunningServer:
    """The real server in a background thread with its own loop, for synchronous tests."""
    return server_thread_factory()
