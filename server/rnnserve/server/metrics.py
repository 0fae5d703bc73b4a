"""Every Prometheus metric the server exports, on an injected CollectorRegistry.

Buckets fit steps that take tens of microseconds: latency histograms start at 50 µs.
Label ``model`` is ``<name>/<version>``. Children of per-model series are bound once per model
version (``ModelMetrics``) so the step path does no label lookups.

The histograms are this module's own ``Histogram`` (a collector on the same registry, exposed
in the standard format): an observation is one bisect and two additions on the event loop,
where prometheus_client's takes a lock and walks every bucket; the server makes three or four
of them per step, which profiling showed as a tenth of its per-step CPU time. For the same
reason ``rnnserve_steps_total`` is no counter of its own: it is collected from the sum of
``rnnserve_chunk_length`` (the steps of every applied chunk), which the step path keeps anyway.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector


class HistogramChild:
    """One labelled series of a Histogram. Observe from one thread (the event loop)."""

    __slots__ = ("_bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        """Record ``value`` (``times`` times over: one call for a batch of equal values)."""
        # Bucket ``le=b`` holds values <= b: the first bound not below the value.
        self.counts[bisect.bisect_left(self._bounds, value)] += times
        self.sum += value * times
        self.count += times


class Histogram(Collector):
    """A Prometheus histogram with fixed label names, registered on ``registry``."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self.bounds = tuple(float(b) for b in buckets)
        self._children: dict[tuple[str, ...], HistogramChild] = {}
        registry.register(self)

    def labels(self, *values: str) -> HistogramChild:
        """The series of these label values (created on first use)."""
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}")
            child = self._children[values] = HistogramChild(self.bounds)
        return child

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            counts, total = list(child.counts), child.sum  # a snapshot; the loop keeps going
            cumulative, buckets = 0, []
            for bound, n in zip((*self.bounds, float("inf")), counts, strict=True):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            family.add_metric(list(values), buckets, total)
        yield family

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)


class SumCounter(Collector):
    """A counter exposed as the running sum of a Histogram's series (same labels): free on the
    step path, and never out of step with the histogram."""

    def __init__(
        self, name: str, documentation: str, source: Histogram, registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.source = source
        registry.register(self)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.source.labelnames)
        for values, child in list(self.source._children.items()):
            family.add_metric(list(values), child.sum)
        yield family

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, labels=self.source.labelnames)


#: Seconds: 50 µs to 10 s, roughly three buckets per decade.
LATENCY_BUCKETS = (
    50e-6, 75e-6, 100e-6, 150e-6, 200e-6, 300e-6, 500e-6, 750e-6,
    1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3, 7.5e-3, 10e-3, 20e-3, 50e-3, 100e-3,
    250e-3, 500e-3, 1.0, 2.5, 10.0,
)  # fmt: skip
#: Compute time of one engine run, seconds: from 5 µs (a tiny model at batch 1 on a GPU).
COMPUTE_BUCKETS = (5e-6, 10e-6, 20e-6, 30e-6, *LATENCY_BUCKETS)
#: The ``protocol`` label of rnnserve's own service (the Open Inference Protocol's is "oip").
PROTOCOL_V1 = "rnnserve.v1"


def protocol_of(path: str) -> str:
    """The ``protocol`` label of a gRPC method path (``/inference.GRPCInferenceService/...``)."""
    return "oip" if path.startswith("/inference.") else PROTOCOL_V1


#: Sessions per engine run.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
#: Steps per chunk.
CHUNK_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass(frozen=True)
class ModelMetrics:
    """The per-model series, bound to one model version's label."""

    queue_wait: HistogramChild
    compute: HistogramChild
    batch_size: HistogramChild
    chunk_length: HistogramChild
    opened: Counter
    active: Gauge
    state_bytes: Gauge


class Metrics:
    """The server's metrics. One instance per server, on its own registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        self.request_duration = Histogram(
            "rnnserve_request_duration_seconds",
            "Time from a request's arrival to its reply, by RPC method, status code and "
            "protocol: rnnserve.v1 or oip, the Open Inference Protocol (Stream and "
            "ModelStreamInfer: per message).",
            ["method", "code", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "rnnserve_queue_wait_seconds",
            "Time a chunk waited for its engine run to start.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute = Histogram(
            "rnnserve_compute_seconds",
            "Wall time of one engine run (a batch of chunks).",
            ["model"],
            buckets=COMPUTE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "rnnserve_batch_size",
            "Sessions per engine run.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.chunk_length = Histogram(
            "rnnserve_chunk_length",
            "Steps per applied chunk.",
            ["model"],
            buckets=CHUNK_BUCKETS,
            registry=r,
        )
        self.steps = SumCounter(
            "rnnserve_steps",
            "Steps applied (a chunk of T steps counts T).",
            self.chunk_length,
            registry=r,
        )
        self.sessions_opened = Counter(
            "rnnserve_sessions_opened", "Sessions opened (including forks and restores).",
            ["model"], registry=r,
        )  # fmt: skip
        self.sessions_ended = Counter(
            "rnnserve_sessions_ended",
            "Sessions ended, by reason: closed, idle (TTL), capacity (evicted).",
            ["model", "reason"],
            registry=r,
        )
        self.errors = Counter(
            "rnnserve_errors",
            "Requests answered with an error, by method, status code and protocol.",
            ["method", "code", "protocol"],
            registry=r,
        )
        self.active_sessions = Gauge(
            "rnnserve_active_sessions", "Open sessions.", ["model"], registry=r
        )
        self.parked_sessions = Gauge(
            "rnnserve_parked_sessions",
            "Open sessions parked: idle for park_after_s and kept as a row of columns, not a "
            "record (they count in rnnserve_active_sessions too).",
            registry=r,
        )
        self.state_bytes = Gauge(
            "rnnserve_state_bytes",
            "Bytes of the model's memory-cell slot pool that may be resident (pages written).",
            ["model"],
            registry=r,
        )
        self.model_info = Gauge(
            "rnnserve_model_info",
            "Always 1: one series per served model version with its cell and provider.",
            ["model", "name", "version", "cell", "provider"],
            registry=r,
        )
        # The durable session store (durable.py); flat at zero when the server has none.
        self.store_up = Gauge(
            "rnnserve_store_up",
            "1 while the session store (Redis) answers, 0 while it does not (sessions are then "
            "served from memory and checkpoints wait).",
            registry=r,
        )
        self.store_errors = Counter(
            "rnnserve_store_errors", "Session store operations that failed.", registry=r
        )
        self.checkpoints = Counter(
            "rnnserve_checkpoints", "Session checkpoints written to the store.", registry=r
        )
        self.checkpoint_lag = Gauge(
            "rnnserve_checkpoint_lag_steps",
            "Steps applied in memory but not yet in the store, summed over the sessions queued "
            "for a checkpoint.",
            registry=r,
        )
        self.takeovers = Counter(
            "rnnserve_takeovers",
            "Sessions loaded from the store because a call for them reached this replica.",
            registry=r,
        )
        self.fenced = Counter(
            "rnnserve_fenced",
            "Sessions dropped here because another replica took them over.",
            registry=r,
        )
        self._durations: dict[tuple[str, str, str], HistogramChild] = {}

    def for_model(self, label: str) -> ModelMetrics:
        """The series of one model version (``label`` = ``<name>/<version>``)."""
        return ModelMetrics(
            queue_wait=self.queue_wait.labels(label),
            compute=self.compute.labels(label),
            batch_size=self.batch_size.labels(label),
            chunk_length=self.chunk_length.labels(label),
            opened=self.sessions_opened.labels(label),
            active=self.active_sessions.labels(label),
            state_bytes=self.state_bytes.labels(label),
        )

    def request_child(self, method: str, code: str, protocol: str = PROTOCOL_V1) -> HistogramChild:
        """The request-duration series of ``method`` and ``code``, to observe directly (OK only:
        an error must also count in ``rnnserve_errors_total``, see observe_request)."""
        key = (method, code, protocol)
        child = self._durations.get(key)
        if child is None:
            child = self._durations[key] = self.request_duration.labels(method, code, protocol)
        return child

    def observe_request(
        self, method: str, code: str, seconds: float, protocol: str = PROTOCOL_V1
    ) -> None:
        """Record one request's duration; errors also count in ``rnnserve_errors_total``."""
        self.request_child(method, code, protocol).observe(seconds)
        if code != "OK":
            self.errors.labels(method, code, protocol).inc()

    def session_ended(self, label: str, reason: str) -> None:
        self.sessions_ended.labels(label, reason).inc()
