"""Write-behind checkpoints of a replica's sessions to the session store (durable.py holds
the rest of the store side: takeovers, fencing, Redis coming and going).

A commit that leaves a session ``checkpoint_every`` or more steps past its last checkpoint
queues it (``mark``); one writer task (``run``) snapshots the queued sessions and writes them
in one pipelined round trip, then the next batch, so no step waits on Redis. Evicted sessions
are snapshotted when they leave (their slot is then reused), closed ones become tombstones,
and a drain writes every session with unsaved steps (``flush``), its checkpoints *final* and
its OIP sequences named (``announce`` first, pending). A reset, a restore or a close waits for
its own write (``written``); a takeover of a session this replica just evicted waits for the
eviction's write (``landed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import Protocol

from rnnserve.server import snapshots
from rnnserve.server.metrics import Metrics
from rnnserve.server.sessions import CAPACITY, CLOSED, Session, SessionManager
from rnnserve.server.store import TIMEOUT_S, RedisError, RedisStore, Write
from rnnserve.v1 import rnnserve_pb2 as pb

#: Sessions written in one pipelined round trip.
WRITE_BATCH = 256
#: Backoff between attempts while the store does not answer, seconds.
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.05, 2.0


class StoreLink(Protocol):
    """What the writer reports to, and learns from, the rest of the store side (durable.py)."""

    #: Whether the store answered the last operation.
    up: bool

    def failed(self, exc: BaseException) -> None: ...

    def answered(self) -> None: ...

    def fence(self, session: Session) -> None: ...


class CheckpointWriter:
    """The checkpoint queue and its writer; the ``Checkpoints`` a session reports to."""

    def __init__(
        self, store: RedisStore, link: StoreLink, metrics: Metrics, every: int, ttl_s: float
    ) -> None:
        self.store = store
        self.link = link
        self.metrics = metrics
        #: A session is queued once this many steps past its last checkpoint.
        self.every = every
        self.ttl_ms = max(1, int(ttl_s * 1000))
        #: How often sessions are scanned for a TTL renewal (see ``_refresh``), seconds.
        self._refresh_s = max(0.5, ttl_s / 16)
        self.sessions: SessionManager | None = None
        self._queued: dict[str, Session] = {}
        #: Writes decided when a session left this replica (eviction snapshot, close).
        self._final: dict[str, Write] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        #: Callers of ``written`` waiting for a session's queued write to land.
        self._savers: dict[str, list[asyncio.Future[None]]] = {}
        #: The ids written by the round trip in flight.
        self._in_flight: set[str] = set()
        #: Takeovers waiting for this replica's own pending write of a session to land.
        self._landing: dict[str, list[asyncio.Future[None]]] = {}
        #: Set by a drain's flush: the replica takes no more work, so checkpoints are final.
        self._handing_over = False
        metrics.checkpoint_lag.set_function(self._lag)

    def mark(self, session: Session) -> None:
        """Queue ``session`` for a checkpoint."""
        self._queued[session.id] = session
        self._idle.clear()
        self._wake.set()

    def ended(self, session: Session, reason: str) -> None:
        """``session`` leaves this replica: evicted ones are saved now (their slot is reused),
        closed ones become tombstones; expired ones simply expire in the store too, and moved
        ones belong to another replica."""
        self._queued.pop(session.id, None)
        if reason == CAPACITY and session.saved_seq < session.next_seq:
            self._final[session.id] = self._write(session, snapshots.take(session))
        elif reason == CLOSED:
            self._final[session.id] = Write(session.id, session.epoch, None, "", self.ttl_ms)
        else:
            return
        self._idle.clear()
        self._wake.set()

    async def written(self, sid: str, timeout_s: float = TIMEOUT_S) -> None:
        """Return once the write queued for session ``sid`` (a checkpoint, or a close's
        tombstone) is in the store. A reset, a restore or a close is acknowledged only once it
        would survive this replica: after a crash, a write-behind checkpoint not yet written
        would bring back the state from before it (at the same seq, where no client could
        tell), or a closed session. While the store is away, or past ``timeout_s``, it
        returns at once and the write stays queued."""
        if self.link.up and (sid in self._queued or sid in self._final):
            await self._wait(self._savers, sid, timeout_s)

    async def landed(self, sid: str) -> None:
        """Return once this replica's own pending write of session ``sid`` (it evicted the
        session and has not written it yet: the store's copy is older) is in the store, or at
        once when there is none; at most TIMEOUT_S."""
        if sid in self._final or sid in self._in_flight:
            await self._wait(self._landing, sid, TIMEOUT_S)

    async def _wait(
        self, waiters: dict[str, list[asyncio.Future[None]]], sid: str, timeout_s: float
    ) -> None:
        """Wait, at most ``timeout_s``, among ``waiters`` of ``sid``, for the writer."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.setdefault(sid, []).append(done)
        self._wake.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(done), timeout_s)

    @staticmethod
    def _saved(waiting: list[asyncio.Future[None]]) -> None:
        for done in waiting:
            if not done.done():
                done.set_result(None)

    def _lag(self) -> float:
        return float(sum(s.next_seq - max(s.saved_seq, 0) for s in list(self._queued.values())))

    def _write(self, session: Session, snap: pb.SessionSnapshot) -> Write:
        remaining_ms = int((session.deadline - time.monotonic()) * 1000)
        return Write(
            session.id,
            session.epoch,
            snap.SerializeToString(),
            session.principal,
            max(1000, min(self.ttl_ms, remaining_ms)),
            self._handing_over,
        )

    async def flush(self, timeout_s: float, handover: Mapping[str, Session] | None = None) -> bool:
        """Checkpoint every session with unsaved steps; whether all were written within
        ``timeout_s``. ``handover`` is a drain's, once the replica takes no more work: every
        checkpoint from then on is final, and each session in it (an OIP sequence's, by its
        name) is written final whatever it saved before, then recorded under its name."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if handover is not None:
            self._handing_over = True
            for session in handover.values():
                self.mark(session)
        if self.sessions is not None:
            for session in self.sessions.all():
                if session.saved_seq < session.next_seq:
                    self.mark(session)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            if handover:
                names = [
                    (n, s.id)
                    for n, s in handover.items()
                    if s.ended is None and s.saved_seq == s.next_seq
                ]
                await asyncio.wait_for(
                    self.store.name(names, self.ttl_ms), max(0.0, deadline - loop.time())
                )
        except TimeoutError:
            return False
        except (RedisError, OSError) as exc:
            self.link.failed(exc)
            return False
        return True

    async def announce(self, handover: Mapping[str, Session], timeout_s: float) -> None:
        """Record ``handover``'s sessions under their names as pending (a drain begins); on
        failure the drain goes on without (a replica asked early then says the sequence is
        unknown)."""
        if not handover:
            return
        names = [(n, s.id) for n, s in handover.items()]
        try:
            await asyncio.wait_for(self.store.name(names, self.ttl_ms, pending=True), timeout_s)
        except (TimeoutError, RedisError, OSError) as exc:
            self.link.failed(exc)

    async def run(self) -> None:
        """The writer task: write what is queued, batch after batch, until cancelled."""
        backoff = BACKOFF_MIN_S
        while True:
            if not self._queued and not self._final:
                self._idle.set()
                try:
                    await asyncio.wait_for(self._wake.wait(), self._refresh_s)
                except TimeoutError:
                    self._refresh()
                    continue
            self._wake.clear()
            writes, sessions, seqs, savers = self._take_batch()
            if not writes:
                await asyncio.sleep(0)  # every queued session is mid-run: after it
                continue
            self._in_flight = {w.session_id for w in writes}
            try:
                written = await self.store.write(writes)
            except (RedisError, OSError) as exc:
                self._in_flight = set()
                self.link.failed(exc)
                for w, session, waiting in zip(writes, sessions, savers, strict=True):
                    if session is None:
                        self._final.setdefault(w.session_id, w)
                    elif session.ended is None:
                        self._queued.setdefault(session.id, session)
                    if waiting:  # they wait for the next attempt
                        self._savers.setdefault(w.session_id, []).extend(waiting)
                await asyncio.sleep(backoff)
                backoff = min(BACKOFF_MAX_S, backoff * 2)
                continue
            self._in_flight = set()
            for w in writes:
                if w.session_id not in self._final:  # else its last write is still to come
                    self._saved(self._landing.pop(w.session_id, []))
            backoff = BACKOFF_MIN_S
            self.link.answered()
            now = time.monotonic()
            self.metrics.checkpoints.inc(sum(written))
            for w, session, seq, ok, waiting in zip(
                writes, sessions, seqs, written, savers, strict=True
            ):
                self._saved(waiting)
                if session is None:
                    continue
                if ok:
                    session.saved_seq = max(session.saved_seq, seq)
                    session.saved_at = now
                elif session.ended is None and session.epoch == w.epoch:
                    self.link.fence(session)

    def _refresh(self) -> None:
        """Queue the sessions used well after their last checkpoint (fewer than
        ``checkpoint_every`` steps since, or none), so that no store copy expires before the
        session would: a checkpoint renews the key's TTL."""
        if self.sessions is None:
            return
        ttl = self.ttl_ms / 1000
        for session in self.sessions.all():
            if session.deadline - ttl - session.saved_at > ttl / 8:
                self.mark(session)

    def _take_batch(
        self,
    ) -> tuple[list[Write], list[Session | None], list[int], list[list[asyncio.Future[None]]]]:
        """Up to WRITE_BATCH writes, with the session each checkpoints (None for a final
        write), the seq it holds and the ``written`` callers it answers: final ones first, then
        snapshots of queued sessions that are not in an engine run (those stay queued)."""
        writes: list[Write] = []
        owners: list[Session | None] = []
        seqs: list[int] = []
        savers: list[list[asyncio.Future[None]]] = []
        while self._final and len(writes) < WRITE_BATCH:
            _, write = self._final.popitem()
            writes.append(write)
            owners.append(None)
            seqs.append(-1)
            savers.append(self._savers.pop(write.session_id, []))
        busy = []
        while self._queued and len(writes) < WRITE_BATCH:
            _, session = self._queued.popitem()
            if session.ended is not None:
                self._saved(self._savers.pop(session.id, []))
                continue
            if session.busy:
                busy.append(session)
                continue
            writes.append(self._write(session, snapshots.take(session)))
            owners.append(session)
            seqs.append(session.next_seq)
            savers.append(self._savers.pop(session.id, []))
        for session in busy:
            self._queued[session.id] = session
        return writes, owners, seqs, savers
