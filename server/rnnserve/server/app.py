"""``RnnServer``: the gRPC server, its metrics endpoint and its background tasks, in one object.

    server = RnnServer(settings)
    port = await server.start()        # bound gRPC port (settings.port may be 0)
    ...
    await server.stop(grace=10.0)      # NOT_SERVING, streams drain, in-flight calls finish

Everything the server needs hangs off this object; nothing is global.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import socketserver
import threading
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, make_wsgi_app
from rnnserve.server.auth import (
    SecurityConfigError,
    TokenAuth,
    connection_options,
    exposure_warnings,
    load_snapshot_key,
    load_tokens,
    server_credentials,
)
from rnnserve.server.health import HealthService
from rnnserve.server.limits import OpenRate, StreamLimit
from rnnserve.server.metrics import Metrics
from rnnserve.server.oip import OIP_STREAM_METHOD, OipServicer
from rnnserve.server.oip import add_to_server as add_oip_to_server
from rnnserve.server.oip_http import OipHttp
from rnnserve.server.repository import Repository
from rnnserve.server.servicer import InferenceServicer, add_to_server
from rnnserve.server.sessions import SessionManager
from rnnserve.server.settings import Settings
from rnnserve.v1 import rnnserve_pb2 as pb

if TYPE_CHECKING:
    from rnnserve.server.durable import Durability

log = logging.getLogger("rnnserve.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name


class ServerStartError(RuntimeError):
    """The server cannot start (address in use, ...); the message says what to change."""


class NoModelError(ServerStartError):
    """The model repository is missing or holds no servable model (and ``allow_empty`` is off)."""


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _in_use(host: str, port: int) -> bool:
    """True when something already listens on ``host:port``. Checked before the models load
    (seconds), so a second server on one machine fails at once; the real bind still decides."""
    if port <= 0:
        return False
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return False  # the real bind says what is wrong with the host
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # As gRPC and the metrics server bind: a port in TIME_WAIT is free, a listener not.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


class _MetricsServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # scrapes are not news
        pass


def _serve_metrics(
    host: str, port: int, registry: CollectorRegistry
) -> tuple[WSGIServer, threading.Thread]:
    """``/metrics`` on its own thread; polls for shutdown every 50 ms so stop() is quick."""
    httpd = make_server(
        host, port, make_wsgi_app(registry), _MetricsServer, handler_class=_QuietHandler
    )
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name="metrics"
    )
    thread.start()
    return httpd, thread


class RnnServer:
    """The rnnserve server. ``start`` and ``stop`` must run on the same event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.repository = Repository(settings, self.metrics)
        #: The durable session store's side, when settings.store_url names one.
        self.durable: Durability | None = None
        if settings.store_url:
            # Imported only with a store: redis-py is the largest import of a start (0.1 s).
            from rnnserve.server.durable import Durability
            from rnnserve.server.store import RedisStore

            self.durable = Durability(
                RedisStore(settings.store_url, settings.replica_name),
                self.repository,
                self.metrics,
                settings.checkpoint_every,
                settings.session_ttl_s,
            )
        self.sessions = SessionManager(
            self.metrics,
            settings.session_ttl_s,
            settings.max_sessions,
            self.durable.checkpoints if self.durable is not None else None,
            principal_max=settings.principal_max_sessions,
            park_after_s=settings.park_after_s,
        )
        self.servicer = InferenceServicer(
            self.repository,
            self.sessions,
            self.metrics,
            settings.max_stream_inflight,
            self.durable,
            open_rate=OpenRate(settings.principal_open_rate),
            max_frame=settings.max_frame_sessions,
        )
        # The Open Inference Protocol (KServe v2, Triton's sequences) on the same port.
        self.oip = OipServicer(
            self.repository,
            self.sessions,
            self.metrics,
            settings.max_stream_inflight,
            self.servicer.open_rate,
            self.durable,
        )
        self.health = HealthService()
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._metrics_http: tuple[WSGIServer, threading.Thread] | None = None
        #: The Open Inference Protocol's REST face, when settings.oip_http_port turns it on.
        self.oip_http: OipHttp | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()

    @property
    def metrics_port(self) -> int:
        """Port of the ``/metrics`` endpoint (0 before start or when it is off)."""
        return self._metrics_http[0].server_port if self._metrics_http else 0

    async def start(self) -> int:
        """Load the models, bind, start serving; returns the bound gRPC port.

        Raises ServerStartError when an address is in use or cannot be bound (checked before
        any model loads), NoModelError when the repository serves nothing and ``allow_empty``
        is off.
        """
        s = self.settings
        empty_hint = "; pass the right folder with --models, or --allow-empty to start with none"
        missing = self.repository.why_no_models()
        if missing and not s.allow_empty:
            raise NoModelError(missing + empty_hint)
        busy = "address already in use (another rnnserve?); pick another with"
        if _in_use(s.host, s.port):
            raise ServerStartError(
                f"cannot listen on {_hostport(s.host, s.port)}: {busy} --port N "
                "(0 for any free port)"
            )
        if _in_use(s.metrics_host, s.metrics_port):
            raise ServerStartError(
                f"cannot serve metrics on {_hostport(s.metrics_host, s.metrics_port)}: {busy} "
                "--metrics-port N (0 for any free port, -1 for none)"
            )
        await self.repository.scan()
        if not self.repository.all():
            if not s.allow_empty:
                reason = self.repository.why_no_models(scanned=True) or "no servable model"
                raise NoModelError(reason + empty_hint)
            log.warning("no servable model in %s; serving none until one appears", s.models)
        try:
            credentials = server_credentials(s)
            tokens = load_tokens(s)
            self.servicer.snapshot_key = load_snapshot_key(s)
        except SecurityConfigError as exc:
            raise ServerStartError(str(exc)) from None
        if s.oip_http_port >= 0 and (tokens or credentials is not None):
            raise ServerStartError(
                "oip_http_port: the Open Inference Protocol's REST face checks no tokens and has "
                "no TLS, so it cannot serve beside a gRPC port that has them; leave it off (-1)"
            )
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if tokens:
            interceptors.append(TokenAuth(tokens, self.metrics))
        if s.principal_max_streams:  # after TokenAuth: it counts by principal
            interceptors.append(StreamLimit(s.principal_max_streams, f"/{SERVICE_NAME}/Stream"))
            # The Open Inference Protocol's streams count apart, against the same limit.
            interceptors.append(StreamLimit(s.principal_max_streams, OIP_STREAM_METHOD))
        limit = s.max_message_bytes
        server = grpc.aio.server(
            interceptors=interceptors or None,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
                *connection_options(s),
            ],
        )
        add_to_server(self.servicer, server)
        add_oip_to_server(self.oip, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        address = _hostport(s.host, s.port)
        try:
            if credentials is None:
                self.port = server.add_insecure_port(address)
            else:
                self.port = server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise ServerStartError(f"cannot listen on {address}: {exc}") from None
        if self.port == 0:
            raise ServerStartError(f"cannot listen on {address} (address in use?)")
        if s.metrics_port >= 0:
            try:
                self._metrics_http = _serve_metrics(s.metrics_host, s.metrics_port, self.registry)
            except OSError as exc:
                raise ServerStartError(
                    f"cannot serve metrics on {_hostport(s.metrics_host, s.metrics_port)}: "
                    f"{exc.strerror}"
                ) from None
        if s.oip_http_port >= 0:
            self.oip_http = self._serve_oip_http()
        await server.start()
        self._server = server
        for warning in exposure_warnings(s, bool(tokens), credentials is not None):
            log.warning("%s", warning)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.durable is not None:
            self.durable.start(self.sessions)
            await self.durable.ping()  # logs and shows in rnnserve_store_up when it fails
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._expire_sessions()))
        if s.reload_interval_s > 0:
            self._tasks.append(loop.create_task(self._reload()))
        return self.port

    async def _expire_sessions(self) -> None:
        period = min(1.0, self.settings.session_ttl_s / 4)
        while True:
            await asyncio.sleep(period)
            self.sessions.expire_idle()

    async def _reload(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_interval_s)
            try:
                await self.repository.scan()
            except Exception:  # a broken repository must never stop the server
                log.exception("model repository scan failed")

    async def stop(self, grace: float | None = None) -> None:
        """Shut down: health NOT_SERVING, streams stop reading, in-flight calls get ``grace``
        seconds (default: settings.shutdown_grace_s) to finish, then everything closes."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.settings.shutdown_grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self.durable is not None:
            await self._drain(grace)
        self.servicer.begin_shutdown()
        self.oip.begin_shutdown()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # The metrics endpoint stops in a thread (its poll loop takes up to 50 ms) while the
        # gRPC server drains, so the event loop never waits on it.
        closing_metrics = asyncio.ensure_future(asyncio.to_thread(self._close_metrics))
        if self._server is not None:
            await self._server.stop(grace)
        await closing_metrics
        if self.oip_http is not None:
            await asyncio.to_thread(self.oip_http.stop)
        if self.durable is not None:
            await self.durable.stop()
        for model in self.repository.all():
            model.close()
        log.info("rnnserve stopped")

    async def _drain(self, grace: float) -> None:
        """Hand every session on through the store: refuse new work (clients retry and the
        proxy sends them to a replica that takes their sessions over), let the chunks in flight
        finish, then checkpoint every session with unsaved steps and hand the OIP sequences
        over (their clients cannot replay, so they need the final state; durable.py)."""
        assert self.durable is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.oip.begin_drain()
        try:
            handover = self.oip.table.handed_over()
            await self.durable.checkpoints.announce(handover, grace)
            self.servicer.begin_drain()
            for session in self.sessions.all():
                await session.model.batcher.wait_idle(session)
            left = max(0.0, grace - (loop.time() - started))
            flushed = await self.durable.checkpoints.flush(left, handover)
        finally:
            self.oip.end_drain()
        if flushed:
            log.info("drained: every session is checkpointed")
        else:
            log.warning("drain: not every session was checkpointed within %.1f s", grace)

    def _serve_oip_http(self) -> OipHttp:
        """The REST face on settings.oip_http_port; ServerStartError when it cannot bind."""
        s = self.settings
        loop = asyncio.get_running_loop()
        try:
            return OipHttp(self.oip, loop, s.host, s.oip_http_port, s.max_message_bytes)
        except OSError as exc:
            where = _hostport(s.host, s.oip_http_port)
            raise ServerStartError(
                f"cannot serve the Open Inference Protocol's REST face on {where}: "
                f"{exc.strerror}; pick another port with --oip-http-port N (0: any free one)"
            ) from None

    def _close_metrics(self) -> None:
        if self._metrics_http is not None:
            httpd, thread = self._metrics_http
            httpd.shutdown()
            httpd.server_close()
            thread.join(5)
            self._metrics_http = None
