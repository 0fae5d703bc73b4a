"""The synchronous client: one channel to a server, model metadata, and sessions."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TypeVar

import grpc
import numpy.typing as npt
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

from ._convert import encode_state
from ._driver import RETRY_CODES
from ._retry import Backoff
from ._routing import check_route_key, new_route_key, routed
from .errors import RnnserveError, from_rpc_error, rpc_code
from .models import ModelInfo
from .options import ClientOptions, as_options
from .session import Session
from .snapshot import Snapshot

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


class Client:
    """A connection to an rnnserve server, for use from ordinary (threaded) code.

    Thread-safe: sessions may be driven from different threads. Use it as a context manager,
    or call ``close()``; sessions of a closed client can no longer be used.

    >>> with Client("127.0.0.1:50051") as client, client.session("char-gru") as s:
    ...     logits = s.step("hello")            # [5, vocabulary]
    """

    def __init__(self, target: str | ClientOptions) -> None:
        """Connect lazily to ``target`` (``"host:port"``) or with full ``ClientOptions``."""
        self.options = as_options(target)
        creds = self.options.credentials()
        args = list(self.options.channel_options())
        if creds is None:
            self._channel = grpc.insecure_channel(self.options.target, options=args)
        else:
            self._channel = grpc.secure_channel(self.options.target, creds, options=args)
        self._stub = pb_grpc.InferenceServiceStub(self._channel)
        self._rng = random.Random()
        self._models: dict[tuple[str, str], ModelInfo] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel. Sessions stay open on the server until closed or expired."""
        self._channel.close()

    # -- metadata ---------------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        """Every model version the server serves."""
        resp = self._call(self._stub.ListModels, pb.ListModelsRequest())
        return [self._remember(m) for m in resp.models]

    def model(self, name: str, version: str = "") -> ModelInfo:
        """One model version (the latest when ``version`` is empty); ModelNotFound if unknown.

        Answers for a named version are cached: a model version never changes.
        """
        with self._lock:
            cached = self._models.get((name, version)) if version else None
        if cached is not None:
            return cached
        resp = self._call(self._stub.GetModel, pb.GetModelRequest(model=name, version=version))
        return self._remember(resp.model)

    # -- sessions ---------------------------------------------------------------------------

    def session(
        self,
        model: str | ModelInfo,
        version: str = "",
        initial_state: Mapping[str, npt.ArrayLike] | None = None,
        route_key: str | None = None,
    ) -> Session:
        """Open a session on a model version (the latest when ``version`` is empty).

        ``initial_state`` is the memory cell to start from (state name -> array of its
        per-session shape); zeros when None. ``route_key``: behind a proxy, sessions opened with
        one key live on one replica (a random key per session when None). The session is a
        context manager that closes it.
        """
        info = model if isinstance(model, ModelInfo) else self.model(model, version)
        route = new_route_key() if route_key is None else check_route_key(route_key)
        req = pb.OpenSessionRequest(model=info.name, version=info.version)
        if initial_state is not None:
            for name, tensor in encode_state(info, initial_state).items():
                req.initial_state[name].CopyFrom(tensor)
        resp = self._call(self._stub.OpenSession, req, route=route)
        return self._session(resp.session)

    def attach(self, session_id: str) -> Session:
        """A handle on a session opened elsewhere (another process, an earlier run)."""
        resp = self._call(
            self._stub.GetSession, pb.GetSessionRequest(session_id=session_id), session_id
        )
        return self._session(resp.session)

    def restore(self, snapshot: Snapshot, session_id: str = "") -> Session:
        """Restore a snapshot as a session on this client's server; it continues exactly.

        With ``session_id`` empty the server opens a new id; otherwise that session is
        overwritten (or created, when the id came from another replica).
        """
        req = pb.PutStateRequest(session_id=session_id, snapshot=snapshot.to_proto())
        route = None if session_id else new_route_key()
        resp = self._call(self._stub.PutState, req, session_id or None, route)
        return self._session(resp.session)

    # -- internals shared with Session ----------------------------------------------------------

    def _session(self, info: pb.SessionInfo) -> Session:
        return Session(self, info, self.model(info.model, info.version))

    def _remember(self, m: pb.ModelInfo) -> ModelInfo:
        try:
            info = ModelInfo.from_proto(m)
        except ValueError as exc:
            raise RnnserveError(grpc.StatusCode.DATA_LOSS, str(exc)) from None
        with self._lock:
            self._models[(info.name, info.version)] = info
        return info

    def _backoff(self) -> Backoff:
        return Backoff(self.options.retry, self._rng)

    def _call(
        self,
        method: Callable[..., _Resp],
        request: _Req,
        session_id: str | None = None,
        route: str | None = None,
    ) -> _Resp:
        """A unary call with the client's deadline and metadata (with the route key of
        ``route``, else of ``session_id``), retried while UNAVAILABLE (or CANCELLED by a
        stopping server).

        Only idempotent calls come through here (OpenSession repeated after a lost reply at
        worst leaves an unused session, which expires on the server).
        """
        backoff = self._backoff()
        metadata = routed(self.options, session_id, route)
        while True:
            try:
                return method(request, timeout=self.options.deadline_s, metadata=metadata)
            except grpc.RpcError as exc:
                if rpc_code(exc) in RETRY_CODES:
                    delay = backoff.next_delay()
                    if delay is not None:
                        time.sleep(delay)
                        continue
                raise from_rpc_error(
                    exc, target=self.options.target, session_id=session_id
                ) from exc
