"""The asyncio client: the same API as ``Client`` with ``await``, on a ``grpc.aio`` channel."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

import grpc
import grpc.aio
import numpy.typing as npt
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

from ._convert import encode_state
from ._driver import RETRY_CODES
from ._retry import Backoff
from ._routing import check_route_key, new_route_key, routed
from .aio_session import AsyncSession
from .errors import RnnserveError, from_rpc_error, rpc_code
from .models import ModelInfo
from .options import ClientOptions, as_options
from .snapshot import Snapshot

if TYPE_CHECKING:
    from rnnserve.v1.rnnserve_pb2_grpc import InferenceServiceAsyncStub

    from .mux import Multiplexer

_Resp = TypeVar("_Resp")


class AsyncClient:
    """A connection to an rnnserve server for asyncio code.

    Create and use it inside one running event loop; ``async with`` closes it.

    >>> async with AsyncClient("127.0.0.1:50051") as client:
    ...     async with await client.session("co2-gru") as s:
    ...         y = await s.step([[315.2]])           # [1, 1]
    """

    def __init__(self, target: str | ClientOptions) -> None:
        """Connect lazily to ``target`` (``"host:port"``) or with full ``ClientOptions``."""
        self.options = as_options(target)
        creds = self.options.credentials()
        args = list(self.options.channel_options())
        if creds is None:
            self._channel = grpc.aio.insecure_channel(self.options.target, options=args)
        else:
            self._channel = grpc.aio.secure_channel(self.options.target, creds, options=args)
        self._stub: InferenceServiceAsyncStub = pb_grpc.InferenceServiceStub(self._channel)
        self._rng = random.Random()
        self._models: dict[tuple[str, str], ModelInfo] = {}

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel. Sessions stay open on the server until closed or expired."""
        await self._channel.close()

    async def models(self) -> list[ModelInfo]:
        """Every model version the server serves."""
        resp = await self._call(self._stub.ListModels, pb.ListModelsRequest())
        return [self._remember(m) for m in resp.models]

    async def model(self, name: str, version: str = "") -> ModelInfo:
        """One model version (the latest when ``version`` is empty); ModelNotFound if unknown."""
        cached = self._models.get((name, version)) if version else None
        if cached is not None:
            return cached
        req = pb.GetModelRequest(model=name, version=version)
        resp = await self._call(self._stub.GetModel, req)
        return self._remember(resp.model)

    async def session(
        self,
        model: str | ModelInfo,
        version: str = "",
        initial_state: Mapping[str, npt.ArrayLike] | None = None,
        route_key: str | None = None,
    ) -> AsyncSession:
        """Open a session (see ``Client.session``); ``async with`` closes it."""
        info = model if isinstance(model, ModelInfo) else await self.model(model, version)
        route = new_route_key() if route_key is None else check_route_key(route_key)
        req = pb.OpenSessionRequest(model=info.name, version=info.version)
        if initial_state is not None:
            for name, tensor in encode_state(info, initial_state).items():
                req.initial_state[name].CopyFrom(tensor)
        resp = await self._call(self._stub.OpenSession, req, route=route)
        return await self._session(resp.session)

    async def attach(self, session_id: str) -> AsyncSession:
        """A handle on a session opened elsewhere."""
        req = pb.GetSessionRequest(session_id=session_id)
        resp = await self._call(self._stub.GetSession, req, session_id)
        return await self._session(resp.session)

    async def restore(self, snapshot: Snapshot, session_id: str = "") -> AsyncSession:
        """Restore a snapshot as a session on this server (see ``Client.restore``)."""
        req = pb.PutStateRequest(session_id=session_id, snapshot=snapshot.to_proto())
        route = None if session_id else new_route_key()
        resp = await self._call(self._stub.PutState, req, session_id or None, route)
        return await self._session(resp.session)

    def multiplexer(
        self, streams: int = 4, *, max_frame: int = 256, max_inflight: int = 1024
    ) -> Multiplexer:
        """A helper that drives many sessions over a few bidi streams (``async with`` it).

        One stream per route key: sessions opened with ``Multiplexer.session`` share ``streams``
        route keys (so behind a proxy they live on the replica of their stream); a session
        opened elsewhere gets a stream of its own route key. Steps pending in the same loop
        tick on one stream go out as one frame of at most ``max_frame`` sessions (keep it
        within the server's ``max_frame_sessions``); at most ``max_inflight`` session-chunks
        are unanswered on one stream, more wait in the client.
        """
        from .mux import Multiplexer

        return Multiplexer(self, streams, max_frame=max_frame, max_inflight=max_inflight)

    async def _session(self, info: pb.SessionInfo) -> AsyncSession:
        return AsyncSession(self, info, await self.model(info.model, info.version))

    def _remember(self, m: pb.ModelInfo) -> ModelInfo:
        try:
            info = ModelInfo.from_proto(m)
        except ValueError as exc:
            raise RnnserveError(grpc.StatusCode.DATA_LOSS, str(exc)) from None
        self._models[(info.name, info.version)] = info
        return info

    def _backoff(self) -> Backoff:
        return Backoff(self.options.retry, self._rng)

    async def _call(
        self,
        method: Callable[..., Awaitable[_Resp]],
        request: object,
        session_id: str | None = None,
        route: str | None = None,
    ) -> _Resp:
        """A unary call with deadline and metadata (see ``Client._call``), retried while
        UNAVAILABLE (idempotent only)."""
        backoff = self._backoff()
        metadata = routed(self.options, session_id, route)
        while True:
            try:
                return await method(request, timeout=self.options.deadline_s, metadata=metadata)
            except grpc.RpcError as exc:
                if rpc_code(exc) in RETRY_CODES:
                    delay = backoff.next_delay()
                    if delay is not None:
                        await asyncio.sleep(delay)
                        continue
                raise from_rpc_error(
                    exc, target=self.options.target, session_id=session_id
                ) from exc
