"""Tombstones: why each of the last ended sessions ended, in a ring of numpy columns."""

from __future__ import annotations

from rnnserve.server.sessions import CAPACITY, CLOSED, IDLE, MOVED
from rnnserve.server.tombstones import Tombstones


def test_the_newest_reason_answers_until_the_ring_forgets_it() -> None:
    ring = Tombstones(size=4)
    ring.add("a", CLOSED)
    ring.add("b", IDLE)
    assert (ring.get("a"), ring.get("b"), ring.get("c")) == (CLOSED, IDLE, None)
    ring.add("a", MOVED)  # ended again (restored under its id in between): the newest answers
    assert ring.get("a") == MOVED and len(ring) == 3
    ring.add("c", CAPACITY)
    ring.add("d", CLOSED)  # the ring is full: "a"'s first entry goes, its second stays
    assert ring.get("a") == MOVED and ring.get("d") == CLOSED
    ring.add("e", IDLE)  # now "b" goes
    assert ring.get("b") is None and len(ring) == 4
    ring.add("f", CLOSED)  # and "a"'s second
    assert ring.get("a") is None


def test_a_session_open_again_has_no_tombstone() -> None:
    ring = Tombstones(size=8)
    ring.add("a", CLOSED)
    ring.add("a", MOVED)
    ring.forget("a")
    assert ring.get("a") is None and len(ring) == 0
    ring.add("a", IDLE)
    assert ring.get("a") == IDLE
