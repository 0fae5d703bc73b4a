"""The resume logic: which chunks a session must (re)send, decided from one number.

Free of I/O so that the sync session, the asyncio session and the multiplexer share it, and so
that it can be tested alone. The server's contract (see rnnserve.proto) gives:

- a chunk carries ``seq``, the index of its first step; the server applies the chunk whose seq
  is its ``next_seq``, answers a repeat of its last applied chunk from a cached reply, and
  refuses any other seq with the ``next_seq`` it holds.

So each session keeps at most ONE chunk in flight (the server caches one reply; a second chunk
in flight could be applied with its reply lost for good). After a dropped connection, a server
restart or a move to another replica, the SDK simply sends the unanswered chunk again with the
same seq. The server then applies it (it had not), answers it from its cache (it had), or
refuses it naming the seq it holds; from that seq alone this ledger works out what to do:

- server at the chunk's seq: send the chunk again (covered by the first two cases);
- server behind (it restored an older copy of the session): replay the answered chunks from the
  server's seq, discarding their outputs (the caller has them), then the chunk;
- anything else (the server applied the chunk but lost its reply, or is ahead of everything this
  client sent): the session cannot be continued exactly, so ``SessionLost`` / ``SeqConflict``.

The caller thus sees every output once, in order, and no step is applied twice.
"""

from __future__ import annotations

from collections import deque

import grpc
import numpy as np
import numpy.typing as npt

from .errors import SeqConflict, SessionLost

Array = npt.NDArray[np.generic]


class Chunk:
    """One chunk of a session: its first step's ``seq`` and its encoded inputs ``[T, ...]``.

    ``steps`` (T) and ``end`` (the seq of the step after it) are worked out once: the step path
    reads them several times per chunk. Treat a chunk as immutable.
    """

    __slots__ = ("end", "inputs", "seq", "steps")

    def __init__(self, seq: int, inputs: Array) -> None:
        self.seq = seq
        self.inputs = inputs
        self.steps = int(inputs.shape[0])
        self.end = seq + self.steps

    def __repr__(self) -> str:
        return f"Chunk(seq={self.seq}, steps={self.steps})"


class SeqLedger:
    """A session's seq bookkeeping: the chunk in flight and the recently answered ones.

    Not thread-safe: a session serialises its calls (one chunk in flight by design).
    """

    def __init__(self, session_id: str, next_seq: int, replay_steps: int) -> None:
        """``next_seq``: the seq the session's next chunk carries (from the server).

        ``replay_steps``: how many steps of answered chunks to keep for replay (0: none).
        """
        self.session_id = session_id
        self._next_seq = next_seq
        self._replay_steps = replay_steps
        self._answered: deque[Chunk] = deque()
        self._answered_steps = 0
        self._pending: Chunk | None = None
        self._replay: deque[Chunk] = deque()

    @property
    def next_seq(self) -> int:
        """The seq of the next new chunk."""
        return self._next_seq

    @property
    def pending(self) -> Chunk | None:
        """The chunk sent but not answered yet, if any."""
        return self._pending

    def submit(self, inputs: Array) -> Chunk:
        """Number a new chunk and make it the one in flight.

        RuntimeError if a chunk is already in flight (finish or abandon it first).
        """
        if self._pending is not None:
            raise RuntimeError("a chunk of this session is already in flight")
        chunk = Chunk(self._next_seq, inputs)
        self._pending = chunk
        self._next_seq = chunk.end
        return chunk

    def to_send(self) -> Chunk | None:
        """The chunk to send now: a replayed one first, else the one in flight."""
        if self._replay:
            return self._replay[0]
        return self._pending

    def on_outputs(self, seq: int, outputs: Array) -> Array | None:
        """Record a reply to the chunk starting at ``seq``.

        Returns the outputs when they belong to the chunk in flight (the caller's result), None
        for a replayed chunk (its outputs were delivered before). SeqConflict for a reply to a
        chunk this ledger did not send.
        """
        if self._replay and seq == self._replay[0].seq:
            self._replay.popleft()
            return None
        pending = self._pending
        if pending is None or seq != pending.seq or self._replay:
            raise SeqConflict(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"session {self.session_id}: reply for seq {seq} does not match the chunk in "
                f"flight ({'none' if pending is None else pending.seq})",
            )
        self._pending = None
        self._remember(pending)
        return outputs

    def abandon(self) -> None:
        """The chunk in flight was refused and not applied: its seq is free again."""
        if self._pending is not None:
            self._next_seq = self._pending.seq
            self._pending = None
        self._replay.clear()

    def forget_history(self) -> None:
        """Drop the answered chunks (after a reset, replaying them would rebuild a stale state)."""
        self._answered.clear()
        self._answered_steps = 0

    def on_server_seq(self, server_next_seq: int) -> None:
        """The server refused a chunk and said which seq it holds: plan what to send.

        Afterwards ``to_send()`` gives the next chunk to send. Raises SessionLost when the
        session cannot be continued exactly, SeqConflict when another client drove it.
        """
        self._replay.clear()
        frontier = self._pending.seq if self._pending is not None else self._next_seq
        if server_next_seq == frontier:
            return
        if server_next_seq < frontier:
            replay = [c for c in self._answered if c.seq >= server_next_seq]
            if not replay or replay[0].seq != server_next_seq:
                raise SessionLost(
                    self.session_id,
                    f"the server holds it at seq {server_next_seq}, but outputs up to seq "
                    f"{frontier} were already delivered and this client keeps only the last "
                    f"{self._replay_steps} steps to replay",
                    grpc.StatusCode.DATA_LOSS,
                )
            self._replay.extend(replay)
            return
        if self._pending is not None and server_next_seq == self._pending.end:
            raise SessionLost(
                self.session_id,
                f"the server applied the chunk at seq {self._pending.seq} but no longer has "
                "its outputs",
                grpc.StatusCode.DATA_LOSS,
            )
        raise SeqConflict(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"session {self.session_id}: the server is at seq {server_next_seq}, past the "
            f"{frontier} this client sent; another client is driving the session",
        )

    def _remember(self, chunk: Chunk) -> None:
        if self._replay_steps <= 0:
            return
        self._answered.append(chunk)
        self._answered_steps += chunk.steps
        while self._answered and self._answered_steps - self._answered[0].steps >= (
            self._replay_steps
        ):
            self._answered_steps -= self._answered.popleft().steps
