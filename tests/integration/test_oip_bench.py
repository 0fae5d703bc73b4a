"""bench/oip_stream.py's closed loops against a real server: both protocols step real
sequences and the report renders. Smoke only; speed is the benchmark's business."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest
from rnnserve.manifest import load_manifest

BENCH = Path(__file__).resolve().parents[2] / "bench"


class _InProcess:
    """What one_run needs of a ServerProcess, for a server in this process."""

    def __init__(self, target: str) -> None:
        self.target = target

    def cpu_seconds(self) -> tuple[float, float]:
        return time.process_time(), 0.0


@pytest.fixture
def oip_stream() -> Any:
    sys.path.insert(0, str(BENCH))
    try:
        import oip_stream

        yield oip_stream
    finally:
        sys.path.remove(str(BENCH))


async def test_both_protocols_step_sequences_and_the_report_renders(
    server: Any, model_repo: Path, oip_stream: Any
) -> None:
    m = load_manifest(model_repo / "tiny-char" / "1")
    target = _InProcess(server.address)
    # Windows long enough for a step on a loaded machine (a window without one fails).
    v1 = await oip_stream.one_run(target, m, "rnnserve.v1", 3, 0.2, 1.5)
    oip = await oip_stream.one_run(target, m, "oip", 3, 0.2, 1.5)
    for run in (v1, oip):
        assert run.steps > 0 and len(run.latencies_us) == run.steps
        assert 0 < run.pct(0.5) <= run.pct(0.99)
    assert len(server.server.sessions) == 0  # every sequence ended, every session closed
    section = oip_stream.render([(v1, oip, [oip.steps_per_s / v1.steps_per_s])], "info")
    assert section.startswith(oip_stream.BEGIN) and section.endswith(oip_stream.END)
    assert "| 3 |" in section
