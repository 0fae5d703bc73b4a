"""The sessions of a server: opening, finding and ending them, idle expiry and capacity.

A session is a small record (``Session``, session.py) plus one slot in its model version's
``SlotPool``.
The manager keeps records in least-recently-used order, so idle expiry pops from the front and
capacity eviction takes the front. A session idle for ``park_after_s`` that nothing else holds
is parked (parked.py): a row of columns instead of a record, taken back as a record by its next
use; capacity eviction takes the oldest parked session first. An ended session leaves a
tombstone with its reason for a while, so a late call hears "expired" or "evicted" rather than
"unknown".
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from operator import attrgetter

import numpy as np
import numpy.typing as npt
from rnnserve.server import codec
from rnnserve.server.errors import (
    ServingError,
    not_found,
    quoted,
    resource_exhausted,
)
from rnnserve.server.metrics import Metrics
from rnnserve.server.model import ServedModel
from rnnserve.server.parked import ParkedSessions
from rnnserve.server.session import CAPACITY as CAPACITY
from rnnserve.server.session import CLOSED as CLOSED
from rnnserve.server.session import IDLE as IDLE
from rnnserve.server.session import MAX_SEQ as MAX_SEQ
from rnnserve.server.session import MOVED as MOVED
from rnnserve.server.session import REPLACED as REPLACED
from rnnserve.server.session import Checkpoints
from rnnserve.server.session import Digest as Digest
from rnnserve.server.session import Session as Session
from rnnserve.server.session import check_seq_room as check_seq_room
from rnnserve.server.session_ids import new_id
from rnnserve.server.state import trim_heap
from rnnserve.server.tombstones import MAX_TOMBSTONES as MAX_TOMBSTONES
from rnnserve.server.tombstones import Tombstones
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.wire import route_of

_PRINCIPAL = attrgetter("principal")
_DEADLINE = attrgetter("deadline")
#: ``_open`` is rebuilt smaller once fewer than an eighth of at least SHRINK_FROM sessions remain,
#: and at most SHRINK_COPY (copying an OrderedDict costs about 0.5 µs an entry: 8 ms here).
SHRINK_FROM = 65_536
SHRINK_COPY = 16_384
#: After this many sessions ended, the next sweep hands the C heap's free pages back.
TRIM_AFTER = 16_384
#: The most sessions one sweep parks (about 6 µs each here: a sweep pauses the loop ~7 ms).
PARK_PER_SWEEP = 1024
#: References to a record that only the manager holds, as ``sys.getrefcount`` counts them
#: while ``_sweep`` looks at it: ``_open``, the state pool's owner list, the sweep's loop
#: variable and getrefcount's own argument (one more: a principal's share). Any other
#: reference (a chunk queued or running, a stream or OIP sequence that keeps it, a checkpoint
#: queued, a caller between two awaits) keeps the session a record.
_MANAGER_REFS = 4


class SessionManager:
    """All open sessions of a server, over every model version."""

    def __init__(
        self,
        metrics: Metrics,
        ttl_s: float,
        capacity: int,
        checkpoints: Checkpoints | None = None,
        principal_max: int = 0,
        park_after_s: float = 0.0,
    ) -> None:
        self.metrics = metrics
        self.ttl = ttl_s
        self.capacity = capacity
        #: Seconds idle after which a session is parked (0: never; never with a store, whose
        #: checkpoint bookkeeping lives in the records).
        self.park_after = park_after_s if checkpoints is None else 0.0
        self._parked = ParkedSessions(capacity)
        #: The durable store's checkpoint queue, when the server has a store.
        self.checkpoints = checkpoints
        self._open: OrderedDict[str, Session] = OrderedDict()
        #: Tombstones: why each recently ended session ended (by the hash of its id, not the
        #: id itself: the ids, made among the records when the sessions opened, would keep
        #: their memory from going back; see tombstones.py).
        self._ended = Tombstones()
        #: Each principal's open sessions, least recently used first (fair eviction).
        self._shares: dict[str, OrderedDict[str, Session]] = {}
        #: While every open session belongs to one principal (always, when authentication is
        #: off), that principal: its share is ``_open`` itself and ``_shares`` stays empty, which
        #: saves an entry per session; a second principal's session builds the shares once.
        self._solo: str | None = None
        #: The most sessions one principal may hold open (0: no limit but ``capacity``).
        self.principal_max = principal_max
        self._last_deadline = 0.0
        #: The most sessions ``_open`` held since it was last rebuilt (a dict keeps its size
        #: when entries go; see ``end``).
        self._open_peak = 0
        #: Sessions ended since the heap was last trimmed (``expire_idle``).
        self._ended_since_trim = 0

    def __len__(self) -> int:
        return len(self._open) + len(self._parked)

    @property
    def parked(self) -> int:
        """How many sessions are parked now."""
        return len(self._parked)

    def open(
        self,
        model: ServedModel,
        state: Mapping[str, npt.NDArray[np.float32]] | None = None,
        sid: str | None = None,
        route: str = "",
        epoch: int = 1,
        principal: str = "",
    ) -> Session:
        """A new session on ``model`` (zeros, or ``state`` when given); evicts the least
        recently used session when the server is at capacity.

        Without ``sid`` the id is new: ``<route>.<secret>``, with a random route key when
        ``route`` is empty. With a store, the session is owned at ``epoch`` and queued for its
        first checkpoint (a takeover, which loaded it from the store, passes ``epoch`` 0 and
        sets the store's bookkeeping itself). The session belongs to ``principal``, who may hold
        at most ``principal_max`` sessions (RESOURCE_EXHAUSTED past it).
        """
        held = self.held_by(principal)
        if self.principal_max and held >= self.principal_max:
            who = f"principal {quoted(principal)}" if principal else "the anonymous principal"
            raise resource_exhausted(
                f"{who} has {held} open sessions, the most principal_max_sessions allows; "
                "close some first"
            )
        while len(self._open) + len(self._parked) >= self.capacity:
            self._evict_one()
        if not sid:
            sid = new_id(route)
        else:  # restored under its id: open again, not ended
            self._ended.forget(sid)
        session = Session(sid, model, -1, self._deadline(time.monotonic()))
        # The pool may move the session to a lower slot later (keeping slots packed).
        slot = session.slot = model.pool.allocate(session)
        if state is not None:
            model.pool.write(slot, dict(state))
        checkpoints = self.checkpoints
        if checkpoints is not None:
            session.checkpoints = checkpoints
            if epoch:
                session.epoch = epoch
                checkpoints.mark(session)
        if not self._open and not self._shares and not self._parked:
            self._solo = principal
        elif self._solo is not None and principal != self._solo:
            self._split()
        self._open[sid] = session
        if len(self._open) > self._open_peak:
            self._open_peak = len(self._open)
        session.principal = principal
        if self._solo is None:
            self._shares.setdefault(principal, OrderedDict())[sid] = session
        model.metrics.opened.inc()
        model.metrics.active.inc()
        model.metrics.state_bytes.set(model.pool.nbytes)
        return session

    def _evict_one(self) -> None:
        # Fair share: the principal holding the most sessions loses its least recently used
        # one, so one client opening sessions in a loop evicts its own, not everyone else's:
        # its oldest parked session if it has one (parked ones were idle longest), else its
        # least recently used record. A session with a chunk in flight is skipped if possible.
        if self._solo is not None:
            principal = None
            share = self._open
        else:
            held = {p: len(share) for p, share in self._shares.items()}
            for p in self._parked.principals():
                held[p] = held.get(p, 0) + self._parked.held_by(p)
            principal = max(held, key=held.__getitem__)
            share = self._shares.get(principal, OrderedDict())
        oldest = self._parked.oldest(principal)
        if oldest is not None:
            self.end(self._take(oldest), CAPACITY)
            return
        victim = next((s for s in share.values() if not s.busy), None)
        if victim is None:
            victim = next(iter(share.values()))
        self.end(victim, CAPACITY)

    def _split(self) -> None:
        """Build the per-principal shares from ``_open`` (once a second principal opens)."""
        shares: dict[str, OrderedDict[str, Session]] = {}
        for sid, session in self._open.items():
            shares.setdefault(session.principal, OrderedDict())[sid] = session
        self._shares = shares
        self._solo = None

    def _reshare(self, session: Session) -> None:
        """Count ``session`` in its principal's share (after its principal was set later, as
        a takeover from the store does)."""
        self._unshare(session)
        self._shares.setdefault(session.principal, OrderedDict())[session.id] = session

    def _unshare(self, session: Session) -> None:
        """Take ``session`` out of the share it counts in: its principal's, or (its principal
        was set after it opened) whichever holds it."""
        if self._solo is not None:
            if not self._open and not self._parked:
                self._solo = None
            return
        sid, key = session.id, session.principal
        share = self._shares.get(key)
        if share is None or share.pop(sid, None) is None:
            found = next(((p, sh) for p, sh in self._shares.items() if sid in sh), None)
            if found is None:
                return
            key, share = found
            del share[sid]
        if not share:
            del self._shares[key]

    def _deadline(self, now: float) -> float:
        """``now`` + ttl, as a float object shared by the sessions used within the same
        millisecond (an idle session then holds no float of its own; its deadline is at most
        a millisecond early)."""
        deadline = self._last_deadline
        if now + self.ttl - deadline > 0.001:
            deadline = self._last_deadline = now + self.ttl
        return deadline

    def get(self, sid: str, principal: str | None = None) -> Session:
        """The open session ``sid``, its idle clock restarted; NOT_FOUND saying why not. With
        ``principal``, a session of another principal is NOT_FOUND exactly as an unknown id."""
        session = self._open.get(sid)
        now = time.monotonic()
        if session is None:
            if sid not in self._parked.rows:
                raise not_found(self._ended.why(sid, self.ttl, self.capacity))
            if principal is not None and self._parked.principal_of(sid) != principal:
                raise self.foreign(sid)  # left parked, as another principal found it
            session = self._take(sid)
        if principal is not None and session.principal != principal:
            raise self.foreign(sid)
        if session.deadline < now and not session.busy:
            self.end(session, IDLE)
            raise not_found(self._ended.why(sid, self.ttl, self.capacity))
        session.deadline = self._deadline(now)
        self._open.move_to_end(sid)
        if self._solo is None:
            try:
                self._shares[session.principal].move_to_end(sid)
            except KeyError:  # its principal was set after it opened (a takeover)
                self._reshare(session)
        elif session.principal != self._solo:  # set after it opened (a takeover)
            self._split()
        return session

    def get_many(self, sids: list[str], principal: str) -> list[Session | ServingError]:
        """``get`` of each id of a frame, in one pass (one clock read): the session, or the
        error ``get`` would raise for it."""
        opened = self._open
        now = time.monotonic()
        deadline = self._deadline(now)
        solo = self._solo
        fast = list(map(opened.get, sids))
        if (
            solo is not None  # no shares to keep in order
            and principal == solo
            and None not in fast
            and all(map(principal.__eq__, map(_PRINCIPAL, fast)))
            and min(map(_DEADLINE, fast), default=now) >= now
        ):
            # The usual frame (every session here, its principal's, none expired): the same
            # as the loop below, in C-level passes but the one that restarts the idle clocks.
            for session in fast:
                session.deadline = deadline  # type: ignore[union-attr]
            deque(map(opened.move_to_end, sids), 0)
            return fast  # type: ignore[return-value]
        found: list[Session | ServingError] = []
        for sid in sids:
            session = self._open.get(sid)  # get() may take one back or rebuild the table
            if (
                session is None
                or session.principal != principal
                or (session.deadline < now and not session.busy)
                or (solo is not None and principal != solo)
            ):
                try:
                    found.append(self.get(sid, principal))
                except ServingError as exc:
                    found.append(exc)
                continue
            session.deadline = deadline
            self._open.move_to_end(sid)
            if solo is None:
                try:
                    self._shares[principal].move_to_end(sid)
                except KeyError:
                    self._reshare(session)
            found.append(session)
        return found

    def foreign(self, sid: str) -> ServingError:
        """The NOT_FOUND for a session of another principal: the words of an unknown id, so
        it says nothing about the session."""
        return not_found(
            f"session {quoted(sid)} is unknown here (never opened, or ended long ago); "
            "open a new one"
        )

    def held_by(self, principal: str) -> int:
        """How many sessions ``principal`` holds open."""
        if self._solo is not None:
            return len(self) if principal == self._solo else 0
        return len(self._shares.get(principal, ())) + self._parked.held_by(principal)

    def ended_reason(self, sid: str) -> str | None:
        """Why session ``sid`` ended here, while its tombstone lasts; None if it did not."""
        return self._ended.get(sid)

    def peek(self, sid: str) -> Session | None:
        """The open session ``sid`` without restarting its idle clock, or None."""
        session = self._open.get(sid)
        if session is None and sid in self._parked.rows:
            session = self._take(sid)
        return session

    def _take(self, sid: str) -> Session:
        """Parked session ``sid``, a record again (the most recently used)."""
        session = self._parked.take(sid)
        self._open[session.id] = session
        if len(self._open) > self._open_peak:
            self._open_peak = len(self._open)
        if self._solo is None:
            self._shares.setdefault(session.principal, OrderedDict())[session.id] = session
        return session

    def _park(self, sessions: list[Session]) -> None:
        """Keep ``sessions`` as parked rows, their records dropped (see parked.py)."""
        self._parked.park(sessions)
        opened = self._open
        for session in sessions:
            del opened[session.id]
            if self._solo is None:
                self._unshare(session)

    def end(self, session: Session, reason: str) -> None:
        """End a session: free its slot, remember why."""
        if session.ended is not None:
            return
        session.ended = reason
        self._open.pop(session.id, None)
        self._shrink()
        self._unshare(session)
        if session.checkpoints is not None:  # before the slot is handed on: it may save it
            session.checkpoints.ended(session, reason)
        pool = session.model.pool
        moved = pool.release(session.slot)
        if moved is not None:  # a parked session moved into the freed slot
            self._parked.moved(moved, session.slot)
        session.model.metrics.state_bytes.set(pool.nbytes)
        self._ended.add(session.id, reason)
        self._ended_since_trim += 1
        session.model.metrics.active.dec()
        self.metrics.session_ended(session.model.label, reason)

    def _shrink(self) -> None:
        left = len(self._open)
        if left < self._open_peak >> 3 and left <= SHRINK_COPY and self._open_peak >= SHRINK_FROM:
            # Most sessions went: a copy sized for those left gives the table's memory back
            # (a dict never shrinks as entries go).
            self._open = self._open.copy()
            self._open_peak = len(self._open)

    def expire_idle(self) -> int:
        """End every session idle past its TTL, then park up to PARK_PER_SWEEP sessions idle
        for ``park_after_s`` that nothing else holds; how many ended. After many sessions
        ended, hand the C heap's free pages back (state.trim_heap)."""
        now = time.monotonic()
        expired, idle = self._sweep(now)
        for s in expired:
            self.end(s, IDLE)
        ended = len(expired)
        for sid in self._parked.expired(now):
            self.end(self._take(sid), IDLE)
            ended += 1
        self._park([s for s in idle if s.ended is None and self._parked.can_park(s)])
        self._shrink()
        if self._ended_since_trim >= TRIM_AFTER:  # what they freed may sit inside the heap
            trim_heap()
            self._ended_since_trim = 0
        self.metrics.parked_sessions.set(len(self._parked))
        return ended

    def _sweep(self, now: float) -> tuple[list[Session], list[Session]]:
        """The records idle past their TTL, and up to PARK_PER_SWEEP records idle for
        ``park_after_s`` that only the manager holds, in one pass from the least recently
        used (a busy one is neither)."""
        expired: list[Session] = []
        idle: list[Session] = []
        # A deadline before ``limit``: expired, or idle for park_after_s.
        limit = max(now, now + self.ttl - self.park_after) if self.park_after else now
        alone = _MANAGER_REFS + (self._solo is None)
        for s in self._open.values():
            deadline = s.deadline
            if deadline >= limit or (deadline >= now and len(idle) >= PARK_PER_SWEEP):
                break  # the rest were used more recently
            if s.busy:
                continue
            if deadline < now:
                expired.append(s)
            elif sys.getrefcount(s) == alone:
                idle.append(s)
        return expired, idle

    def fork(self, source: Session) -> Session:
        """A new session on the same model version with a copy of ``source``'s state, seq and
        last reply."""
        child = self.open(source.model, route=route_of(source.id), principal=source.principal)
        source.model.pool.copy(source.slot, child.slot)
        child.next_seq = source.next_seq
        if source._outputs is not None:  # bytes: shared, not copied
            child.last_seq = source.last_seq
            child._outputs = source._outputs
            child.last_digest = source.last_digest
        return child

    def info(self, session: Session) -> pb.SessionInfo:
        """The session as the API describes it."""
        every = self.checkpoints.every if self.checkpoints is not None else 0
        return codec.session_info(session, every)

    def all(self) -> list[Session]:
        """Every open session as a record (parked ones are taken back)."""
        for sid in list(self._parked.rows):
            self._take(sid)
        return list(self._open.values())
