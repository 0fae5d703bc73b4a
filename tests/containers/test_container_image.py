"""The server image, built and run for real (issue 14, parts 1 and 2).

One container serves a copy of the shipped models, mounted read-only at /models as a user
would mount theirs, with its gRPC and metrics ports published on 127.0.0.1. Needs the image
``make image-test`` builds; run with ``make image-test`` (these tests are left out of the
default ``pytest`` run by the ``containers`` marker).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rnnserve.client import Client

from tests.containers.engine import ROOT, SERVER_IMAGE, Engine, wait_for
from tests.support.modelgen import reference_run

pytestmark = pytest.mark.containers

SHIPPED = ROOT / "models"
GRACE_S = 10.0
TOL = 1e-4


@dataclass
class Served:
    engine: Engine
    container: str
    address: str
    metrics_url: str
    models: Path


def _health(address: str, service: str = "rnnserve.v1.InferenceService") -> str:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _serving(address: str) -> bool:
    try:
        return _health(address) == "SERVING"
    except grpc.RpcError:
        return False


@pytest.fixture(scope="module")
def engine() -> Engine:
    found = Engine()
    found.require_image(SERVER_IMAGE)
    return found


@pytest.fixture(scope="module")
def served(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The image serving a copy of the shipped models (read-only mount), scanned every 1 s."""
    models = tmp_path_factory.mktemp("container") / "models"
    shutil.copytree(SHIPPED, models)
    # The container runs as uid 10001: the copy must be readable by others, as models are.
    for path in [models, *models.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    models.parent.chmod(0o755)
    container = engine.run(
        SERVER_IMAGE,
        options=[
            "-p",
            "127.0.0.1::50051",
            "-p",
            "127.0.0.1::9464",
            "-v",
            f"{models}:/models:ro",
            "-e",
            "RNNSERVE_RELOAD_INTERVAL_S=1",
            "-e",
            f"RNNSERVE_SHUTDOWN_GRACE_S={GRACE_S:g}",
        ],
    )
    try:
        address = f"127.0.0.1:{engine.host_port(container, 50051)}"
        metrics = f"http://127.0.0.1:{engine.host_port(container, 9464)}/metrics"
        wait_for(
            "the container SERVING through its published port",
            lambda: _serving(address),
            timeout=180,
            why=lambda: engine.logs(container),
        )
        yield Served(engine, container, address, metrics, models)
    finally:
        engine.remove(container)


def _image_config(engine: Engine, key: str) -> Any:
    """One field of the image's config (docker nests it under Config, podman has it on top)."""
    data = engine.inspect(SERVER_IMAGE)
    return data.get("Config", {}).get(key) or data.get(key)


def _inputs(client: Client, name: str, steps: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    model = client.model(name)
    if model.vocabulary:
        return rng.integers(0, len(model.vocabulary), steps).astype(np.int64)
    return rng.normal(330.0, 15.0, (steps, 1)).astype(np.float32)


def _stream_equals_onnxruntime(address: str, name: str, version: str, model_dir: Path) -> None:
    with Client(address) as client:
        x = _inputs(client, name, 37, seed=len(name))
        want, _ = reference_run(model_dir, x)
        with client.session(name, version) as session:
            chunks = np.array_split(x, [1, 5, 6, 19, 30])
            got = np.concatenate([np.asarray(y) for y in session.stream(chunks)])
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= TOL * max(1.0, float(np.max(np.abs(want))))


def test_runs_as_a_non_root_numeric_user(served: Served) -> None:
    assert _image_config(served.engine, "User") == "10001:10001"
    status = served.engine("exec", served.container, "cat", "/proc/1/status").stdout
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert set(uids) == {"10001"}, status
    cmdline = served.engine("exec", served.container, "cat", "/proc/1/cmdline").stdout
    assert "rnnserve" in cmdline and "serve" in cmdline


def test_serving_through_grpc_health_and_the_healthcheck(served: Served) -> None:
    assert _health(served.address) == "SERVING"
    assert _health(served.address, service="") == "SERVING"
    check = _image_config(served.engine, "Healthcheck")
    assert check["Test"] == ["CMD", "rnnserve", "probe"], check
    done = served.engine("healthcheck", "run", served.container, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    # The same probe fails where nothing serves: the check can tell.
    bad = served.engine(
        "exec", served.container, "rnnserve", "probe", "--server", "127.0.0.1:1", check=False
    )
    assert bad.returncode == 1 and "UNAVAILABLE" in bad.stderr, bad.stderr


def test_serves_the_shipped_models_and_a_streamed_session_equals_onnxruntime(
    served: Served,
) -> None:
    shipped = {(p.parent.parent.name, p.parent.name) for p in SHIPPED.glob("*/*/manifest.json")}
    assert len(shipped) >= 6
    with Client(served.address) as client:
        listed = {(m.name, m.version) for m in client.models()}
    assert shipped <= listed
    for name, version in sorted(shipped):
        _stream_equals_onnxruntime(served.address, name, version, SHIPPED / name / version)
    with urllib.request.urlopen(served.metrics_url, timeout=5) as reply:
        assert "rnnserve_steps_total" in reply.read().decode()


def test_the_image_holds_no_torch(served: Served) -> None:
    probe = "import importlib.util as u, onnxruntime; print(u.find_spec('torch'))"
    out = served.engine("exec", served.container, "python", "-c", probe).stdout
    assert out.strip() == "None"
    found = served.engine(
        "exec", served.container, "sh", "-c", "find / -xdev -type d -name torch | head -1"
    ).stdout
    assert found.strip() == ""


def test_a_model_version_dropped_into_the_mounted_folder_is_served_without_a_restart(
    served: Served,
) -> None:
    before = served.engine.inspect(served.container)["State"]["StartedAt"]
    # Copied next to the repository, then renamed into it: the server never sees half a model.
    staging = served.models.parent / "staging-2"
    shutil.copytree(served.models / "char-gru" / "1", staging)
    manifest = json.loads((staging / "manifest.json").read_text())
    (staging / "manifest.json").write_text(json.dumps({**manifest, "version": "2"}))
    for path in [staging, *staging.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    os.rename(staging, served.models / "char-gru" / "2")

    def listed() -> bool:
        with Client(served.address) as client:
            return ("char-gru", "2") in {(m.name, m.version) for m in client.models()}

    wait_for(
        "char-gru version 2 listed",
        listed,
        timeout=60,
        why=lambda: served.engine.logs(served.container)[-3000:],
    )
    _stream_equals_onnxruntime(served.address, "char-gru", "2", served.models / "char-gru" / "2")
    state = served.engine.inspect(served.container)["State"]
    assert state["Running"] and state["StartedAt"] == before


def test_sigterm_stops_it_gracefully_within_the_grace_period(served: Served) -> None:
    # Last in this module: it stops the module's container. A session is open while it stops.
    with Client(served.address) as client:
        client.session("co2-gru").step(np.float32(320.0))  # left open: the server ends it
        began = time.monotonic()
        served.engine("stop", "-t", str(int(GRACE_S) + 20), served.container, timeout=60)
        took = time.monotonic() - began
    state = served.engine.inspect(served.container)["State"]
    logs = served.engine.logs(served.container)
    assert state["ExitCode"] == 0, logs[-3000:]  # 137 would be the engine's SIGKILL
    assert took < GRACE_S + 5, f"stopping took {took:.1f} s"
    assert "rnnserve: shutting down" in logs
