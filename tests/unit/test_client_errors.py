"""The SDK's exception family: status codes kept, mapped to the right subclass."""

from __future__ import annotations

import grpc
from rnnserve.client import (
    ModelNotFound,
    RnnserveError,
    SeqConflict,
    ServerUnavailable,
    SessionLost,
)
from rnnserve.client.errors import code_from_int, from_code


def test_not_found_means_a_lost_session_only_for_session_calls() -> None:
    lost = from_code(grpc.StatusCode.NOT_FOUND, "expired", session_id="abc")
    assert isinstance(lost, SessionLost) and lost.session_id == "abc"
    assert "session abc" in lost.message and "expired" in lost.message
    missing = from_code(grpc.StatusCode.NOT_FOUND, "no model 'x'")
    assert isinstance(missing, ModelNotFound) and missing.message == "no model 'x'"


def test_other_codes() -> None:
    down = from_code(grpc.StatusCode.UNAVAILABLE, "connection refused", target="h:1")
    assert isinstance(down, ServerUnavailable) and "at h:1" in down.message
    assert isinstance(from_code(grpc.StatusCode.FAILED_PRECONDITION, "seq"), SeqConflict)
    generic = from_code(grpc.StatusCode.RESOURCE_EXHAUSTED, "full")
    assert type(generic) is RnnserveError and generic.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(generic) == "full [RESOURCE_EXHAUSTED]"


def test_in_band_codes_map_back_to_status_codes() -> None:
    assert code_from_int(5) == grpc.StatusCode.NOT_FOUND
    assert code_from_int(9) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_from_int(12345) == grpc.StatusCode.UNKNOWN
