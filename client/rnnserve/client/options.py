"""Everything about how a client talks to a server, in one typed, immutable object.

``ClientOptions`` is built once and handed to ``Client`` or ``AsyncClient``; nothing in the SDK
reads the environment. Times are in seconds, sizes in bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import grpc


@dataclass(frozen=True)
class RetryPolicy:
    """How the SDK waits and retries when the server cannot be reached.

    Only failures that leave a session's state intact are retried (the connection dropped, the
    server restarted or moved). The wait before attempt ``n`` (n >= 1) is
    ``min(max_backoff_s, initial_backoff_s * multiplier ** (n - 1))``, scaled by a random
    factor in ``[1 - jitter, 1]`` so that many clients do not reconnect in lock step. The SDK
    gives up once ``give_up_after_s`` seconds have passed since the first failure.
    """

    #: Wait before the first retry, seconds.
    initial_backoff_s: float = 0.05
    #: Longest wait between two attempts, seconds.
    max_backoff_s: float = 2.0
    #: Growth of the wait from one attempt to the next.
    multiplier: float = 2.0
    #: Fraction of each wait that is randomised (0: none, 1: anywhere between 0 and the wait).
    jitter: float = 0.2
    #: Total time to keep trying after the first failure, seconds; 0 disables retries.
    give_up_after_s: float = 30.0
    #: Steps of already-answered chunks each session keeps, so that it can bring a server
    #: that restored an older copy of the session back up to date. 0 keeps none.
    replay_steps: int = 256

    def __post_init__(self) -> None:
        if self.initial_backoff_s <= 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("need 0 < initial_backoff_s <= max_backoff_s")
        if self.multiplier < 1:
            raise ValueError("multiplier must be at least 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be between 0 and 1")
        if self.give_up_after_s < 0 or self.replay_steps < 0:
            raise ValueError("give_up_after_s and replay_steps must not be negative")


@dataclass(frozen=True)
class ClientOptions:
    """Where the server is and how to reach it.

    ``target`` is a gRPC target such as ``"127.0.0.1:50051"`` or ``"dns:///rnnserve:50051"``.
    TLS is on when any of ``root_certificates``, ``certificate_chain`` or ``private_key`` is set
    (PEM bytes), or when ``tls`` is true (system roots). ``metadata`` is sent with every call,
    for example ``(("authorization", "Bearer …"),)``.
    """

    target: str
    #: Use TLS even without explicit certificates (the system's root certificates).
    tls: bool = False
    #: PEM root certificates to verify the server with.
    root_certificates: bytes | None = None
    #: PEM certificate chain of the client, for mutual TLS.
    certificate_chain: bytes | None = None
    #: PEM private key of the client, for mutual TLS.
    private_key: bytes | None = None
    #: Host name to verify the server certificate against, when it differs from the target.
    server_name_override: str | None = None
    #: Interval between keepalive pings on an idle connection, seconds; 0 disables them.
    keepalive_s: float = 30.0
    #: How long a keepalive ping may go unanswered before the connection counts as dead, s.
    keepalive_timeout_s: float = 10.0
    #: Largest message the client sends or accepts, bytes.
    max_message_bytes: int = 64 * 1024 * 1024
    #: Deadline of each unary call attempt, seconds; None waits forever.
    deadline_s: float | None = 30.0
    #: Metadata sent with every call: (key, value) pairs, keys in lower case.
    metadata: tuple[tuple[str, str], ...] = ()
    #: How failures to reach the server are retried.
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: Extra raw gRPC channel arguments, appended after the ones derived above.
    channel_args: tuple[tuple[str, str | int], ...] = ()

    def __post_init__(self) -> None:
        if not self.target:
            raise ValueError("target must not be empty, for example '127.0.0.1:50051'")
        if self.deadline_s is not None and self.deadline_s <= 0:
            raise ValueError("deadline_s must be positive or None")
        if self.max_message_bytes < 1024:
            raise ValueError("max_message_bytes must be at least 1024")
        for key, _ in self.metadata:
            if key != key.lower():
                raise ValueError(f"metadata key {key!r} must be lower case")

    def with_token(self, token: str) -> ClientOptions:
        """A copy that sends ``authorization: Bearer <token>`` with every call."""
        return replace(self, metadata=(*self.metadata, ("authorization", f"Bearer {token}")))

    @property
    def uses_tls(self) -> bool:
        """Whether the channel is secure."""
        return self.tls or any(
            v is not None
            for v in (self.root_certificates, self.certificate_chain, self.private_key)
        )

    def credentials(self) -> grpc.ChannelCredentials | None:
        """The channel credentials, or None for a plaintext channel."""
        if not self.uses_tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )

    def channel_options(self) -> Sequence[tuple[str, str | int]]:
        """gRPC channel arguments derived from these options."""
        retry = self.retry
        # gRPC's own reconnect backoff starts at 1 s and grows to 120 s; keep it within the
        # SDK's retry policy so that a reconnect is attempted as soon as the SDK retries.
        backoff_ms = max(1, int(retry.initial_backoff_s * 1000))
        options: list[tuple[str, str | int]] = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", backoff_ms),
            ("grpc.min_reconnect_backoff_ms", backoff_ms),
            ("grpc.max_reconnect_backoff_ms", max(backoff_ms, int(retry.max_backoff_s * 1000))),
            # Retries are the SDK's job: it knows which calls are safe to repeat.
            ("grpc.enable_retries", 0),
        ]
        if self.keepalive_s > 0:
            options += [
                ("grpc.keepalive_time_ms", int(self.keepalive_s * 1000)),
                ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.max_pings_without_data", 0),
            ]
        if self.server_name_override:
            options.append(("grpc.ssl_target_name_override", self.server_name_override))
        options.extend(self.channel_args)
        return options


def as_options(target: str | ClientOptions) -> ClientOptions:
    """Options from a target string (defaults for the rest) or the options themselves."""
    return target if isinstance(target, ClientOptions) else ClientOptions(target=target)
