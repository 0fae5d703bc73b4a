"""Parked sessions: idle sessions kept as rows of a few columns instead of as records.

An open session is a ``Session`` record (session.py), an entry in the manager's
least-recently-used table and a slot number: about 380 bytes of Python objects besides its id
and its state, and one more object for every full garbage collection to walk. Most sessions
of a big server are idle most of the time, so the manager *parks* a session that has been idle
for ``park_after_s`` and that nothing else holds (no chunk queued or running, no stream or OIP
sequence keeping it, no checkpoint queued): its fields go into one row here, its record and
its table entry go. Its next use takes it back (``take``): a new record with the same fields,
as if it had never left. A parked session costs its id, an entry in ``rows`` (id -> row
number), the row number and about 50 bytes of columns.

What a row keeps is exactly what a record of a server without a session store holds besides
its defaults: id, model version, state slot, next seq, the last chunk's outputs and inputs (for
a retry; its seq is the next seq less its steps), idle deadline and principal. With a store
the manager parks nothing (its checkpoint bookkeeping stays in records; the store already
holds idle sessions). A model version's state pool names a parked session's owner by its row
here, so one SessionManager parks the sessions of a model version (as in the server).

The columns reserve a row for every session the server may hold (``capacity``) as address
space only, as the state pool does (state.reserve): the kernel backs a page when a row in it is
first written, so they never copy themselves to grow. Rows stay packed (a session taken back
leaves its row to the last one) and pages past them go back to the kernel. The rows' order is
not kept: the expired sessions and the oldest are found with one numpy pass over the deadline
column, the oldest few remembered until the next park. Sessions used within the same
millisecond share a deadline (sessions.py), and among them any may be the oldest.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Hashable, Iterator
from itertools import chain
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt
from rnnserve.server.session import Session
from rnnserve.server.state import Objects, reserve

if TYPE_CHECKING:
    from rnnserve.server.model import ServedModel

#: The columns: name and type (27 bytes a row). ``raw``: the last inputs are kept as they
#: came (a record keeps them in a 1-tuple, ``Session._digest``), not as their digest.
COLUMNS = (
    ("deadline", np.float64),
    ("next_seq", np.int64),
    ("slot", np.int32),
    ("principal", np.int32),
    ("model", np.uint16),
    ("raw", np.uint8),
)
ROW_BYTES = sum(np.dtype(t).itemsize for _, t in COLUMNS)
#: Dicts the parked ids are spread over (``_Rows``).
ROW_SHARDS = 64
ROW_SHARD_MASK = ROW_SHARDS - 1
_DEADLINE = attrgetter("deadline")
_NEXT_SEQ = attrgetter("next_seq")
_SLOT = attrgetter("slot")
_DIGEST = attrgetter("_digest")
_ID = attrgetter("id")
_OUTPUTS = attrgetter("_outputs")
#: How many of the oldest rows one scan remembers for capacity eviction.
OLDEST_KEPT = 64
#: Column pages past the used rows go back to the kernel once more than this many bytes lie
#: there (or an eighth of the used bytes, if more).
GIVE_BACK_SLACK = 1 << 20
#: ``rows`` is rebuilt smaller once fewer than an eighth of at least SHRINK_FROM remain, and
#: at most SHRINK_COPY (as the manager's record table, sessions.py).
SHRINK_FROM = 65_536
SHRINK_COPY = 16_384
_PAGE = mmap.PAGESIZE
T = TypeVar("T", bound=Hashable)


class _Interned(Generic[T]):
    """Values kept once and referred to by index, each for as long as a row refers to it (a
    model version removed from the repository is freed once its last session is)."""

    def __init__(self) -> None:
        self.values: list[T | None] = []
        self._index: dict[T, int] = {}
        self._count: list[int] = []
        self._free: list[int] = []

    def acquire(self, value: T) -> int:
        i = self._index.get(value)
        if i is None:
            i = self._free.pop() if self._free else len(self.values)
            if i == len(self.values):
                self.values.append(value)
                self._count.append(0)
            self.values[i] = value
            self._index[value] = i
        self._count[i] += 1
        return i

    def release(self, i: int) -> T:
        value = self.values[i]
        assert value is not None
        self._count[i] -= 1
        if not self._count[i]:
            self.values[i] = None
            del self._index[value]
            self._free.append(i)
        return value

    def index(self, value: T) -> int | None:
        return self._index.get(value)

    def count(self, value: T) -> int:
        i = self._index.get(value)
        return 0 if i is None else self._count[i]

    def present(self) -> list[T]:
        return list(self._index)


class _Rows:
    """Each parked session's row, by id: in ROW_SHARDS dicts by the id's hash, not one. A dict
    that outgrows its table copies every entry into a new one, and one of 700,000 entries
    took 50-190 ms here (the event loop stalls); each shard holds a 64th of the ids."""

    def __init__(self) -> None:
        self._shards: list[dict[str, int]] = [{} for _ in range(ROW_SHARDS)]
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __contains__(self, sid: str) -> bool:
        return sid in self._shards[hash(sid) & ROW_SHARD_MASK]

    def __getitem__(self, sid: str) -> int:
        return self._shards[hash(sid) & ROW_SHARD_MASK][sid]

    def __iter__(self) -> Iterator[str]:
        return chain.from_iterable(self._shards)

    def add(self, sid: str, row: int) -> None:
        self._shards[hash(sid) & ROW_SHARD_MASK][sid] = row
        self._len += 1

    def move(self, sid: str, row: int) -> None:
        self._shards[hash(sid) & ROW_SHARD_MASK][sid] = row

    def pop(self, sid: str) -> int:
        row = self._shards[hash(sid) & ROW_SHARD_MASK].pop(sid)
        self._len -= 1
        return row

    def rebuild(self) -> None:
        """Copies sized for the ids left (a dict keeps its size as entries go)."""
        self._shards = [dict(shard) for shard in self._shards]


class ParkedSessions:
    """The parked sessions of one SessionManager."""

    def __init__(self, capacity: int) -> None:
        #: Each parked session's row, by id.
        self.rows = _Rows()
        self._capacity = capacity
        self._maps = {name: reserve(capacity * np.dtype(t).itemsize) for name, t in COLUMNS}
        columns: dict[str, npt.NDArray[Any]] = {
            name: np.frombuffer(self._maps[name], t, count=capacity) for name, t in COLUMNS
        }
        self._deadline: npt.NDArray[np.float64] = columns["deadline"]
        self._next_seq: npt.NDArray[np.int64] = columns["next_seq"]
        self._slot: npt.NDArray[np.int32] = columns["slot"]
        self._principal: npt.NDArray[np.int32] = columns["principal"]
        self._model: npt.NDArray[np.uint16] = columns["model"]
        self._raw: npt.NDArray[np.uint8] = columns["raw"]
        self._columns = list(columns.values())
        #: Rows whose column pages may be resident; the most rows since ``rows`` was rebuilt.
        self._touched = 0
        self._peak = 0
        #: Object columns (numpy object arrays, which the garbage collector does not walk).
        #: The rows are packed: row r is in use while r < ``len(self._ids)``.
        self._ids = Objects()  # str
        self._outputs = Objects()  # bytes | None: Session._outputs
        self._digests = Objects()  # bytes: a digest, or the inputs themselves (``raw``)
        #: Model versions and principals, each kept once, referred to by index.
        self._models: _Interned[ServedModel] = _Interned()
        self._principals: _Interned[str] = _Interned()
        #: The oldest sessions of the last scan, oldest last; forgotten at each park.
        self._oldest: list[str] = []

    def __len__(self) -> int:
        return len(self.rows)

    def held_by(self, principal: str) -> int:
        return self._principals.count(principal)

    def principals(self) -> list[str]:
        return self._principals.present()

    def can_park(self, session: Session) -> bool:
        """Whether a row holds all of ``session``: its last chunk ends at its next seq (so
        the chunk's seq follows from its outputs), as every commit and restore leaves it."""
        outputs = session._outputs
        return outputs is None or session.last_seq + self._steps(session.model, outputs) == (
            session.next_seq
        )

    @staticmethod
    def _steps(model: ServedModel, outputs: bytes) -> int:
        return len(outputs) // (4 * model.manifest.output_size)

    def park(self, sessions: list[Session]) -> list[int]:
        """Keep the fields of ``sessions`` in rows, each row its slot's owner in the state
        pool (the caller drops the records); their rows, in order. Columns are written a
        batch at a time (a row at a time costs twice as much: numpy's per-item writes)."""
        k = len(sessions)
        first = len(self._ids)
        end = first + k
        if end > self._capacity:
            raise RuntimeError("more sessions parked than the server's capacity")
        self._deadline[first:end] = np.fromiter(map(_DEADLINE, sessions), np.float64, k)
        self._next_seq[first:end] = np.fromiter(map(_NEXT_SEQ, sessions), np.int64, k)
        self._slot[first:end] = np.fromiter(map(_SLOT, sessions), np.int32, k)
        self._model[first:end] = [self._models.acquire(s.model) for s in sessions]
        self._principal[first:end] = [self._principals.acquire(s.principal) for s in sessions]
        kept = list(map(_DIGEST, sessions))
        raw = [isinstance(d, tuple) for d in kept]
        self._raw[first:end] = raw
        for j, (session, is_raw) in enumerate(zip(sessions, raw, strict=True)):
            # The inputs' raw bytes without their tuple (56 bytes); a digest as it is; inputs
            # kept as an array (a view of their frame's block) digested.
            kept[j] = kept[j][0] if is_raw else session.last_digest
        self._ids.extend(list(map(_ID, sessions)))
        self._outputs.extend(list(map(_OUTPUTS, sessions)))
        self._digests.extend(kept)
        rows = list(range(first, end))  # each int object shared by the index and the pool
        for session, row in zip(sessions, rows, strict=True):
            self.rows.add(session.id, row)
            session.model.pool.hand(session.slot, row)
        self._touched = max(self._touched, end)
        self._peak = max(self._peak, end)
        self._oldest = []
        return rows

    def take(self, sid: str) -> Session:
        """Parked session ``sid`` as a record again, its slot's owner in its state pool. The
        last row moves into its row, so the rows stay packed (that pool learns the move)."""
        row = self.rows.pop(sid)
        model = self._models.release(int(self._model[row]))
        session = Session(sid, model, int(self._slot[row]), float(self._deadline[row]))
        session.next_seq = int(self._next_seq[row])
        outputs = session._outputs = self._outputs[row]
        if outputs is not None:
            session.last_seq = session.next_seq - self._steps(model, outputs)
        kept = self._digests[row]
        session._digest = (kept,) if self._raw[row] else kept
        session.principal = self._principals.release(int(self._principal[row]))
        model.pool.hand(session.slot, session)
        last = len(self._ids) - 1
        if row < last:
            for column in self._columns:
                column[row] = column[last]
            moved = self._ids[row] = self._ids[last]
            self._outputs[row] = self._outputs[last]
            self._digests[row] = self._digests[last]
            self.rows.move(moved, row)
            mover = self._models.values[int(self._model[row])]
            assert mover is not None
            mover.pool.hand(int(self._slot[row]), row)
        for objects in (self._ids, self._outputs, self._digests):
            objects.pop()
        self._give_back()
        return session

    def principal_of(self, sid: str) -> str:
        principal = self._principals.values[int(self._principal[self.rows[sid]])]
        assert principal is not None
        return principal

    def moved(self, row: int, slot: int) -> None:
        """The state pool moved row ``row``'s session to ``slot``."""
        self._slot[row] = slot

    def expired(self, now: float) -> list[str]:
        """The sessions whose idle deadline passed."""
        return self._ids.take(np.flatnonzero(self._deadline[: len(self._ids)] < now))

    def oldest(self, principal: str | None = None) -> str | None:
        """The session used least recently (of ``principal``'s, when given); None if none."""
        used = len(self._ids)
        if principal is not None:
            p = self._principals.index(principal)
            if p is None:
                return None
            masked = np.where(self._principal[:used] == p, self._deadline[:used], math.inf)
            sid: str = self._ids[int(masked.argmin())]
            return sid
        while self._oldest:  # parked since the scan, in the order it found them
            sid = self._oldest.pop()
            if sid in self.rows:
                return sid
        if not used:
            return None
        deadline = self._deadline[:used]
        k = min(OLDEST_KEPT, used)
        some = np.argpartition(deadline, k - 1)[:k] if k < used else np.arange(used)
        some = some[np.argsort(deadline[some])[::-1]]
        self._oldest = self._ids.take(some)
        return self._oldest.pop()

    def _give_back(self) -> None:
        """Hand the columns' pages past the used rows back to the kernel once more than
        GIVE_BACK_SLACK bytes lie there, and the id table's memory once most rows went."""
        used = len(self._ids)
        if (self._touched - used) * ROW_BYTES > max(GIVE_BACK_SLACK, used * ROW_BYTES // 8):
            for (_, t), mm in zip(COLUMNS, self._maps.values(), strict=True):
                size = np.dtype(t).itemsize
                start = -(-used * size // _PAGE) * _PAGE
                end = -(-self._touched * size // _PAGE) * _PAGE
                if start < end:
                    mm.madvise(mmap.MADV_DONTNEED, start, end - start)
            self._touched = used
        if used < self._peak >> 3 and used <= SHRINK_COPY and self._peak >= SHRINK_FROM:
            self.rows.rebuild()
            self._peak = used
