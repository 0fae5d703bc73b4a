"""Frames on Stream: many sessions' chunks in one message (``StreamRequest.frame``).

A frame is columnar (session ids, seqs, one inputs tensor) and stays so: its inputs are decoded
and checked in a few numpy calls, its entries go to the batcher as one ``FrameWork`` per model,
and its reply is one outputs tensor filled in as the entries are answered, sent once all are.
Each entry stands alone: its own seq, exactly-once retry and error.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from rnnserve.server import codec
from rnnserve.server.errors import ServingError, as_serving_error, invalid
from rnnserve.server.model import ServedModel
from rnnserve.server.sessions import MAX_SEQ, Session, check_seq_room
from rnnserve.server.work import FrameWork, Rows
from rnnserve.v1 import rnnserve_pb2 as pb

if TYPE_CHECKING:
    from rnnserve.server.stream import StreamCall

METHOD = "Stream"
#: An entry's session, the error that kept it from being found, or None: ask the store.
Found = Session | BaseException | None


class FrameReply:
    """One frame's reply, filled in as its entries are answered and sent once all are."""

    __slots__ = (
        "call",
        "errors",
        "next_seqs",
        "outputs",
        "remaining",
        "rid",
        "seqs",
        "started",
        "steps",
        "width",
    )

    def __init__(self, call: StreamCall, rid: int, seqs: list[int], started: float) -> None:
        self.call = call
        self.rid = rid
        self.seqs = seqs
        self.started = started
        self.remaining = len(seqs)
        self.next_seqs = [0] * len(seqs)
        self.errors: list[tuple[int, ServingError]] = []
        #: Steps per entry and outputs per step, once known (an entry's session was found).
        self.steps = self.width = 0
        #: float32 [N, T, outputs]: the batcher's block when one run answered every entry
        #: (read-only, not copied), else filled in entry by entry; None until an entry is done.
        self.outputs: npt.NDArray[np.float32] | None = None

    def shape(self, steps: int, width: int) -> None:
        self.steps, self.width = steps, width

    def _writable(self) -> npt.NDArray[np.float32]:
        out = self.outputs
        if out is None:
            out = np.zeros((len(self.seqs), self.steps, self.width), dtype=np.float32)
        elif not out.flags.writeable:
            out = out.copy()
        self.outputs = out
        return out

    def entries_done(self, rows: list[int], outputs: npt.NDArray[Any]) -> None:
        steps = outputs.shape[1]
        if len(rows) == len(self.seqs):  # the whole frame in one run (the usual case)
            self.outputs = outputs
            self.next_seqs = list(map(steps.__add__, self.seqs))
        else:
            self._writable()[np.array(rows, dtype=np.intp)] = outputs
            seqs, next_seqs = self.seqs, self.next_seqs
            for r in rows:
                next_seqs[r] = seqs[r] + steps
        self._answered(len(rows))

    def entry_done(self, row: int, outputs: Rows) -> None:
        if outputs.shape != (self.steps, self.width):
            self.entry_failed(
                row,
                invalid(
                    f"entry {row} repeats seq {self.seqs[row]}, which was applied with "
                    f"{outputs.shape[0]} steps, not {self.steps}; send the same chunk"
                ),
            )
            return
        self._writable()[row] = outputs
        self.next_seqs[row] = self.seqs[row] + outputs.shape[0]
        self._answered(1)

    def entry_failed(self, row: int, err: ServingError) -> None:
        self.errors.append((row, err))
        self.next_seqs[row] = err.next_seq or 0
        self._answered(1)

    def _answered(self, count: int) -> None:
        self.remaining -= count
        if self.remaining == 0:
            self.call.answer(self.reply(), self.started, None)

    def reply(self) -> pb.StreamResponse:
        reply = pb.StreamResponse(request_id=self.rid)
        frame = reply.frame
        if self.steps:
            out = frame.outputs
            out.dtype = pb.DTYPE_FLOAT32
            out.shape[:] = (len(self.seqs), self.steps, self.width)
            outputs = self.outputs
            out.raw_data = (
                outputs.tobytes()  # C order whatever the block's layout
                if outputs is not None
                else bytes(4 * len(self.seqs) * self.steps * self.width)
            )
        frame.next_seqs[:] = self.next_seqs
        for row, err in sorted(self.errors, key=lambda e: e[0]):
            frame.errors.add(index=row, error=err.to_step_error())
        return reply


def accept(
    call: StreamCall, req: pb.StreamRequest, started: float
) -> Coroutine[Any, Any, None] | None:
    """Look up a frame's sessions and run it; when some must first come from the store, the
    coroutine that loads them and then runs it (the call awaits it in the message's turn)."""
    frame = req.frame
    try:
        sids = list(frame.session_ids)
        seqs = list(frame.seqs)
        if not sids or len(seqs) != len(sids):
            raise invalid(
                f"a frame needs one seq per session id and at least one entry; it has "
                f"{len(sids)} session_ids and {len(seqs)} seqs"
            )
        if len(sids) > call.max_frame:
            raise invalid(
                f"a frame holds at most {call.max_frame} entries (max_frame_sessions); "
                f"this one has {len(sids)}: split it"
            )
    except Exception as exc:
        call.refuse(req.request_id, "", started, exc)
        return None
    try:
        sessions = call.local_many(sids)
    except Exception as exc:  # answered, never left pending: the stream would wait for it
        call.refuse(req.request_id, "", started, exc)
        return None
    reply = FrameReply(call, req.request_id, seqs, started)
    if None in sessions:
        return _after_store(call, req, reply, sids, sessions)
    _run(call, req, reply, sessions)
    return None


async def _after_store(
    call: StreamCall,
    req: pb.StreamRequest,
    reply: FrameReply,
    sids: list[str],
    sessions: list[Found],
) -> None:
    for i, found in enumerate(sessions):
        if found is None:
            try:
                sessions[i] = await call.lookup(sids[i])
            except Exception as exc:
                sessions[i] = exc
    _run(call, req, reply, sessions)


def _run(call: StreamCall, req: pb.StreamRequest, reply: FrameReply, sessions: list[Found]) -> None:
    """Decode the frame's inputs for the model of its first session found, then submit its
    entries to their models' batchers; every entry that cannot run is answered."""
    groups = _by_model(sessions)
    if not groups:  # no session of the frame was found
        for row, found in enumerate(sessions):
            reply.entry_failed(row, _error(found))
        return
    first = next(iter(groups))
    try:
        inputs = codec.frame_inputs(first, req.frame.inputs, len(sessions))
    except Exception as exc:
        call.refuse(req.request_id, "", reply.started, exc)
        return
    steps = inputs.shape[1]
    reply.shape(steps, first.manifest.output_size)
    seqs = reply.seqs
    if len(groups[first]) < len(sessions):
        for row, found in enumerate(sessions):
            if not isinstance(found, Session):
                reply.entry_failed(row, _error(found))
    late = max(seqs) > MAX_SEQ - steps  # some entry's chunk would end past the largest seq
    for model, rows in groups.items():
        if model is not first and not _same_shapes(model, first):
            err = invalid(
                f"the session runs {model.label}, whose input or output shape differs from "
                f"{first.label} of the frame's first session: send it in another frame"
            )
            for row in rows:
                reply.entry_failed(row, err)
            continue
        if late:
            rows = _in_range(reply, rows, steps)
            if not rows:
                continue
        if len(rows) == len(sessions):  # the usual frame: every entry, one model
            picked, part, at = sessions, inputs, seqs
        else:
            picked = [sessions[r] for r in rows]
            part, at = inputs[np.array(rows, dtype=np.intp)], [seqs[r] for r in rows]
        model.batcher.submit(FrameWork(reply, picked, at, rows, part, reply.started))  # type: ignore[arg-type]


def _by_model(sessions: list[Found]) -> dict[ServedModel, list[int]]:
    """The rows of the sessions found, by model, in the frame's order of first appearance."""
    try:
        models = {s.model for s in sessions}  # type: ignore[union-attr]
    except AttributeError:  # an entry whose session was not found
        models = set()
    if len(models) == 1:
        return {models.pop(): list(range(len(sessions)))}
    groups: dict[ServedModel, list[int]] = {}
    for row, found in enumerate(sessions):
        if isinstance(found, Session):
            groups.setdefault(found.model, []).append(row)
    return groups


def _error(found: Found) -> ServingError:
    """Why an entry whose session was not found cannot run."""
    return as_serving_error(found if isinstance(found, BaseException) else RuntimeError(), METHOD)


def _in_range(reply: FrameReply, rows: list[int], steps: int) -> list[int]:
    """``rows`` whose chunk ends within the largest seq; the others are answered OUT_OF_RANGE."""
    ok = []
    for row in rows:
        try:
            check_seq_room(reply.seqs[row], steps)
        except ServingError as err:
            reply.entry_failed(row, err)
        else:
            ok.append(row)
    return ok


def _same_shapes(a: ServedModel, b: ServedModel) -> bool:
    """Whether sessions of ``a`` can share a frame with those of ``b``."""
    ma, mb = a.manifest, b.manifest
    return (a.tokens, ma.input_size, ma.output_size) == (b.tokens, mb.input_size, mb.output_size)
