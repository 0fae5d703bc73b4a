"""Domain errors that carry their gRPC status, and the one place that maps them onto the wire.

Code below the servicer raises ``ServingError`` (or a helper like ``not_found``); the servicer
turns it into an aborted call (unary) or an in-band ``StepError`` (stream). Anything else is a
bug: it is logged with its traceback and the client gets a generic INTERNAL message, never the
exception's text.
"""

from __future__ import annotations

import logging
import secrets

import grpc
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.wire import NEXT_SEQ_KEY

log = logging.getLogger("rnnserve.server")

#: Longest error message sent (status details travel in HTTP/2 headers, whose total size the
#: client limits to about 8 KB: a longer message would turn the error into RESOURCE_EXHAUSTED).
MAX_MESSAGE_CHARS = 1024
#: Longest client-supplied string (an id, a name) an error message quotes whole.
MAX_QUOTED_CHARS = 64


def quoted(text: str) -> str:
    """``text`` as an error message may quote it: whole when short, else its start and its
    length, so a client's long id or name never makes the error itself too large."""
    if len(text) <= MAX_QUOTED_CHARS:
        return text
    return f"{text[:MAX_QUOTED_CHARS]}... ({len(text)} characters)"


class ServingError(Exception):
    """A request cannot be served: a status code, a message saying what to fix, and for seq
    errors the seq the session expects next."""

    def __init__(self, code: grpc.StatusCode, message: str, next_seq: int | None = None) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 3] + "..."
        super().__init__(message)
        self.code = code
        self.message = message
        self.next_seq = next_seq

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata a unary error carries: the next expected seq for seq errors."""
        return () if self.next_seq is None else ((NEXT_SEQ_KEY, str(self.next_seq)),)

    def to_step_error(self) -> pb.StepError:
        """The in-band form used on the Stream call."""
        return pb.StepError(
            code=self.code.value[0], message=self.message, next_seq=self.next_seq or 0
        )


def not_found(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.NOT_FOUND, message)


def invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def seq_error(message: str, next_seq: int) -> ServingError:
    return ServingError(grpc.StatusCode.FAILED_PRECONDITION, message, next_seq)


def unavailable(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.UNAVAILABLE, message)


def out_of_range(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.OUT_OF_RANGE, message)


def resource_exhausted(message: str) -> ServingError:
    """A limit was reached; the message names the limit (the setting) and what to do."""
    return ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def internal(exc: BaseException, what: str) -> ServingError:
    """Log an unexpected exception with a reference the client sees; a generic INTERNAL."""
    ref = secrets.token_hex(4)
    log.error("internal error %s during %s", ref, what, exc_info=exc)
    return ServingError(
        grpc.StatusCode.INTERNAL, f"internal server error (reference {ref} in the server log)"
    )


def as_serving_error(exc: BaseException, what: str) -> ServingError:
    """The ServingError for any exception: itself, or a logged INTERNAL for anything else."""
    return exc if isinstance(exc, ServingError) else internal(exc, what)
