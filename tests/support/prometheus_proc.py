"""Prometheus for the tests: the SHIPPED deploy/prometheus.yml rendered for local targets
(``render_prometheus``) and run (``start_prometheus``); see tests/support/procs.py."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.support.proc_base import ROOT, Proc, _start_with_free_ports, free_port, require_binary

PROMETHEUS_CONFIG = ROOT / "deploy/prometheus.yml"
DASHBOARD = ROOT / "deploy/grafana/dashboards/rnnserve.json"


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the shipped Grafana dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]


def render_prometheus(
    replicas: Sequence[int], envoy_admin: int | None, shipped: Path = PROMETHEUS_CONFIG
) -> dict[str, Any]:
    """The shipped Prometheus config with local targets and 1 s scrapes: the ``rnnserve`` job
    scrapes each replica's metrics port, the ``envoy`` job Envoy's admin port (the shipped
    metrics_path, /stats/prometheus); a job with no local target is dropped."""
    config = yaml.safe_load(shipped.read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    targets = {
        "rnnserve": [f"127.0.0.1:{p}" for p in replicas],
        "envoy": [f"127.0.0.1:{envoy_admin}"] if envoy_admin else [],
    }
    jobs = []
    for job in config["scrape_configs"]:
        local = targets[job["job_name"]]
        if local:
            job["static_configs"] = [{"targets": local}]
            jobs.append(job)
    config["scrape_configs"] = jobs
    return config


class PrometheusProc(Proc):
    """Debian's prometheus with the shipped config rendered for local targets."""

    name = "prometheus"

    def __init__(self, workdir: Path, replicas: Sequence[int], envoy_admin: int | None) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.config_path = workdir / "prometheus.yml"
        config = render_prometheus(replicas, envoy_admin)
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.binary = require_binary("prometheus", "Debian package prometheus")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=5) as r:
            return json.load(r)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except urllib.error.HTTPError:
            return False  # 503 while it replays its write-ahead log

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; the result vector (``[{"metric": {...}, "value": [t, "v"]}]``)."""
        body = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def targets(self) -> dict[str, str]:
        """``{scrape url: health}`` of the active targets (``up``, ``down``, ``unknown``)."""
        body = self._get("/api/v1/targets?state=active")
        return {t["scrapeUrl"]: t["health"] for t in body["data"]["activeTargets"]}


def start_prometheus(
    tmp_path: Path,
    replicas: Sequence[int] = (),
    envoy_admin: int | None = None,
    timeout: float = 30.0,
) -> PrometheusProc:
    """Start Prometheus scraping the replicas' metrics ports and Envoy's admin port every
    second; returns once it is ready."""
    workdir = tmp_path / "prometheus"
    proc: PrometheusProc = _start_with_free_ports(
        lambda: PrometheusProc(workdir, replicas, envoy_admin), timeout
    )
    return proc
