"""Triton's sequences as rnnserve sessions.

A sequence is named by its caller's ``sequence_id`` and lives in the caller's scope: the
principal when the server checks tokens, the connection otherwise (``caller_scope``), so two
clients that both use sequence 1 never share state. ``sequence_start`` opens an rnnserve session
(ending the scope's previous sequence of that id, after its steps already sent), later requests
step it in arrival order, and ``sequence_end`` closes it once its step is applied. Without
START, an id the scope has no open sequence for gets Triton's error.
"""

from __future__ import annotations

from typing import Any

from rnnserve.server.auth import current_principal
from rnnserve.server.errors import ServingError, invalid, quoted
from rnnserve.server.model import ServedModel
from rnnserve.server.sessions import CLOSED, Session, SessionManager, route_key

#: (caller scope, model name, sequence id)
Key = tuple[str, str, int | str]
#: Forget the records of ended sequences after this many START requests (a sweep costs one
#: pass over the table, so it is spread over as many opens as there are sequences).
SWEEP_EVERY = 1024


class Caller:
    """Who sent a call: the scope of its sequence ids (its principal when tokens are on, else
    its peer: the client's address and port, one connection), its principal ("" when tokens
    are off), and the route key it sent for new sessions ("": a random one)."""

    __slots__ = ("principal", "route", "scope")

    def __init__(self, scope: str, principal: str = "", route: str = "") -> None:
        self.scope = scope
        self.principal = principal
        self.route = route


def caller_of(context: Any) -> Caller:
    """The Caller of a call; INVALID_ARGUMENT when its route key header is malformed."""
    principal = current_principal()
    scope = f"principal:{principal}" if principal else f"peer:{context.peer()}"
    return Caller(scope, principal, route_key(context.invocation_metadata()))


class OipSequence:
    """One open sequence: its session, the seq its next chunk gets, and its chunks in flight."""

    __slots__ = ("closing", "inflight", "last", "next_seq", "session")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.next_seq = session.next_seq
        self.inflight = 0
        #: Set by END (or a new START of the same id): the session ends after its last chunk.
        self.closing = False
        #: The last chunk submitted and not yet answered (an error reply queues behind it, so a
        #: sequence's replies keep their order).
        self.last: Any = None


class SequenceTable:
    """The open OIP sequences of a server, by (scope, model, id)."""

    def __init__(self, sessions: SessionManager) -> None:
        self.sessions = sessions
        self._open: dict[Key, OipSequence] = {}
        self._starts = 0

    def __len__(self) -> int:
        return len(self._open)

    def start(
        self, key: Key, model: ServedModel, principal: str = "", route: str = ""
    ) -> OipSequence:
        """A new sequence (START): a fresh session on ``model`` of ``principal`` (within its
        quota), routed by ``route``; the key's previous sequence, if any, ends once its chunks
        in flight are applied."""
        old = self._open.pop(key, None)
        if old is not None:
            self._close(old)
        self._starts += 1
        if self._starts % SWEEP_EVERY == 0:
            self._sweep()
        seq = OipSequence(self.sessions.open(model, route=route, principal=principal))
        self._open[key] = seq
        return seq

    def find(self, key: Key) -> OipSequence:
        """The open sequence of ``key`` (a request without START), its idle clock restarted;
        INVALID_ARGUMENT in Triton's words when there is none, with rnnserve's reason."""
        seq = self._open.get(key)
        model, sid = key[1], key[2]
        if seq is None:
            raise invalid(
                f"inference request for sequence {quoted(str(sid))} to model '{quoted(model)}' "
                "must specify the START flag on the first request of the sequence"
            )
        try:
            self.sessions.get(seq.session.id)
        except ServingError as exc:  # expired idle or evicted: say so, in Triton's terms
            self._open.pop(key, None)
            raise invalid(
                f"inference request for sequence {quoted(str(sid))} to model "
                f"'{quoted(model)}' must specify the START flag: the sequence is no longer "
                f"open ({exc.message})"
            ) from None
        return seq

    def peek(self, key: Key) -> OipSequence | None:
        """The open sequence of ``key``, or None; touches nothing."""
        return self._open.get(key)

    def finish(self, key: Key, seq: OipSequence) -> None:
        """END: forget ``key`` now (a new START may reuse the id at once); the session ends
        after the chunks already submitted."""
        if self._open.get(key) is seq:
            del self._open[key]
        self._close(seq)

    def submitted(self, seq: OipSequence, steps: int) -> int:
        """Book a chunk of ``steps`` steps; the seq number it runs at."""
        at = seq.next_seq
        seq.next_seq += steps
        seq.inflight += 1
        return at

    def answered(self, seq: OipSequence, failed: bool) -> None:
        """A chunk of ``seq`` was answered. After a failed chunk the sequence goes on from
        what was applied, once nothing else of it is in flight."""
        seq.inflight -= 1
        if seq.inflight == 0:
            seq.last = None
            if failed:
                seq.next_seq = seq.session.next_seq
            if seq.closing:
                self.sessions.end(seq.session, CLOSED)

    def _close(self, seq: OipSequence) -> None:
        seq.closing = True
        if seq.inflight == 0:
            self.sessions.end(seq.session, CLOSED)

    def _sweep(self) -> None:
        """Drop records whose session ended without END (expired idle, evicted)."""
        for key in [k for k, s in self._open.items() if s.session.ended is not None]:
            del self._open[key]
