"""The compose topology (docker-compose.yml) started for real with podman-compose (issue 14,
part 3): two replicas, Envoy, Redis and Prometheus, on the local test images
(deploy/containers/compose.test.yml); Grafana is left out (no local image).

The compose file publishes fixed host ports (Envoy 50051 and 9901, Prometheus 9090): the
test fails at once, saying which, when one is taken.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from rnnserve.client import Client

from tests.containers.engine import ROOT, SERVER_IMAGE, Engine, wait_for
from tests.support.modelgen import reference_run

pytestmark = pytest.mark.containers

PROJECT = "rnnserve-test"
FILES = ("-f", "docker-compose.yml", "-f", "deploy/containers/compose.test.yml")
SERVICES = ("replica-a", "replica-b", "envoy", "redis", "prometheus")
TEST_IMAGES = (
    SERVER_IMAGE,
    "localhost/rnnserve-envoy:test",
    "localhost/rnnserve-redis:test",
    "localhost/rnnserve-prometheus:test",
)
HOST_PORTS = {50051: "Envoy's gRPC listener", 9901: "Envoy's admin port", 9090: "Prometheus"}
ENVOY = "127.0.0.1:50051"
PROMETHEUS = "http://127.0.0.1:9090"
TOL = 1e-4


@dataclass
class Topology:
    engine: Engine
    compose: list[str]

    def container(self, service: str) -> str:
        """The name of ``service``'s container."""
        out = self.engine(
            "ps",
            "-a",
            "--filter",
            f"label=com.docker.compose.project={PROJECT}",
            "--filter",
            f"label=com.docker.compose.service={service}",
            "--format",
            "{{.Names}}",
        ).stdout.split()
        assert len(out) == 1, f"containers of {service}: {out}"
        return out[0]

    def logs(self) -> str:
        return "\n".join(
            f"--- {s}\n{self.engine.logs(self.container(s))[-2500:]}" for s in SERVICES
        )

    def metrics(self, service: str) -> dict[str, float]:
        """A replica's metrics, read inside its container (the port is not published), each
        series summed over its labels."""
        read = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:9464/metrics').read().decode())"
        text = self.engine("exec", self.container(service), "python", "-c", read).stdout
        sums: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.split("{")[0].split(" ")[0], line.rsplit(" ", 1)[1]
                sums[name] = sums.get(name, 0.0) + float(value)
        return sums


def _compose_path() -> str:
    found = shutil.which("podman-compose")
    if found is None:
        message = "the compose test needs podman-compose (apt-get install podman-compose)"
        required = os.environ.get("CI", "").lower() in ("1", "true", "yes")
        if required or os.environ.get("REQUIRE_TOOLS") == "1":
            pytest.fail(f"CI (or REQUIRE_TOOLS=1) is set and {message}", pytrace=False)
        pytest.skip(message)
    return found


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return str(reply.read().decode())


def _envoy_sees_both_healthy() -> bool:
    try:
        clusters = _get("http://127.0.0.1:9901/clusters")
    except OSError:
        return False
    return clusters.count("health_flags::healthy") == 2


@pytest.fixture(scope="module")
def topology() -> Iterator[Topology]:
    engine = Engine()
    compose = [_compose_path(), "-p", PROJECT, *FILES]
    for image in TEST_IMAGES:
        engine.require_image(image)
    taken = [f"{port} ({what})" for port, what in HOST_PORTS.items() if _port_taken(port)]
    if taken:
        pytest.fail(
            f"host ports the compose file publishes are taken: {', '.join(taken)}", pytrace=False
        )

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*compose, *args],
            cwd=ROOT,
            env=engine.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"podman-compose {' '.join(args)}: {done.stdout}{done.stderr}")
        return done

    topology = Topology(engine, compose)
    try:
        run("down", "-v", check=False)  # what an interrupted run may have left
        run("up", "-d", *SERVICES)
        wait_for(
            "Envoy seeing both replicas healthy",
            _envoy_sees_both_healthy,
            timeout=180,
            why=topology.logs,
        )
        yield topology
    finally:
        run("down", "-v", check=False)
        engine("network", "rm", "-f", f"{PROJECT}_default", check=False)


def test_prometheus_scrapes_every_replica_and_envoy(topology: Topology) -> None:
    wanted = {
        ("rnnserve", "replica-a:9464"),
        ("rnnserve", "replica-b:9464"),
        ("envoy", "envoy:9901"),
    }
    seen: dict[tuple[str, str], str] = {}

    def all_up() -> bool:
        try:
            data = json.loads(_get(f"{PROMETHEUS}/api/v1/targets"))
        except OSError:
            return False
        seen.clear()
        for target in data["data"]["activeTargets"]:
            key = (target["labels"]["job"], target["labels"]["instance"])
            seen[key] = target["health"]
        return set(seen) == wanted and set(seen.values()) == {"up"}

    wait_for("every Prometheus target up", all_up, timeout=90, why=lambda: f"targets: {seen}")


def _session_inputs(client: Client, names: list[str]) -> list[np.ndarray]:
    xs = []
    for i, name in enumerate(names):
        rng = np.random.default_rng(i)
        model = client.model(name)
        if model.vocabulary:
            xs.append(rng.integers(0, len(model.vocabulary), 60).astype(np.int64))
        else:
            xs.append(rng.normal(330.0, 15.0, (60, 1)).astype(np.float32))
    return xs


def test_sessions_through_envoy_finish_identically_after_their_replica_is_killed(
    topology: Topology,
) -> None:
    names = ["char-gru", "char-lstm", "co2-gru", "co2-notes-gru"]
    with Client(ENVOY) as client:
        xs = _session_inputs(client, names)
        # One route key: Envoy puts every session on one replica, the one to kill.
        sessions = [client.session(name, route_key="containers-test") for name in names]
        firsts = [
            np.concatenate([np.asarray(y) for y in s.stream(np.array_split(x[:35], [3, 20, 21]))])
            for s, x in zip(sessions, xs, strict=True)
        ]
        active = {r: topology.metrics(r).get("rnnserve_active_sessions", 0) for r in SERVICES[:2]}
        holder = max(active, key=lambda r: active[r])
        other = next(r for r in SERVICES[:2] if r != holder)
        assert active == {holder: len(names), other: 0}, active
        assert topology.metrics(holder)["rnnserve_store_up"] == 1

        topology.engine("kill", topology.container(holder))
        seconds = [
            np.concatenate([np.asarray(y) for y in s.stream(np.array_split(x[35:], [1, 9]))])
            for s, x in zip(sessions, xs, strict=True)
        ]
        for s in sessions:
            s.close()

    state = topology.engine.inspect(topology.container(holder))["State"]
    assert not state["Running"]
    versions = [s.model.version for s in sessions]  # the latest of each, as the client opened
    for name, version, x, first, second in zip(names, versions, xs, firsts, seconds, strict=True):
        want, _ = reference_run(ROOT / "models" / name / version, x)
        got = np.concatenate([first, second])
        scale = max(1.0, float(np.max(np.abs(want))))
        assert got.shape == want.shape, name
        assert np.max(np.abs(got - want)) <= TOL * scale, name
    survivor = topology.metrics(other)
    assert survivor["rnnserve_takeovers_total"] >= len(names)
    assert survivor["rnnserve_store_up"] == 1
