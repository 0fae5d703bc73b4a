"""Why a chunk of a session that ended while the chunk waited was not applied: retryable when
the session lives on under its id, NOT_FOUND when it is gone."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from rnnserve.server.session import CAPACITY, CLOSED, IDLE, MOVED, REPLACED, Session


class _Store:
    every = 16

    def mark(self, session: Session) -> None: ...

    def ended(self, session: Session, reason: str) -> None: ...


@pytest.mark.parametrize(
    ("reason", "store", "code"),
    [
        (CLOSED, False, grpc.StatusCode.NOT_FOUND),
        (CLOSED, True, grpc.StatusCode.NOT_FOUND),
        (IDLE, True, grpc.StatusCode.NOT_FOUND),
        (CAPACITY, False, grpc.StatusCode.NOT_FOUND),  # evicted without a store: gone
        (CAPACITY, True, grpc.StatusCode.UNAVAILABLE),  # saved on the way out
        (MOVED, True, grpc.StatusCode.UNAVAILABLE),  # another replica holds it
        (REPLACED, False, grpc.StatusCode.UNAVAILABLE),  # a restore lives on under its id
    ],
)
def test_a_chunk_of_an_ended_session_is_retryable_only_when_it_lives_on(
    reason: str, store: bool, code: grpc.StatusCode
) -> None:
    model: Any = None
    session = Session("r.abcdefghijklmnopqrstuv", model, 0, 0.0)
    if store:
        session.checkpoints = _Store()
    session.ended = reason
    err = session.gone()
    assert err.code == code
    assert session.id in err.message
