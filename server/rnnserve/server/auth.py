"""Who is calling: TLS on the gRPC port, bearer tokens mapped to principals, and the principal
of the call being served.

- ``server_credentials(settings)``: TLS (``tls_cert`` + ``tls_key``) or mutual TLS (also
  ``tls_client_ca``) credentials for the gRPC port, or None for plaintext.
- ``load_tokens(settings)``: the configured bearer tokens, token -> principal, from
  ``auth_tokens_file`` and ``auth_tokens`` (usually the environment).
- ``TokenAuth``: a server interceptor that refuses a call without a known token with
  UNAUTHENTICATED and makes the token's principal the call's principal. Health checks
  (``grpc.health.v1.Health``) need no token, so load balancers and Kubernetes probes work.
- ``current_principal()``: the principal of the call being served; "" (anonymous) when tokens
  are off.

The principal travels in a ``contextvars.ContextVar``: grpc.aio runs a call's interceptors and
its handler in one asyncio task, so the value the interceptor sets is the one the handler (and
any task it starts) reads, and concurrent calls do not see each other's (tested in
tests/integration/test_security_auth.py).
"""

from __future__ import annotations

import contextvars
import hashlib
import ipaddress
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from rnnserve.server.metrics import Metrics, protocol_of
from rnnserve.server.settings import Settings

#: The principal of the call being served ("" = anonymous).
_PRINCIPAL: contextvars.ContextVar[str] = contextvars.ContextVar("rnnserve_principal", default="")

#: Methods that need no token: the health service, so probes work without a secret.
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
#: A principal's name: printable, no separators, short enough for logs and metrics.
PRINCIPAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
#: Fewer characters than this cannot hold enough randomness to be a bearer secret.
MIN_TOKEN_CHARS = 16


class SecurityConfigError(ValueError):
    """A TLS file or a token list cannot be used; the message says which and why."""


def current_principal() -> str:
    """The principal of the call being served: the name its token maps to, "" when the server
    runs without tokens."""
    return _PRINCIPAL.get()


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost: assume it is reachable


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    if not data.strip():
        raise SecurityConfigError(f"{what} {path} is empty")
    return data


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port from the settings, or None for plaintext."""
    cert, key, ca = settings.tls_cert, settings.tls_key, settings.tls_client_ca
    if cert is None and key is None:
        if ca is not None:
            raise SecurityConfigError("tls_client_ca needs tls_cert and tls_key (mutual TLS)")
        return None
    if cert is None or key is None:
        raise SecurityConfigError("TLS needs both tls_cert and tls_key")
    pair = (_read(key, "TLS key"), _read(cert, "TLS certificate"))
    if b"PRIVATE KEY" not in pair[0] or b"CERTIFICATE" not in pair[1]:
        raise SecurityConfigError(
            f"tls_key {key} and tls_cert {cert} must be PEM files (a private key and a "
            "certificate chain)"
        )
    if ca is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair], root_certificates=_read(ca, "TLS client CA"), require_client_auth=True
    )


def _add(tokens: dict[bytes, str], entry: str, where: str) -> None:
    """Add one ``principal:token`` entry to ``tokens``; ``where`` names it in errors."""
    principal, sep, token = entry.partition(":")
    principal, token = principal.strip(), token.strip()
    if not sep or not PRINCIPAL.fullmatch(principal):
        raise SecurityConfigError(
            f"{where}: expected principal:token with a principal of letters, digits and _.@- "
            "(at most 64 characters)"
        )
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise SecurityConfigError(
            f"{where}: the token of {principal!r} must be at least {MIN_TOKEN_CHARS} "
            "characters without spaces (generate one: openssl rand -hex 32)"
        )
    key = _digest(token)
    if tokens.get(key, principal) != principal:
        raise SecurityConfigError(f"{where}: this token is already given to another principal")
    tokens[key] = principal


def _digest(token: str) -> bytes:
    # Tokens are looked up by their SHA-256, so a lookup's timing says nothing about a
    # secret's characters and the table holds no secret in the clear.
    return hashlib.sha256(token.encode()).digest()


def load_tokens(settings: Settings) -> dict[bytes, str]:
    """SHA-256 of each configured token -> its principal; empty when tokens are off."""
    tokens: dict[bytes, str] = {}
    path = settings.auth_tokens_file
    if path is not None:
        text = _read(path, "token file").decode("utf-8", "replace")
        for number, line in enumerate(text.splitlines(), 1):
            entry = line.split("#", 1)[0].strip()  # a comment may follow an entry
            if entry:
                _add(tokens, entry, f"token file {path} line {number}")
    for number, entry in enumerate(settings.auth_tokens.split(","), 1):
        if entry.strip():
            _add(tokens, entry, f"auth_tokens entry {number}")
    return tokens


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _deny_handler(
    handler: grpc.RpcMethodHandler[Any, Any], message: str
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of ``handler``'s kind that ends the call with UNAUTHENTICATED, reading no
    request (request bytes are not even decoded)."""

    async def deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # an async generator, as a response-streaming handler must be

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream)
    return grpc.unary_unary_rpc_method_handler(deny)


if TYPE_CHECKING:
    Continuation = Callable[
        [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
    ]


class TokenAuth(grpc.aio.ServerInterceptor):
    """Every call but a health check must carry ``authorization: Bearer <token>`` with a
    configured token; the token's principal becomes the call's principal."""

    def __init__(self, tokens: dict[bytes, str], metrics: Metrics) -> None:
        self.tokens = dict(tokens)
        self.metrics = metrics

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            _PRINCIPAL.set("")
            return await continuation(handler_call_details)
        token = _bearer(handler_call_details.invocation_metadata)
        principal = self.tokens.get(_digest(token)) if token else None
        handler = await continuation(handler_call_details)
        if principal is not None or handler is None:  # unknown method: UNIMPLEMENTED as usual
            _PRINCIPAL.set(principal or "")
            return handler
        started = time.perf_counter()
        if token is None:
            message = (
                "this server needs a bearer token: send metadata 'authorization: Bearer "
                "<token>' (ClientOptions.with_token in the SDK)"
            )
        else:
            message = "the bearer token is not valid here; ask the operator for a valid one"
        self.metrics.observe_request(
            method.rsplit("/", 1)[-1],
            "UNAUTHENTICATED",
            time.perf_counter() - started,
            protocol_of(method),
        )
        return _deny_handler(handler, message)


def connection_options(settings: Settings) -> list[tuple[str, int]]:
    """gRPC server arguments that bound what an idle or silent connection may hold."""
    options = [("grpc.server_handshake_timeout_ms", int(settings.handshake_timeout_s * 1000))]
    if settings.max_connection_idle_s > 0:
        options.append(("grpc.max_connection_idle_ms", int(settings.max_connection_idle_s * 1000)))
    return options


def exposure_warnings(settings: Settings, tokens: bool, tls: bool) -> list[str]:
    """What an operator must hear at start about who can reach this server."""
    where = f"{settings.host}:{settings.port}"
    warnings = []
    if not is_loopback(settings.host):
        if not tokens:
            warnings.append(
                f"SECURITY: the gRPC port listens beyond loopback ({where}) WITHOUT "
                "authentication: anyone who can reach it can open, read, change and close "
                "sessions. Set auth_tokens_file (or RNNSERVE_AUTH_TOKENS) and TLS "
                "(docs/security.md), or listen on 127.0.0.1 behind a proxy that authenticates."
            )
        elif not tls:
            warnings.append(
                f"SECURITY: bearer tokens travel in clear text on {where}: set tls_cert and "
                "tls_key, or terminate TLS in front of the server on a private network"
            )
        if not settings.snapshot_key_file:
            warnings.append(
                "SECURITY: snapshots are not signed (no snapshot_key_file): PutState takes any "
                "well-formed state a client sends"
            )
    if settings.metrics_port >= 0 and not is_loopback(settings.metrics_host):
        warnings.append(
            f"SECURITY: the metrics endpoint on {settings.metrics_host} is plain HTTP without "
            "authentication, separate from the gRPC port's TLS and tokens; expose it to the "
            "monitoring network only"
        )
    return warnings


#: Fewer bytes than this are too easy to guess for a MAC key.
MIN_SNAPSHOT_KEY_BYTES = 32


def load_snapshot_key(settings: Settings) -> bytes:
    """The deployment's snapshot key from ``snapshot_key_file`` (surrounding whitespace is
    not part of it); empty when unset."""
    path = settings.snapshot_key_file
    if path is None:
        return b""
    key = _read(path, "snapshot key file").strip()
    if len(key) < MIN_SNAPSHOT_KEY_BYTES:
        raise SecurityConfigError(
            f"snapshot key file {path} holds {len(key)} bytes; it needs at least "
            f"{MIN_SNAPSHOT_KEY_BYTES} (generate one: openssl rand -hex 32)"
        )
    return key
