"""A gateway app for security tests: the real security mechanism and routers (me, audit, exports,
api-keys) plus a test-only router that serves every policy resource from an in-memory store
and, like the real services, filters by the record scope it is given."""

import copy
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from crm.common.v1 import custom_fields_pb2
from crm.common.v1.custom_fields_pb2_grpc import CustomFieldServiceStub
from crm.leads.v1.leads_service_pb2_grpc import LeadsServiceServicer, add_LeadsServiceServicer_to_server
from crm_platform.ids import new_id
from fastapi import APIRouter, Body, Depends, FastAPI, Request
from gateway.app import create_app
from gateway.config import Settings
from gateway.errors import install_error_handlers
from gateway.middleware import RequestContextMiddleware
from gateway.routers import api_keys as api_keys_router
from gateway.routers import audit as audit_router
from gateway.routers import exports as exports_router
from gateway.routers import me as me_router
from gateway.routers.custom_fields import audit_pii_keys
from gateway.security import Access, Policy, SecurityRuntime, SecuritySettings, install_security, load_policy, require
from gateway.security import exports as exports_registry
from gateway.security.exports import register_export_source
from gateway.security.problems import not_found
from gateway.security.store import migrate
from gateway.testing import PolicyEdit, RoleClient, serving, started_gateway
from gateway.token_cli import issue_dev_token
from gateway.upstreams import UpstreamNotConfigured

SECRET = "test-secret-" + "x" * 40
FAKE_PREFIX = "/api/v1/fake"

ME = "u-me"
TEAM = "team-a"
REGION = "north"


@dataclass
class FakeStore:
    """Records per resource; the stand-in for the owning services."""

    records: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    # Custom field definitions per entity (lead, account, contact, opportunity, ticket).
    custom_fields: dict[str, list[custom_fields_pb2.CustomFieldDefinition]] = field(default_factory=dict)

    def define(self, entity: str, key: str, *, pii: bool = False) -> None:
        definition = custom_fields_pb2.CustomFieldDefinition(entity=entity, key=key, label=key, type="text", pii=pii)
        self.custom_fields.setdefault(entity, []).append(definition)

    def put(self, resource: str, record: dict[str, Any]) -> dict[str, Any]:
        self.records.setdefault(resource, {})[record["id"]] = record
        return record

    def get(self, resource: str, record_id: str) -> dict[str, Any] | None:
        return self.records.get(resource, {}).get(record_id)


class FakeCustomFieldService:
    """The CustomFieldService every owning service serves, as the gateway calls it."""

    def __init__(self, store: FakeStore) -> None:
        self.store = store

    async def ListCustomFields(
        self, request: custom_fields_pb2.ListCustomFieldsRequest, **_: Any
    ) -> custom_fields_pb2.ListCustomFieldsResponse:
        return custom_fields_pb2.ListCustomFieldsResponse(items=self.store.custom_fields.get(request.entity, []))


class FakeUpstreams:
    """`app.state.upstreams` of the test app: only the custom field definitions are served."""

    def __init__(self, store: FakeStore) -> None:
        self.store = store

    def stub(self, name: str, stub_type: Any) -> Any:
        if stub_type is not CustomFieldServiceStub:
            raise UpstreamNotConfigured(name)
        return FakeCustomFieldService(self.store)


def fake_router(policy: Policy, store: FakeStore) -> APIRouter:
    """Routes for every resource and action of the policy, declared the way real routers do."""
    router = APIRouter()
    for resource, spec in policy.resources.items():
        _add_routes(router, resource, spec.actions, list(spec.fields), store)
    return router


def _in_scope(access: Access, record: Mapping[str, Any] | None) -> dict[str, Any]:
    if record is None or not access.allows_record(record):
        raise not_found()
    return dict(record)


def _add_routes(
    router: APIRouter, resource: str, actions: tuple[str, ...], fields: list[str], store: FakeStore
) -> None:
    base = f"/fake/{resource}"
    Json = Annotated[dict[str, Any], Body()]
    # The list reads its query parameters itself: a filter per field, the page size and the order.
    list_parameters = [{"name": name, "in": "query"} for name in [*fields, "limit", "sort"]]

    if "read" in actions:

        @router.get(base, name=f"list_{resource}", openapi_extra={"parameters": list_parameters})
        async def list_records(request: Request, access: Annotated[Access, Depends(require(resource, "read"))]) -> dict:
            filters = dict(request.query_params)
            limit = access.page_limit(int(filters.pop("limit")) if "limit" in filters else None)
            sort = filters.pop("sort", None)
            access.check_filter([*filters, *([sort] if sort else [])])
            rows = [
                r
                for r in store.records.get(resource, {}).values()
                if access.allows_record(r) and all(str(r.get(k)) == v for k, v in filters.items())
            ]
            return {"items": access.present_many(rows[:limit]), "next_cursor": None}

        @router.get(base + "/{record_id}", name=f"get_{resource}")
        async def get_record(record_id: str, access: Annotated[Access, Depends(require(resource, "read"))]) -> dict:
            return access.present(_in_scope(access, store.get(resource, record_id)))

    if "create" in actions:

        @router.post(base, status_code=201, name=f"create_{resource}")
        async def create_record(body: Json, access: Annotated[Access, Depends(require(resource, "create"))]) -> dict:
            access.check_write(body)
            principal = access.principal
            record = {
                "owner_id": principal.user_id,
                "team": principal.team,
                "region": principal.region,
                **body,
                "id": new_id(),
            }
            store.put(resource, record)
            await access.audit_write(record["id"], None, record)
            return access.present(record)

    if "update" in actions:

        @router.patch(base + "/{record_id}", name=f"update_{resource}")
        async def update_record(
            record_id: str, body: Json, access: Annotated[Access, Depends(require(resource, "update"))]
        ) -> dict:
            # Like real routes: the fields first, then the record in the scope check_write leaves.
            access.check_write(body)
            before = _in_scope(access, store.get(resource, record_id))
            after = {**copy.deepcopy(before), **body}
            store.put(resource, after)
            await access.audit_write(record_id, before, after)
            return access.present(after)

    if "delete" in actions:

        @router.delete(base + "/{record_id}", status_code=204, name=f"delete_{resource}")
        async def delete_record(
            record_id: str, access: Annotated[Access, Depends(require(resource, "delete"))]
        ) -> None:
            before = _in_scope(access, store.get(resource, record_id))
            del store.records[resource][record_id]
            await access.audit_write(record_id, before, None)

    for action in ("assign", "approve"):
        if action in actions:
            _add_command(router, resource, action, store)

    if "export" in actions:

        async def fetch(access: Access, filters: Mapping[str, str]) -> AsyncIterator[Mapping[str, Any]]:
            for record in list(store.records.get(resource, {}).values()):
                if access.allows_record(record) and all(str(record.get(k)) == v for k, v in filters.items()):
                    yield record

        register_export_source(resource, fetch, filters={"status", "owner_id", "team", "phone", "email", "name"})


def _add_command(router: APIRouter, resource: str, action: str, store: FakeStore) -> None:
    @router.post(f"/fake/{resource}/{{record_id}}/{action}", name=f"{action}_{resource}")
    async def command(
        record_id: str,
        body: Annotated[dict[str, Any], Body()],
        access: Annotated[Access, Depends(require(resource, action))],
    ) -> dict:
        access.check_write(body)
        before = _in_scope(access, store.get(resource, record_id))
        after = {**before, **body}
        store.put(resource, after)
        await access.audit_write(record_id, before, after, action=action)
        return access.present(after)


def build_app(settings: SecuritySettings, policy: Policy, store: FakeStore, **kwargs: Any) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    runtime = install_security(app, settings, policy=policy, **kwargs)
    runtime.custom_pii_keys = audit_pii_keys
    app.add_middleware(RequestContextMiddleware)
    for module in (me_router, audit_router, exports_router, api_keys_router):
        app.include_router(module.router)  # each carries the API prefix (gateway.routing)
    app.include_router(fake_router(policy, store), prefix="/api/v1")
    app.state.upstreams = FakeUpstreams(store)
    runtime.check_routes(app)
    return app


def make_settings(tmp_path: Path, database_url: str | None = None, **overrides: Any) -> SecuritySettings:
    values: dict[str, Any] = {
        "dev_mode": True,
        "dev_jwt_secret": SECRET,
        "database_url": database_url or f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}",
        "rate_limit_per_second": 10_000.0,
        "rate_limit_burst": 100_000,
        "export_rate_limit_per_minute": 10_000.0,
        "export_rate_limit_burst": 100_000,
        "auth_failure_rate_per_second": 10_000.0,
        "auth_failure_burst": 100_000,
    }
    values.update(overrides)
    return SecuritySettings(**values)


def token(roles: str | list[str], sub: str = ME, team: str = TEAM, region: str = REGION, **extra: Any) -> str:
    role_list = [roles] if isinstance(roles, str) else roles
    return issue_dev_token(secret=SECRET, sub=sub, roles=role_list, team=team, region=region, **extra)


def auth(roles: str | list[str], **kwargs: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(roles, **kwargs)}"}


@dataclass
class Gateway:
    app: FastAPI
    client: httpx.AsyncClient
    runtime: SecurityRuntime
    store: FakeStore
    policy: Policy


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
def default_policy() -> Policy:
    return load_policy()


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated SQLite database, copied for each test (migrating takes seconds)."""
    path = tmp_path_factory.mktemp("template") / "gateway.db"
    migrate(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture
async def make_gateway(tmp_path: Path, migrated_sqlite: Path) -> AsyncIterator[GatewayFactory]:
    opened: list[Gateway] = []
    # The fake routers register export sources for every resource: put the real ones back after.
    real_sources = dict(exports_registry._sources)

    async def factory(*, policy: Policy | None = None, database_url: str | None = None, **overrides: Any) -> Gateway:
        kwargs = {key: overrides.pop(key) for key in ("jwks_client",) if key in overrides}
        if database_url is None:
            copy_path = tmp_path / f"gateway-{len(opened)}.db"
            shutil.copyfile(migrated_sqlite, copy_path)
            database_url = f"sqlite+aiosqlite:///{copy_path}"
        settings = make_settings(tmp_path, database_url, **overrides)
        chosen = policy or load_policy()
        store = FakeStore()
        app = build_app(settings, chosen, store, **kwargs)
        runtime: SecurityRuntime = app.state.security
        # A given database (PostgreSQL) is migrated here; the SQLite copy already is.
        await runtime.start(migrate=database_url.startswith("postgresql"), relay=False)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")
        gateway = Gateway(app=app, client=client, runtime=runtime, store=store, policy=chosen)
        opened.append(gateway)
        return gateway

    yield factory
    for gateway in opened:
        await gateway.client.aclose()
        await gateway.runtime.stop()
    exports_registry._sources.clear()
    exports_registry._sources.update(real_sources)


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway()


AuthHeaders = Callable[..., dict[str, str]]


@pytest.fixture
def auth_headers() -> AuthHeaders:
    """`auth_headers("sales_rep", sub=..., team=..., region=...)` -> an Authorization header."""
    return auth


REAL_APP_SECRET = "real-app-secret-" + "z" * 30


@pytest.fixture
async def real_app(tmp_path: Path, migrated_sqlite: Path) -> AsyncIterator[FastAPI]:
    """The real gateway app with no upstream configured (a call that gets past the gateway's own
    checks answers 503 at once); tokens from `real_app_auth`."""
    database = tmp_path / "gateway.db"
    shutil.copyfile(migrated_sqlite, database)
    settings = Settings(
        dev_mode=True,
        dev_jwt_secret=REAL_APP_SECRET,
        database_url=f"sqlite+aiosqlite:///{database}",
        leads_target="",
        accounts_target="",
        sales_target="",
        service_desk_target="",
        analytics_target="",
        rate_limit_per_second=10_000.0,
        rate_limit_burst=100_000,
        audit_relay_enabled=False,
        audit_ingest_enabled=False,
    )
    app = create_app(settings)
    await app.state.security.start(migrate=False, relay=False)
    yield app
    await app.state.upstreams.close()
    await app.state.security.stop()


@pytest.fixture
async def client(real_app: FastAPI, real_app_auth: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An admin's client of `real_app` (a test module may define its own `client`)."""
    transport = httpx.ASGITransport(app=real_app, raise_app_exceptions=False)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://gateway", headers=real_app_auth("admin")
    ) as http:
        yield http


@pytest.fixture
def real_app_auth() -> AuthHeaders:
    """`real_app_auth("sales_rep")` -> an Authorization header the `real_app` accepts."""

    def headers(role: str, sub: str = "u-real") -> dict[str, str]:
        token = issue_dev_token(secret=REAL_APP_SECRET, sub=sub, roles=[role], team="team-a", region="north")
        return {"Authorization": f"Bearer {token}"}

    return headers


ROLE_CLIENT_SECRET = "role-client-secret-" + "r" * 30


@pytest.fixture
async def role_client(tmp_path: Path, migrated_sqlite: Path) -> AsyncIterator[RoleClient]:
    """`await role_client(role, *edits, upstream="host:port")`: an HTTP client of the real gateway
    for one role, under the default policy changed by `edits`. The leads, sales, service-desk and
    analytics calls go to `upstream` (none by default: they answer 503); accounts has none."""
    async with AsyncExitStack() as started:

        async def make(role: str, *edits: PolicyEdit, upstream: str = "") -> httpx.AsyncClient:
            token = issue_dev_token(secret=ROLE_CLIENT_SECRET, sub="u-1", roles=[role], team="east", region="north")
            targets = {service: upstream for service in ("leads", "sales", "service_desk", "analytics")}
            gateway = started_gateway(
                tmp_path, migrated_sqlite, secret=ROLE_CLIENT_SECRET, edits=edits, token=token, **targets
            )
            return await started.enter_async_context(gateway)

        yield make


LEADS_SECRET = "leads-gateway-secret-" + "l" * 30
# (action, outcome, record id, reason) of audit rows.
AuditRows = list[tuple[str, str, str, str]]


@pytest.fixture
async def leads_http(
    tmp_path: Path, migrated_sqlite: Path, leads: LeadsServiceServicer
) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the real gateway in front of a fake leads service: the servicer the test
    module's own `leads` fixture makes (it records what the gateway sends). Tokens from `leads_auth`."""
    async with (
        serving(lambda server: add_LeadsServiceServicer_to_server(leads, server)) as address,
        started_gateway(tmp_path, migrated_sqlite, secret=LEADS_SECRET, leads=address) as client,
    ):
        yield client


@pytest.fixture
def leads_auth() -> AuthHeaders:
    """`leads_auth(role, user="u-1")` -> an Authorization header `leads_http` accepts (team east,
    region north)."""

    def headers(role: str, user: str = "u-1") -> dict[str, str]:
        token = issue_dev_token(secret=LEADS_SECRET, sub=user, roles=[role], team="east", region="north")
        return {"Authorization": f"Bearer {token}"}

    return headers


@pytest.fixture
def leads_trail(leads_http: httpx.AsyncClient, leads_auth: AuthHeaders) -> Callable[..., Awaitable[AuditRows]]:
    """`await leads_trail(actor="u-1")`: the actor's audit rows on leads in `leads_http`, sorted."""

    async def rows(actor: str = "u-1") -> AuditRows:
        query = {"resource": "leads", "actor": actor}
        answer = await leads_http.get("/api/v1/audit-events", params=query, headers=leads_auth("admin", "auditor"))
        return sorted(
            (row["action"], row["outcome"], row["record_id"], row["reason"]) for row in answer.json()["items"]
        )

    return rows
