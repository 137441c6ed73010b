"""A migrated PostgreSQL database per test and the leads use cases over it (fake upstream ports);
a migrated gateway database for the tests that call the leads service through the gateway."""

from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from accounts import repository as accounts_repo
from accounts.__main__ import MIGRATIONS as ACCOUNTS_MIGRATIONS
from accounts.domain import PoolPolicy
from accounts.handlers import Context
from accounts.servicer import AccountsServicer
from crm.accounts.v1.accounts_service_pb2_grpc import add_AccountsServiceServicer_to_server
from crm.common.v1 import custom_fields_pb2_grpc
from crm.leads.v1 import leads_service_pb2_grpc
from crm_platform import custom_fields_service
from crm_platform.errors import CrmError, Unavailable
from crm_platform.grpc_server import GrpcServer
from crm_platform.ids import new_id
from crm_platform.outbox import UnitOfWork
from crm_platform.principal import Principal, RecordScope, ScopeKind, acting_as
from crm_platform.testing.database import migrated_engine
from gateway.security.store import migrate
from gateway.testing import started_gateway
from gateway.token_cli import issue_dev_token
from leads import repository as repo
from leads.__main__ import SERVICE_NAME, custom_field_servicer
from leads.config import LeadsSettings
from leads.domain import OPEN_STATUSES
from leads.handlers import ConvertRequest, LeadsService
from leads.servicer import LeadsServicer
from leads.upstream import GrpcConversionPorts
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


@dataclass
class FakePorts:
    """Accounts and sales as the saga sees them; failures can be injected per step."""

    accounts: dict[str, str] = field(default_factory=dict)
    contacts: dict[str, str] = field(default_factory=dict)
    opportunities: dict[str, str] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    fail: dict[str, CrmError] = field(default_factory=dict)
    # Steps whose create is made upstream, but whose answer is lost on the way back (a timeout).
    answer_lost: set[str] = field(default_factory=set)
    calls: list[str] = field(default_factory=list)

    def _create(self, step: str, key: str, store: dict[str, str], value: str, replay_only: bool) -> str:
        if replay_only:  # only what the key made, if it still exists
            self.calls.append(f"replay_{step}")
            return self.keys[key] if self.keys.get(key) in store else ""
        self.calls.append(f"create_{step}")
        if step in self.fail:
            raise self.fail[step]
        if key not in self.keys:
            created = new_id()
            self.keys[key] = created
            store[created] = value
        if step in self.answer_lost:
            raise Unavailable(f"{step}: deadline exceeded")
        return self.keys[key]

    async def get_account(self, account_id: str) -> None:
        if account_id not in self.accounts:
            from crm_platform.errors import FieldError, ValidationFailed

            raise ValidationFailed([FieldError("account_id", "does not exist")])

    async def create_account(self, *, key: str, lead: Mapping[Any, Any], name: str, replay_only: bool = False) -> str:
        return self._create("account", key, self.accounts, name, replay_only)

    async def contact_account_id(self, contact_id: str) -> str:
        self.calls.append("get_contact")
        if "get_contact" in self.fail:
            raise self.fail["get_contact"]
        return self.contacts.get(contact_id, "")

    async def create_contact(
        self, *, key: str, account_id: str, lead: Mapping[Any, Any], replay_only: bool = False
    ) -> str:
        return self._create("contact", key, self.contacts, account_id, replay_only)

    async def create_opportunity(
        self,
        *,
        key: str,
        account_id: str,
        contact_id: str,
        lead: Mapping[Any, Any],
        request: ConvertRequest,
        replay_only: bool = False,
    ) -> str:
        return self._create("opportunity", key, self.opportunities, account_id, replay_only)

    async def delete_opportunity(self, opportunity_id: str) -> None:
        self.calls.append("delete_opportunity")
        self.opportunities.pop(opportunity_id, None)

    async def delete_contact(self, contact_id: str) -> None:
        self.calls.append("delete_contact")
        if "delete" in self.fail:
            raise Unavailable("accounts down")
        self.contacts.pop(contact_id, None)

    async def delete_account(self, account_id: str) -> None:
        self.calls.append("delete_account")
        if "delete_account" in self.fail:
            raise self.fail["delete_account"]
        self.accounts.pop(account_id, None)

    async def account_used_besides(self, account_id: str, *, contact_id: str, opportunity_id: str) -> bool:
        self.calls.append("account_used_besides")
        contacts = {c for c, account in self.contacts.items() if account == account_id} - {contact_id}
        deals = {o for o, account in self.opportunities.items() if account == account_id} - {opportunity_id}
        return bool(contacts or deals)


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


@dataclass
class Env:
    engine: AsyncEngine
    service: LeadsService
    ports: FakePorts
    clock: Clock
    url: str

    @contextmanager
    def acting(self, user: str = "rep1", *, roles: tuple[str, ...] = ("sales_rep",), team: str = "east",
               scope: ScopeKind = ScopeKind.ALL) -> Iterator[None]:  # fmt: skip
        principal = Principal(user_id=user, roles=roles, team=team, region="cn-east")
        record_scope = RecordScope(scope, owner_id=user, team=team, region="cn-east")
        with acting_as(principal, record_scope):
            yield

    async def loads_kept(self) -> dict[str, int]:
        """Open leads per owner as `lead_owner_loads` keeps them."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(repo.owner_loads))
        return {owner: count for owner, count in rows if count}

    async def loads_counted(self) -> dict[str, int]:
        """Open leads per owner counted from the leads themselves."""
        c = repo.leads.c
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(c.owner_id, func.count())
                .where(c.owner_id != "", c.status.in_(OPEN_STATUSES))
                .group_by(c.owner_id)
            )
        return {owner: int(count) for owner, count in rows}


async def _env(url: str) -> AsyncIterator[Env]:
    async with migrated_engine(url, MIGRATIONS) as engine:
        clock = Clock()
        ports = FakePorts()
        settings = LeadsSettings(database_url=url, rules_cache_seconds=0, import_batch_size=500)
        uow = UnitOfWork(engine, repo.metadata, source="crm/leads")
        service = LeadsService(engine=engine, uow=uow, settings=settings, ports=ports, clock=clock)
        yield Env(engine, service, ports, clock, url)


@pytest.fixture
async def env(postgres_url: str) -> AsyncIterator[Env]:
    async for made in _env(postgres_url):
        yield made


@pytest.fixture
async def env_each_database(each_database_url: str) -> AsyncIterator[Env]:
    """The same, once on a SQLite file (the embedded default) and once on PostgreSQL."""
    async for made in _env(each_database_url):
        yield made


AccountsOverGrpc = Callable[..., AbstractAsyncContextManager[tuple[AccountsServicer, AsyncEngine]]]


@pytest.fixture
def accounts_over_grpc(env: Env, tmp_path: Path) -> AccountsOverGrpc:
    """`async with accounts_over_grpc(ServicerClass) as (servicer, accounts_db)`: the real accounts
    service (or a subclass that misbehaves) over gRPC on a SQLite database, as the conversion's
    accounts and sales ports of `env` while the block runs."""

    @asynccontextmanager
    async def serving(
        servicer_class: type[AccountsServicer] = AccountsServicer,
    ) -> AsyncIterator[tuple[AccountsServicer, AsyncEngine]]:
        async with migrated_engine(f"sqlite+aiosqlite:///{tmp_path}/accounts.db", ACCOUNTS_MIGRATIONS) as db:
            accounts = servicer_class(
                Context(uow=UnitOfWork(db, accounts_repo.metadata, source="/test"), policy=PoolPolicy())
            )
            server = GrpcServer(
                service="accounts",
                service_names=["crm.accounts.v1.AccountsService"],
                register=lambda s: add_AccountsServiceServicer_to_server(accounts, s),
            )
            port = await server.start("127.0.0.1", 0)
            env.service.ports = GrpcConversionPorts(f"127.0.0.1:{port}", f"127.0.0.1:{port}", deadline_seconds=10)
            try:
                yield accounts, db
            finally:
                await env.service.ports.close()
                await server.stop(0)

    return serving


GATEWAY_SECRET = "leads-tests-gateway-secret-" + "s" * 30


@pytest.fixture
async def admin(env: Env, tmp_path: Path, gateway_database: Path) -> AsyncIterator[httpx.AsyncClient]:
    """An admin's client of the real gateway (who sees every lead and reads the audit trail), in
    front of the leads service of `env`: its leads and custom field definitions, as
    `leads.__main__` serves them."""

    def register(server: Any) -> None:
        leads_service_pb2_grpc.add_LeadsServiceServicer_to_server(LeadsServicer(env.service), server)
        custom_fields_pb2_grpc.add_CustomFieldServiceServicer_to_server(custom_field_servicer(env.service), server)

    server = GrpcServer(
        service="leads", service_names=[SERVICE_NAME, custom_fields_service.SERVICE_NAME], register=register
    )
    port = await server.start("127.0.0.1", 0)
    token = issue_dev_token(secret=GATEWAY_SECRET, sub="u-1", roles=["admin"], team="east", region="north")
    async with started_gateway(
        tmp_path, gateway_database, secret=GATEWAY_SECRET, token=token, leads=f"127.0.0.1:{port}"
    ) as client:
        yield client
    await server.stop(1)


@pytest.fixture
def bearer() -> Callable[[str, str], dict[str, str]]:
    """`bearer(user, role)`: the Authorization header of another caller of the `admin` gateway, of
    team east and region north as the admin."""

    def header(user: str, role: str) -> dict[str, str]:
        token = issue_dev_token(secret=GATEWAY_SECRET, sub=user, roles=[role], team="east", region="north")
        return {"Authorization": f"Bearer {token}"}

    return header


@pytest.fixture(scope="module")
def gateway_database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated gateway database, copied for each gateway (migrating takes seconds)."""
    path = tmp_path_factory.mktemp("gateway") / "gateway.db"
    migrate(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture
async def stub(env: Env) -> AsyncIterator[leads_service_pb2_grpc.LeadsServiceStub]:
    """The leads service over gRPC on a local port, as the gateway calls it."""
    server = GrpcServer(
        service="leads",
        service_names=["crm.leads.v1.LeadsService"],
        register=lambda s: leads_service_pb2_grpc.add_LeadsServiceServicer_to_server(LeadsServicer(env.service), s),
    )
    port = await server.start("127.0.0.1", 0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield leads_service_pb2_grpc.LeadsServiceStub(channel)
    await server.stop(1)
