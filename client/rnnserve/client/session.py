"""A synchronous session: a memory cell on the server, driven step by step or as a stream."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from rnnserve.v1 import rnnserve_pb2 as pb

from ._convert import Array
from ._routing import Metadata
from ._session_core import Exchange, Ops, Rpc, SessionCore, Sleep, Step, StreamFailure
from .errors import RnnserveError, rpc_code, rpc_message
from .models import ModelInfo
from .snapshot import Snapshot

if TYPE_CHECKING:
    from .client import Client

_T = TypeVar("_T")


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
        self._core = SessionCore(client.options, client._backoff, info, model)
        self.id: str = self._core.id
        self.model: ModelInfo = model
        self._lock = threading.RLock()

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
        return self._core.ledger.next_seq

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
        with self._lock:
            return self._run(self._core.step(x))

    def stream(self, inputs: Iterable[object]) -> Iterator[Array]:
        """Send each item of ``inputs`` over one bidi stream, yielding its outputs in order.

        Each item is what ``step()`` takes, and each yielded array what it returns. The next
        item is read only after the previous outputs were yielded, so ``inputs`` may depend on
        them (feeding a sampled token back, for example). The stream reconnects and resumes by
        itself. It ends when ``inputs`` is exhausted or the generator is closed (``break`` out
        of the loop); until then the session's other calls wait.
        """
        with self._lock:
            self._core.check_open()
            holder: list[_BidiCall] = []
            try:
                if self._core.ledger.pending is not None:
                    self._run(self._core.drive_stream(), holder)
                for item in inputs:
                    yield self._run(self._core.stream_item(item), holder)
            except GeneratorExit:  # the caller stopped early: a clean end if nothing is in flight
                for call in holder:
                    call.close(graceful=self._core.ledger.pending is None)
                raise
            except BaseException:
                for call in holder:
                    call.close()
                raise
            for call in holder:
                call.close(graceful=True)

    # -- session management -----------------------------------------------------------------

    def reset(self) -> None:
        """Set the memory cell back to zeros; seq numbering goes on."""
        with self._lock:
            self._run(self._core.reset())

    def fork(self) -> Session:
        """A new session starting from a copy of this one's memory cell and seq."""
        with self._lock:
            info = self._run(self._core.fork())
        return Session(self._client, info, self.model)

    def snapshot(self) -> Snapshot:
        """A portable copy of the session (memory cell, seq, last reply) to restore elsewhere."""
        with self._lock:
            return self._run(self._core.snapshot())

    def state(self) -> dict[str, Array]:
        """The current memory cell: state name -> array of its per-session shape."""
        return self.snapshot().state

    def restore(self, snapshot: Snapshot) -> None:
        """Overwrite this session with a snapshot; it continues from the snapshot's seq."""
        with self._lock:
            self._run(self._core.restore(snapshot))

    def info(self) -> pb.SessionInfo:
        """The session as the server holds it (expiry, the seq it expects next)."""
        return self._run(self._core.info())

    def close(self) -> None:
        """End the session on the server and free its state (idempotent).

        A session the server already dropped counts as closed.
        """
        with self._lock:
            self._run(self._core.close())

    # -- the transport --------------------------------------------------------------------------

    def _run(self, ops: Ops[_T], holder: list[_BidiCall] | None = None) -> _T:
        """Run an operation with blocking calls (see _session_core)."""
        result: Any = None
        error: Exception | None = None
        while True:
            try:
                op = ops.send(result) if error is None else ops.throw(error)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            result, error = None, None
            try:
                result = self._do(op, holder)
            except Exception as exc:
                error = exc

    def _do(self, op: Rpc | Step | Exchange | Sleep, holder: list[_BidiCall] | None) -> Any:
        client = self._client
        if isinstance(op, Step):
            timeout = client.options.deadline_s
            return client._stub.Step(op.request, timeout=timeout, metadata=self._core.metadata)
        if isinstance(op, Rpc):
            return client._call(getattr(client._stub, op.method), op.request, self.id)
        if isinstance(op, Sleep):
            time.sleep(op.seconds)
            return None
        assert holder is not None, "an Exchange outside a stream"
        try:
            if not holder:
                holder.append(_BidiCall(client, self._core.metadata))
            return holder[0].exchange(op.request)
        except (grpc.RpcError, RnnserveError) as exc:
            holder.pop().close()
            code = exc.code if isinstance(exc, RnnserveError) else rpc_code(exc)
            message = exc.message if isinstance(exc, RnnserveError) else rpc_message(exc)
            raise StreamFailure(code, message) from exc
