"""Sessions that outlive their replica: write-behind checkpoints to the store, takeover of a
session this replica does not hold, and fencing of a replica whose sessions moved away.

- **Checkpoints** never wait on the request path. A commit that leaves a session
  ``checkpoint_every`` or more steps past its last checkpoint queues it (``mark``); one writer
  task snapshots the queued sessions and writes them in one pipelined round trip, then the next
  batch. Evicted sessions are snapshotted when they leave (their slot is then reused), closed
  ones become tombstones, and a drain writes every session with unsaved steps (``flush``).
- **Takeover**: a call for a session that is not here (the proxy's ring changed: a replica
  died, drained or was added) claims it in the store, which bumps its epoch, and restores its
  last checkpoint. The session then expects that checkpoint's seq; the client replays the newer
  chunks it keeps (SessionInfo.checkpoint_every), so its outputs are those of an uninterrupted
  run and no step counts twice.
- **Fencing**: a checkpoint is written only at the epoch this replica holds (store.py). A
  takeover is announced on a channel and a former owner drops its copy at once. What the
  channel can miss (this process was paused, or cut off from Redis) is caught here: after an
  event-loop stall or a lost subscription every session is *suspect* and its epoch is checked
  in the store before its next use; a session that moved is loaded afresh, never served stale.
- **Redis down**: serving goes on from memory (health stays SERVING), ``rnnserve_store_up`` is
  0, the writer retries with backoff, and once Redis answers again every session is queued, so
  a Redis that lost its data gets it back.
- **Handover** (a drain): the checkpoints written once the replica takes no more work are
  *final*, and each Open Inference Protocol sequence's session is recorded under its name, so
  a replica that gets the sequence's next request finds it and continues it exactly, although
  its client cannot replay (oip_sequences.py). The names are first recorded *pending*
  (``announce``), before the replica stops taking requests: a replica asked for the sequence
  before the final checkpoint is written answers UNAVAILABLE (retry), not "unknown".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping

import grpc
from rnnserve.server import snapshots
from rnnserve.server.errors import ServingError, unavailable
from rnnserve.server.metrics import Metrics
from rnnserve.server.repository import Repository
from rnnserve.server.sessions import CAPACITY, CLOSED, MOVED, SESSION_ID, Session, SessionManager
from rnnserve.server.store import TIMEOUT_S, ForeignSession, RedisError, RedisStore, Write
from rnnserve.v1 import rnnserve_pb2 as pb

log = logging.getLogger("rnnserve.server")

#: Sessions written in one pipelined round trip.
WRITE_BATCH = 256
#: Backoff between attempts while the store does not answer, seconds.
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.05, 2.0
#: An event-loop stall this long makes every session suspect. Below the time a proxy takes to
#: eject an unresponsive replica (Envoy: two failed health checks 1 s apart), so a replica that
#: was paused long enough for its sessions to move always checks before serving them again.
STALL_S = 1.0
#: Period of the stall watch, seconds.
TICK_S = 0.1

#: A session taken over from the store, and whether its checkpoint was final (store.Claimed).
Loaded = tuple[Session, bool]


class Durability:
    """The store side of a server's sessions. ``start`` runs its tasks; ``stop`` ends them."""

    def __init__(
        self, store: RedisStore, repository: Repository, metrics: Metrics, every: int, ttl_s: float
    ) -> None:
        self.store = store
        self.repository = repository
        self.metrics = metrics
        #: A session is queued once this many steps past its last checkpoint (Checkpoints).
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
        self._loading: dict[tuple[str, str], asyncio.Future[Loaded | None]] = {}
        #: Callers of ``written`` waiting for a session's queued write to land.
        self._savers: dict[str, list[asyncio.Future[None]]] = {}
        #: The ids written by the round trip in flight.
        self._in_flight: set[str] = set()
        #: Takeovers waiting for this replica's own pending write of a session to land.
        self._landing: dict[str, list[asyncio.Future[None]]] = {}
        #: Set by a drain's flush: the replica takes no more work, so checkpoints are final.
        self._handing_over = False
        self._tasks: list[asyncio.Task[None]] = []
        self._up = True
        metrics.store_up.set(1)
        metrics.checkpoint_lag.set_function(self._lag)

    # -- Checkpoints (called from Session.commit and SessionManager.end) ----------------------

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
        if not self._up or (sid not in self._queued and sid not in self._final):
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._savers.setdefault(sid, []).append(done)
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

    # -- tasks --------------------------------------------------------------------------------

    def start(self, sessions: SessionManager) -> None:
        """Start the writer, the takeover listener and the stall watch on the running loop."""
        self.sessions = sessions
        loop = asyncio.get_running_loop()
        for job in (self._writer(), self._listen(), self._watch()):
            self._tasks.append(loop.create_task(job))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.store.close()

    async def ping(self) -> bool:
        """Whether the store answers now (recorded like any other store operation)."""
        try:
            await self.store.ping()
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return False
        self._answered()
        return True

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
            self._failed(exc)
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
            self._failed(exc)

    async def _writer(self) -> None:
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
                self._failed(exc)
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
            self._answered()
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
                    self._fence(session)

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

    def _failed(self, exc: BaseException) -> None:
        self.metrics.store_errors.inc()
        if self._up:
            log.warning("session store unreachable (%s); serving from memory, retrying", exc)
            self._up = False
            self.metrics.store_up.set(0)

    def _answered(self) -> None:
        if self._up:
            return
        self._up = True
        self.metrics.store_up.set(1)
        log.info("session store reachable again; checkpointing every session")
        if self.sessions is not None:
            for session in self.sessions.all():
                self.mark(session)  # it may have lost data while it was away
                session.suspect = True  # and moves while we could not hear them

    async def _listen(self) -> None:
        """Drop sessions another replica took over; after a lost subscription, suspect all."""
        backoff = BACKOFF_MIN_S
        while True:
            try:
                await self.store.ping()
                self._answered()  # Redis is back even when no session has a write to make
                async for epoch, sid in self.store.moves():
                    backoff = BACKOFF_MIN_S
                    session = self.sessions.peek(sid) if self.sessions is not None else None
                    if session is not None and session.epoch < epoch:
                        self._fence(session)
            except (RedisError, OSError) as exc:
                self._failed(exc)
            self._suspect_all()
            await asyncio.sleep(backoff)
            backoff = min(BACKOFF_MAX_S, backoff * 2)

    async def _watch(self) -> None:
        """Suspect every session after the event loop stalled (a SIGSTOP, a long pause)."""
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(TICK_S)
            now = loop.time()
            if now - last > STALL_S:
                log.warning(
                    "event loop stalled for %.1f s; rechecking session ownership", now - last
                )
                self._suspect_all()
            last = now

    def _suspect_all(self) -> None:
        if self.sessions is not None:
            for session in self.sessions.all():
                session.suspect = True

    def _fence(self, session: Session) -> None:
        assert self.sessions is not None
        log.info("session %s moved to another replica; dropped here", session.id)
        self.metrics.fenced.inc()
        self.sessions.end(session, MOVED)

    # -- the request path ---------------------------------------------------------------------

    def may_hold(self, sid: str) -> bool:
        """Whether the store may have session ``sid`` (a well-formed id not closed here)."""
        assert self.sessions is not None
        return bool(SESSION_ID.fullmatch(sid)) and self.sessions.ended_reason(sid) != CLOSED

    async def take_over(self, sid: str, principal: str) -> Session | None:
        """Load session ``sid`` from the store and own it, for ``principal``; None when the
        store has no checkpoint of it; NOT_FOUND, as for an unknown id and with nothing moved,
        when it is another principal's. UNAVAILABLE when the store cannot be reached."""
        loaded = await self._take_over(sid, principal)
        return None if loaded is None else loaded[0]

    async def handed_over(self, name: str, principal: str) -> Loaded | None:
        """The session a drain recorded under ``name`` (an OIP sequence of ``principal``),
        taken over, and whether its checkpoint was final; None when there is none.
        UNAVAILABLE when the store cannot be reached."""
        try:
            named = await self.store.named(name)
        except (RedisError, OSError) as exc:
            self._failed(exc)
            raise unavailable(
                "the session store cannot be reached to find the sequence; retry"
            ) from None
        self._answered()
        if named is None or not self.may_hold(named[0]):
            return None
        sid, pending = named
        if pending:
            raise unavailable("the sequence is being handed over by its draining replica; retry")
        return await self._take_over(sid, principal)

    async def _take_over(self, sid: str, principal: str) -> Loaded | None:
        """One load per session and principal at a time; concurrent callers share it."""
        key = (sid, principal)
        loading = self._loading.get(key)
        if loading is None:
            loading = self._loading[key] = asyncio.get_running_loop().create_future()
            try:
                loading.set_result(await self._load(sid, principal))
            except BaseException as exc:
                loading.set_exception(exc)
                loading.exception()  # retrieved: the awaiting callers re-raise it
            finally:
                del self._loading[key]
        return await asyncio.shield(loading)

    async def _load(self, sid: str, principal: str) -> Loaded | None:
        assert self.sessions is not None
        if sid in self._final or sid in self._in_flight:
            # This replica evicted it and has not written it yet: the store's copy is older.
            landed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._landing.setdefault(sid, []).append(landed)
            self._wake.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(landed), TIMEOUT_S)
        try:
            claimed = await self.store.claim(sid, self.ttl_ms, principal)
        except ForeignSession:
            raise self.sessions.foreign(sid) from None
        except (RedisError, OSError) as exc:
            self._failed(exc)
            raise unavailable(
                f"session {sid} is not on this replica and the session store cannot be reached; "
                "retry"
            ) from None
        self._answered()
        if claimed is None:
            return None
        restored = await self._restorable(sid, pb.SessionSnapshot.FromString(claimed.snapshot))
        stale = self.sessions.peek(sid)
        if stale is not None:  # an older copy (a suspect one): the store's is the truth
            self.sessions.end(stale, MOVED)
        session = self.sessions.open(restored.model, restored.state, sid, epoch=0)
        snapshots.resume(session, restored)
        session.principal = claimed.principal
        session.epoch = claimed.epoch
        session.saved_seq = restored.next_seq
        session.saved_at = time.monotonic()
        self.metrics.takeovers.inc()
        log.info("took over session %s at seq %d (epoch %d)", sid, session.next_seq, session.epoch)
        return session, claimed.final

    async def owns(self, session: Session) -> bool:
        """Whether this replica still owns the suspect ``session`` (True too when the store
        cannot tell); one that moved is dropped here."""
        try:
            epoch = await self.store.epoch(session.id)
        except (RedisError, OSError) as exc:
            self._failed(exc)
            session.suspect = False  # availability: serve from memory while Redis is away
            return True
        self._answered()
        if epoch is None or epoch == session.epoch:
            session.suspect = False
            return True
        self._fence(session)
        return False

    async def _restorable(self, sid: str, snap: pb.SessionSnapshot) -> snapshots.Restored:
        """``snap`` checked against this replica's models. A version this replica does not
        serve yet (a rollout reaches replicas one by one) is looked for on disk once; if it is
        still missing the call is UNAVAILABLE, not NOT_FOUND: the session is whole in the
        store, and a retry (here once the version is loaded, or on another replica) goes on."""
        try:
            return snapshots.check(snap, self.repository)
        except ServingError as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND:
                raise
        await self.repository.scan()
        try:
            return snapshots.check(snap, self.repository)
        except ServingError as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND:
                raise
            raise unavailable(
                f"session {sid} runs model {snap.model!r} version {snap.version!r}, which this "
                f"replica does not serve ({exc.message}); retry, or send it to a replica that "
                "has that version"
            ) from None

    async def verify(self, session: Session) -> Session:
        """A suspect session, checked against the store: itself when this replica still owns
        it (or the store cannot tell), else the store's copy, taken over."""
        if await self.owns(session):
            return session
        moved = await self.take_over(session.id, session.principal)
        if moved is None:
            assert self.sessions is not None
            return self.sessions.get(session.id)  # raises NOT_FOUND saying why
        return moved

    async def seize(self, sid: str) -> int:
        """Own ``sid`` whoever holds it (PutState over it); the epoch. UNAVAILABLE without a
        store to ask."""
        try:
            epoch = await self.store.seize(sid, self.ttl_ms)
        except (RedisError, OSError) as exc:
            self._failed(exc)
            raise unavailable(
                "the session store cannot be reached to restore a session; retry"
            ) from None
        self._answered()
        return epoch
