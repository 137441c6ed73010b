"""Kafka over TLS as the services connect: the brokers' CA, and a client certificate for brokers
that authenticate clients by TLS (mTLS, e.g. Strimzi's `tls` listeners).

No Kafka here speaks TLS (tansu is plaintext), so a TLS listener that requires a client
certificate stands in for the broker: it records the certificate each connection presents, which
is what a broker's mTLS authentication reads. The producer is the one the outbox relay uses.
"""

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka.errors import KafkaConnectionError
from crm_platform.config import KafkaSettings
from crm_platform.kafka import client_options, create_producer, stop_quietly
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_key: Path


def _key_file(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A cluster CA that signs the broker's and the CRM's certificates (as Strimzi's operators do)."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("kafka-cluster-ca", ca_key, None, ca_key)
    files = {}
    for role in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate("crm" if role == "client" else "kafka-broker", key, ca, ca_key)
        (folder / f"{role}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[role] = (folder / f"{role}.crt", _key_file(folder / f"{role}.key", key))
    (folder / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    other_key = _key_file(folder / "other.key", ec.generate_private_key(ec.SECP256R1()))
    return Pki(folder / "ca.crt", *files["server"], *files["client"], other_key)


@pytest.fixture
async def mtls_listener(pki: Pki) -> AsyncIterator[tuple[str, list[str]]]:
    """(bootstrap address, common names of the client certificates presented)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    context.verify_mode = ssl.CERT_REQUIRED
    presented: list[str] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        certificate = writer.get_extra_info("peercert") or {}
        presented.extend(value for rdn in certificate.get("subject", ()) for key, value in rdn if key == "commonName")
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"127.0.0.1:{port}", presented


async def _connect(settings: KafkaSettings) -> None:
    producer = create_producer(settings, client_id="crm-test")
    try:
        with pytest.raises(KafkaConnectionError):  # the stand-in speaks TLS, not Kafka
            await producer.start()
    finally:
        await stop_quietly(producer)


async def test_the_producer_presents_the_client_certificate_to_a_broker_that_requires_one(
    pki: Pki, mtls_listener: tuple[str, list[str]]
) -> None:
    bootstrap, presented = mtls_listener
    settings = KafkaSettings(
        bootstrap_servers=bootstrap,
        security_protocol="SSL",
        ssl_cafile=str(pki.ca),
        ssl_certfile=str(pki.client_cert),
        ssl_keyfile=str(pki.client_key),
        send_timeout_seconds=2.0,
    )
    await _connect(settings)
    assert presented and set(presented) == {"crm"}


async def test_without_a_client_certificate_the_broker_sees_none(
    pki: Pki, mtls_listener: tuple[str, list[str]]
) -> None:
    bootstrap, presented = mtls_listener
    settings = KafkaSettings(
        bootstrap_servers=bootstrap, security_protocol="SSL", ssl_cafile=str(pki.ca), send_timeout_seconds=2.0
    )
    await _connect(settings)
    assert presented == []


def test_a_key_that_is_not_the_certificates_stops_the_service_naming_the_files(pki: Pki) -> None:
    settings = KafkaSettings(security_protocol="SSL", ssl_certfile=str(pki.client_cert), ssl_keyfile=str(pki.other_key))
    with pytest.raises(RuntimeError, match="Kafka TLS files cannot be used") as caught:
        client_options(settings)
    assert str(pki.other_key) in str(caught.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"security_protocol": "SSL", "ssl_certfile": "/c.crt"}, "go together"),
        ({"security_protocol": "SSL", "ssl_keyfile": "/c.key"}, "go together"),
        ({"ssl_certfile": "/c.crt", "ssl_keyfile": "/c.key"}, "needs security_protocol SSL or SASL_SSL"),
    ],
)
def test_a_half_or_misplaced_client_certificate_is_a_settings_error(values: dict[str, str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        KafkaSettings(**values)  # type: ignore[arg-type]
