"""SessionManager on a real model: slots stay packed as sessions end, the state pool's bytes
go back, and one principal's sessions need no share of their own until a second one opens."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from rnnserve.server.codec import decode_chunk
from rnnserve.server.errors import ServingError
from rnnserve.server.metrics import Metrics
from rnnserve.server.model import ServedModel
from rnnserve.server.repository import Repository
from rnnserve.server.sessions import CAPACITY, CLOSED, SessionManager
from rnnserve.server.settings import Settings
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.wire import array_digest, chunk_digest, to_tensor

MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.fixture(scope="module")
def model() -> ServedModel:
    settings = Settings(models=MODELS, self_check=False)
    return Repository(settings, Metrics(CollectorRegistry())).load_version(
        MODELS / "char-gru" / "1"
    )


def test_sessions_keep_their_state_as_slots_are_packed(model: ServedModel) -> None:
    manager = SessionManager(Metrics(CollectorRegistry()), 60.0, 10_000)
    sessions = [manager.open(model) for _ in range(3000)]
    for i, s in enumerate(sessions):
        model.pool.arrays["h"][s.slot] = i
    for s in sessions[::2]:
        manager.end(s, CLOSED)
    rest = sessions[1::2]
    assert sorted(s.slot for s in rest) == list(range(len(rest)))
    for i, s in enumerate(sessions):
        if i % 2:
            assert (model.pool.read(s.slot)["h"] == i).all()
    for s in rest:
        manager.end(s, CLOSED)
    assert model.pool.in_use == 0


def test_state_bytes_fall_when_sessions_end(model: ServedModel) -> None:
    manager = SessionManager(Metrics(CollectorRegistry()), 60.0, 100_000)
    sessions = [manager.open(model) for _ in range(20_000)]  # 20,000 x 512 bytes
    held = model.pool.nbytes
    assert held >= 20_000 * 512
    for s in sessions:
        manager.end(s, CLOSED)
    assert model.pool.nbytes <= 2 * 2**20 < held


def test_fair_eviction_after_a_second_principal_opens(model: ServedModel) -> None:
    manager = SessionManager(Metrics(CollectorRegistry()), 60.0, 6)
    a = [manager.open(model, principal="a") for _ in range(4)]
    assert manager.held_by("a") == 4 and manager.held_by("b") == 0
    manager.get(a[0].id)  # a[1] is now a's least recently used
    b = [manager.open(model, principal="b") for _ in range(2)]
    assert manager.held_by("a") == 4 and manager.held_by("b") == 2
    manager.open(model, principal="b")  # at capacity: a holds the most, loses a[1]
    assert a[1].ended == CAPACITY and all(s.ended is None for s in (a[0], a[2], a[3], *b))
    assert manager.held_by("a") == 3 and manager.held_by("b") == 3
    # A takeover sets the principal after the open: the session moves to that share.
    a[2].principal = "b"
    manager.get(a[2].id)
    assert manager.held_by("a") == 2 and manager.held_by("b") == 4
    for s in manager.all():
        manager.end(s, CLOSED)
    assert manager.held_by("a") == manager.held_by("b") == 0
    solo = manager.open(model, principal="c")
    assert manager.held_by("c") == 1 and np.isfinite(solo.deadline)


@pytest.mark.parametrize("folder", ["char-gru/1", "co2-gru/2"])
def test_a_kept_chunk_digests_as_its_tensor(folder: str) -> None:
    """A session keeps a chunk tensor's raw bytes, not the tensor (which holds its whole
    request): the digest made from them later is the tensor's own."""
    settings = Settings(models=MODELS, self_check=False)
    served = Repository(settings, Metrics(CollectorRegistry())).load_version(MODELS / folder)
    manager = SessionManager(Metrics(CollectorRegistry()), 60.0, 10)
    session = manager.open(served)
    if served.tokens:
        chunk = np.array([3, 1, 4], dtype="<i8")
    else:
        chunk = np.arange(3 * served.manifest.input_size, dtype="<f4").reshape(3, -1)
    request = pb.StepRequest.FromString(
        pb.StepRequest(session_id=session.id, inputs=to_tensor(chunk)).SerializeToString()
    )
    decode_chunk(served, request.inputs)
    session.commit(0, np.zeros((3, served.manifest.output_size), np.float32), request.inputs)
    assert session.last_digest == chunk_digest(request.inputs) == array_digest(chunk)
    other = to_tensor(chunk[::-1].copy())
    with pytest.raises(ServingError):
        session.check_seq(0, other)
    cached = session.check_seq(0, request.inputs)
    assert (
        cached is not None and not cached.any() and cached.shape == (3, served.manifest.output_size)
    )


def test_the_open_table_shrinks_when_most_sessions_end(model: ServedModel) -> None:
    manager = SessionManager(Metrics(CollectorRegistry()), 60.0, 100_000)
    sessions = [manager.open(model) for _ in range(70_000)]
    full = sys.getsizeof(manager._open)
    keep = sessions[-100:]
    manager.get(keep[0].id)  # now the most recently used
    for s in sessions[:-100]:
        manager.end(s, CLOSED)
    assert sys.getsizeof(manager._open) < full / 8
    assert [s.id for s in manager.all()] == [s.id for s in keep[1:]] + [keep[0].id]
    for s in keep:
        assert manager.get(s.id) is s
        manager.end(s, CLOSED)
