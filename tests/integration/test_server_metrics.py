"""The server's metrics, scraped by a real Prometheus and queried through its HTTP API."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

from tests.support.procs import Procs, PrometheusProc
from tests.support.raw import open_session, step, step_error, stream_all, stream_step

pytestmark = pytest.mark.prometheus


@pytest.fixture
def prometheus_for(procs: Procs) -> Callable[[int], PrometheusProc]:
    """Factory: a real Prometheus (the shipped deploy/prometheus.yml rendered for 127.0.0.1)
    scraping 127.0.0.1:<metrics_port> every second; stopped after the test."""
    return lambda metrics_port: procs.prometheus([metrics_port])


async def _poll(prom: PrometheusProc, expr: str, timeout: float = 60.0) -> list[dict]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            result = await asyncio.to_thread(prom.query, expr)
        except OSError:
            result = []  # not listening yet
        if result and result[0]["value"][1] not in ("NaN", "0"):
            return result
        assert loop.time() < deadline, f"no value for {expr}"
        await asyncio.sleep(0.5)


async def test_request_latency_quantile_through_prometheus(server, prometheus_for):
    prom = prometheus_for(server.metrics_port)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        sid = await open_session(stub, "tiny-gru")
        other = await open_session(stub, "tiny-lstm")
        x = np.ones((1, 3), np.float32)
        await step_error(stub, stream_step(sid, 5, x, 0).step)  # one FAILED_PRECONDITION
        seq = 0
        query = (
            "histogram_quantile(0.5, sum by (le) "
            "(rate(rnnserve_request_duration_seconds_bucket[30s])))"
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 90
        while True:
            # Keep traffic going until Prometheus has two scrapes of it for rate().
            await step(stub, sid, seq, x)
            await stream_all(stub, [stream_step(other, seq, x, seq)])
            seq += 1
            try:
                result = await asyncio.to_thread(prom.query, query)
            except OSError:
                result = []
            if result and result[0]["value"][1] != "NaN":
                break
            assert loop.time() < deadline, "Prometheus never returned the quantile"
            await asyncio.sleep(0.2)
    p50 = float(result[0]["value"][1])
    assert 0 < p50 < 10, p50  # a latency in seconds, inside the histogram's buckets

    by_method = await _poll(prom, "sum by (method) (rnnserve_request_duration_seconds_count)")
    assert {"Step", "Stream", "OpenSession"} <= {r["metric"]["method"] for r in by_method}
    errors = await _poll(prom, 'rnnserve_errors_total{code="FAILED_PRECONDITION"}')
    assert float(errors[0]["value"][1]) >= 1
    steps = await _poll(prom, 'rnnserve_steps_total{model="tiny-gru/1"}')
    assert float(steps[0]["value"][1]) >= 2
    for expr in (
        "sum(rnnserve_queue_wait_seconds_count)",
        "sum(rnnserve_compute_seconds_count)",
        "sum(rnnserve_batch_size_count)",
        "sum(rnnserve_chunk_length_count)",
        'rnnserve_active_sessions{model="tiny-lstm/1"}',
        'rnnserve_state_bytes{model="tiny-lstm/1"}',
        'rnnserve_sessions_opened_total{model="tiny-gru/1"}',
        'rnnserve_model_info{name="tiny-char",cell="gru",provider="CPUExecutionProvider"}',
    ):
        await _poll(prom, expr)

    async with grpc.aio.insecure_channel(server.address) as channel:
        await pb_grpc.InferenceServiceStub(channel).CloseSession(
            pb.CloseSessionRequest(session_id=sid)
        )
    await _poll(prom, 'rnnserve_sessions_ended_total{model="tiny-gru/1",reason="closed"}')
