"""SessionManager.get_many, a frame's lookup: for each id what get would answer, in one pass."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from prometheus_client import CollectorRegistry
from rnnserve.server.errors import ServingError
from rnnserve.server.metrics import Metrics
from rnnserve.server.repository import Repository
from rnnserve.server.sessions import IDLE, SessionManager
from rnnserve.server.settings import Settings

from tests.support.modelgen import write_model


async def test_get_many_answers_each_id_as_get_would(tmp_path: Path):
    folder = write_model(tmp_path, "m")
    metrics = Metrics(CollectorRegistry())
    settings = Settings(models=tmp_path, metrics_port=-1)
    model = await asyncio.to_thread(Repository(settings, metrics).load_version, folder)
    sessions = SessionManager(metrics, 60.0, 100)
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
