"""Driving one chunk to its outputs: what to send, and what each reply or failure means.

Shared by every transport (sync unary, sync stream, asyncio unary and stream, multiplexer), which
only move messages and sleep when told to. The seq decisions themselves are ``SeqLedger``'s.
"""

from __future__ import annotations

import grpc
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.wire import to_tensor

from ._convert import Array, decode_outputs
from ._ledger import Chunk, SeqLedger
from ._retry import Backoff
from .errors import (
    IN_DOUBT_CODES,
    RnnserveError,
    SeqConflict,
    ServerUnavailable,
    code_from_int,
    from_code,
)
from .models import ModelInfo

#: Seq refusals in a row after which the SDK stops re-planning (the server disagrees with itself).
_MAX_SEQ_REFUSALS = 3

#: Failures after which the session is intact and the chunk is simply sent again. The SDK never
#: cancels a call it waits on, so a CANCELLED comes from the server going away: a stopping gRPC
#: server cancels the calls that reached it after its drain (measured: 11 of 668 unary steps
#: sent straight to a replica during its SIGTERM drain). The seq makes the resend safe.
RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
#: How a broken stream call looks: the SDK never cancels a call while a chunk is in flight, so a
#: CANCELLED comes from the server going away (a restart, a drain), and gRPC core reports a
#: connection torn down mid-write as INTERNAL. Replies in-band on a live stream use RETRY_CODES.
STREAM_RETRY_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL}
)


class ChunkDriver:
    """Takes the chunk in flight of ``ledger`` (replays first) to its outputs.

    Loop: ``request()`` -> send -> ``on_reply()`` or ``on_failure()``, until ``on_reply`` returns
    the outputs. ``on_failure`` returns the seconds to wait before sending again, or raises the
    SDK exception for the caller.
    """

    def __init__(
        self, ledger: SeqLedger, model: ModelInfo, backoff: Backoff, target: str = ""
    ) -> None:
        self._ledger = ledger
        self._model = model
        self._backoff = backoff
        self._target = target
        self._refusals = 0

    def chunk(self) -> Chunk:
        """The next chunk to send (a replayed one, or the one in flight)."""
        chunk = self._ledger.to_send()
        if chunk is None:
            raise RuntimeError("no chunk in flight")
        return chunk

    def request(self) -> pb.StepRequest:
        """The next StepRequest to send (a replayed chunk, or the one in flight)."""
        chunk = self.chunk()
        return pb.StepRequest(
            session_id=self._ledger.session_id, seq=chunk.seq, inputs=to_tensor(chunk.inputs)
        )

    def on_reply(self, reply: pb.StepResponse) -> Array | None:
        """A StepResponse arrived: the caller's outputs, or None to send the next request."""
        chunk = self._ledger.to_send()
        if chunk is None or reply.seq != chunk.seq:
            raise SeqConflict(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"session {self._ledger.session_id}: got the reply for seq {reply.seq}, "
                f"expected {None if chunk is None else chunk.seq}",
            )
        outputs = decode_outputs(self._model, reply.outputs, chunk.steps)
        self._refusals = 0
        return self._ledger.on_outputs(reply.seq, outputs)

    def on_outputs(self, outputs: Array, next_seq: int) -> Array | None:
        """A frame entry's outputs arrived (decoded and shape-checked with the frame): the
        caller's outputs, or None to send the next request (a replayed chunk was answered)."""
        chunk = self._ledger.to_send()
        if chunk is None or next_seq != chunk.end:
            raise SeqConflict(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"session {self._ledger.session_id}: the server is at seq {next_seq} after the "
                f"chunk, expected {None if chunk is None else chunk.end}",
            )
        self._refusals = 0
        return self._ledger.on_outputs(chunk.seq, outputs)

    def on_failure(
        self,
        code: grpc.StatusCode,
        message: str,
        next_seq: int | None,
        *,
        retry_codes: frozenset[grpc.StatusCode] = RETRY_CODES,
    ) -> float:
        """A send failed or was refused: seconds to wait before sending again, or raises.

        ``next_seq`` is the seq the server said it holds (FAILED_PRECONDITION), when it did.
        After a failure whose outcome is unknown the chunk stays in flight, so the session's
        next call completes it exactly once; a chunk the server refused is abandoned.
        """
        session_id = self._ledger.session_id
        if code in retry_codes:
            delay = self._backoff.next_delay()
            if delay is not None:
                return delay
        elif code == grpc.StatusCode.FAILED_PRECONDITION and next_seq is not None:
            self._refusals += 1
            if self._refusals <= _MAX_SEQ_REFUSALS:
                self._ledger.on_server_seq(next_seq)
                return 0.0
            raise SeqConflict(code, f"session {session_id}: {message}")
        if code not in IN_DOUBT_CODES:
            self._ledger.abandon()
        if code in retry_codes:
            where = f" at {self._target}" if self._target else ""
            raise ServerUnavailable(
                code, f"cannot reach the rnnserve server{where}, gave up retrying: {message}"
            )
        raise from_code(code, message, target=self._target, session_id=session_id)

    def on_stream_reply(self, reply: pb.StreamResponse) -> Array | float | None:
        """A reply on a live stream: the caller's outputs (an array), the seconds to wait before
        sending again (an in-band refusal), or None to send the next request right away."""
        kind = reply.WhichOneof("result")
        if kind == "step":
            return self.on_reply(reply.step)
        if kind == "error":
            err = reply.error
            return self.on_failure(code_from_int(err.code), err.message, int(err.next_seq))
        raise RnnserveError(
            grpc.StatusCode.INTERNAL,
            f"session {self._ledger.session_id}: the server sent an empty reply",
        )
