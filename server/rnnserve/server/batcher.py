"""Cross-session batching for one model version.

Chunks that arrive while the engine is busy form the next batch; there is no fixed wait. At
low load (the last batch held one chunk) a chunk runs as it arrives; once two arrive in one
event-loop tick, a chunk runs on the next tick together with whatever else arrived in its
tick. A session has at most one chunk in a batch, so its chunks apply in arrival order; its
seq is checked when the chunk is taken into a batch, after the one before has been applied.
Chunks of different lengths share a batch through the model's ``sequence_lens`` input (padded
to the longest); without one, a batch holds one length only.

What waits is a chunk or a frame's entries (work.py); each answers to its sink. What follows a
run (storing the new states, committing and answering each chunk) is results.py's. The batcher
builds no protobuf and moves no seq itself: a session commits its own chunk (``Session.commit``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import Executor
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import numpy as np
from rnnserve.server.errors import ServingError
from rnnserve.server.results import Results, answer_entry, done, fail
from rnnserve.server.work import FrameWork, Item, Work, assemble, one_length

if TYPE_CHECKING:
    from rnnserve.server.engine import Engine
    from rnnserve.server.metrics import ModelMetrics
    from rnnserve.server.sessions import Session
    from rnnserve.server.state import SlotPool

_BUSY = attrgetter("busy")
_ENDED = attrgetter("ended")
_NEXT_SEQ = attrgetter("next_seq")
_SLOT = attrgetter("slot")


class Batcher:
    """Runs a model version's pending chunks, one batch at a time, through one route into the
    engine (gather the batch's states, ``Engine.run``, store the new states).

    Small runs happen on the event loop itself (``inline_max_steps``), larger ones on the
    ``executor`` thread; either way a batch is taken from what is pending when the loop gets
    to it, and the next batch forms while one runs in the thread. Plain callbacks, not tasks:
    this is the per-step path.
    """

    def __init__(
        self,
        engine: Engine,
        pool: SlotPool,
        metrics: ModelMetrics,
        executor: Executor,
        *,
        label: str,
        max_batch: int,
        inline_max_steps: int = 0,
    ) -> None:
        self.engine = engine
        self.pool = pool
        self.metrics = metrics
        self.executor = executor
        self.label = label
        self.max_batch = max_batch
        self.inline_max_steps = inline_max_steps
        #: Without sequence_lens a batch holds chunks of one length only.
        self.fixed_length = not engine.manifest.sequence_lens
        self.results = Results(pool, metrics, list(engine.manifest.states), label)
        self._pending: deque[Item] = deque()
        self._scheduled = False
        self._running = False
        #: Run a chunk as it arrives while the load is low (the last batch held one chunk);
        #: a second chunk arriving in the same loop tick turns batching back on.
        self._eager = True
        self._ran_this_tick = False
        self._idle_waiters: list[asyncio.Future[None]] = []
        #: The event loop it serves, from the first submit (asyncio.get_running_loop makes a
        #: system call on Python 3.11, once per call).
        self._loop: asyncio.AbstractEventLoop | None = None

    def submit(self, item: Item) -> None:
        """Queue a chunk or a frame's entries; each is answered through its sink from the
        event loop (possibly before ``submit`` returns)."""
        if self._scheduled or self._running:
            self._pending.append(item)
            return
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        if self._eager and not self._ran_this_tick and not self._pending:
            # Low load: nothing else is waiting, so run now rather than a loop tick later.
            self._ran_this_tick = True
            loop.call_soon(self._tick_over)
            if isinstance(item, Work) and self._ready(item):
                # Its session's next chunk: a batch of one without the queue (what _take
                # would make of it, in fewer calls).
                item.session.busy = True
                self._start([item], [item.session])
                if not self._running and self._idle_waiters:
                    self._wake_idle_waiters()
                return
            self._pending.append(item)
            self._dispatch()
            return
        self._pending.append(item)
        if self._ran_this_tick:
            self._eager = False  # a second chunk in one tick: batch from now on
        # Dispatch on the next loop tick, after the callbacks already ready in this one:
        # every chunk that arrives in the same tick joins the batch.
        self._scheduled = True
        loop.call_soon(self._dispatch)

    @staticmethod
    def _ready(w: Work) -> bool:
        """Whether ``w`` may run now as it is: its session's next chunk, the session live and
        idle (else ``_take`` decides: wait, answer from the cache, or refuse)."""
        session = w.session
        return not session.busy and session.ended is None and w.seq == session.next_seq

    def _tick_over(self) -> None:
        self._ran_this_tick = False

    async def wait_idle(self, session: Session) -> None:
        """Return once ``session`` has no chunk in an engine run."""
        while session.busy:
            fut = asyncio.get_running_loop().create_future()
            self._idle_waiters.append(fut)
            await fut

    def _wake_idle_waiters(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _dispatch(self) -> None:
        self._scheduled = False
        while self._pending and not self._running:
            batch, sessions = self._take()
            if batch:
                self._eager = len(sessions) == 1
                self._start(batch, sessions)
        if not self._running and self._idle_waiters:
            self._wake_idle_waiters()

    # -- taking a batch -------------------------------------------------------------------

    def _take(self) -> tuple[list[Item], list[Session]]:
        """The next batch and its sessions in batch order: at most one chunk per session, in
        arrival order. Duplicates and seq errors are answered here and not run. (Nothing of
        this model runs while a batch is taken, so a busy session is one taken just now.)"""
        batch: list[Item] = []
        sessions: list[Session] = []
        deferred: list[Item] = []
        length = -1
        pending = self._pending
        room = self.max_batch
        while pending and room > 0:
            item = pending.popleft()
            if isinstance(item, FrameWork):
                steps = item.inputs.shape[1]
                if self.fixed_length and length not in (-1, steps):
                    deferred.append(item)
                    continue
                taken, rest = self._take_frame(item, room)
                if rest is not None:
                    deferred.append(rest)
                if taken is not None:
                    length = steps
                    batch.append(taken)
                    sessions.extend(taken.sessions)
                    room -= len(taken.sessions)
                continue
            session = item.session
            if session.busy:
                deferred.append(item)
                continue
            if not self._runnable(item):
                continue
            if self.fixed_length:
                steps = item.inputs.shape[0]
                if length == -1:
                    length = steps
                elif steps != length:
                    deferred.append(item)
                    continue
            session.busy = True
            batch.append(item)
            sessions.append(session)
            room -= 1
        pending.extendleft(reversed(deferred))
        return batch, sessions

    def _runnable(self, w: Work) -> bool:
        """Whether ``w`` is its session's next chunk; otherwise it is answered here (an ended
        session, a retry of the last applied chunk, a seq error)."""
        session = w.session
        if session.ended is not None:
            fail(w, session.gone())
            return False
        if w.seq == session.next_seq:
            return True
        try:
            cached = session.check_seq(w.seq, w.digest)
        except ServingError as exc:
            fail(w, exc)
            return False
        if cached is None:
            return True
        state = self.pool.read(session.slot) if w.want_state else None
        done(w, cached, state)
        return False

    def _take_frame(self, fw: FrameWork, room: int) -> tuple[FrameWork | None, FrameWork | None]:
        """The entries of ``fw`` that run in this batch (at most ``room``) and those that wait
        for the next one (a session's second entry, or no room); the others are answered."""
        sessions = fw.sessions
        if (
            len(sessions) <= room
            and not any(map(_BUSY, sessions))
            and not any(map(_ENDED, sessions))
            and list(map(_NEXT_SEQ, sessions)) == fw.seqs
            and len(set(sessions)) == len(sessions)
        ):
            # The usual frame: every entry its session's next chunk, each session once, room
            # for all. The loop below would take them all, one at a time.
            for session in sessions:
                session.busy = True
            return fw, None
        picked: list[int] = []
        later: list[int] = []
        sink = fw.sink
        seqs = fw.seqs
        for j, session in enumerate(sessions):
            if session.busy or len(picked) == room:
                later.append(j)
                continue
            seq = seqs[j]
            if seq != session.next_seq or session.ended is not None:
                try:
                    if session.ended is not None:
                        raise session.gone()
                    cached = session.check_seq(seq, fw.inputs[j])
                except ServingError as exc:
                    answer_entry(sink.entry_failed, fw.rows[j], exc)
                    continue
                if cached is not None:
                    answer_entry(sink.entry_done, fw.rows[j], cached)
                    continue
            session.busy = True
            picked.append(j)
        taken = fw.part(picked) if picked else None
        rest = fw.part(later) if later else None
        return taken, rest

    # -- running it -----------------------------------------------------------------------

    def _start(self, batch: list[Item], sessions: list[Session]) -> None:
        """Run a batch inline, or start it on the worker thread and return."""
        count = len(sessions)
        if count == 1:
            lone = batch[0]
            if isinstance(lone, Work) and lone.inputs.shape[0] <= self.inline_max_steps:
                self._run_lone(lone)
                return
        slots = np.fromiter(map(_SLOT, sessions), np.intp, count)
        x, lengths = assemble(batch, count)
        states = self.pool.gather(slots)
        started = time.perf_counter()
        queue_wait = self.metrics.queue_wait
        for item in batch:
            if isinstance(item, FrameWork):
                queue_wait.observe(started - item.enqueued, len(item.sessions))
            else:
                queue_wait.observe(started - item.enqueued)
        run = self.engine.run
        if x.shape[0] * count <= self.inline_max_steps:
            try:
                y, new = run(x, states, lengths)
            except Exception as exc:
                self.results.failed(batch, sessions, exc)
            else:
                self.results.finish(batch, sessions, slots, y, new, started)
            return
        self._running = True
        loop = self._loop or asyncio.get_running_loop()
        fut = loop.run_in_executor(self.executor, run, x, states, lengths)

        def finished(f: asyncio.Future[Any]) -> None:
            self._running = False
            try:
                exc = None if f.cancelled() else f.exception()
                if f.cancelled() or exc is not None:
                    failure = exc or RuntimeError("engine run cancelled")
                    self.results.failed(batch, sessions, failure)
                else:
                    y, new = f.result()
                    self.results.finish(batch, sessions, slots, y, new, started)
            finally:
                self._dispatch()  # the next batch runs whatever happened to this one

        fut.add_done_callback(finished)

    def _run_lone(self, w: Work) -> None:
        """A batch of one chunk, run inline: what ``_start`` and ``_finish`` do, through the
        same engine route, in a third fewer Python calls (no batch to assemble, no slot array,
        the state read and stored as views of its slot). At low load every chunk runs alone,
        and there a step spends more on Python calls than on the model: this path takes a
        lone step from 1.21x to 1.07x the instructions it cost before the hot path was
        refactored (bench/instructions.py; docs/benchmarks.md)."""
        session = w.session
        started = time.perf_counter()
        self.metrics.queue_wait.observe(started - w.enqueued)
        try:
            y, new = self.engine.run(
                w.inputs[:, None], self.pool.gather_one(session.slot), one_length(w.inputs.shape[0])
            )
        except Exception as exc:
            self.results.failed([w], [session], exc)
            return
        self.results.finish_lone(w, y, new, started)
