"""Resuming after a cut connection, through a TCP proxy the test controls.

Every scenario checks the outputs against one uninterrupted reference run AND the seq the server
holds at the end, so a step lost or applied twice cannot pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from rnnserve.client import AsyncClient, Client, ClientOptions, RetryPolicy, SessionLost
from rnnserve.manifest import load_manifest

from tests.support.modelgen import reference_run


class CuttableProxy:
    """Forwards 127.0.0.1:<port> to 127.0.0.1:<upstream_port>, byte for byte, until told not to.

    - ``cut()``: abort every open connection, both sides;
    - ``refuse``: while true, new connections are accepted and closed at once;
    - ``swallow_replies``: while true, bytes from the server are dropped (the client waits).
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.refuse = False
        self.swallow_replies = False
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Listen on a free port; returns it."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and cut everything."""
        if self._server is not None:
            self._server.close()
        await self.cut()
        if self._server is not None:
            await self._server.wait_closed()

    async def cut(self) -> None:
        """Abort every open connection (an RST on both sides, as a dropped link looks)."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers.update((writer, up_writer))
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, replies=False)),
            asyncio.create_task(self._pump(up_reader, writer, replies=True)),
        ]
        self._tasks.update(pumps)
        for pump in pumps:
            pump.add_done_callback(self._tasks.discard)

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, replies: bool
    ) -> None:
        try:
            while data := await src.read(65536):
                if replies and self.swallow_replies:
                    continue
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                dst.transport.abort()
            self._writers.discard(dst)


# -- helpers --------------------------------------------------------------------------------------

FAST_RETRY = RetryPolicy(initial_backoff_s=0.02, max_backoff_s=0.2, give_up_after_s=30.0)
TOL = 1e-5
CHUNK = 4


def _options(port: int) -> ClientOptions:
    return ClientOptions(target=f"127.0.0.1:{port}", retry=FAST_RETRY, deadline_s=20.0)


def _sequence(model_repo: Path, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    size = load_manifest(model_repo / "tiny-gru" / "1").input_size
    xs = np.random.default_rng(seed).normal(size=(steps, size)).astype(np.float32)
    expected, state = reference_run(model_repo / "tiny-gru" / "1", xs)
    return xs, expected, state


async def _server_seq(direct: AsyncClient, session_id: str) -> int:
    return (await direct.attach(session_id)).next_seq


async def _cut_once_applied(
    proxy: CuttableProxy, direct: AsyncClient, session_id: str, seq: int
) -> None:
    """Wait until the server applied the chunk up to ``seq`` (its reply is being swallowed),
    then cut: the client must get the outputs from the server's cached reply."""
    while await _server_seq(direct, session_id) < seq:
        await asyncio.sleep(0.01)
    proxy.swallow_replies = False
    await proxy.cut()


async def _cut_and_refuse(proxy: CuttableProxy, seconds: float) -> None:
    """Cut everything and refuse new connections for a while (a restart, a moved replica)."""
    proxy.refuse = True
    await proxy.cut()
    await asyncio.sleep(seconds)
    proxy.refuse = False


async def _assert_exactly_once(
    direct: AsyncClient, session_id: str, steps: int, state: dict
) -> None:
    session = await direct.attach(session_id)
    assert session.next_seq == steps  # a step applied twice would move it further
    for name, value in (await session.state()).items():
        assert np.max(np.abs(value - state[name])) <= TOL


# -- asyncio --------------------------------------------------------------------------------------


async def test_async_stream_survives_cuts(server: Any, model_repo: Path) -> None:
    xs, expected, state = _sequence(model_repo, 40, seed=11)
    proxy = CuttableProxy(server.port)
    port = await proxy.start()
    tasks: list[asyncio.Task[None]] = []
    async with AsyncClient(server.address) as direct, AsyncClient(_options(port)) as client:
        s = await client.session("tiny-gru")

        async def inputs() -> AsyncIterator[np.ndarray]:
            for i in range(0, 40, CHUNK):
                if i == 12:  # dropped before the chunk is sent; reconnects refused a while
                    await _cut_and_refuse(proxy, 0.3)
                if i == 24:  # the server applies the chunk, its reply never arrives
                    proxy.swallow_replies = True
                    tasks.append(
                        asyncio.create_task(_cut_once_applied(proxy, direct, s.id, i + CHUNK))
                    )
                yield xs[i : i + CHUNK]

        outs = [out async for out in s.stream(inputs())]
        await asyncio.gather(*tasks)
        got = np.concatenate(outs)
        assert got.shape == expected.shape
        assert np.max(np.abs(got - expected)) <= TOL
        await _assert_exactly_once(direct, s.id, 40, state)
        assert proxy.connections >= 3
    await proxy.stop()


async def test_async_unary_steps_survive_cuts(server: Any, model_repo: Path) -> None:
    xs, expected, state = _sequence(model_repo, 24, seed=12)
    proxy = CuttableProxy(server.port)
    port = await proxy.start()
    async with AsyncClient(server.address) as direct, AsyncClient(_options(port)) as client:
        s = await client.session("tiny-gru")
        outs = []
        for i in range(0, 24, CHUNK):
            if i == 8:
                await _cut_and_refuse(proxy, 0.2)
            if i == 16:
                proxy.swallow_replies = True
                cutter = asyncio.create_task(_cut_once_applied(proxy, direct, s.id, i + CHUNK))
            outs.append(await s.step(xs[i : i + CHUNK]))
        await cutter
        assert np.max(np.abs(np.concatenate(outs) - expected)) <= TOL
        await _assert_exactly_once(direct, s.id, 24, state)
    await proxy.stop()


async def test_multiplexed_sessions_survive_a_cut(server: Any, model_repo: Path) -> None:
    size = load_manifest(model_repo / "tiny-gru" / "1").input_size
    rng = np.random.default_rng(13)
    sessions_n, rounds = 12, 5
    xs = rng.normal(size=(sessions_n, rounds * CHUNK, size)).astype(np.float32)
    refs = [reference_run(model_repo / "tiny-gru" / "1", x) for x in xs]
    proxy = CuttableProxy(server.port)
    port = await proxy.start()
    async with AsyncClient(server.address) as direct, AsyncClient(_options(port)) as client:
        sessions = [await client.session("tiny-gru") for _ in range(sessions_n)]
        outs: list[list[np.ndarray]] = [[] for _ in sessions]
        async with client.multiplexer() as mux:
            for r in range(rounds):
                chunk = slice(r * CHUNK, (r + 1) * CHUNK)
                steps = [mux.step(s, xs[k, chunk]) for k, s in enumerate(sessions)]
                if r == 2:  # cut while every session has a chunk in flight
                    steps.append(_cut_and_refuse(proxy, 0.2))
                results = await asyncio.gather(*steps)
                for k in range(sessions_n):
                    outs[k].append(results[k])
        for k, s in enumerate(sessions):
            expected, state = refs[k]
            assert np.max(np.abs(np.concatenate(outs[k]) - expected)) <= TOL
            await _assert_exactly_once(direct, s.id, rounds * CHUNK, state)
    await proxy.stop()


async def test_lost_session_raises_session_lost(start_server: Any) -> None:
    running = await start_server(session_ttl_s=0.2)
    async with AsyncClient(running.address) as client:
        s = await client.session("tiny-gru")
        await s.step(np.zeros(s.model.step_shape, np.float32))
        # Idle past its TTL: the server checks the deadline on the next call, so this is certain.
        await asyncio.sleep(0.5)
        with pytest.raises(SessionLost, match=f"{s.id}.*expired") as info:
            await s.step(np.zeros(s.model.step_shape, np.float32))
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        assert isinstance(info.value.__cause__, grpc.RpcError)
        # Closing a session the server already dropped is not an error.
        await s.close()


# -- sync, with the proxy on its own event loop thread --------------------------------------------


class _ProxyThread:
    def __init__(self, upstream_port: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.proxy = CuttableProxy(upstream_port)
        self.port: int = self.run(self.proxy.start())

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.run(self.proxy.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_sync_stream_survives_cuts(server_thread: Any, model_repo: Path) -> None:
    xs, expected, state = _sequence(model_repo, 40, seed=14)
    pt = _ProxyThread(server_thread.port)
    try:
        with Client(server_thread.address) as direct, Client(_options(pt.port)) as client:
            s = client.session("tiny-gru")

            def inputs() -> Iterator[np.ndarray]:
                for i in range(0, 40, CHUNK):
                    if i == 8:
                        pt.run(_cut_and_refuse(pt.proxy, 0.3))
                    if i == 20:
                        pt.proxy.swallow_replies = True
                        threading.Thread(target=cut_when_applied, args=(i + CHUNK,)).start()
                    yield xs[i : i + CHUNK]

            def cut_when_applied(seq: int) -> None:
                while direct.attach(s.id).next_seq < seq:
                    time.sleep(0.01)
                pt.proxy.swallow_replies = False
                pt.run(pt.proxy.cut())

            got = np.concatenate(list(s.stream(inputs())))
            assert np.max(np.abs(got - expected)) <= TOL
            again = direct.attach(s.id)
            assert again.next_seq == 40
            for name, value in again.state().items():
                assert np.max(np.abs(value - state[name])) <= TOL
            # Unary steps through a cut as well.
            pt.run(_cut_and_refuse(pt.proxy, 0.2))
            assert s.step(xs[0]).shape == (expected.shape[1],)
            assert direct.attach(s.id).next_seq == 41
    finally:
        pt.close()


async def test_server_behind_is_brought_up_to_date_by_replay(server: Any, model_repo: Path) -> None:
    """A replica that restored an older copy of the session (as a durable store would after a
    crash) says so with its seq; the SDK replays what it lacks and the caller notices nothing."""
    xs, expected, state = _sequence(model_repo, 20, seed=15)
    async with AsyncClient(server.address) as admin, AsyncClient(_options(server.port)) as client:
        s = await client.session("tiny-gru")
        outs = [await s.step(xs[:4])]
        old = await (await admin.attach(s.id)).snapshot()  # taken at seq 4
        outs.append(await s.step(xs[4:8]))
        outs += [o async for o in s.stream([xs[8:11], xs[11:12]])]
        await admin.restore(old, session_id=s.id)  # the server goes back to seq 4
        outs.append(await s.step(xs[12:16]))  # replays 4..12, then applies 12..16
        await admin.restore(old, session_id=s.id)
        async with client.multiplexer() as mux:
            outs.append(await mux.step(s, xs[16:]))
        assert np.max(np.abs(np.concatenate(outs) - expected)) <= TOL
        await _assert_exactly_once(admin, s.id, 20, state)


async def test_server_too_far_behind_is_session_lost(server: Any) -> None:
    options = ClientOptions(target=server.address, retry=RetryPolicy(replay_steps=2))
    async with AsyncClient(server.address) as admin, AsyncClient(options) as client:
        s = await client.session("tiny-gru")
        x = np.zeros((3, *s.model.step_shape), np.float32)
        await s.step(x)
        old = await s.snapshot()
        for _ in range(3):
            await s.step(x)
        await admin.restore(old, session_id=s.id)
        with pytest.raises(SessionLost, match="keeps only the last 2 steps"):
            await s.step(x)


async def test_stream_survives_a_server_replaced_mid_stream(
    start_server: Any, model_repo: Path
) -> None:
    """The server goes away mid-stream and a new one takes its address with an older copy of
    the session (what a durable store or a replica move gives): the stream carries on."""
    xs, expected, state = _sequence(model_repo, 32, seed=16)
    first = await start_server()
    replacement: list[Any] = []
    async with AsyncClient(_options(first.port)) as client:
        s = await client.session("tiny-gru")

        async def inputs() -> AsyncIterator[np.ndarray]:
            old = None
            for i in range(0, 32, CHUNK):
                if i == 8:
                    old = await s.snapshot()  # the last copy saved before the "crash"
                if i == 20:
                    await first.server.stop(0)
                    replacement.append(await start_server(port=first.port))
                    async with AsyncClient(replacement[0].address) as admin:
                        assert old is not None
                        await admin.restore(old, session_id=s.id)
                yield xs[i : i + CHUNK]

        outs = [out async for out in s.stream(inputs())]
        assert np.max(np.abs(np.concatenate(outs) - expected)) <= TOL
        async with AsyncClient(replacement[0].address) as admin:
            await _assert_exactly_once(admin, s.id, 32, state)
