"""The SDK's one exception family.

Every error the SDK raises is a ``RnnserveError`` that keeps the ``grpc.StatusCode`` and the
server's message. Errors that come from a gRPC call are raised ``from`` the gRPC error, so the
original stays in ``__cause__``. Errors found before a call (bad input) carry
``INVALID_ARGUMENT`` and are also ``ValueError``.
"""

from __future__ import annotations

import grpc
import numpy as np
import numpy.typing as npt
from rnnserve.wire import NEXT_SEQ_KEY


class RnnserveError(Exception):
    """A call failed. ``code`` is the gRPC status code, ``message`` says what went wrong."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{message} [{code.name}]")
        self.code = code
        self.message = message


class InvalidInput(RnnserveError, ValueError):
    """The SDK refused the input before sending it; the message names the expected shape."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message)


class ModelNotFound(RnnserveError):
    """The server does not serve the model (or version) asked for."""


class ServerUnavailable(RnnserveError):
    """The server could not be reached, also after retrying for as long as the policy allows."""


class SessionLost(RnnserveError):
    """A session is gone for good and cannot be continued.

    Raised when the server no longer knows the session (it expired, was evicted, closed, or the
    server restarted without a durable store) or holds a copy the SDK cannot bring up to date.
    The SDK never continues such a session silently; open a new one, or restore a snapshot.
    """

    def __init__(self, session_id: str, message: str, code: grpc.StatusCode) -> None:
        super().__init__(code, f"session {session_id}: {message}")
        self.session_id = session_id


class SeqConflict(RnnserveError):
    """The server's seq does not fit this client's history: another client drove the session."""


class StepManyError(RnnserveError):
    """Some entries of a ``Multiplexer.step_many`` failed; the others succeeded.

    ``errors`` maps each failed entry's index to the exception a single step of that session
    would have raised; ``outputs`` holds every entry's outputs, with NaN in the rows of the
    failed ones. ``code`` and the message are those of the first failed entry.
    """

    def __init__(self, outputs: npt.NDArray[np.generic], errors: dict[int, RnnserveError]) -> None:
        first = min(errors)
        err = errors[first]
        super().__init__(
            err.code,
            f"{len(errors)} of {len(outputs)} entries failed; entry {first}: {err.message}",
        )
        self.outputs = outputs
        self.errors = errors

    @property
    def failed(self) -> list[int]:
        """The indices of the failed entries, ascending."""
        return sorted(self.errors)


#: Codes after which the server may or may not have applied a chunk.
IN_DOUBT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)


def rpc_code(exc: grpc.RpcError) -> grpc.StatusCode:
    """The status code of a failed call (UNKNOWN when the error carries none)."""
    if isinstance(exc, grpc.Call | grpc.aio.AioRpcError):
        code = exc.code()
        if isinstance(code, grpc.StatusCode):
            return code
    return grpc.StatusCode.UNKNOWN


def rpc_message(exc: grpc.RpcError) -> str:
    """The server's message of a failed call."""
    if isinstance(exc, grpc.Call | grpc.aio.AioRpcError):
        details = exc.details()
        if details:
            return str(details)
    return str(exc) or type(exc).__name__


def rpc_next_seq(exc: grpc.RpcError) -> int | None:
    """The seq a session expects, from a FAILED_PRECONDITION's trailing metadata, if present."""
    if not isinstance(exc, grpc.Call | grpc.aio.AioRpcError):
        return None
    for key, value in exc.trailing_metadata() or ():
        if key == NEXT_SEQ_KEY:
            try:
                return int(value)
            except (TypeError, ValueError):
                return None
    return None


def from_code(
    code: grpc.StatusCode, message: str, *, target: str = "", session_id: str | None = None
) -> RnnserveError:
    """The SDK exception for a status code.

    ``session_id`` says the call was about that session, so NOT_FOUND means the session is gone
    (``SessionLost``); without it NOT_FOUND means an unknown model (``ModelNotFound``).
    """
    if code == grpc.StatusCode.NOT_FOUND:
        if session_id is not None:
            return SessionLost(
                session_id,
                f"the server no longer has it ({message}); open a new session or restore a "
                "snapshot",
                code,
            )
        return ModelNotFound(code, message)
    if code == grpc.StatusCode.UNAVAILABLE:
        where = f" at {target}" if target else ""
        return ServerUnavailable(code, f"cannot reach the rnnserve server{where}: {message}")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return SeqConflict(code, message)
    return RnnserveError(code, message)


def from_rpc_error(
    exc: grpc.RpcError, *, target: str = "", session_id: str | None = None
) -> RnnserveError:
    """The SDK exception for a failed gRPC call; raise it ``from exc``."""
    return from_code(rpc_code(exc), rpc_message(exc), target=target, session_id=session_id)


def code_from_int(value: int) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` of an in-band ``StepError.code`` (UNKNOWN for unknown values)."""
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN
