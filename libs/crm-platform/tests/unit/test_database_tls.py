"""TLS to PostgreSQL as the services connect, checked on the TLS context asyncpg builds (no server):
the engine's connections (SQLAlchemy passes the URL's query to `asyncpg.connect` as keywords) and
the outbox relay's LISTEN connection (a DSN from `listen_dsn`) verify the server against the CA
that PGSSLROOTCERT names, which the chart's `database.tls` mounts and sets.

asyncpg has no `sslrootcert` keyword: on the engine's path the CA comes only from PGSSLROOTCERT
(or ~/.postgresql/root.crt), which is why the chart sets the variable and not a URL parameter.
tests/integration/test_postgres_tls.py connects to a real TLS server.
"""

import datetime
import inspect
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from asyncpg import connect_utils
from crm_platform.db import create_engine
from crm_platform.outbox import listen_dsn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

pytestmark = pytest.mark.unit

SERVER = "postgresql://crm:secret@pg.internal.example.com:5432/crm"
# What asyncpg reads from the environment about TLS, as libpq does.
TLS_VARIABLES = ("PGSSLMODE", "PGSSLROOTCERT", "PGSSLCRL", "PGSSLCERT", "PGSSLKEY")

TlsOf = Callable[[str], Awaitable[ssl.SSLContext | None]]


@dataclass(frozen=True)
class Ca:
    path: Path
    name: str

    @property
    def subject(self) -> Any:
        """As `ssl` shows a certificate's subject."""
        return ((("commonName", self.name),),)


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No TLS setting from the machine: none of the PGSSL* variables, no ~/.postgresql/root.crt."""
    for name in TLS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return monkeypatch


@pytest.fixture
def ca(tmp_path: Path) -> Ca:
    """A self-signed CA, as the operator's PostgreSQL certificates would chain to."""
    name = "crm-test-postgres-ca"
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "ca.crt"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return Ca(path, name)


def asyncpg_tls(dsn: str | None = None, **keywords: Any) -> ssl.SSLContext | None:
    """The TLS context `asyncpg.connect(dsn, **keywords)` would open its connection with (None:
    no TLS), from asyncpg's own parsing of its arguments and the environment."""
    inspect.signature(asyncpg.connect).bind(dsn, **keywords)  # a TypeError where asyncpg.connect refuses them
    parse = connect_utils._parse_connect_dsn_and_args
    names = inspect.signature(parse).parameters
    arguments: dict[str, Any] = dict.fromkeys(names) | {k: v for k, v in keywords.items() if k in names}
    _, params = parse(**(arguments | {"dsn": dsn}))
    context = params.ssl
    return context if isinstance(context, ssl.SSLContext) else None


async def engine_tls(url: str) -> ssl.SSLContext | None:
    """What `create_engine(url)` hands asyncpg.connect for a pool connection, caught before any I/O."""

    class Caught(Exception):
        pass

    passed: dict[str, Any] = {}

    async def connect(*args: Any, **keywords: Any) -> None:
        assert not args, "SQLAlchemy passes keywords only"
        passed.update(keywords)
        raise Caught

    engine = create_engine(url)
    try:
        with pytest.MonkeyPatch.context() as patch, pytest.raises(Caught):
            patch.setattr(asyncpg, "connect", connect)
            async with engine.connect():
                pass
    finally:
        await engine.dispose()
    return asyncpg_tls(**passed)


async def listen_tls(url: str) -> ssl.SSLContext | None:
    """What the outbox relay hands asyncpg.connect for its LISTEN connection."""
    engine = create_engine(url)
    try:
        return asyncpg_tls(listen_dsn(engine.url))
    finally:
        await engine.dispose()


@pytest.fixture(params=["engine", "LISTEN connection"])
def tls_of(request: pytest.FixtureRequest, environment: pytest.MonkeyPatch) -> TlsOf:
    return engine_tls if request.param == "engine" else listen_tls


def trusted_cas(context: ssl.SSLContext) -> list[Any]:
    """The subjects of the certificates `context` accepts as CAs."""
    return [cert["subject"] for cert in context.get_ca_certs()]


async def test_verify_full_checks_the_server_certificate_and_host_name_against_the_ca_pgsslrootcert_names(
    tls_of: TlsOf, environment: pytest.MonkeyPatch, ca: Ca
) -> None:
    environment.setenv("PGSSLROOTCERT", str(ca.path))
    context = await tls_of(f"{SERVER}?ssl=verify-full")
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert trusted_cas(context) == [ca.subject]


async def test_a_url_without_ssl_verifies_fully_under_the_charts_pgsslmode(
    tls_of: TlsOf, environment: pytest.MonkeyPatch, ca: Ca
) -> None:
    environment.setenv("PGSSLROOTCERT", str(ca.path))
    environment.setenv("PGSSLMODE", "verify-full")
    context = await tls_of(SERVER)
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert trusted_cas(context) == [ca.subject]


async def test_ssl_require_in_the_url_wins_and_with_the_ca_checks_the_chain_but_not_the_host_name(
    tls_of: TlsOf, environment: pytest.MonkeyPatch, ca: Ca
) -> None:
    environment.setenv("PGSSLROOTCERT", str(ca.path))
    environment.setenv("PGSSLMODE", "verify-full")
    context = await tls_of(f"{SERVER}?ssl=require")
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is False
    assert trusted_cas(context) == [ca.subject]


async def test_ssl_require_without_a_ca_encrypts_but_checks_no_certificate(tls_of: TlsOf) -> None:
    context = await tls_of(f"{SERVER}?ssl=require")
    assert context is not None
    assert context.verify_mode == ssl.CERT_NONE


async def test_verify_full_without_a_ca_refuses_to_connect_rather_than_trust_any_server(tls_of: TlsOf) -> None:
    with pytest.raises(asyncpg.ClientConfigurationError, match="root certificate file"):
        await tls_of(f"{SERVER}?ssl=verify-full")
