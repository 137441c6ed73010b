"""Helpers for tests of the gateway (and of code that uses it): edits of the default policy, and
the real gateway started in process under such a policy."""

import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import yaml

from gateway.app import create_app
from gateway.config import Settings
from gateway.security.policy import DEFAULT_POLICY_PATH

# A change to the default policy document before a gateway loads it.
PolicyEdit = Callable[[dict[str, Any]], None]
# `await role_client(role, *edits, upstream="host:port")` (the fixture of the gateway's security tests).
RoleClient = Callable[..., Awaitable[httpx.AsyncClient]]


def grant_fields(role: str, resource: str, **rules: str) -> PolicyEdit:
    """Field rules added to one grant of the default policy."""

    def edit(policy: dict[str, Any]) -> None:
        policy["roles"][role]["grants"][resource].setdefault("fields", {}).update(rules)

    return edit


@asynccontextmanager
async def started_gateway(
    folder: Path,
    migrated_database: Path,
    *,
    secret: str,
    edits: Sequence[PolicyEdit] = (),
    token: str = "",
    **targets: str,
) -> AsyncIterator[httpx.AsyncClient]:
    """The real gateway app in process, under the default policy changed by `edits`, on a copy of
    a migrated SQLite database, calling the services named in `targets` (`leads="host:port"`; the
    others answer 503): an HTTP client of it, sending `token` as bearer when given."""
    settings = _settings(folder, migrated_database, secret, edits, targets)
    app = create_app(settings)
    await app.state.security.start(migrate=False, relay=False)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway", headers=headers, timeout=30
        ) as client:
            yield client
    finally:
        await app.state.upstreams.close()
        await app.state.security.stop()


def _settings(
    folder: Path, migrated_database: Path, secret: str, edits: Sequence[PolicyEdit], targets: dict[str, str]
) -> Settings:
    """The gateway's settings for `started_gateway`: its policy file and database copy, numbered so
    that one test may start several."""
    unknown = set(targets) - {"leads", "accounts", "sales", "service_desk", "analytics"}
    if unknown:
        raise TypeError(f"no such service to call: {sorted(unknown)}")
    number = len(list(folder.glob("gateway-*.db")))
    policy = yaml.safe_load(DEFAULT_POLICY_PATH.read_text(encoding="utf-8"))
    for edit in edits:
        edit(policy)
    policy_path = folder / f"policy-{number}.yaml"
    policy_path.write_text(yaml.safe_dump(policy), encoding="utf-8")
    database = folder / f"gateway-{number}.db"
    shutil.copyfile(migrated_database, database)
    return Settings(
        dev_mode=True,
        dev_jwt_secret=secret,
        database_url=f"sqlite+aiosqlite:///{database}",
        policy_path=str(policy_path),
        audit_relay_enabled=False,
        leads_target=targets.get("leads", ""),
        accounts_target=targets.get("accounts", ""),
        sales_target=targets.get("sales", ""),
        service_desk_target=targets.get("service_desk", ""),
        analytics_target=targets.get("analytics", ""),
    )


@asynccontextmanager
async def serving(*add_servicers: Callable[[grpc.aio.Server], None]) -> AsyncIterator[str]:
    """Fake services on a local gRPC port, for the gateway to call: their `host:port`.
    `serving(lambda server: add_LeadsServiceServicer_to_server(fake, server))`."""
    server = grpc.aio.server()
    for add in add_servicers:
        add(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)
