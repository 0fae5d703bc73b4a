"""A synchronous session: a memory cell on the server, driven step by step or as a stream."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

import grpc
import numpy as np
from rnnserve.v1 import rnnserve_pb2 as pb

from ._convert import Array, encode_inputs, join_outputs, split_chunks
from ._driver import STREAM_RETRY_CODES, ChunkDriver
from ._ledger import SeqLedger
from ._routing import Metadata, replay_steps, routed
from .errors import RnnserveError, rpc_code, rpc_message, rpc_next_seq
from .models import ModelInfo
from .snapshot import Snapshot

if TYPE_CHECKING:
    from .client import Client

_Resp = TypeVar("_Resp")


class _BidiCall:
    """One sync Stream call: requests go in through a queue, replies come out in order."""

    def __init__(self, client: Client, metadata: Metadata) -> None:
        self._requests: queue.SimpleQueue[pb.StreamRequest | None] = queue.SimpleQueue()
        # gRPC reads the request iterator in its own thread; None ends it (half-close).
        self._replies = client._stub.Stream(iter(self._requests.get, None), metadata=metadata)

    def exchange(self, request: pb.StreamRequest) -> pb.StreamResponse:
        """Send one request and wait for its reply; grpc.RpcError when the stream broke."""
        self._requests.put(request)
        try:
            return next(self._replies)
        except StopIteration:
            raise RnnserveError(
                grpc.StatusCode.UNAVAILABLE, "the server ended the stream early"
            ) from None

    def close(self, *, graceful: bool = False) -> None:
        """End the call (idempotent).

        ``graceful``: half-close and let the server finish with OK (every reply has arrived,
        so it ends at once) instead of cancelling, which the server would count as CANCELLED.
        """
        self._requests.put(None)
        if graceful:
            try:
                for _ in self._replies:
                    pass
            except grpc.RpcError:
                pass
        self._replies.cancel()


class Session:
    """A session on the server: send steps, get outputs; the memory cell stays on the server.

    Calls on one session are serialised (one chunk in flight, which is what makes resuming
    exact). After a dropped connection, a server restart or a move to another replica the
    session resends what the server has not applied, so every output arrives once, in order;
    ``SessionLost`` says when the session is gone for good. Close it (or use ``with``).
    """

    def __init__(self, client: Client, info: pb.SessionInfo, model: ModelInfo) -> None:
        """Internal: sessions come from ``Client.session()``, ``attach()`` and ``restore()``."""
        self._client = client
        self.id: str = info.session_id
        self.model: ModelInfo = model
        self._ledger = SeqLedger(self.id, int(info.next_seq), replay_steps(client.options, info))
        #: Every call of the session carries its route key (rnnserve.proto, Routing).
        self._metadata = routed(client.options, self.id)
        self._lock = threading.RLock()
        self._closed = False

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Session(id={self.id!r}, model={self.model.name!r}, next_seq={self.next_seq})"

    @property
    def next_seq(self) -> int:
        """Steps this session has applied (the seq of its next chunk)."""
        return self._ledger.next_seq

    # -- steps ----------------------------------------------------------------------------------

    def step(self, x: object) -> Array:
        """Apply one step or a chunk and return its outputs.

        ``x``: see the model's input (``[features]`` one step, ``[T, features]`` a chunk; for
        text models an int, a string or token ids). Returns ``[outputs]`` for one step and
        ``[T, outputs]`` for a chunk. InvalidInput before any call when ``x`` does not fit.
        Chunks longer than the server's limit are split and the outputs joined.

        If this raises after the chunk may have reached the server (ServerUnavailable,
        DEADLINE_EXCEEDED), the session's next call completes that chunk exactly once before
        anything else; do not send it again.
        """
        inputs, single = encode_inputs(self.model, x)
        with self._lock:
            self._check_open()
            self._settle()
            parts = []
            for piece in split_chunks(self.model, inputs):
                self._ledger.submit(piece)
                parts.append(self._drive_unary())
        return join_outputs(parts, single)

    def stream(self, inputs: Iterable[object]) -> Iterator[Array]:
        """Send each item of ``inputs`` over one bidi stream, yielding its outputs in order.

        Each item is what ``step()`` takes, and each yielded array what it returns. The next
        item is read only after the previous outputs were yielded, so ``inputs`` may depend on
        them (feeding a sampled token back, for example). The stream reconnects and resumes by
        itself. It ends when ``inputs`` is exhausted or the generator is closed (``break`` out
        of the loop); until then the session's other calls wait.
        """
        with self._lock:
            self._check_open()
            holder: list[_BidiCall] = []
            try:
                if self._ledger.pending is not None:
                    self._drive_stream(holder)
                for item in inputs:
                    chunk, single = encode_inputs(self.model, item)
                    parts = []
                    for piece in split_chunks(self.model, chunk):
                        self._ledger.submit(piece)
                        parts.append(self._drive_stream(holder))
                    yield join_outputs(parts, single)
            except GeneratorExit:  # the caller stopped early: a clean end if nothing is in flight
                for call in holder:
                    call.close(graceful=self._ledger.pending is None)
                raise
            except BaseException:
                for call in holder:
                    call.close()
                raise
            for call in holder:
                call.close(graceful=True)

    def _drive_unary(self) -> Array:
        driver = ChunkDriver(self._ledger, self.model, self._client._backoff(), self._target)
        stub, options = self._client._stub, self._client.options
        while True:
            try:
                reply = stub.Step(
                    driver.request(), timeout=options.deadline_s, metadata=self._metadata
                )
            except grpc.RpcError as exc:
                try:
                    delay = driver.on_failure(rpc_code(exc), rpc_message(exc), rpc_next_seq(exc))
                except RnnserveError as error:
                    raise error from exc
                time.sleep(delay)
                continue
            outputs = driver.on_reply(reply)
            if outputs is not None:
                return outputs

    def _drive_stream(self, holder: list[_BidiCall]) -> Array:
        driver = ChunkDriver(self._ledger, self.model, self._client._backoff(), self._target)
        while True:
            request = driver.request()
            try:
                if not holder:
                    holder.append(_BidiCall(self._client, self._metadata))
                reply = holder[0].exchange(pb.StreamRequest(step=request, request_id=request.seq))
            except (grpc.RpcError, RnnserveError) as exc:
                holder.pop().close()
                code = exc.code if isinstance(exc, RnnserveError) else rpc_code(exc)
                message = exc.message if isinstance(exc, RnnserveError) else rpc_message(exc)
                try:
                    delay = driver.on_failure(code, message, None, retry_codes=STREAM_RETRY_CODES)
                except RnnserveError as error:
                    raise error from exc
                time.sleep(delay)
                continue
            result = driver.on_stream_reply(reply)
            if isinstance(result, np.ndarray):
                return result
            if result is not None:
                time.sleep(result)

    # -- session management -----------------------------------------------------------------

    def reset(self) -> None:
        """Set the memory cell back to zeros; seq numbering goes on."""
        with self._lock:
            self._check_open()
            self._settle()
            self._unary(self._client._stub.ResetSession, pb.ResetSessionRequest(session_id=self.id))
            self._ledger.forget_history()

    def fork(self) -> Session:
        """A new session starting from a copy of this one's memory cell and seq."""
        with self._lock:
            self._check_open()
            self._settle()
            resp = self._unary(
                self._client._stub.ForkSession, pb.ForkSessionRequest(session_id=self.id)
            )
        return Session(self._client, resp.session, self.model)

    def snapshot(self) -> Snapshot:
        """A portable copy of the session (memory cell, seq, last reply) to restore elsewhere."""
        with self._lock:
            self._check_open()
            self._settle()
            resp = self._unary(self._client._stub.GetState, pb.GetStateRequest(session_id=self.id))
        return Snapshot(resp.snapshot)

    def state(self) -> dict[str, Array]:
        """The current memory cell: state name -> array of its per-session shape."""
        return self.snapshot().state

    def restore(self, snapshot: Snapshot) -> None:
        """Overwrite this session with a snapshot; it continues from the snapshot's seq."""
        with self._lock:
            self._check_open()
            self._ledger.abandon()
            req = pb.PutStateRequest(session_id=self.id, snapshot=snapshot.to_proto())
            resp = self._unary(self._client._stub.PutState, req)
            replay = replay_steps(self._client.options, resp.session)
            self._ledger = SeqLedger(self.id, int(resp.session.next_seq), replay)

    def info(self) -> pb.SessionInfo:
        """The session as the server holds it (expiry, the seq it expects next)."""
        resp = self._unary(self._client._stub.GetSession, pb.GetSessionRequest(session_id=self.id))
        return resp.session

    def close(self) -> None:
        """End the session on the server and free its state (idempotent).

        A session the server already dropped counts as closed.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._unary(
                    self._client._stub.CloseSession, pb.CloseSessionRequest(session_id=self.id)
                )
            except RnnserveError as exc:
                if exc.code != grpc.StatusCode.NOT_FOUND:
                    raise

    @property
    def _target(self) -> str:
        return self._client.options.target

    def _unary(self, method: Callable[..., _Resp], request: object) -> _Resp:
        return self._client._call(method, request, self.id)

    def _settle(self) -> None:
        # A chunk left in doubt by an earlier failure is completed before anything else, so
        # that a reset, fork or snapshot sees the steps in the order they were sent.
        if self._ledger.pending is not None:
            self._drive_unary()

    def _check_open(self) -> None:
        if self._closed:
            raise RnnserveError(grpc.StatusCode.FAILED_PRECONDITION, f"session {self.id} is closed")
