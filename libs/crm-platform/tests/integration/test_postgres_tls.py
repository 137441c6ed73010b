"""PostgreSQL over TLS with a CA of the operator's own, as the services connect to it.

A throwaway cluster (initdb, pg_ctl) on a free port accepts only TLS connections, with a server
certificate that a test CA signed (openssl) for 127.0.0.1. The CA is named by PGSSLROOTCERT, as
the chart's `database.tls` does. With `?ssl=verify-full`, the engine (`create_engine`) and the
outbox relay's LISTEN connection (`asyncpg.connect(listen_dsn(engine.url))`, as the relay opens
it) connect; with another CA, or to a host name the certificate does not name, both refuse.

Skipped where the PostgreSQL server binaries are missing, except in CI (CI=true), where that fails.
"""

import asyncio
import glob
import os
import pwd
import shutil
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from crm_platform.db import create_engine
from crm_platform.outbox import NOTIFY_CHANNEL, listen_dsn
from crm_platform.testing import infra
from crm_platform.testing.infra import free_port
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class TlsPostgres:
    port: int
    ca: Path  # signed the server's certificate
    other_ca: Path  # signed nothing the server presents

    def url(self, host: str = "127.0.0.1") -> str:
        return f"postgresql://postgres@{host}:{self.port}/postgres?ssl=verify-full"


def _server_binaries() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, else the newest Debian/Ubuntu installation."""
    found = shutil.which("initdb")
    candidates = [found] if found else sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(os.path.realpath(candidates[-1])).parent if candidates else None


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


def _new_key_and_request(key: Path, *output: str | Path) -> None:
    """A P-256 key and, after it, `output`: a self-signed certificate (-x509) or a signing request."""
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, *output)


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    certificate, key = folder / f"{name}.crt", folder / f"{name}.key"
    _new_key_and_request(key, "-x509", "-out", certificate, "-days", "1", "-subj", f"/CN={name}")
    return certificate, key


def _unavailable(reason: str) -> None:
    """In CI a missing prerequisite fails the test: it must never pass by being skipped there."""
    if infra.in_ci():
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def tls_postgres() -> Iterator[TlsPostgres]:
    binaries = _server_binaries()
    if binaries is None or shutil.which("openssl") is None:
        _unavailable("the PostgreSQL server binaries (initdb, pg_ctl) or openssl are not installed")
    # PostgreSQL refuses to run as root: as root, the cluster belongs to the `postgres` user.
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            _unavailable("running as root, and there is no `postgres` user to run PostgreSQL as")
    folder = Path(tempfile.mkdtemp(prefix="crm-pg-tls-"))
    data = folder / "data"
    try:
        ca, ca_key = _make_ca(folder, "crm-test-postgres-ca")
        other_ca, _ = _make_ca(folder, "crm-test-other-ca")
        server_key, server_csr, server_cert = folder / "server.key", folder / "server.csr", folder / "server.crt"
        _new_key_and_request(server_key, "-out", server_csr, "-subj", "/CN=127.0.0.1")
        (folder / "server.ext").write_text("subjectAltName = IP:127.0.0.1\n")
        signing = ("-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "1", "-extfile", folder / "server.ext")
        _openssl("x509", "-req", "-in", server_csr, *signing, "-out", server_cert)
        server_key.chmod(0o600)
        if owner is not None:
            for path in [folder, *folder.iterdir()]:
                os.chown(path, owner.pw_uid, owner.pw_gid)
        user = owner.pw_name if owner is not None else None

        def run(*command: str | Path) -> None:
            subprocess.run([str(part) for part in command], check=True, capture_output=True, timeout=60, user=user)

        run(binaries / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8", "--locale=C")
        port = free_port()
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = ''\n"
                f"ssl = on\nssl_cert_file = '{server_cert}'\nssl_key_file = '{server_key}'\nfsync = off\n"
            )
        (data / "pg_hba.conf").write_text("hostssl all all 127.0.0.1/32 trust\n")  # TLS or nothing
        run(binaries / "pg_ctl", "-D", data, "-l", folder / "server.log", "-w", "-t", "30", "start")
        try:
            yield TlsPostgres(port, ca, other_ca)
        finally:
            run(binaries / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def trusted_ca(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """The environment without PGSSLMODE and ~/.postgresql/root.crt; the test sets PGSSLROOTCERT."""
    monkeypatch.delenv("PGSSLMODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return monkeypatch


async def _notified_over(listener: asyncpg.Connection, engine: AsyncEngine) -> None:
    woken = asyncio.Event()
    await listener.add_listener(NOTIFY_CHANNEL, lambda *_: woken.set())
    async with engine.begin() as conn:
        await conn.execute(text("SELECT pg_notify(:channel, '')"), {"channel": NOTIFY_CHANNEL})
    await asyncio.wait_for(woken.wait(), 5)


async def test_verify_full_with_the_operators_ca_connects_the_engine_and_the_listen_connection(
    tls_postgres: TlsPostgres, trusted_ca: pytest.MonkeyPatch
) -> None:
    trusted_ca.setenv("PGSSLROOTCERT", str(tls_postgres.ca))
    engine = create_engine(tls_postgres.url())
    try:
        async with engine.connect() as conn:
            tls = await conn.scalar(text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))
        assert tls is True
        listener = await asyncpg.connect(listen_dsn(engine.url))
        try:
            await _notified_over(listener, engine)
        finally:
            await listener.close()
    finally:
        await engine.dispose()


async def _refused(url: str) -> None:
    engine = create_engine(url)
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            async with engine.connect():
                pass
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncpg.connect(listen_dsn(engine.url))
    finally:
        await engine.dispose()


async def test_a_server_certificate_from_another_ca_is_refused_by_the_engine_and_the_listen_connection(
    tls_postgres: TlsPostgres, trusted_ca: pytest.MonkeyPatch
) -> None:
    trusted_ca.setenv("PGSSLROOTCERT", str(tls_postgres.other_ca))
    await _refused(tls_postgres.url())


async def test_verify_full_refuses_a_certificate_that_does_not_name_the_host_connected_to(
    tls_postgres: TlsPostgres, trusted_ca: pytest.MonkeyPatch
) -> None:
    # The certificate names 127.0.0.1 only; `localhost` reaches the same server.
    trusted_ca.setenv("PGSSLROOTCERT", str(tls_postgres.ca))
    await _refused(tls_postgres.url("localhost"))
