"""Why recently ended sessions ended, so a late call hears "expired" or "evicted" rather than
"unknown".

The last ``size`` ended sessions are kept in a ring of two numpy columns: the hash of the id
and a reason code. Not a dict: its keys would be int objects, each made when a session ends,
scattered over the memory the ended sessions leave, where they keep the allocator from
giving that memory back (closing a million parked sessions kept 176 MiB more that way). A
lookup is one numpy pass over the ring (tens of microseconds at 100,000), made only for an
id that is not open: an error's message, or a session opened under a given id.
"""

from __future__ import annotations

import numpy as np
from rnnserve.server.errors import quoted
from rnnserve.server.session import CAPACITY, CLOSED, IDLE, MOVED, REPLACED

#: Tombstones kept (oldest forgotten first).
MAX_TOMBSTONES = 100_000
#: Reason codes: 0 is an empty or forgotten entry.
_REASONS: tuple[str | None, ...] = (None, CLOSED, IDLE, CAPACITY, MOVED, REPLACED)
_CODES = {reason: code for code, reason in enumerate(_REASONS) if reason is not None}


class Tombstones:
    """The reasons the last ``size`` ended sessions ended, by id."""

    def __init__(self, size: int = MAX_TOMBSTONES) -> None:
        self._hashes = np.zeros(size, np.int64)
        self._reasons = np.zeros(size, np.uint8)
        #: Where the next one goes, and how many entries were ever written (up to ``size``).
        self._next = 0
        self._filled = 0

    def __len__(self) -> int:
        return int(np.count_nonzero(self._reasons[: self._filled]))

    def add(self, sid: str, reason: str) -> None:
        i = self._next
        self._hashes[i] = hash(sid)
        self._reasons[i] = _CODES[reason]
        self._next = (i + 1) % len(self._hashes)
        self._filled = max(self._filled, i + 1)

    def _latest(self, sid: str) -> int | None:
        """The newest entry of ``sid``, if any."""
        hits = np.flatnonzero(self._hashes[: self._filled] == hash(sid))
        hits = hits[self._reasons[hits] != 0]
        if not hits.size:
            return None
        age = (self._next - 1 - hits) % len(self._hashes)
        return int(hits[age.argmin()])

    def get(self, sid: str) -> str | None:
        """Why session ``sid`` ended, while its tombstone lasts; None if it did not."""
        i = self._latest(sid)
        return None if i is None else _REASONS[self._reasons[i]]

    def why(self, sid: str, ttl_s: float, capacity: int) -> str:
        """What to tell a call on ``sid``, a session that is not open here: why it ended
        (with the server's idle TTL and session capacity), or that it is unknown."""
        reason = self.get(sid)
        sid = quoted(sid)
        if reason == CLOSED:
            return f"session {sid} was closed; open a new session"
        if reason == IDLE:
            return (
                f"session {sid} expired after {ttl_s:g} s idle; open a new session "
                "(or restore a snapshot with PutState)"
            )
        if reason == MOVED:
            return f"session {sid} moved to another replica; retry through the proxy"
        if reason == CAPACITY:
            return (
                f"session {sid} was evicted: the server reached its capacity of "
                f"{capacity} sessions and its principal held the most of them (each "
                "principal's least recently used sessions go first); open a new session (or "
                "restore a snapshot)"
            )
        if not sid:
            return "session_id is empty; open a session first"
        return f"session {sid} is unknown here (never opened, or ended long ago); open a new one"

    def forget(self, sid: str) -> None:
        """``sid`` is open again (restored under its id): no tombstone of it answers."""
        hits = np.flatnonzero(self._hashes[: self._filled] == hash(sid))
        self._reasons[hits] = 0
