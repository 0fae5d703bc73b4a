"""``rnnserve probe`` (the image's HEALTHCHECK): exit 0 only while the server is SERVING, one
line on stderr otherwise, 2 for bad settings."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import os
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2
from rnnserve.server import probe

RNNSERVE = str(Path(sys.executable).with_name("rnnserve"))


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RNNSERVE_")}
    return subprocess.run(
        [RNNSERVE, "probe", *args],
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=60,
    )


def _args(server: str | None, service: str = probe.DEFAULT_SERVICE) -> argparse.Namespace:
    return argparse.Namespace(
        server=server,
        service=service,
        timeout=2.0,
        tls_ca=None,
        tls_server_name=None,
        tls_client_cert=None,
        tls_client_key=None,
    )


async def test_serving_exits_0_from_the_flag_and_from_the_settings_port(start_server):
    running = await start_server()
    by_flag, by_env = await asyncio.gather(
        asyncio.to_thread(_cli, "--server", running.address),
        asyncio.to_thread(_cli, RNNSERVE_PORT=str(running.port)),
    )
    assert (by_flag.returncode, by_flag.stderr) == (0, "")
    assert (by_env.returncode, by_env.stderr) == (0, "")


async def test_not_serving_unknown_service_and_nothing_listening_exit_1(start_server, capsys):
    running = await start_server()
    await running.server.health.set(
        probe.DEFAULT_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING
    )
    assert await asyncio.to_thread(probe.run, _args(running.address)) == 1
    assert "is NOT_SERVING" in capsys.readouterr().err
    assert await asyncio.to_thread(probe.run, _args(running.address, "nope")) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    await running.server.stop(0)
    assert await asyncio.to_thread(probe.run, _args(running.address)) == 1
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err and err.count("\n") == 1


def test_bad_settings_and_flags_exit_2_with_one_line():
    bad_port = _cli(RNNSERVE_PORT="fifty")
    assert bad_port.returncode == 2
    assert bad_port.stderr.startswith("rnnserve probe: setting port")
    assert "Traceback" not in bad_port.stderr
    any_port = _cli(RNNSERVE_PORT="0")
    assert any_port.returncode == 2 and "--server" in any_port.stderr
    missing_ca = _cli("--server", "127.0.0.1:1", "--tls-ca", "/nonexistent/ca.pem")
    assert missing_ca.returncode == 2 and "cannot read /nonexistent/ca.pem" in missing_ca.stderr


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed server certificate for 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rnnserve-probe-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "server.pem", tmp_path / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


async def test_a_tls_server_is_probed_over_tls_from_the_settings_or_the_flag(
    start_server, tmp_path
):
    cert, key = _self_signed(tmp_path)
    running = await start_server(tls_cert=cert, tls_key=key)
    from_settings, by_flag, plaintext = await asyncio.gather(
        asyncio.to_thread(
            _cli,
            RNNSERVE_PORT=str(running.port),
            RNNSERVE_TLS_CERT=str(cert),
            RNNSERVE_TLS_KEY=str(key),
        ),
        asyncio.to_thread(_cli, "--server", running.address, "--tls-ca", str(cert)),
        asyncio.to_thread(_cli, "--server", running.address, "--timeout", "2"),
    )
    assert (from_settings.returncode, from_settings.stderr) == (0, "")
    assert (by_flag.returncode, by_flag.stderr) == (0, "")
    assert plaintext.returncode == 1 and plaintext.stderr.count("\n") == 1


async def test_mutual_tls_needs_the_client_certificate(start_server, tmp_path):
    cert, key = _self_signed(tmp_path)  # the server's, the client's and the client CA at once
    running = await start_server(tls_cert=cert, tls_key=key, tls_client_ca=cert)
    tls = ("--server", running.address, "--tls-ca", str(cert))
    with_pair, without = await asyncio.gather(
        asyncio.to_thread(_cli, *tls, "--tls-client-cert", str(cert), "--tls-client-key", str(key)),
        asyncio.to_thread(_cli, *tls, "--timeout", "2"),
    )
    assert (with_pair.returncode, with_pair.stderr) == (0, "")
    assert without.returncode == 1 and without.stderr.count("\n") == 1
    half = _cli(*tls, "--tls-client-cert", str(cert))
    assert half.returncode == 2 and "together" in half.stderr
