"""SessionManager.get_many, a frame's lookup: for each id what get would answer, in one pass."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from prometheus_client import CollectorRegistry
from rnnserve.server.errors import ServingError
from rnnserve.server.metrics import Metrics
from rnnserve.server.model import ServedModel
from rnnserve.server.repository import Repository
from rnnserve.server.sessions import IDLE, SessionManager
from rnnserve.server.settings import Settings

from tests.support.modelgen import write_model


async def _manager(tmp_path: Path) -> tuple[ServedModel, SessionManager]:
    """A served model and a SessionManager (60 s idle TTL, room for 100 sessions)."""
    folder = write_model(tmp_path, "m")
    metrics = Metrics(CollectorRegistry())
    settings = Settings(models=tmp_path, metrics_port=-1)
    model = await asyncio.to_thread(Repository(settings, metrics).load_version, folder)
    return model, SessionManager(metrics, 60.0, 100)


async def test_get_many_answers_each_id_as_get_would(tmp_path: Path):
    model, sessions = await _manager(tmp_path)
    mine = [sessions.open(model, principal="alice") for _ in range(3)]
    theirs = sessions.open(model, principal="bob")
    stale = sessions.open(model, principal="alice")
    stale.deadline = time.monotonic() - 1  # idle past its TTL
    ids = [mine[0].id, "unknown.x", theirs.id, mine[1].id, stale.id, mine[2].id]
    before = time.monotonic()
    got = sessions.get_many(ids, "alice")
    assert [type(g).__name__ for g in got] == [
        "Session", "ServingError", "ServingError", "Session", "ServingError", "Session"
    ]  # fmt: skip
    assert got[0] is mine[0] and got[3] is mine[1] and got[5] is mine[2]
    assert all(s.deadline >= before + 59 for s in mine)  # their idle clocks restarted
    for i in (1, 2, 4):
        err = got[i]
        assert isinstance(err, ServingError) and err.code.name == "NOT_FOUND"
    # Another principal's session reads exactly as an unknown one.
    assert "unknown here" in got[1].message and "unknown here" in got[2].message
    assert sessions.ended_reason(stale.id) == IDLE and "expired" in got[4].message
    # The least recently used order follows the lookups: the sessions just used go last.
    assert list(sessions._open)[-3:] == [mine[0].id, mine[1].id, mine[2].id]


async def test_get_many_of_one_principal_answers_as_get_would(tmp_path: Path):
    # One principal holds every session (always so without authentication): get_many takes
    # a shorter route for a frame whose sessions are all found and live, and the answers, the
    # idle clocks and the LRU order must be what get's would be, on either route.
    model, sessions = await _manager(tmp_path)
    s = [sessions.open(model, principal="alice") for _ in range(5)]
    before = time.monotonic()
    got = sessions.get_many([s[3].id, s[0].id, s[3].id], "alice")
    assert got == [s[3], s[0], s[3]]
    assert s[0].deadline >= before + 59 and s[3].deadline >= before + 59
    assert list(sessions._open)[-2:] == [s[0].id, s[3].id]
    # Someone else (authentication on, another token) finds none of them.
    assert all(isinstance(g, ServingError) for g in sessions.get_many([s[1].id], "bob"))
    # One expired session among live ones: that entry alone fails, the others are found.
    s[2].deadline = time.monotonic() - 1
    got = sessions.get_many([s[1].id, s[2].id, s[4].id], "alice")
    assert got[0] is s[1] and got[2] is s[4]
    assert isinstance(got[1], ServingError) and "expired" in got[1].message
    assert list(sessions._open)[-2:] == [s[1].id, s[4].id]
    assert sessions.get_many([], "alice") == []
