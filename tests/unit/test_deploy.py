"""The deployment files agree with the code: every series the Grafana dashboard queries exists."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry
from rnnserve.server.metrics import Metrics
from rnnserve.server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


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
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/rnnserve.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"rnnserve_[a-z_]+", target["expr"])
    }
    assert queried, "the dashboard queries nothing"
    missing = queried - _exposed_names()
    assert not missing, f"dashboard queries series the server does not export: {sorted(missing)}"


def test_prometheus_config_scrapes_the_metrics_port_of_the_compose_service() -> None:
    compose = (ROOT / "docker-compose.yml").read_text()
    prom = (ROOT / "deploy/prometheus.yml").read_text()
    target = re.search(r'targets: \["rnnserve:(\d+)"\]', prom)
    assert target is not None
    assert f'"{target.group(1)}:{target.group(1)}"' in compose
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"EXPOSE 50051 {target.group(1)}" in dockerfile
    assert Settings().metrics_port == int(target.group(1))
