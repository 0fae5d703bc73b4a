"""Sessions that outlive their replica: write-behind checkpoints to the store, takeover of a
session this replica does not hold, and fencing of a replica whose sessions moved away.

- **Checkpoints** never wait on the request path: checkpoints.py writes them behind.
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
  (``CheckpointWriter.announce``), before the replica stops taking requests: a replica asked
  for the sequence before the final checkpoint is written answers UNAVAILABLE (retry), not
  "unknown".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc
from rnnserve.server import snapshots
from rnnserve.server.checkpoints import BACKOFF_MAX_S, BACKOFF_MIN_S, CheckpointWriter
from rnnserve.server.errors import ServingError, unavailable
from rnnserve.server.metrics import Metrics
from rnnserve.server.repository import Repository
from rnnserve.server.session_ids import SESSION_ID
from rnnserve.server.sessions import CLOSED, MOVED, Session, SessionManager
from rnnserve.server.store import ForeignSession, RedisError, RedisStore
from rnnserve.v1 import rnnserve_pb2 as pb

log = logging.getLogger("rnnserve.server")
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
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.sessions: SessionManager | None = None
        #: The write-behind side: what sessions report their steps and ends to.
        self.checkpoints = CheckpointWriter(store, self, metrics, every, ttl_s)
        self._loading: dict[tuple[str, str], asyncio.Future[Loaded | None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        #: Whether the store answered the last operation.
        self.up = True
        metrics.store_up.set(1)

    # -- tasks --------------------------------------------------------------------------------

    def start(self, sessions: SessionManager) -> None:
        """Start the writer, the takeover listener and the stall watch on the running loop."""
        self.sessions = self.checkpoints.sessions = sessions
        loop = asyncio.get_running_loop()
        for job in (self.checkpoints.run(), self._listen(), self._watch()):
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
            self.failed(exc)
            return False
        self.answered()
        return True

    def failed(self, exc: BaseException) -> None:
        """A store operation failed: serve from memory, say so once."""
        self.metrics.store_errors.inc()
        if self.up:
            log.warning("session store unreachable (%s); serving from memory, retrying", exc)
            self.up = False
            self.metrics.store_up.set(0)

    def answered(self) -> None:
        """A store operation succeeded: after an outage, write and check every session."""
        if self.up:
            return
        self.up = True
        self.metrics.store_up.set(1)
        log.info("session store reachable again; checkpointing every session")
        if self.sessions is not None:
            for session in self.sessions.all():
                self.checkpoints.mark(session)  # it may have lost data while it was away
                session.suspect = True  # and moves while we could not hear them

    async def _listen(self) -> None:
        """Drop sessions another replica took over; after a lost subscription, suspect all."""
        backoff = BACKOFF_MIN_S
        while True:
            try:
                await self.store.ping()
                self.answered()  # Redis is back even when no session has a write to make
                async for epoch, sid in self.store.moves():
                    backoff = BACKOFF_MIN_S
                    session = self.sessions.peek(sid) if self.sessions is not None else None
                    if session is not None and session.epoch < epoch:
                        self.fence(session)
            except (RedisError, OSError) as exc:
                self.failed(exc)
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

    def fence(self, session: Session) -> None:
        """Drop ``session``: another replica owns it now."""
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
            self.failed(exc)
            raise unavailable(
                "the session store cannot be reached to find the sequence; retry"
            ) from None
        self.answered()
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
        await self.checkpoints.landed(sid)  # an eviction not written yet: the store is older
        try:
            claimed = await self.store.claim(sid, self.ttl_ms, principal)
        except ForeignSession:
            raise self.sessions.foreign(sid) from None
        except (RedisError, OSError) as exc:
            self.failed(exc)
            raise unavailable(
                f"session {sid} is not on this replica and the session store cannot be reached; "
                "retry"
            ) from None
        self.answered()
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
            self.failed(exc)
            session.suspect = False  # availability: serve from memory while Redis is away
            return True
        self.answered()
        if epoch is None or epoch == session.epoch:
            session.suspect = False
            return True
        self.fence(session)
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
            self.failed(exc)
            raise unavailable(
                "the session store cannot be reached to restore a session; retry"
            ) from None
        self.answered()
        return epoch
