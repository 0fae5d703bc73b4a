"""The scale-out deployment's monitoring, end to end with real processes: two ``rnnserve serve``
replicas on a Redis store behind Envoy (the shipped deploy/envoy/envoy.yaml), scraped by
Prometheus on the shipped deploy/prometheus.yml (both rendered for 127.0.0.1). Prometheus
reaches every target, and after some traffic through Envoy every query of the Grafana dashboard
returns data, the per-replica ones for both replicas."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from rnnserve.wire import to_tensor

from tests.support.procs import Procs, PrometheusProc
from tests.support.prometheus_proc import dashboard_queries

pytestmark = pytest.mark.prometheus

ROUTE = "x-rnnserve-route"
X = to_tensor(np.ones((1, 3), np.float32))


class Traffic:
    """Sessions opened through Envoy, each with its own route key, stepped a chunk at a time."""

    def __init__(self, stub: pb_grpc.InferenceServiceStub, count: int) -> None:
        self.stub = stub
        self.sessions: list[tuple[str, str, int]] = []  # (route key, session id, next seq)
        for i in range(count):
            key = f"route{i}"
            reply = stub.OpenSession(
                pb.OpenSessionRequest(model="tiny-gru"), metadata=((ROUTE, key),), timeout=10
            )
            self.sessions.append((key, reply.session.session_id, 0))

    def step_all(self) -> None:
        for i, (key, sid, seq) in enumerate(self.sessions):
            self.stub.Step(
                pb.StepRequest(session_id=sid, seq=seq, inputs=X),
                metadata=((ROUTE, key),),
                timeout=10,
            )
            self.sessions[i] = (key, sid, seq + 1)
        # One Stream call too, so the stream path's series fill.
        key, sid, seq = self.sessions[0]
        request = pb.StreamRequest(step=pb.StepRequest(session_id=sid, seq=seq, inputs=X))
        list(self.stub.Stream(iter([request]), metadata=((ROUTE, key),), timeout=10))
        self.sessions[0] = (key, sid, seq + 1)

    def close_last(self) -> None:
        key, sid, _ = self.sessions.pop()
        self.stub.CloseSession(
            pb.CloseSessionRequest(session_id=sid), metadata=((ROUTE, key),), timeout=10
        )

    def fail_one(self) -> None:
        """One call that fails (a session id no replica has), for the errors panel."""
        with pytest.raises(grpc.RpcError) as failed:
            self.stub.Step(
                pb.StepRequest(session_id="route0.nosuchsessionxxxxxxxxx", seq=0, inputs=X),
                metadata=((ROUTE, "route0"),),
                timeout=10,
            )
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND


def _missing(prom: PrometheusProc, queries: list[str], instances: set[str]) -> list[str]:
    """The queries that return no data yet (or, when grouped by instance, not for every
    replica); a histogram quantile or ratio must be a number, not NaN."""
    missing = []
    for expr in queries:
        result = prom.query(expr)
        values = [r["value"][1] for r in result]
        if not values or ("histogram_quantile" in expr and all(v == "NaN" for v in values)):
            missing.append(expr)
        elif "by (instance)" in expr and {r["metric"].get("instance") for r in result} != instances:
            missing.append(f"{expr} (instances: {[r['metric'] for r in result]})")
    return missing


def test_prometheus_scrapes_replicas_and_envoy_and_the_dashboard_has_data(procs: Procs) -> None:
    redis = procs.redis()
    replicas = procs.replicas(["replica-a", "replica-b"], store_url=redis.url)
    envoy = procs.envoy(replicas)
    envoy.wait_hosts(healthy=[r.name for r in replicas])
    prom = procs.prometheus(replicas, envoy)
    instances = {f"127.0.0.1:{r.metrics_port}" for r in replicas}
    queries = dashboard_queries()

    with grpc.insecure_channel(envoy.address) as channel:
        traffic = Traffic(pb_grpc.InferenceServiceStub(channel), count=12)
        traffic.fail_one()
        traffic.close_last()
        deadline = time.monotonic() + 90
        while True:
            # Keep the traffic going until Prometheus has scraped enough of it for rate().
            traffic.step_all()
            targets = prom.targets()
            missing = _missing(prom, queries, instances)
            if len(targets) == 3 and set(targets.values()) == {"up"} and not missing:
                break
            assert time.monotonic() < deadline, (
                f"after 90 s: targets {targets}; dashboard queries without data: {missing}"
            )
            time.sleep(0.5)

    # Both replicas served steps (the route keys spread over the ring) and Envoy saw both healthy.
    steps = prom.query("sum by (instance) (rnnserve_steps_total)")
    assert {r["metric"]["instance"] for r in steps if float(r["value"][1]) > 0} == instances
    healthy = prom.query('sum(envoy_cluster_membership_healthy{envoy_cluster_name="rnnserve"})')
    assert float(healthy[0]["value"][1]) == 2
    store_up = prom.query("min(rnnserve_store_up)")
    assert float(store_up[0]["value"][1]) == 1, "a replica does not reach the Redis store"
