"""Triton's sequences as rnnserve sessions.

A sequence is named by its caller's ``sequence_id`` and lives in the caller's scope: the
principal when the server checks tokens, the connection otherwise (``caller_scope``), so two
clients that both use sequence 1 never share state. ``sequence_start`` opens an rnnserve session
(ending the scope's previous sequence of that id, after its steps already sent), later requests
step it in arrival order, and ``sequence_end`` closes it once its step is applied. Without
START, an id the scope has no open sequence for gets Triton's error.

With a session store, a principal's sequences outlive their replica's drain: the drain writes
their sessions' final checkpoints and records each under the sequence's name (durable.py), and
the replica that gets the sequence's next request takes it over from there and goes on exactly
(``adopt``). A sequence whose replica stopped without a drain cannot go on (its client cannot
replay the steps since the last checkpoint): it gets Triton's START error, saying why.
Sequences scoped by a connection never move: a new connection is a new scope.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from rnnserve.server.auth import current_principal
from rnnserve.server.errors import ServingError, invalid, quoted
from rnnserve.server.model import ServedModel
from rnnserve.server.session_ids import route_key
from rnnserve.server.sessions import CLOSED, Session, SessionManager

if TYPE_CHECKING:
    from rnnserve.server.durable import Durability

#: (caller scope, model name, sequence id)
Key = tuple[str, str, int | str]
#: Forget the records of ended sequences after this many START requests (a sweep costs one
#: pass over the table, so it is spread over as many opens as there are sequences).
SWEEP_EVERY = 1024
#: The scope prefix of a principal's sequences: the ones that may move between replicas.
PRINCIPAL_SCOPE = "principal:"
#: A request that waits while its sequence is looked up in the store: whether it STARTs, how to
#: run it, and how to answer it with the lookup's error instead.
Waiting = tuple[bool, Callable[[], None], Callable[[ServingError], None]]


def name_of(key: Key) -> str:
    """The name a drain records a sequence's session under in the store: a digest of its
    key, so scopes and ids of any length make a short name."""
    return hashlib.sha256(repr(key).encode()).hexdigest()


def start_error(key: Key, why: str = "") -> ServingError:
    """Triton's INVALID_ARGUMENT for a request without START on a sequence that is not open,
    with rnnserve's reason when there is one."""
    tail = f": {why}" if why else " on the first request of the sequence"
    return invalid(
        f"inference request for sequence {quoted(str(key[2]))} to model '{quoted(key[1])}' "
        f"must specify the START flag{tail}"
    )


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
    scope = f"{PRINCIPAL_SCOPE}{principal}" if principal else f"peer:{context.peer()}"
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

    def __init__(self, sessions: SessionManager, durable: Durability | None = None) -> None:
        self.sessions = sessions
        #: The session store's side, when the server has one: sequences may move.
        self.durable = durable
        self._open: dict[Key, OipSequence] = {}
        self._starts = 0
        #: Requests that wait, in arrival order, while their sequence is looked up in the store.
        self.waiting: dict[Key, list[Waiting]] = {}

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
        if seq is None:
            raise start_error(key)
        try:
            self.sessions.get(seq.session.id)
        except ServingError as exc:  # expired idle, evicted or moved: say so
            self._open.pop(key, None)
            raise start_error(key, f"the sequence is no longer open ({exc.message})") from None
        return seq

    def needs_store(self, key: Key) -> bool:
        """Whether the store must be asked before a request without START runs: the
        sequence is not here but may have been handed over by a drain, or it is here but its
        ownership is in doubt (see durable.py)."""
        if self.durable is None or not key[0].startswith(PRINCIPAL_SCOPE):
            return False
        seq = self._open.get(key)
        return seq.session.suspect if seq is not None else True

    async def adopt(self, key: Key) -> None:
        """Settle ``key`` with the store (``needs_store``): take over the session a drain
        handed over, or check that a suspect one is still this replica's. Afterwards ``find``
        answers; INVALID_ARGUMENT in Triton's words when the sequence cannot go on."""
        assert self.durable is not None
        seq = self._open.get(key)
        if seq is not None:
            if await self.durable.owns(seq.session):
                return
            self._open.pop(key, None)
            raise start_error(key, "the sequence moved to another replica")
        owner = key[0].removeprefix(PRINCIPAL_SCOPE)
        try:
            loaded = await self.durable.handed_over(name_of(key), owner)
        except ServingError as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND:  # another principal's: as unknown
                raise
            loaded = None
        if loaded is None:
            return  # never here, or ended: find gives Triton's error
        session, final = loaded
        if key in self._open:  # a START raced the lookup: it wins
            self.sessions.end(session, CLOSED)
            return
        if session.model.manifest.name != key[1]:
            self.sessions.end(session, CLOSED)
            return
        if not final:
            self.sessions.end(session, CLOSED)
            raise start_error(
                key,
                "its replica stopped without handing it over, so its last steps may be lost",
            )
        self._open[key] = OipSequence(session)

    def handed_over(self) -> dict[str, Session]:
        """What a drain hands over: the sessions of the open sequences that may move (a
        principal's), by name."""
        return {
            name_of(key): seq.session
            for key, seq in self._open.items()
            if key[0].startswith(PRINCIPAL_SCOPE) and seq.session.ended is None
        }

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
