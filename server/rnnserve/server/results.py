"""What follows an engine run of a batch: store the new states, commit each chunk and answer
its sink; or, when the run failed, answer every chunk of it with the error.

``Results`` is the batcher's second half (batcher.py forms and runs batches): it touches the
state pool and the model's metrics, and moves no seq itself (a session commits its own chunk).
The answering helpers are shared with the batcher, which answers retries and seq errors
without a run: a failing sink is logged and never stops the other chunks of the batch from
being answered, since the session itself is consistent.
"""

from __future__ import annotations

import logging
import time
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from rnnserve.server.errors import ServingError, as_serving_error
from rnnserve.server.session import commit_entries
from rnnserve.server.work import Array, FrameWork, Item, Rows, States, Work

if TYPE_CHECKING:
    from rnnserve.manifest import StateSpec
    from rnnserve.server.metrics import ModelMetrics
    from rnnserve.server.sessions import Session
    from rnnserve.server.state import SlotPool

LE_FLOAT32 = np.dtype("<f4")
_ENDED = attrgetter("ended")
log = logging.getLogger("rnnserve.server")


class Results:
    """Stores and answers the runs of one model version's batches."""

    def __init__(
        self, pool: SlotPool, metrics: ModelMetrics, specs: list[StateSpec], label: str
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.specs = specs
        self.label = label

    def failed(self, batch: list[Item], sessions: list[Session], exc: BaseException) -> None:
        """The run of ``batch`` failed: every chunk gets the error, no session's state or seq
        moved, and none stays busy."""
        err = as_serving_error(exc, f"engine run of {self.label}")
        for s in sessions:
            s.busy = False
        for item in batch:
            if isinstance(item, FrameWork):
                for row in item.rows:
                    answer_entry(item.sink.entry_failed, row, err)
            else:
                fail(item, err)

    def finish(
        self,
        batch: list[Item],
        sessions: list[Session],
        slots: npt.NDArray[np.intp],
        y: Array,
        new: States,
        started: float,
    ) -> None:
        """Store the new states, then commit and answer each chunk. The outputs are copied
        out of the engine's buffers first, so a failure there leaves every session of the
        batch where it was."""
        metrics = self.metrics
        metrics.compute.observe(time.perf_counter() - started)
        metrics.batch_size.observe(len(sessions))
        try:
            # One copy of the whole output, session-major ``[B, T, O]``: each chunk's outputs
            # are a view of it, read-only, kept by its session for a retry.
            outputs = y.swapaxes(0, 1).copy()  # C order
            if outputs.dtype != LE_FLOAT32:
                outputs = outputs.astype(LE_FLOAT32)
            outputs.flags.writeable = False
            wanted = self.wanted_states(batch, new)
        except Exception as exc:
            self.failed(batch, sessions, exc)
            return
        # A session closed or evicted while its chunk ran may have handed its slot to another.
        if not any(map(_ENDED, sessions)):
            self.pool.scatter(slots, new)
        else:
            alive = [i for i, s in enumerate(sessions) if s.ended is None]
            if alive:
                rows = np.array(alive, dtype=np.intp)
                self.pool.scatter(slots[rows], new, rows)
        chunk_length = metrics.chunk_length
        i = 0
        for item in batch:
            if isinstance(item, FrameWork):
                k = len(item.sessions)
                steps = item.inputs.shape[1]
                block = outputs[i : i + k, :steps]
                chunk_length.observe(steps, k)
                # Each entry's outputs and inputs are slices of one bytes copy of the block:
                # no array per entry.
                commit_entries(item.sessions, item.seqs, steps, block, item.inputs)
                try:
                    item.sink.entries_done(item.rows, block)
                except Exception:  # a bug in a reply sink: the sessions are consistent
                    log.exception("answering a frame of %d entries failed", k)
                i += k
            else:
                steps = item.inputs.shape[0]
                chunk_length.observe(steps)
                rows_out = outputs[i, :steps]
                item.session.commit(item.seq, rows_out, item.digest)
                done(item, rows_out, wanted.get(i))
                i += 1

    def finish_lone(self, w: Work, y: Array, new: States, started: float) -> None:
        """``finish`` of a batch of one chunk (the batcher's lone run): its slot is stored
        straight, its outputs copied alone."""
        session = w.session
        try:
            outputs = y[:, 0].astype(LE_FLOAT32)  # a copy: the engine's buffers are reused
            outputs.flags.writeable = False
            state = self.wanted_states([w], new).get(0) if w.want_state else None
        except Exception as exc:
            self.failed([w], [session], exc)
            return
        metrics = self.metrics
        metrics.compute.observe(time.perf_counter() - started)
        metrics.batch_size.observe(1)
        metrics.chunk_length.observe(outputs.shape[0])
        if session.ended is None:  # else its slot may be another session's now
            self.pool.scatter_one(session.slot, new)
        session.commit(w.seq, outputs, w.digest)
        done(w, outputs, state)

    def wanted_states(self, batch: list[Item], new: States) -> dict[int, States]:
        """The new state of each batch row whose chunk asked for it, by state name."""
        wanted: dict[int, States] = {}
        i = 0
        for item in batch:
            if isinstance(item, FrameWork):
                i += len(item.sessions)
                continue
            if item.want_state:
                wanted[i] = {
                    s.name: np.take(new[s.output], i, axis=s.batch_axis) for s in self.specs
                }
            i += 1
        return wanted


def done(w: Work, outputs: Rows, state: States | None) -> None:
    """Answer ``w`` with its outputs (and, when asked, its session's state)."""
    try:
        w.sink.step_done(w, outputs, state)
    except Exception:
        log.exception("answering a chunk of session %s failed", w.session.id)


def fail(w: Work, err: ServingError) -> None:
    """Answer ``w`` with ``err``: the chunk was not applied."""
    try:
        w.sink.step_failed(w, err)
    except Exception:
        log.exception("answering a chunk of session %s failed", w.session.id)


def answer_entry(answer: Any, row: int, result: Any) -> None:
    """Answer entry ``row`` of a frame through ``answer`` (its sink's entry_done or
    entry_failed)."""
    try:
        answer(row, result)
    except Exception:
        log.exception("answering entry %d of a frame failed", row)
