"""``rnnserve probe``: ask a server's gRPC health service whether it is SERVING.

Exit 0 when it is; 1 when it is not (NOT_SERVING while shutting down, unreachable, no answer
within the timeout), with one line on stderr saying why; 2 for bad settings. The container
image's HEALTHCHECK runs it, so the image needs no downloaded ``grpc_health_probe`` binary.

With no ``--server`` it checks the server of this environment's settings (the same
``RNNSERVE_*`` variables and ``RNNSERVE_CONFIG`` file ``rnnserve serve`` reads) on
127.0.0.1, over TLS when those settings turn TLS on.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

#: The service whose status the replicas report; "" would be the whole server.
DEFAULT_SERVICE = "rnnserve.v1.InferenceService"


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the probe's flags."""
    parser.add_argument(
        "--server",
        help="HOST:PORT to check (default: 127.0.0.1 and the port of this environment's "
        "settings, RNNSERVE_PORT or 50051)",
    )
    parser.add_argument(
        "--service",
        default=DEFAULT_SERVICE,
        help=f'health service name to check; "" for the whole server (default: {DEFAULT_SERVICE})',
    )
    parser.add_argument(
        "--timeout", type=float, default=3.0, help="seconds to wait for the answer (default: 3)"
    )
    parser.add_argument(
        "--tls-ca",
        type=Path,
        help="PEM file of the CA that signed the server's certificate: connect with TLS "
        "(default: the settings' tls_cert when they turn TLS on)",
    )
    parser.add_argument(
        "--tls-server-name",
        help="name to verify the server's certificate against, when it differs from HOST",
    )
    parser.add_argument(
        "--tls-client-cert",
        type=Path,
        help="PEM client certificate for a server that requires mutual TLS (with --tls-client-key)",
    )
    parser.add_argument("--tls-client-key", type=Path, help="PEM private key of --tls-client-cert")


def _default_target(args: argparse.Namespace) -> tuple[str, Path | None]:
    """The address and CA file from this environment's server settings."""
    from rnnserve.server.settings import load_settings

    config = os.environ.get("RNNSERVE_CONFIG")
    settings = load_settings(Path(config) if config else None)
    if settings.port == 0:
        raise ValueError("the settings' port is 0 (any free port): give --server HOST:PORT")
    tls = settings.tls_cert if settings.tls_cert and settings.tls_key else None
    return f"127.0.0.1:{settings.port}", tls


def check(
    target: str,
    service: str = DEFAULT_SERVICE,
    timeout: float = 3.0,
    tls_ca: bytes | None = None,
    tls_server_name: str | None = None,
    client_pair: tuple[bytes, bytes] | None = None,
) -> str:
    """The serving status of ``service`` on ``target`` as a name (``SERVING``, ``NOT_SERVING``,
    ...), over TLS when ``tls_ca`` is given (``client_pair``: certificate and key for mutual
    TLS). grpc.RpcError when the call fails."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
    if tls_ca is not None:
        cert, key = client_pair or (None, None)
        creds = grpc.ssl_channel_credentials(tls_ca, private_key=key, certificate_chain=cert)
        channel = grpc.secure_channel(target, creds, options=options)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def run(args: argparse.Namespace) -> int:
    """0 when SERVING, 1 otherwise, 2 for bad settings or flags; one line on stderr unless 0."""
    import grpc
    from rnnserve.server.settings import SettingsError

    ca_file: Path | None = args.tls_ca
    target: str | None = args.server
    if args.timeout <= 0:
        print("rnnserve probe: --timeout must be above 0", file=sys.stderr)
        return 2
    if target is None:
        try:
            target, settings_ca = _default_target(args)
        except (SettingsError, ValueError) as exc:
            print(f"rnnserve probe: {exc}", file=sys.stderr)
            return 2
        ca_file = ca_file or settings_ca
    if (args.tls_client_cert is None) != (args.tls_client_key is None):
        print(
            "rnnserve probe: give --tls-client-cert and --tls-client-key together", file=sys.stderr
        )
        return 2
    if args.tls_client_cert is not None and ca_file is None:
        print("rnnserve probe: a client certificate needs --tls-ca (TLS)", file=sys.stderr)
        return 2
    pair: tuple[bytes, bytes] | None = None
    reading = ca_file
    try:
        ca = ca_file.read_bytes() if ca_file is not None else None
        if args.tls_client_cert is not None:
            reading = args.tls_client_cert
            cert = args.tls_client_cert.read_bytes()
            reading = args.tls_client_key
            pair = (cert, args.tls_client_key.read_bytes())
    except OSError as exc:
        print(f"rnnserve probe: cannot read {reading}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        status = check(target, args.service, args.timeout, ca, args.tls_server_name, pair)
    except grpc.RpcError as exc:
        code = exc.code().name if isinstance(exc, grpc.Call) else "UNKNOWN"
        detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        print(f"rnnserve probe: {target} {args.service!r}: {code}: {detail}", file=sys.stderr)
        return 1
    if status != "SERVING":
        print(f"rnnserve probe: {target} {args.service!r} is {status}", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    """``python -m rnnserve.server.probe``: the same as ``rnnserve probe``."""
    parser = argparse.ArgumentParser(prog="rnnserve probe", description=__doc__.splitlines()[0])
    configure(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
