"""A session's record: the seq it expects, its last chunk's outputs and digest (so a retry is
answered again rather than applied twice), its state slot and its bookkeeping.

The SessionManager (sessions.py) opens, finds and ends them. A record is kept small: an idle
one costs about 160 bytes of Python object besides its id and its state slot (the fields are
``__slots__``; its last outputs and inputs are kept as bytes, never as protobuf).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt
from rnnserve.server.errors import ServingError, not_found, out_of_range, seq_error, unavailable
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.wire import array_digest, chunk_digest

if TYPE_CHECKING:
    from rnnserve.server.model import ServedModel

#: Inputs of at most this many bytes are kept undigested after a chunk (``Session.applied``).
MAX_KEPT_INPUT_BYTES = 1024
#: A chunk's digest (rnnserve.wire.chunk_digest), or its inputs to digest when needed: the
#: tensor it came in, or (a frame's entry) its row of the frame's inputs.
Digest = bytes | pb.Tensor | npt.NDArray[np.generic]
#: A chunk's outputs, float32 ``[T, outputs]``, read-only.
Outputs = npt.NDArray[np.float32]
LE_FLOAT32 = np.dtype("<f4")

#: The largest seq a session reaches: int64's largest, which every client language holds.
MAX_SEQ = 2**63 - 1

#: Why a session ended here (``Session.ended``).
CLOSED, IDLE, CAPACITY = "closed", "idle", "capacity"
#: Ended here because another replica took the session over (see durable.py).
MOVED = "moved"
#: Ended because a PutState restored another snapshot under its id.
REPLACED = "replaced"


def check_seq_room(seq: int, steps: int) -> None:
    """OUT_OF_RANGE when a chunk of ``steps`` steps at ``seq`` would end past ``MAX_SEQ``."""
    if seq > MAX_SEQ - steps:
        raise out_of_range(
            f"chunk seq {seq} with {steps} steps would end past the largest seq {MAX_SEQ}; "
            "open a new session"
        )


class Checkpoints(Protocol):
    """Where a session with unsaved steps is queued for a checkpoint (checkpoints.py)."""

    every: int

    def mark(self, session: Session) -> None: ...

    def ended(self, session: Session, reason: str) -> None: ...


class Session:
    """One session. ``last_outputs`` are the outputs of the last applied chunk (at
    ``last_seq``), kept so a retry of that chunk is answered again instead of applied twice."""

    __slots__ = (
        "_digest",
        "_outputs",
        "busy",
        "checkpoints",
        "deadline",
        "ended",
        "epoch",
        "id",
        "last_seq",
        "model",
        "next_seq",
        "principal",
        "saved_at",
        "saved_seq",
        "slot",
        "suspect",
    )

    def __init__(self, sid: str, model: ServedModel, slot: int, deadline: float) -> None:
        self.id = sid
        self.model = model
        self.slot = slot
        self.next_seq = 0
        self.last_seq = 0
        #: ``last_outputs``' bytes: None until a chunk is applied (or a snapshot restores one).
        self._outputs: bytes | None = None
        #: The last applied chunk's digest, or its inputs not yet digested (``last_digest``):
        #: a tensor's raw bytes (in a 1-tuple) or a frame's row.
        self._digest: Digest | tuple[bytes] = b""
        self.deadline = deadline
        self.busy = False
        self.ended: str | None = None
        #: Who opened the session (authentication's principal; "" when it is off). The
        #: SessionManager counts it in this principal's fair share.
        self.principal = ""
        #: The durable store's bookkeeping (durable.py), when the server has a store: where a
        #: commit reports unsaved steps, this replica's ownership epoch of the session, the seq
        #: of its last checkpoint (-1: none yet) and when it was written (monotonic), and
        #: whether its ownership must be checked before its next use.
        self.checkpoints: Checkpoints | None = None
        self.epoch = 0
        self.saved_seq = -1
        self.saved_at = 0.0
        self.suspect = False

    @property
    def last_outputs(self) -> Outputs | None:
        """The outputs of the last applied chunk, float32 ``[T, outputs]``, read-only.

        Kept as bytes, not as the array the batcher hands over: that is a view of its whole
        batch's outputs, which one idle session would keep alive (up to the batch size times
        its own outputs), and an array costs about 110 bytes more than its data."""
        raw = self._outputs
        if raw is None:
            return None
        return np.frombuffer(raw, LE_FLOAT32).reshape(-1, self.model.manifest.output_size)

    @last_outputs.setter
    def last_outputs(self, outputs: Outputs | None) -> None:
        if outputs is None:
            self._outputs = None
            return
        if outputs.dtype != LE_FLOAT32:
            outputs = outputs.astype(LE_FLOAT32)
        self._outputs = outputs.tobytes()

    @property
    def last_digest(self) -> bytes:
        """rnnserve.wire.chunk_digest of the last applied chunk's inputs (empty: unknown)."""
        kept = self._digest
        if isinstance(kept, bytes):
            return kept
        if isinstance(kept, tuple):  # a tensor's raw bytes, in the model's input layout
            model = self.model
            arr = np.frombuffer(kept[0], model.wire_dtype)
            if not model.tokens:
                arr = arr.reshape(-1, model.manifest.input_size)
            digest = array_digest(arr)
        elif isinstance(kept, pb.Tensor):
            digest = chunk_digest(kept)
        else:
            digest = array_digest(kept)
        self._digest = digest
        return digest

    @last_digest.setter
    def last_digest(self, digest: bytes) -> None:
        self._digest = digest

    def applied(self, inputs: Digest) -> None:
        """Remember the inputs of the chunk just applied (as this session's model's
        decode_chunk accepted them): their digest, or the inputs themselves. Small inputs are
        kept and digested only if a retry or a snapshot asks (most never do: the digest costs
        microseconds per step); large ones are digested now, so an idle session keeps no more
        than a small record. Of a tensor only its raw bytes are kept: the tensor would keep
        its whole request message alive (about 540 bytes for a one-token Stream message);
        its dtype and shape follow from the model and the byte count."""
        if isinstance(inputs, bytes):
            self._digest = inputs
        elif isinstance(inputs, pb.Tensor):
            raw = inputs.raw_data
            if len(raw) <= MAX_KEPT_INPUT_BYTES:
                self._digest = (raw,)
            else:
                self._digest = chunk_digest(inputs)
        elif inputs.nbytes <= MAX_KEPT_INPUT_BYTES:
            self._digest = inputs
        else:
            self._digest = array_digest(inputs)

    def commit(self, seq: int, outputs: Outputs, inputs: Digest) -> None:
        """The chunk at ``seq`` was applied (its new state is stored) and made ``outputs``:
        move past it, keep its outputs for a retry, and leave the engine."""
        self.next_seq = seq + outputs.shape[0]
        self.last_seq = seq
        if outputs.dtype != LE_FLOAT32:
            outputs = outputs.astype(LE_FLOAT32)
        self._outputs = outputs.tobytes()
        self.applied(inputs)
        self.busy = False
        checkpoints = self.checkpoints
        if checkpoints is not None and self.next_seq - self.saved_seq >= checkpoints.every:
            checkpoints.mark(self)

    def gone(self) -> ServingError:
        """Why a chunk of this session, which ended while the chunk waited, was not applied:
        UNAVAILABLE (send it again) when the session lives on under its id: in the store
        (evicted, or taken over by another replica), loaded again by the next call, or
        restored over by a PutState (whose seq then decides); NOT_FOUND when it is gone."""
        if self.ended == REPLACED:
            return unavailable(
                f"session {self.id} was restored from a snapshot while its chunk waited; send "
                "the chunk again (the restored session's seq decides what it needs)"
            )
        if self.ended in (CAPACITY, MOVED) and self.checkpoints is not None:
            return unavailable(
                f"session {self.id} left this replica's memory ({self.ended}) while its chunk "
                "waited; send the chunk again (the session is loaded from the store)"
            )
        return not_found(f"session {self.id} ended ({self.ended}) before its chunk ran")

    def state_replaced(self) -> None:
        """The state changed without a step (a reset): the store's copy is stale, whatever
        seq it was written at; queue a checkpoint now (a drain writes it too)."""
        self.saved_seq = -1
        checkpoints = self.checkpoints
        if checkpoints is not None:
            checkpoints.mark(self)

    def check_seq(self, seq: int, digest: Digest = b"") -> Outputs | None:
        """The cached outputs when ``seq`` and the inputs' ``digest`` repeat the last applied
        chunk, None when ``seq`` is the next one; FAILED_PRECONDITION (with next_seq) otherwise.
        An empty digest (on either side) matches by seq alone; ``digest`` may be the chunk's
        tensor or array, digested only when needed."""
        if seq == self.next_seq:
            return None
        if self._outputs is not None and seq == self.last_seq:
            if isinstance(digest, pb.Tensor):
                digest = chunk_digest(digest)
            elif not isinstance(digest, bytes):
                digest = array_digest(digest)
            if digest and self.last_digest and digest != self.last_digest:
                raise seq_error(
                    f"chunk seq {seq} was already applied with other inputs (a retry must resend "
                    f"the same chunk; is another client using session {self.id}?); "
                    f"it expects seq {self.next_seq} next",
                    self.next_seq,
                )
            return self.last_outputs
        what = "was already applied" if seq < self.next_seq else "skips steps"
        raise seq_error(
            f"chunk seq {seq} {what}; session {self.id} expects seq {self.next_seq} next",
            self.next_seq,
        )


def commit_entries(
    sessions: list[Session],
    seqs: list[int],
    steps: int,
    outputs: npt.NDArray[np.float32],
    inputs: npt.NDArray[np.generic],
) -> None:
    """``Session.commit`` of each entry of a frame's block: ``sessions[j]``'s chunk at
    ``seqs[j]`` (``steps`` steps, inputs ``inputs[j]``) made ``outputs[j]``. Each session keeps
    bytes sliced from one copy of the block (no array per entry); one pass, no call per
    entry but a checkpoint's."""
    k = len(sessions)
    outs = outputs.tobytes()  # C order whatever the layout
    ins = inputs.tobytes()
    o, n = len(outs) // k, len(ins) // k
    small = n <= MAX_KEPT_INPUT_BYTES
    for session, seq, a, b in zip(
        sessions, seqs, range(0, k * o, o), range(0, k * n, n), strict=True
    ):
        session.next_seq = next_seq = seq + steps
        session.last_seq = seq
        session._outputs = outs[a : a + o]
        session._digest = (ins[b : b + n],)
        if not small:
            session._digest = session.last_digest
        session.busy = False
        checkpoints = session.checkpoints
        if checkpoints is not None and next_seq - session.saved_seq >= checkpoints.every:
            checkpoints.mark(session)
