"""Many sessions over a few bidi streams, for gateway-style asyncio apps.

One stream per session does not scale to thousands of sessions; a few streams carrying every
session's chunks do. A session always uses the same stream of the multiplexer (its "lane"), so
its chunks stay in order. Lanes follow route keys: behind a proxy a stream is routed once, at
open, by its ``x-rnnserve-route`` (rnnserve.proto, Routing), so a lane only carries sessions of
its own route key, which live on the replica the stream reaches. ``Multiplexer.session`` opens
sessions on ``streams`` route keys, round robin; a session opened elsewhere gets a lane of its
own key. Why more than one stream by default: grpc.aio handles one stream's messages one at a
time on each side, so a single shared stream is a sequential pipe (docs/benchmarks.md measured
0.4-0.6x the throughput of one stream per session; four streams recovered it).

Steps travel as frames (rnnserve.proto, StepFrame): the chunks that the sessions of a lane have
pending in the same event-loop tick go out as one message, and ``step_many`` sends a whole
batch the caller already holds (_frames.py, _many.py). Each session still has one chunk in
flight, so the resume logic is the same as for a single session: when a stream breaks, every
entry waiting on it reconnects (one new stream for the lane) and is sent again at its seq.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING

import grpc
import numpy as np
import numpy.typing as npt
from rnnserve.wire import route_of

from ._convert import Array, encode_inputs, join_outputs, split_chunks
from ._driver import STREAM_RETRY_CODES
from ._frames import Lane, Part, StreamBroken, frame_key, settle_entry
from ._many import step_many
from ._routing import new_route_key, routed
from .aio_session import AsyncSession
from .errors import RnnserveError
from .models import ModelInfo

if TYPE_CHECKING:
    from .aio import AsyncClient

#: The most entries the multiplexer puts in one frame by default (the server's
#: ``max_frame_sessions`` must allow it).
DEFAULT_MAX_FRAME = 256
#: The most entries written and not yet answered on one stream by default.
DEFAULT_MAX_INFLIGHT = 1024


class Multiplexer:
    """Drives any number of ``AsyncSession`` objects over ``streams`` Stream calls.

    >>> async with client.multiplexer() as mux:
    ...     outs = await asyncio.gather(*(mux.step(s, x) for s, x in zip(sessions, xs)))
    ...     ys = await mux.step_many(sessions, xs)     # the same, as one call

    ``step(session, x)`` has the contract of ``AsyncSession.step``; steps of different sessions
    run concurrently on the stream, steps of one session in order. Steps pending in the same
    event-loop tick on one stream go out as one frame. Use it from one event loop.
    """

    def __init__(
        self,
        client: AsyncClient,
        streams: int = 4,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
    ) -> None:
        """Internal: use ``AsyncClient.multiplexer()``. Each stream opens at its first step."""
        if streams < 1:
            raise ValueError(f"streams must be at least 1, got {streams}")
        if max_frame < 1 or max_inflight < 1:
            raise ValueError(
                f"max_frame and max_inflight must be at least 1, got {max_frame}, {max_inflight}"
            )
        self._client = client
        #: The route keys of the sessions this multiplexer opens, one stream each.
        self._keys = [new_route_key() for _ in range(streams)]
        self._opened = 0
        self._lanes: dict[str, Lane] = {}
        self._max_frame = max_frame
        self._max_inflight = max_inflight
        self._closed = False

    async def __aenter__(self) -> Multiplexer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """End the streams; steps still waiting fail with CANCELLED. Sessions stay open."""
        self._closed = True
        for lane in self._lanes.values():
            await lane.close()

    async def session(
        self,
        model: str | ModelInfo,
        version: str = "",
        initial_state: Mapping[str, npt.ArrayLike] | None = None,
    ) -> AsyncSession:
        """Open a session (see ``AsyncClient.session``) on one of this multiplexer's route keys,
        so that it shares a stream (and, behind a proxy, a replica) with others."""
        key = self._keys[self._opened % len(self._keys)]
        self._opened += 1
        return await self._client.session(model, version, initial_state, route_key=key)

    async def step(self, session: AsyncSession, x: object) -> Array:
        """Apply one step or a chunk to ``session`` over the shared stream; its outputs."""
        inputs, single = encode_inputs(session.model, x)
        async with session._lock:
            session._core.check_open()
            if session._core.ledger.pending is not None:
                await self._drive(session)
            parts = []
            for piece in split_chunks(session.model, inputs):
                session._core.ledger.submit(piece)
                parts.append(await self._drive(session))
        return join_outputs(parts, single)

    async def step_many(self, sessions: Sequence[AsyncSession], inputs: object) -> Array:
        """One chunk for each of ``sessions``, sent as frames; their outputs, row by row.

        ``inputs``: one array with a row per session, ``[N, T, features]`` (``[N, features]``
        for one step each) for feature models, ``[N, T]`` token ids (``[N]``, or N strings of
        equal length) for token models. Returns ``[N, T, outputs]`` (``[N, outputs]``). The
        sessions' models must take and return the same shapes; each session appears once.

        Each entry behaves as ``step(session, row)`` would: it resumes after a broken stream
        and fails with the exception a single step would raise. If some entries fail, the
        others still complete and ``StepManyError`` is raised, with ``.errors`` (entry index
        -> exception) and ``.outputs`` (all rows, NaN for the failed ones).
        """
        if self._closed:
            raise _closed_error()
        return await step_many(self, sessions, inputs)

    def _lane(self, session: AsyncSession) -> Lane:
        key = route_of(session.id)
        lane = self._lanes.get(key)
        if lane is None:
            metadata = routed(self._client.options, route=key)
            stub = self._client._stub
            lane = self._lanes[key] = Lane(
                lambda: stub.Stream(metadata=metadata), self._max_frame, self._max_inflight
            )
        return lane

    async def _drive(self, session: AsyncSession) -> Array:
        """Take the session's chunk in flight (replays first) to its outputs, one entry of the
        lane's next frame at a time."""
        driver = session._core.driver()
        if self._closed:
            raise _closed_error()
        lane = self._lane(session)
        loop = asyncio.get_running_loop()
        while True:
            chunk = driver.chunk()
            part = Part(
                [session.id],
                [chunk.seq],
                chunk.inputs[np.newaxis],
                frame_key(session.model, chunk.steps),
                loop,
            )
            try:
                reply, offset = await lane.submit(part)
            except StreamBroken as exc:
                delay = driver.on_failure(
                    exc.code, exc.message, None, retry_codes=STREAM_RETRY_CODES
                )
                await asyncio.sleep(delay)
                continue
            result = settle_entry(driver, reply, offset)
            if isinstance(result, np.ndarray):
                return np.array(result)
            if result is not None:
                await asyncio.sleep(result)


def _closed_error() -> RnnserveError:
    return RnnserveError(grpc.StatusCode.CANCELLED, "the multiplexer is closed")
