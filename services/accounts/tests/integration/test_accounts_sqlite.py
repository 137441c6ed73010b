"""The embedded default: the same handlers on SQLite (no PostgreSQL-only SQL on any path)."""

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from accounts import handlers
from accounts.__main__ import MIGRATIONS
from accounts.domain import PoolPolicy
from accounts.handlers import OWNED_ENTITIES, Context
from accounts.repository import AccountFilter, ContactFilter, custom_fields, idempotency_keys, metadata, parse_page
from crm.common.v1 import custom_fields_pb2 as cf_pb
from crm_platform.custom_fields_service import CustomFieldServicer
from crm_platform.errors import AlreadyExists, Conflict, ValidationFailed
from crm_platform.outbox import UnitOfWork
from crm_platform.principal import ALL_RECORDS, SYSTEM, Principal, RecordScope, ScopeKind, acting_as
from crm_platform.testing.database import migrated_engine
from crm_platform.timeutil import utcnow

pytestmark = pytest.mark.integration

REP = Principal(user_id="rep-1", roles=("sales_rep",), team="east", region="cn-east")
REP_SCOPE = RecordScope(ScopeKind.OWN, owner_id="rep-1")
OTHER = Principal(user_id="rep-2", roles=("sales_rep",), team="east", region="cn-east")
PAGE = parse_page(50, "", "")


@pytest.fixture
async def ctx(tmp_path: Path) -> AsyncIterator[Context]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'accounts.db'}"
    async with migrated_engine(url, MIGRATIONS) as engine:
        yield Context(uow=UnitOfWork(engine, metadata, source="/test"), policy=PoolPolicy(claim_limit_per_day=5))


async def test_sqlite_search_tags_custom_fields_pool_and_merge(ctx: Context) -> None:
    definitions = CustomFieldServicer(ctx.uow.engine, custom_fields, keys=idempotency_keys, entities=OWNED_ENTITIES)
    products = cf_pb.CustomFieldDefinition(
        entity="account", key="products", label="Products", type="multi_enum", options=["crm", "erp"]
    )
    vip = cf_pb.CustomFieldDefinition(entity="account", key="vip", label="VIP", type="bool")
    for definition in (products, vip):
        await definitions.UpsertCustomField(cf_pb.UpsertCustomFieldRequest(definition=definition), None)
    with acting_as(REP, REP_SCOPE):
        acme = await handlers.create_account(
            ctx,
            {"name": "Acme Ltd", "tags": ["vip", "east"], "custom": {"products": ["erp"], "vip": True}, "tier": "C"},
            idempotency_key="",
            in_pool=False,
        )
        other = await handlers.create_account(
            ctx, {"name": "Other Co", "tags": ["east"]}, idempotency_key="", in_pool=False
        )
        with pytest.raises(AlreadyExists) as duplicate:
            await handlers.create_account(ctx, {"name": "ACME limited"}, idempotency_key="", in_pool=False)
        assert duplicate.value.existing_id == acme.id
        with pytest.raises(ValidationFailed) as invalid:
            await handlers.create_account(
                ctx, {"name": "X", "custom": {"vip": "yes"}}, idempotency_key="", in_pool=False
            )
        assert invalid.value.errors[0].field == "custom.vip"

        async def names(f: AccountFilter, custom: list[tuple[str, str]] | None = None) -> list[str]:
            rows, _ = await handlers.list_accounts(ctx, f, custom or [], PAGE, "")
            return sorted(r.name for r in rows)

        assert await names(AccountFilter(q="acm")) == ["Acme Ltd"]
        assert await names(AccountFilter(tags=["east"])) == ["Acme Ltd", "Other Co"]
        assert await names(AccountFilter(tags=["east", "vip"])) == ["Acme Ltd"]
        assert await names(AccountFilter(), [("products", "erp")]) == ["Acme Ltd"]
        assert await names(AccountFilter(), [("vip", "true")]) == ["Acme Ltd"]
        assert await names(AccountFilter(), [("vip", "false")]) == []

        contact = await handlers.create_contact(
            ctx, {"account_id": other.id, "name": "Li", "mobile": "138 0013 8000"}, idempotency_key=""
        )
        merged = await handlers.merge_accounts(ctx, acme.id, other.id, idempotency_key="")
        assert merged.moved_contact_ids == [contact.id]
        moved, _ = await handlers.list_contacts(ctx, ContactFilter(account_id=acme.id), [], PAGE)
        assert [c.id for c in moved] == [contact.id]

    later = utcnow() + timedelta(days=8)
    ctx.clock = lambda: later
    with acting_as(SYSTEM, ALL_RECORDS):
        assert await handlers.return_inactive_accounts(ctx, batch_size=10) == 1
    with acting_as(REP, REP_SCOPE), pytest.raises(Conflict) as cooldown:
        await handlers.claim_account(ctx, acme.id, idempotency_key="")
    assert cooldown.value.reason == "COOLDOWN"
    with acting_as(OTHER, RecordScope(ScopeKind.OWN, owner_id="rep-2")):
        claimed = (await handlers.claim_account(ctx, acme.id, idempotency_key="")).record
    assert claimed.owner_id == "rep-2"


async def test_merging_an_account_into_one_below_it_keeps_the_hierarchy_a_tree(ctx: Context) -> None:
    """group > holding > division > plant, holding > branch; merge holding into plant, then division into plant."""
    with acting_as(REP, REP_SCOPE):

        async def create(name: str, parent: str = "") -> str:
            row = await handlers.create_account(
                ctx, {"name": name, "parent_id": parent}, idempotency_key="", in_pool=False
            )
            return str(row.id)

        group = await create("Northwind Group")
        holding = await create("Contoso Holding", group)
        division = await create("Fabrikam Division", holding)
        plant = await create("Initech Plant", division)
        branch = await create("Umbrella Branch", holding)

        async def parents() -> dict[str, str | None]:
            rows, _ = await handlers.list_accounts(ctx, AccountFilter(), [], PAGE, "")
            return {str(r.id): r.parent_id for r in rows if not r.merged_into_id}

        await handlers.merge_accounts(ctx, plant, holding, idempotency_key="")
        # The division took the holding's place; the holding's other child now hangs under the survivor.
        assert await parents() == {group: None, division: group, plant: division, branch: plant}

        await handlers.merge_accounts(ctx, plant, division, idempotency_key="")
        # The survivor was the duplicate's own child: it moves up to the duplicate's parent.
        assert await parents() == {group: None, plant: group, branch: plant}


async def test_pages_by_a_time_sort_follow_their_cursor_on_sqlite(ctx: Context) -> None:
    with acting_as(REP, REP_SCOPE):
        for n in range(5):
            await handlers.create_account(ctx, {"name": f"Timed {n}"}, idempotency_key="", in_pool=False)
        for sort, order in (("updated_at", range(5)), ("-updated_at", range(4, -1, -1))):
            seen: list[str] = []
            cursor = ""
            while True:
                rows, cursor = await handlers.list_accounts(
                    ctx, AccountFilter(q="Timed"), [], parse_page(2, cursor, sort), ""
                )
                seen += [row.name for row in rows]
                if not cursor:
                    break
            assert seen == [f"Timed {n}" for n in order], sort
