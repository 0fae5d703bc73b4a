"""The server's one settings object: defaults < config file < environment < command line.

Environment variables carry the prefix ``RNNSERVE_`` (``RNNSERVE_PORT=50052``); a config file
is TOML or JSON with the same field names (``--config``/``RNNSERVE_CONFIG``); the ``serve``
sub-command's flags override both. Parse once in ``main``, then pass the object down.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

NanPolicy = Literal["reject", "pass"]
LoopKind = Literal["auto", "asyncio", "uvloop"]


class SettingsError(ValueError):
    """A config file or a setting cannot be used; the message says which and why."""


class Settings(BaseSettings):
    """Everything the server can be told. Units are in each field's name or docstring."""

    model_config = SettingsConfigDict(
        env_prefix="RNNSERVE_", extra="forbid", frozen=True, use_attribute_docstrings=True
    )

    host: str = "127.0.0.1"
    """Address the gRPC server binds to; ``0.0.0.0`` to listen on every interface."""
    port: int = Field(default=50051, ge=0, le=65535)
    """gRPC port; 0 picks a free one (the bound port is logged and returned by start())."""
    metrics_host: str = "127.0.0.1"
    """Address of the Prometheus ``/metrics`` HTTP endpoint."""
    metrics_port: int = Field(default=9464, ge=-1, le=65535)
    """Port of the ``/metrics`` endpoint; 0 picks a free one, -1 turns the endpoint off."""
    models: Path = Path("models")
    """The model repository: ``<models>/<name>/<version>/{model.onnx,manifest.json}``."""
    allow_empty: bool = False
    """Start even when the model repository is missing or holds no servable model (one that
    will be filled later: new versions are picked up every ``reload_interval_s``). Off, the
    server refuses to start then (exit status 2), since it is usually a wrong ``models`` path."""
    providers: str = "auto"
    """ONNX Runtime execution providers, comma-separated in order of preference, for example
    ``CUDAExecutionProvider,CPUExecutionProvider``; ``auto`` takes CUDA first when
    onnxruntime-gpu offers it and a CUDA device is really present, the CPU otherwise."""
    intra_op_threads: int = Field(default=1, ge=0)
    """ONNX Runtime intra-op threads per model (0 = one per core). One is fastest for small
    recurrent models; more adds millisecond tail latency."""
    session_ttl_s: float = Field(default=600.0, gt=0)
    """Seconds a session may stay idle before it expires (every call on it restarts the clock)."""
    max_sessions: int = Field(default=100_000, ge=1)
    """Session capacity over all models; opening one more evicts the least recently used."""
    park_after_s: float = Field(default=30.0, ge=0)
    """Seconds idle after which a session is parked: kept as a row of columns (about 220 bytes
    besides its state) instead of a record (about 380), and made a record again by its next
    call. 0 turns parking off, and so does a value of session_ttl_s or more (sessions expire
    first); with a session store nothing is parked."""
    max_chunk_length: int = Field(default=4096, ge=1)
    """The most steps one chunk (one request) may carry."""
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """Largest gRPC message accepted or sent, in bytes; larger ones get RESOURCE_EXHAUSTED."""
    nan_policy: NanPolicy = "reject"
    """What to do with NaN or Inf in a chunk's inputs: ``reject`` (INVALID_ARGUMENT) or
    ``pass`` (run them; the outputs and state may turn NaN for that session only)."""
    reload_interval_s: float = Field(default=5.0, ge=0)
    """Seconds between scans of the model repository for new versions; 0 turns reload off."""
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    """Seconds in-flight calls get to finish on SIGTERM/SIGINT before they are cancelled."""
    max_batch_size: int = Field(default=256, ge=1)
    """The most sessions one engine run may carry (one chunk per session)."""
    max_stream_inflight: int = Field(default=1024, ge=1)
    """The most chunks one Stream call may have received but not yet sent back. Past it the
    server stops reading that stream until replies go out, so HTTP/2 flow control holds the
    client back: a client that pipelines without reading cannot grow the server's memory. (A
    stream that names one session is read one chunk at a time anyway; this bounds streams
    that carry several.)"""
    max_frame_sessions: int = Field(default=4096, ge=1)
    """The most entries (sessions' chunks) one Stream frame may carry; a larger frame is refused
    with INVALID_ARGUMENT. (max_message_bytes bounds a frame's size too.)"""
    inline_max_steps: int = Field(default=256, ge=0)
    """Engine runs of at most this many steps (sessions x chunk length) run on the event loop
    itself; larger ones go to the model's worker thread. Handing a run to a thread and back
    costs more CPU than a small run (measured on 2 vCPUs, one run each: 256 one-step sessions
    got 0.79x the echo floor's steps/s with 64 here, 0.91x with 1024); a run of 256 char-gru
    steps holds the loop for about a millisecond. 0 sends every run to the worker thread."""
    self_check: bool = True
    """Run each model's stored golden sequence at load and refuse a model that disagrees."""
    self_check_tolerance: float = Field(default=1e-4, gt=0)
    """Largest absolute difference from the golden outputs the self-check accepts."""
    loop: LoopKind = "auto"
    """Event loop of ``rnnserve serve``: ``uvloop`` (faster per message; fails to start when
    uvloop is not installed), ``asyncio`` (the standard library's loop) or ``auto`` (uvloop when
    installed, asyncio otherwise)."""
    gc_threshold: int = Field(default=10_000, ge=0)
    """``rnnserve serve`` only: Python's garbage collector collects its youngest generation
    once this many more objects have been allocated than freed (Python's default: 700). With
    256 sessions in flight, each message's objects outlive 700 allocations: the default
    collected about 40 times a second, 0.5 s of every 9 s measured here, and 10,000 a few
    times in 9 s. Cyclic garbage is still collected. 0 keeps Python's defaults."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Logging level of the server's own loggers."""
    store_url: str = ""
    """The durable session store: ``redis://host:port/db`` (``rediss://`` for TLS), or empty
    (the default) to keep sessions in memory only. With a store, sessions are checkpointed to
    it and survive the replica: a replica that gets a call for a session it does not hold loads
    the session's last checkpoint (see docs/deployment.md)."""
    checkpoint_every: int = Field(default=16, ge=1)
    """With a store: a session is checkpointed once this many steps are applied since its last
    checkpoint (and when it is evicted or the server drains). Fewer means less replay after a
    lost replica and more store writes; clients keep 2x this many steps to replay."""
    replica_name: str = Field(default_factory=socket.gethostname, min_length=1)
    """This replica's name in the store (who owns a session) and in its logs; the host name by
    default. Replicas of one deployment need distinct names."""
    tls_cert: Path | None = None
    """PEM certificate chain the gRPC port presents. With ``tls_key`` it turns TLS on: the port
    then takes TLS connections only (docs/security.md)."""
    tls_key: Path | None = None
    """PEM private key of ``tls_cert``."""
    tls_client_ca: Path | None = None
    """PEM CA certificates for mutual TLS: when set, a client must present a certificate
    signed by one of them or its connection is refused."""
    auth_tokens_file: Path | None = None
    """File of bearer tokens, one ``principal:token`` per line (``#`` starts a comment; a
    token is at least 16 characters). When any token is configured (here or in
    ``auth_tokens``), every call but a health check must send ``authorization: Bearer
    <token>`` and gets UNAUTHENTICATED otherwise; a session belongs to the principal that
    opened it. No token configured: every client is the same anonymous principal."""
    auth_tokens: str = ""
    """Bearer tokens as comma-separated ``principal:token`` pairs, added to those of
    ``auth_tokens_file``; meant for the environment (``RNNSERVE_AUTH_TOKENS``), since a flag's
    value shows in the process list."""
    snapshot_key_file: Path | None = None
    """File holding this deployment's snapshot key (at least 32 bytes, the same on every
    replica). GetState signs each snapshot with HMAC-SHA256 under it and PutState refuses a
    snapshot whose signature is missing or wrong, so a snapshot cannot be forged or altered.
    Unset: snapshots are not signed and PutState takes any well-formed one."""
    principal_max_sessions: int = Field(default=0, ge=0)
    """The most sessions one principal may have open at once (forks and restores count); one
    more gets RESOURCE_EXHAUSTED. 0: no limit but ``max_sessions``."""
    principal_open_rate: float = Field(default=0.0, ge=0)
    """Sessions one principal may open, fork or restore per second, with bursts of up to this
    many; faster gets RESOURCE_EXHAUSTED. 0: no limit."""
    principal_max_streams: int = Field(default=0, ge=0)
    """The most Stream calls one principal may have open at once; one more gets
    RESOURCE_EXHAUSTED. 0: no limit."""
    max_connection_idle_s: float = Field(default=300.0, ge=0)
    """Seconds a client connection may stay without a call before the server closes it
    (HTTP/2 GOAWAY; the SDK reconnects on its next call). An open Stream is a call. 0: never."""
    handshake_timeout_s: float = Field(default=10.0, gt=0)
    """Seconds a new connection has to finish its TLS and HTTP/2 handshake before the server
    drops it, so connections that never speak do not pile up."""
    oip_http_port: int = Field(default=-1, ge=-1, le=65535)
    """Port of the Open Inference Protocol's REST/JSON face on ``host`` (KServe v2 over HTTP,
    for curl users: POST /v2/models/NAME/infer; docs/oip.md); -1 (the default) turns it off, 0
    picks a free one. Plain HTTP without tokens: the server refuses to start it when the gRPC
    port has TLS or tokens. The gRPC port serves the protocol either way."""

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    def provider_list(self) -> list[str] | None:
        """The providers as a list, or None for ``auto``."""
        if self.providers.strip().lower() == "auto":
            return None
        return [p.strip() for p in self.providers.split(",") if p.strip()]


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a TOML (``.toml``) or JSON file of settings; SettingsError says what is wrong."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from None
    import tomllib  # Python 3.11+; the server needs a TOML file only when one is given

    try:
        data = tomllib.loads(text.decode()) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise SettingsError(f"config file {path} is not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path} must hold a table of settings")
    return data


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings: defaults, then the file, then ``RNNSERVE_*`` variables, then overrides.

    ``overrides`` are the command-line flags that were given (None values are ignored).
    Raises SettingsError naming the setting that is invalid.
    """
    from pydantic import ValidationError

    file_values = read_config_file(config_file) if config_file is not None else {}
    unknown = sorted(set(file_values) - set(Settings.model_fields))
    if unknown:
        raise SettingsError(f"config file {config_file}: unknown settings {', '.join(unknown)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        # Environment beats the file: read the environment alone first, then let it win.
        from_env = Settings().model_dump(exclude_unset=True)
        merged = {**file_values, **from_env, **given}
        return Settings.model_validate(merged) if merged else Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        raise SettingsError(f"setting {where}: {first['msg']}") from None
