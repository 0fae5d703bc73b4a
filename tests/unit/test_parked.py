"""Parked sessions (parked.py) on a real model: a session idle for park_after_s that only the
SessionManager holds becomes a row of columns, and its next use makes it the same session
again: seq, retry cache, state, principal and idle clock; expiry, capacity eviction, fair
shares and the state pool's slot moves treat it as any other session."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from rnnserve.server.errors import ServingError
from rnnserve.server.metrics import Metrics
from rnnserve.server.model import ServedModel
from rnnserve.server.repository import Repository
from rnnserve.server.sessions import CAPACITY, CLOSED, IDLE, Session, SessionManager
from rnnserve.server.settings import Settings
from rnnserve.wire import chunk_digest, to_tensor

MODELS = Path(__file__).resolve().parents[2] / "models"
#: Parks a session at the first sweep after its last use.
AT_ONCE = 1e-9


@pytest.fixture()
def model() -> ServedModel:
    settings = Settings(models=MODELS, self_check=False)
    return Repository(settings, Metrics(CollectorRegistry())).load_version(
        MODELS / "char-gru" / "1"
    )


def _manager(capacity: int = 100, ttl: float = 60.0) -> SessionManager:
    return SessionManager(Metrics(CollectorRegistry()), ttl, capacity, park_after_s=AT_ONCE)


def _opened(manager: SessionManager, model: ServedModel, n: int, principal: str = "") -> list[str]:
    """Open ``n`` sessions, give each a state of its own; their ids (no record kept)."""
    ids = []
    for i in range(n):
        s = manager.open(model, principal=principal)
        model.pool.arrays["h"][s.slot] = i + 1
        ids.append(s.id)
    return ids


def _aged(manager: SessionManager, ids: list[str]) -> None:
    """Give the records ``ids`` distinct idle deadlines in their order (sessions used within
    the same millisecond share one, and then any of them may be the oldest)."""
    for i, sid in enumerate(ids):
        manager._open[sid].deadline -= (len(ids) - i) * 0.01


def _sweep(manager: SessionManager) -> None:
    time.sleep(0.002)  # every session idle for longer than AT_ONCE
    manager.expire_idle()


def test_a_parked_session_comes_back_the_same(model: ServedModel) -> None:
    manager = _manager()
    session = manager.open(model, principal="alice")
    sid, slot = session.id, session.slot
    model.pool.arrays["h"][slot] = 7
    outputs = np.arange(2 * model.manifest.output_size, dtype=np.float32).reshape(2, -1)
    chunk = np.array([3, 1], dtype=np.int64)
    session.commit(5, outputs, chunk)
    deadline, digest = session.deadline, session.last_digest
    del session
    _sweep(manager)
    assert manager.parked == 1 and len(manager) == 1 and not manager._open
    back = manager.get(sid, "alice")
    assert manager.parked == 0 and manager._open[sid] is back
    assert (back.id, back.slot, back.principal) == (sid, slot, "alice")
    assert (back.next_seq, back.last_seq, back.last_digest) == (7, 5, digest)
    assert back.deadline >= deadline and back.ended is None and not back.busy
    last = back.last_outputs
    assert last is not None and (last == outputs).all()
    assert (model.pool.read(back.slot)["h"] == 7).all()
    # Its retry cache works as before parking: the same chunk again answers the same outputs,
    # other inputs at that seq are refused.
    cached = back.check_seq(5, chunk)
    assert cached is not None and (cached == outputs).all()
    with pytest.raises(ServingError, match="already applied with other inputs"):
        back.check_seq(5, chunk[::-1].copy())
    assert back.check_seq(7) is None
    manager.end(back, CLOSED)


def test_kept_inputs_come_back_as_they_were_kept(model: ServedModel) -> None:
    # A chunk that came as a tensor is kept as its raw bytes (digested only if a retry asks):
    # parked, the bytes stay bytes, and the retry check still works.
    manager = _manager()
    session = manager.open(model)
    chunk = np.array([3, 1, 4], dtype="<i8")
    tensor = to_tensor(chunk)
    session.commit(0, np.zeros((3, model.manifest.output_size), np.float32), tensor)
    sid, kept = session.id, session._digest
    assert kept == (chunk.tobytes(),)
    del session
    _sweep(manager)
    assert manager.parked == 1
    back = manager.get(sid)
    assert back._digest == kept and back.last_digest == chunk_digest(tensor)
    assert back.check_seq(0, tensor) is not None
    with pytest.raises(ServingError, match="already applied with other inputs"):
        back.check_seq(0, to_tensor(chunk[::-1].copy()))


def test_only_a_session_nothing_else_holds_is_parked(model: ServedModel) -> None:
    manager = _manager()
    kept = manager.open(model)  # as a stream or an OIP sequence would keep it
    busy = manager.open(model)
    busy.busy = True  # a chunk of it in an engine run
    free = _opened(manager, model, 3)
    _sweep(manager)
    assert sorted(manager._parked.rows) == sorted(free)
    assert manager._open[kept.id] is kept and manager._open[busy.id] is busy
    busy.busy = False
    del busy
    _sweep(manager)
    assert manager.parked == 4 and list(manager._open) == [kept.id]


def test_two_principals_park_and_keep_their_shares(model: ServedModel) -> None:
    manager = _manager(capacity=8)
    a = _opened(manager, model, 4, "a")
    b = _opened(manager, model, 3, "b")
    _aged(manager, a + b)
    _sweep(manager)  # with shares, a record has one more reference: its share
    assert manager.parked == 7
    assert manager.held_by("a") == 4 and manager.held_by("b") == 3
    manager.get(a[0], "a")  # a record again, a's most recently used
    assert manager.held_by("a") == 4 and manager.parked == 6
    with pytest.raises(ServingError, match="unknown here"):
        manager.get(b[0], "a")  # another principal's parked session: not found
    assert b[0] in manager._parked.rows  # left parked
    assert manager.held_by("b") == 3
    manager.open(model, principal="b")  # 8: at capacity
    manager.open(model, principal="b")  # a holds the most: its oldest parked one goes
    assert manager.ended_reason(a[1]) == CAPACITY
    assert manager.held_by("a") == 3 and manager.held_by("b") == 5
    manager.open(model, principal="a")  # b holds the most now: its oldest parked one goes
    assert manager.ended_reason(b[0]) == CAPACITY
    for s in manager.all():
        manager.end(s, CLOSED)
    assert len(manager) == 0 and manager.held_by("a") == manager.held_by("b") == 0


def test_capacity_evicts_the_oldest_parked_session_first(model: ServedModel) -> None:
    manager = _manager(capacity=5)
    ids = _opened(manager, model, 3)
    _aged(manager, ids)
    _sweep(manager)
    hot = manager.open(model)  # a record, used after the parked ones
    manager.get(ids[0])  # taken back: now the most recently used
    manager.open(model)  # 5 sessions
    manager.open(model)  # at capacity: the oldest parked one (ids[1]) goes, not `hot`
    assert manager.ended_reason(ids[1]) == CAPACITY and hot.ended is None
    manager.open(model)
    assert manager.ended_reason(ids[2]) == CAPACITY and manager.parked == 0
    manager.open(model)  # nothing parked: the least recently used record goes
    assert hot.ended == CAPACITY
    with pytest.raises(ServingError, match="evicted"):
        manager.get(ids[1])


def test_a_parked_session_expires_with_its_ttl(model: ServedModel) -> None:
    manager = _manager(ttl=0.05)
    ids = _opened(manager, model, 2)
    _sweep(manager)
    assert manager.parked == 2
    time.sleep(0.06)
    assert manager.expire_idle() == 2
    assert len(manager) == 0 and model.pool.in_use == 0
    with pytest.raises(ServingError, match="expired"):
        manager.get(ids[0])
    assert manager.ended_reason(ids[1]) == IDLE


def test_parked_sessions_keep_their_state_as_the_pool_packs(model: ServedModel) -> None:
    manager = _manager(capacity=1000)
    ids = _opened(manager, model, 300)  # session i holds state i + 1
    _sweep(manager)
    assert manager.parked == 300
    # Ending the sessions at the front moves the parked sessions from the back into their
    # slots (the pool tells the manager, which records it in the row).
    for i in range(0, 300, 3):
        manager.end(manager.get(ids[i]), CLOSED)
    assert model.pool.in_use == 200
    for i, sid in enumerate(ids):
        if i % 3:
            s = manager.get(sid)
            assert s.slot < 200 and (model.pool.read(s.slot)["h"] == i + 1).all()
            manager.end(s, CLOSED)
    assert model.pool.in_use == 0 and len(manager) == 0


def test_a_frame_takes_parked_sessions_back(model: ServedModel) -> None:
    manager = _manager()
    ids = _opened(manager, model, 4)
    hot = manager.open(model)
    _sweep(manager)
    got = manager.get_many([ids[2], hot.id, ids[0]], "")
    assert all(isinstance(g, Session) for g in got)
    assert [g.id for g in got if isinstance(g, Session)] == [ids[2], hot.id, ids[0]]
    assert got[1] is hot and manager.parked == 2
    assert list(manager._open)[-3:] == [ids[2], hot.id, ids[0]]


def test_peek_and_all_take_parked_sessions_back(model: ServedModel) -> None:
    manager = _manager()
    ids = _opened(manager, model, 3)
    _sweep(manager)
    peeked = manager.peek(ids[1])
    assert peeked is not None and peeked.id == ids[1] and manager.parked == 2
    assert manager.peek("unknown.x") is None
    assert sorted(s.id for s in manager.all()) == sorted(ids) and manager.parked == 0


def test_nothing_is_parked_with_a_store_or_when_off(model: ServedModel) -> None:
    class Queue:
        every = 10

        def mark(self, session: Session) -> None: ...

        def ended(self, session: Session, reason: str) -> None: ...

    stored = SessionManager(Metrics(CollectorRegistry()), 60.0, 10, Queue(), park_after_s=1e-9)
    off = SessionManager(Metrics(CollectorRegistry()), 60.0, 10)
    for manager in (stored, off):
        _opened(manager, model, 2)
        _sweep(manager)
        assert manager.parked == 0 and len(manager._open) == 2
        for s in manager.all():
            manager.end(s, CLOSED)


def test_a_session_is_parked_once_idle_for_park_after_s(model: ServedModel) -> None:
    manager = SessionManager(Metrics(CollectorRegistry()), 60.0, 100, park_after_s=30.0)
    ids = _opened(manager, model, 3)
    _sweep(manager)
    assert manager.parked == 0  # used a moment ago
    for sid in ids[:2]:
        manager._open[sid].deadline -= 31  # last used 31 s ago
    _sweep(manager)
    assert sorted(manager._parked.rows) == sorted(ids[:2])


def test_the_rows_hold_a_model_version_only_while_they_need_it(model: ServedModel) -> None:
    # A model version removed from the repository must be freed once its last session is:
    # the parked rows refer to it (and to each principal) only while one of theirs is parked.
    manager = _manager()
    ids = _opened(manager, model, 2, "a") + _opened(manager, model, 1, "b")
    _sweep(manager)
    parked = manager._parked
    assert parked.principals() == ["a", "b"] and parked._models.present() == [model]
    manager.end(manager.get(ids[0], "a"), CLOSED)
    assert parked.held_by("a") == 1 and parked._models.present() == [model]
    for s in manager.all():
        manager.end(s, CLOSED)
    assert parked.principals() == [] and parked._models.present() == []
    assert all(v is None for v in parked._models.values)


def test_memory_goes_back_when_parked_sessions_end(model: ServedModel) -> None:
    manager = _manager(capacity=100_000)
    ids = _opened(manager, model, 70_000)
    while manager.parked < len(ids):
        _sweep(manager)  # at most PARK_PER_SWEEP a sweep
    parked = manager._parked
    full = sum(sys.getsizeof(shard) for shard in parked.rows._shards)
    blocks = len(parked._ids._blocks)
    for sid in ids[100:]:
        manager.end(manager.get(sid), CLOSED)
    # The id index is rebuilt smaller, the object columns drop their blocks, the numeric
    # columns' pages go back: what is left is sized for the 100 sessions left.
    assert sum(sys.getsizeof(shard) for shard in parked.rows._shards) < full / 4
    assert len(parked._ids._blocks) <= 2 < blocks
    assert parked._touched * 27 <= 2 * 2**20
    for i, sid in enumerate(ids[:100]):
        s = manager.get(sid)
        assert (model.pool.read(s.slot)["h"] == i + 1).all()


def test_the_sweep_trims_the_heap_after_many_sessions_ended(
    model: ServedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Memory freed in small blocks stays inside the C heap until malloc_trim: the sweep calls
    # it once TRIM_AFTER sessions ended since the last time (pure bookkeeping: the call is
    # counted, not made).
    import rnnserve.server.sessions as sessions_module

    trims: list[int] = []
    monkeypatch.setattr(sessions_module, "TRIM_AFTER", 3)
    monkeypatch.setattr(sessions_module, "trim_heap", lambda: trims.append(1))
    manager = _manager()
    ids = _opened(manager, model, 5)
    for sid in ids[:2]:
        manager.end(manager.get(sid), CLOSED)
    manager.expire_idle()
    assert trims == []
    manager.end(manager.get(ids[2]), CLOSED)
    manager.expire_idle()
    assert trims == [1]
    manager.expire_idle()
    assert trims == [1]  # counted afresh
