"""The server's own histogram: buckets, sums and the standard exposition format."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from rnnserve.server.metrics import Histogram, Metrics


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_histogram_buckets_are_cumulative_and_inclusive():
    registry = CollectorRegistry()
    h = Histogram("t_seconds", "test", ["method"], buckets=(0.1, 1.0), registry=registry)
    child = h.labels("Step")
    for v in (0.05, 0.1, 0.5, 1.0, 7.0):
        child.observe(v)
    got = _samples(registry)
    label = (("method", "Step"),)
    assert got[("t_seconds_bucket", (("le", "0.1"), *label))] == 2  # 0.1 <= 0.1 counts
    assert got[("t_seconds_bucket", (("le", "1.0"), *label))] == 4
    assert got[("t_seconds_bucket", (("le", "+Inf"), *label))] == 5
    assert got[("t_seconds_count", label)] == 5
    assert abs(got[("t_seconds_sum", label)] - 8.65) < 1e-9


def test_server_metrics_expose_every_family():
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    model = metrics.for_model("m/1")
    model.queue_wait.observe(60e-6)
    model.chunk_length.observe(3)  # a chunk of 3 steps applied: rnnserve_steps_total too
    metrics.observe_request("Step", "OK", 1e-4)
    metrics.observe_request("Step", "NOT_FOUND", 1e-4)
    metrics.session_ended("m/1", "idle")
    got = _samples(registry)
    assert got[("rnnserve_queue_wait_seconds_bucket", (("le", "7.5e-05"), ("model", "m/1")))] == 1
    assert got[("rnnserve_chunk_length_sum", (("model", "m/1"),))] == 3
    assert got[("rnnserve_steps_total", (("model", "m/1"),))] == 3
    # What the batcher records for an engine run of one chunk of two steps.
    model.queue_wait.observe(70e-6)
    model.compute.observe(20e-6)
    model.batch_size.observe(1)
    model.chunk_length.observe(2)
    got = _samples(registry)
    assert got[("rnnserve_steps_total", (("model", "m/1"),))] == 5
    assert got[("rnnserve_queue_wait_seconds_count", (("model", "m/1"),))] == 2
    assert got[("rnnserve_compute_seconds_bucket", (("le", "2e-05"), ("model", "m/1")))] == 1
    assert got[("rnnserve_batch_size_bucket", (("le", "1.0"), ("model", "m/1")))] == 1
    assert got[("rnnserve_chunk_length_bucket", (("le", "2.0"), ("model", "m/1")))] == 1
    assert got[("rnnserve_chunk_length_bucket", (("le", "4.0"), ("model", "m/1")))] == 2
    step_v1 = ("method", "Step"), ("protocol", "rnnserve.v1")
    assert got[("rnnserve_errors_total", (("code", "NOT_FOUND"), *step_v1))] == 1
    assert ("rnnserve_errors_total", (("code", "OK"), *step_v1)) not in got
    assert got[("rnnserve_sessions_ended_total", (("model", "m/1"), ("reason", "idle")))] == 1
    assert got[("rnnserve_request_duration_seconds_count", (("code", "OK"), *step_v1))] == 1
