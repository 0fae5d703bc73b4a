"""The resume logic alone: what a session resends, decided from the seq the server holds."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from rnnserve.client._ledger import SeqLedger
from rnnserve.client._retry import Backoff
from rnnserve.client.errors import SeqConflict, SessionLost
from rnnserve.client.options import RetryPolicy


def _chunk(steps: int, value: float = 0.0) -> np.ndarray:
    return np.full((steps, 2), value, np.float32)


def _answer(ledger: SeqLedger) -> np.ndarray | None:
    """Play the server: answer whatever the ledger sends with outputs tagged by seq."""
    chunk = ledger.to_send()
    assert chunk is not None
    return ledger.on_outputs(chunk.seq, np.full((chunk.steps, 1), chunk.seq, np.float32))


def test_chunks_are_numbered_by_their_first_step() -> None:
    ledger = SeqLedger("s", 5, replay_steps=16)
    first = ledger.submit(_chunk(3))
    assert (first.seq, first.end, ledger.next_seq) == (5, 8, 8)
    out = _answer(ledger)
    assert out is not None and out[0, 0] == 5
    assert ledger.pending is None
    assert ledger.submit(_chunk(1)).seq == 8


def test_one_chunk_in_flight() -> None:
    ledger = SeqLedger("s", 0, replay_steps=0)
    ledger.submit(_chunk(2))
    with pytest.raises(RuntimeError, match="in flight"):
        ledger.submit(_chunk(2))


def test_server_at_the_chunk_seq_means_resend_it() -> None:
    ledger = SeqLedger("s", 0, replay_steps=16)
    ledger.submit(_chunk(2))
    _answer(ledger)
    pending = ledger.submit(_chunk(2))
    ledger.on_server_seq(2)
    assert ledger.to_send() is pending


def test_server_behind_replays_answered_chunks_then_the_pending_one() -> None:
    ledger = SeqLedger("s", 0, replay_steps=16)
    for _ in range(3):
        ledger.submit(_chunk(2))
        _answer(ledger)
    pending = ledger.submit(_chunk(2))
    ledger.on_server_seq(2)  # the server restored a copy taken after the first chunk
    sent = []
    while True:
        chunk = ledger.to_send()
        assert chunk is not None
        sent.append(chunk.seq)
        out = ledger.on_outputs(chunk.seq, np.zeros((chunk.steps, 1), np.float32))
        if out is not None:
            break
    assert sent == [2, 4, pending.seq]
    assert ledger.next_seq == 8 and ledger.pending is None


def test_server_behind_past_the_replay_window_is_lost() -> None:
    ledger = SeqLedger("s", 0, replay_steps=2)
    for _ in range(3):
        ledger.submit(_chunk(2))
        _answer(ledger)
    ledger.submit(_chunk(2))
    with pytest.raises(SessionLost, match="keeps only the last 2 steps") as info:
        ledger.on_server_seq(0)
    assert info.value.code == grpc.StatusCode.DATA_LOSS


def test_applied_chunk_without_its_reply_is_lost_not_guessed() -> None:
    ledger = SeqLedger("s", 0, replay_steps=16)
    ledger.submit(_chunk(3))
    with pytest.raises(SessionLost, match="no longer has its outputs"):
        ledger.on_server_seq(3)


def test_server_ahead_of_everything_sent_is_a_conflict() -> None:
    ledger = SeqLedger("s", 0, replay_steps=16)
    ledger.submit(_chunk(3))
    with pytest.raises(SeqConflict, match="another client"):
        ledger.on_server_seq(10)


def test_a_stray_reply_is_refused() -> None:
    ledger = SeqLedger("s", 0, replay_steps=16)
    ledger.submit(_chunk(3))
    with pytest.raises(SeqConflict):
        ledger.on_outputs(7, np.zeros((3, 1), np.float32))


def test_abandon_frees_the_seq_and_reset_forgets_history() -> None:
    ledger = SeqLedger("s", 0, replay_steps=16)
    ledger.submit(_chunk(2))
    _answer(ledger)
    ledger.submit(_chunk(4))
    ledger.abandon()
    assert ledger.next_seq == 2 and ledger.pending is None
    ledger.forget_history()
    ledger.submit(_chunk(1))
    with pytest.raises(SessionLost):  # nothing left to replay from seq 0
        ledger.on_server_seq(0)


def test_replay_window_keeps_at_least_the_asked_steps() -> None:
    ledger = SeqLedger("s", 0, replay_steps=5)
    for _ in range(6):
        ledger.submit(_chunk(2))
        _answer(ledger)
    ledger.submit(_chunk(1))
    ledger.on_server_seq(6)  # 6 steps back: within the window of >= 5 kept steps
    first = ledger.to_send()
    assert first is not None and first.seq == 6


def test_backoff_grows_then_gives_up() -> None:
    import random

    policy = RetryPolicy(
        initial_backoff_s=0.01, max_backoff_s=0.04, multiplier=2, jitter=0, give_up_after_s=60
    )
    backoff = Backoff(policy, random.Random(0))
    delays = [backoff.next_delay() for _ in range(5)]
    assert delays == [0.01, 0.02, 0.04, 0.04, 0.04]
    never = Backoff(RetryPolicy(give_up_after_s=0), random.Random(0))
    assert never.next_delay() is None
