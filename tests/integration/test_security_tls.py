"""TLS and mutual TLS on the gRPC port, end to end through the SDK (sync and asyncio) and raw
stubs, with certificates generated for each test run: a CA, a server certificate for
127.0.0.1/localhost, client certificates from that CA and from an unrelated one."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rnnserve.client import AsyncClient, Client, ClientOptions, RetryPolicy, ServerUnavailable
from rnnserve.server.app import RnnServer, ServerStartError
from rnnserve.server.settings import Settings
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

from tests.support import raw

NO_RETRY = RetryPolicy(give_up_after_s=0.0)


@dataclass
class Issued:
    """A PEM certificate and its PEM private key."""

    cert: bytes
    key: bytes


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(
    cn: str,
    issuer: Issued | None = None,
    *,
    ca: bool = False,
    server: bool = False,
) -> Issued:
    """A certificate for ``cn`` signed by ``issuer`` (self-signed when None)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    if issuer is None:
        issuer_name, signer = _name(cn), key
    else:
        issuer_cert = x509.load_pem_x509_certificate(issuer.cert)
        issuer_name = issuer_cert.subject
        loaded = serialization.load_pem_private_key(issuer.key, None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        signer = loaded
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    cert = builder.sign(signer, hashes.SHA256())
    return Issued(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


@dataclass
class Pki:
    ca: Issued
    server: Issued
    client: Issued
    rogue_ca: Issued
    rogue_client: Issued
    files: dict[str, Path]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = _issue("rnnserve test CA", ca=True)
    rogue_ca = _issue("someone else's CA", ca=True)
    pki = Pki(
        ca=ca,
        server=_issue("localhost", ca, server=True),
        client=_issue("client-a", ca),
        rogue_ca=rogue_ca,
        rogue_client=_issue("client-b", rogue_ca),
        files={},
    )
    root = tmp_path_factory.mktemp("pki")
    for name, pem in {
        "ca.pem": ca.cert,
        "server.pem": pki.server.cert,
        "server.key": pki.server.key,
    }.items():
        (root / name).write_bytes(pem)
        pki.files[name] = root / name
    return pki


def _tls(pki: Pki, mutual: bool = False) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "tls_cert": pki.files["server.pem"],
        "tls_key": pki.files["server.key"],
    }
    if mutual:
        settings["tls_client_ca"] = pki.files["ca.pem"]
    return settings


def _options(address: str, pki: Pki, client: Issued | None = None, **kw: Any) -> ClientOptions:
    return ClientOptions(
        target=address,
        root_certificates=pki.ca.cert,
        certificate_chain=client.cert if client else None,
        private_key=client.key if client else None,
        retry=NO_RETRY,
        deadline_s=5.0,
        **kw,
    )


def _channel(address: str, pki: Pki, client: Issued | None) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        pki.ca.cert, client.key if client else None, client.cert if client else None
    )
    return grpc.aio.secure_channel(address, creds)


async def test_tls_sdk_and_raw_stub(start_server: Any, pki: Pki) -> None:
    running = await start_server(**_tls(pki))
    async with AsyncClient(_options(running.address, pki)) as client:
        assert {m.name for m in await client.models()} >= {"tiny-gru"}
        async with await client.session("tiny-gru") as s:
            out = await s.step(np.ones((3, 3), np.float32))
            assert out.shape[0] == 3
    async with _channel(running.address, pki, None) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        sid = await raw.open_session(stub, "tiny-gru")
        reply = await raw.step(stub, sid, 0, np.ones((2, 3), np.float32))
        assert reply.next_seq == 2
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_tls_port_refuses_plaintext_and_untrusted_servers(
    start_server: Any, pki: Pki
) -> None:
    running = await start_server(**_tls(pki))
    async with grpc.aio.insecure_channel(running.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.InferenceServiceStub(channel).ListModels(
                pb.ListModelsRequest(), timeout=5
            )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # A client that trusts another CA refuses this server: the server is authenticated too.
    wrong = ClientOptions(
        target=running.address, root_certificates=pki.rogue_ca.cert, retry=NO_RETRY
    )
    async with AsyncClient(wrong) as client:
        with pytest.raises(ServerUnavailable):
            await client.models()


def test_mutual_tls_sync_sdk(server_thread_factory: Any, pki: Pki) -> None:
    running = server_thread_factory(**_tls(pki, mutual=True))
    with (
        Client(_options(running.address, pki, pki.client)) as client,
        client.session("tiny-lstm") as s,
    ):
        assert s.step(np.zeros((4, 3), np.float32)).shape[0] == 4
    for who in (None, pki.rogue_client):  # no certificate, or one from an unknown CA
        with (
            Client(_options(running.address, pki, who)) as client,
            pytest.raises(ServerUnavailable),
        ):
            client.models()


async def test_mutual_tls_raw_stub(start_server: Any, pki: Pki) -> None:
    running = await start_server(**_tls(pki, mutual=True))
    async with _channel(running.address, pki, pki.client) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        sid = await raw.open_session(stub, "tiny-gru")
        replies = await raw.stream_all(
            stub, [raw.stream_step(sid, i, np.ones((1, 3), np.float32), i) for i in range(3)]
        )
        assert [r.step.next_seq for r in replies] == [1, 2, 3]
    for who in (None, pki.rogue_client):
        async with _channel(running.address, pki, who) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.InferenceServiceStub(channel).ListModels(
                    pb.ListModelsRequest(), timeout=5
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"tls_cert": "server.pem"}, "both tls_cert and tls_key"),
        ({"tls_client_ca": "ca.pem"}, "tls_client_ca needs tls_cert and tls_key"),
        ({"tls_cert": "server.pem", "tls_key": "missing.key"}, "cannot read TLS key"),
        ({"tls_cert": "server.key", "tls_key": "server.pem"}, "must be PEM files"),
    ],
)
async def test_bad_tls_settings_stop_the_start(
    model_repo: Path, pki: Pki, given: dict[str, str], message: str
) -> None:
    root = pki.files["ca.pem"].parent
    settings = Settings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        models=model_repo,
        **{k: root / v for k, v in given.items()},
    )
    server = RnnServer(settings)
    with pytest.raises(ServerStartError, match=message):
        await server.start()
    await server.stop(0)
