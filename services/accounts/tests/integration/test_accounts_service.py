"""The accounts service over gRPC on PostgreSQL, with its events observed on the broker."""

import asyncio
import csv
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest
from accounts import handlers
from accounts import repository as repo
from accounts.__main__ import MIGRATIONS, build_with_context
from accounts.config import AccountsSettings
from accounts.handlers import Context
from accounts.repository import AccountFilter, list_accounts, parse_page
from crm.accounts.v1 import accounts_pb2, events_pb2
from crm.accounts.v1 import accounts_service_pb2 as pb
from crm.accounts.v1.accounts_service_pb2_grpc import AccountsServiceStub
from crm.common.v1 import common_pb2, custom_fields_pb2
from crm.common.v1.custom_fields_pb2_grpc import CustomFieldServiceStub
from crm.sales.v1 import events_pb2 as sales_events
from crm.sales.v1 import sales_pb2
from crm_platform.config import KafkaSettings
from crm_platform.db import create_engine
from crm_platform.grpc_errors import RemoteError, from_rpc_error
from crm_platform.principal import (
    ALL_RECORDS,
    SYSTEM,
    Principal,
    RecordScope,
    ScopeKind,
    acting_as,
    outgoing_metadata,
    resource_scope_key,
)
from crm_platform.service import ServiceApp
from crm_platform.testing.database import migrate_to_head
from crm_platform.testing.kafka import EventCollector, produce_event
from crm_platform.testing.plans import generic_plan
from crm_platform.timeutil import utcnow
from google.protobuf import field_mask_pb2
from sqlalchemy import text

TOPIC = "crm.accounts.v1"
DATASETS = Path(__file__).resolve().parents[4] / ".." / "shared" / "datasets"


def rep(user_id: str, team: str = "east", region: str = "cn-east") -> tuple[Principal, RecordScope]:
    principal = Principal(user_id=user_id, roles=("sales_rep",), team=team, region=region)
    return principal, RecordScope(ScopeKind.OWN, owner_id=user_id)


def manager(user_id: str = "mgr", team: str = "east") -> tuple[Principal, RecordScope]:
    principal = Principal(user_id=user_id, roles=("sales_manager",), team=team, region="cn-east")
    return principal, RecordScope(ScopeKind.TEAM, team=team)


ADMIN = (Principal(user_id="admin", roles=("admin",)), ALL_RECORDS)


@dataclass
class Running:
    app: ServiceApp
    stub: AccountsServiceStub
    # The shared crm.common.v1.CustomFieldService, registered on the same server.
    definitions: CustomFieldServiceStub
    ctx: Context
    events: EventCollector

    async def call(self, method: str, request: Any, who: tuple[Principal, RecordScope] = ADMIN) -> Any:
        return await getattr(self.stub, method)(request, metadata=outgoing_metadata(*who), timeout=15)

    async def fails(self, method: str, request: Any, who: tuple[Principal, RecordScope] = ADMIN) -> RemoteError:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await self.call(method, request, who)
        return from_rpc_error(caught.value)

    async def wait_events(self, predicate: Callable[[list[Any]], bool], timeout: float = 30.0) -> list[Any]:
        return await self.events.wait_for(predicate, timeout)


async def _migrate(url: str) -> None:
    await migrate_to_head(url, MIGRATIONS)


@asynccontextmanager
async def running(postgres_url: str, kafka_settings: KafkaSettings, *, consume: bool) -> AsyncIterator[Running]:
    await _migrate(postgres_url)
    settings = AccountsSettings(
        database_url=postgres_url,
        grpc_port=0,
        kafka=kafka_settings,
        claim_limit_per_day=3,
        claim_cooldown_hours=24,
    )
    engine = create_engine(postgres_url)
    app, ctx = build_with_context(settings, engine)
    app.jobs.clear()  # the tests run the timers themselves, with a controlled clock
    if not consume:
        app.consumers.clear()  # a consumer group join costs seconds; only the consumer test needs it
    port = await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    collector = EventCollector(kafka_settings.bootstrap_servers, [TOPIC])
    await collector.start()
    try:
        yield Running(
            app=app,
            stub=AccountsServiceStub(channel),
            definitions=CustomFieldServiceStub(channel),
            ctx=ctx,
            events=collector,
        )
    finally:
        await collector.stop()
        await channel.close()
        await app.stop()


@pytest.fixture
async def accounts_service(postgres_url: str, kafka_settings: KafkaSettings) -> AsyncIterator[Running]:
    async with running(postgres_url, kafka_settings, consume=False) as service:
        yield service


@pytest.fixture
async def consuming_service(postgres_url: str, kafka_settings: KafkaSettings) -> AsyncIterator[Running]:
    async with running(postgres_url, kafka_settings, consume=True) as service:
        yield service


pytestmark = pytest.mark.integration

REP1, REP2, REP3 = rep("rep-1"), rep("rep-2"), rep("rep-3")


def account(name: str, **kw: object) -> pb.AccountInput:
    return pb.AccountInput(name=name, region=str(kw.pop("region", "cn-east")), **kw)  # type: ignore[arg-type]


async def create(svc: Running, name: str, who: object = REP1, **kw: object) -> accounts_pb2.Account:
    response = await svc.call("CreateAccount", pb.CreateAccountRequest(account=account(name, **kw)), who)  # type: ignore[arg-type]
    return response.account


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


async def test_account_lifecycle_with_events(accounts_service: Running) -> None:
    svc = accounts_service
    acme = await create(svc, "Acme Corporation", tier="B", tags=["vip"])
    assert acme.owner_id == "rep-1" and acme.team == "east" and acme.version == 1

    # Dedupe on normalised name + region: 409 naming the existing account to who may read it.
    dup = await svc.fails("CreateAccount", pb.CreateAccountRequest(account=account("ACME corp.")), REP1)
    assert dup.code == grpc.StatusCode.ALREADY_EXISTS and dup.metadata["existing_id"] == acme.id
    hidden = await svc.fails("CreateAccount", pb.CreateAccountRequest(account=account("ACME corp.")), REP2)
    assert hidden.code == grpc.StatusCode.ALREADY_EXISTS and not hidden.metadata.get("existing_id")
    assert acme.id not in hidden.message and "outside your accounts" in hidden.message
    other_region = await create(svc, "Acme Corporation", region="cn-west")
    assert other_region.id != acme.id

    # Tag, then a segment over the tag.
    tagged = await svc.call(
        "UpdateAccount",
        pb.UpdateAccountRequest(
            account_id=acme.id,
            account=pb.AccountInput(tags=["vip", "key"]),
            update_mask=mask("tags"),
            expected_version=1,
        ),
    )
    assert list(tagged.account.tags) == ["vip", "key"] and tagged.account.version == 2
    stale = await svc.fails(
        "UpdateAccount",
        pb.UpdateAccountRequest(
            account_id=acme.id, account=pb.AccountInput(tier="A"), update_mask=mask("tier"), expected_version=1
        ),
    )
    assert stale.code == grpc.StatusCode.ABORTED
    segment = (
        await svc.call(
            "CreateSegment", pb.CreateSegmentRequest(name="key accounts", tags=["key"], filters={"tier": "B"}), REP1
        )
    ).segment
    listed = await svc.call("ListAccounts", pb.ListAccountsRequest(segment_id=segment.id), REP1)
    assert [a.id for a in listed.items] == [acme.id]
    hidden = await svc.fails("GetSegment", pb.GetSegmentRequest(segment_id=segment.id), rep("rep-9", team="west"))
    assert hidden.code == grpc.StatusCode.NOT_FOUND
    renamed = await svc.call(
        "UpdateSegment",
        pb.UpdateSegmentRequest(
            segment_id=segment.id,
            segment=accounts_pb2.Segment(name="key", filters={"tier": "A"}),
            update_mask=mask("name"),
            expected_version=1,
        ),
        REP1,
    )
    assert (renamed.segment.name, dict(renamed.segment.filters), renamed.segment.version) == ("key", {"tier": "B"}, 2)
    stale_segment = await svc.fails(
        "UpdateSegment",
        pb.UpdateSegmentRequest(
            segment_id=segment.id, segment=accounts_pb2.Segment(name="k"), update_mask=mask("name"), expected_version=1
        ),
        REP1,
    )
    assert stale_segment.code == grpc.StatusCode.ABORTED
    not_writable = await svc.fails(
        "UpdateSegment",
        pb.UpdateSegmentRequest(
            segment_id=segment.id, segment=accounts_pb2.Segment(owner_id="rep-2"), update_mask=mask("owner_id")
        ),
        REP1,
    )
    assert not_writable.code == grpc.StatusCode.INVALID_ARGUMENT

    # Release; the releaser is cooled down, another rep claims.
    await svc.call("ReleaseAccount", pb.ReleaseAccountRequest(account_id=acme.id), REP1)
    pool = await svc.call("ListPoolAccounts", pb.ListPoolAccountsRequest(), REP2)
    assert acme.id in [a.id for a in pool.items]
    cooldown = await svc.fails("ClaimAccount", pb.ClaimAccountRequest(account_id=acme.id), REP1)
    assert cooldown.code == grpc.StatusCode.FAILED_PRECONDITION and cooldown.reason == "COOLDOWN"
    claimed = (await svc.call("ClaimAccount", pb.ClaimAccountRequest(account_id=acme.id), REP2)).account
    assert claimed.owner_id == "rep-2" and not claimed.in_pool
    again = await svc.fails("ClaimAccount", pb.ClaimAccountRequest(account_id=acme.id), manager())
    assert again.reason == "NOT_IN_POOL"
    # Another rep's account is not there for a rep who reads only their own, as GetAccount answers.
    unseen = await svc.fails("ClaimAccount", pb.ClaimAccountRequest(account_id=acme.id), REP3)
    assert unseen.code == grpc.StatusCode.NOT_FOUND
    # rep-1 no longer sees it (scope own).
    assert (
        await svc.fails("GetAccount", pb.GetAccountRequest(account_id=acme.id), REP1)
    ).code == grpc.StatusCode.NOT_FOUND

    # Transfer (a manager) to rep-3.
    moved = await svc.call(
        "TransferAccount",
        pb.TransferAccountRequest(account_id=acme.id, new_owner_id="rep-3", reason="leave"),
        manager(),
    )
    assert moved.account.owner_id == "rep-3"

    # Merge a duplicate (with a contact and an activity) into it.
    twin = await create(svc, "Acme Trading", who=REP3, industry="retail")
    contact = (
        await svc.call(
            "CreateContact",
            pb.CreateContactRequest(
                contact=pb.ContactInput(
                    account_id=twin.id, name="Li Lei", email="Li.Lei@Acme.com", mobile="138 0013 8000"
                )
            ),
            REP3,
        )
    ).contact
    await svc.call("LogActivity", pb.LogActivityRequest(account_id=twin.id, kind="call", subject="intro"), REP3)
    merged = await svc.call("MergeAccounts", pb.MergeAccountsRequest(survivor_id=acme.id, duplicate_id=twin.id), REP3)
    assert list(merged.moved_contact_ids) == [contact.id] and merged.moved_activities == 1
    assert merged.survivor.industry == "retail"
    tombstone = (await svc.call("GetAccount", pb.GetAccountRequest(account_id=twin.id), REP3)).account
    assert tombstone.merged_into_id == acme.id
    timeline = await svc.call("ListActivities", pb.ListActivitiesRequest(account_id=acme.id), REP3)
    assert [a.subject for a in timeline.items] == ["intro"]
    found = await svc.call("FindContacts", pb.FindContactsRequest(phone="+86 13800138000"), (SYSTEM, ALL_RECORDS))
    assert [c.account_id for c in found.items] == [acme.id]

    types = {
        "crm.accounts.account.created",
        "crm.accounts.account.updated",
        "crm.accounts.account.released",
        "crm.accounts.account.claimed",
        "crm.accounts.account.transferred",
        "crm.accounts.account.merged",
        "crm.accounts.contact.created",
        "crm.accounts.activity.logged",
    }
    records = await svc.wait_events(
        lambda rs: types <= {r.event_type for r in rs if r.key in (acme.id, twin.id, contact.id)}
    )
    merged_event = next(r for r in records if r.event_type == "crm.accounts.account.merged" and r.key == twin.id)
    assert merged_event.decode(events_pb2.AccountMerged).survivor_id == acme.id
    ours = [r.event_type for r in records if r.key == acme.id]
    assert ours.index("crm.accounts.account.released") < ours.index("crm.accounts.account.claimed")


async def test_claim_limit(accounts_service: Running) -> None:
    svc = accounts_service
    ids = []
    for n in range(4):
        created = await svc.call(
            "CreateAccount", pb.CreateAccountRequest(account=account(f"Pool {n}"), in_pool=True), ADMIN
        )
        ids.append(created.account.id)
    for account_id in ids[:3]:
        await svc.call("ClaimAccount", pb.ClaimAccountRequest(account_id=account_id), REP2)
    limit = await svc.fails("ClaimAccount", pb.ClaimAccountRequest(account_id=ids[3]), REP2)
    assert limit.reason == "CLAIM_LIMIT" and "3" in limit.message


async def test_an_activity_is_corrected_and_deleted_with_events_keyed_by_its_account(accounts_service: Running) -> None:
    svc = accounts_service
    acme = await create(svc, "Activity Works")
    logged = await svc.call(
        "LogActivity", pb.LogActivityRequest(account_id=acme.id, kind="call", subject="intro"), REP1
    )
    assert logged.activity.version == 1

    def correction(version: int, *paths: str, **values: Any) -> pb.UpdateActivityRequest:
        return pb.UpdateActivityRequest(
            account_id=acme.id,
            activity_id=logged.activity.id,
            activity=accounts_pb2.Activity(**values),
            update_mask=mask(*paths),
            expected_version=version,
        )

    corrected = await svc.call("UpdateActivity", correction(1, "kind", "notes", kind="meeting", notes="demo"), REP1)
    assert (corrected.activity.kind, corrected.activity.subject, corrected.activity.version) == ("meeting", "intro", 2)
    assert (corrected.previous.kind, corrected.previous.version) == ("call", 1)
    stale = await svc.fails("UpdateActivity", correction(1, "notes", notes="x"), REP1)
    assert (stale.code, stale.metadata["current_version"]) == (grpc.StatusCode.ABORTED, "2")
    not_writable = await svc.fails("UpdateActivity", correction(0, "actor_id", actor_id="rep-2"), REP1)
    assert not_writable.code == grpc.StatusCode.INVALID_ARGUMENT and not_writable.field_errors[0].field == "actor_id"
    # A manager who reads the team's accounts sends that scope along: the account is checked in it.
    team_accounts = RecordScope(ScopeKind.TEAM, team="east").to_proto().SerializeToString()
    manager_reading_accounts = (*outgoing_metadata(*manager()), (resource_scope_key("accounts"), team_accounts))
    deleted = await svc.stub.DeleteActivity(
        pb.DeleteActivityRequest(account_id=acme.id, activity_id=logged.activity.id, expected_version=2),
        metadata=manager_reading_accounts,
        timeout=15,
    )
    assert (deleted.activity.id, deleted.activity.notes) == (logged.activity.id, "demo")
    timeline = await svc.call("ListActivities", pb.ListActivitiesRequest(account_id=acme.id), REP1)
    assert list(timeline.items) == []

    types = {"crm.accounts.activity.logged", "crm.accounts.activity.updated", "crm.accounts.activity.deleted"}
    records = await svc.wait_events(lambda rs: types <= {r.event_type for r in rs if r.key == acme.id})
    ours = [r for r in records if r.key == acme.id and r.event_type in types]
    assert [r.event_type.rsplit(".", 1)[1] for r in ours] == ["logged", "updated", "deleted"]
    assert list(ours[1].decode(events_pb2.ActivityUpdated).changed_fields) == ["kind", "notes"]
    assert ours[2].decode(events_pb2.ActivityDeleted).actor.user_id == "mgr"


async def test_a_create_repeated_under_its_key_after_the_records_deletion_is_not_found(
    accounts_service: Running,
) -> None:
    svc = accounts_service
    created = await svc.call(
        "CreateAccount", pb.CreateAccountRequest(account=account("Gone Soon"), idempotency_key="acc-k"), REP1
    )
    contact_request = pb.CreateContactRequest(
        contact=pb.ContactInput(account_id=created.account.id, name="Li"), idempotency_key="con-k"
    )
    await svc.call("CreateContact", contact_request, REP1)
    await svc.call("DeleteAccount", pb.DeleteAccountRequest(account_id=created.account.id), REP1)

    again = await svc.fails(
        "CreateAccount", pb.CreateAccountRequest(account=account("Gone Soon"), idempotency_key="acc-k"), REP1
    )
    assert again.code == grpc.StatusCode.NOT_FOUND
    assert (await svc.fails("CreateContact", contact_request, REP1)).code == grpc.StatusCode.NOT_FOUND


async def test_an_accounts_contacts_are_listed_in_the_scope_for_accounts_sent_along(accounts_service: Running) -> None:
    svc = accounts_service
    mine = await create(svc, "Contacts Mine", who=REP1)
    others = await create(svc, "Contacts Others", who=REP2)
    li = (
        await svc.call("CreateContact", pb.CreateContactRequest(contact=pb.ContactInput(account_id=mine.id, name="Li")))
    ).contact
    own_accounts = RecordScope(ScopeKind.OWN, owner_id="rep-1").to_proto().SerializeToString()
    reading_own_accounts = (*outgoing_metadata(*REP1), (resource_scope_key("accounts"), own_accounts))

    async def contacts_of(account_id: str) -> pb.ListContactsResponse:
        return await svc.stub.ListContacts(
            pb.ListContactsRequest(account_id=account_id), metadata=reading_own_accounts, timeout=15
        )

    assert [c.id for c in (await contacts_of(mine.id)).items] == [li.id]
    for account_id in (others.id, "no-such-account"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await contacts_of(account_id)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND, account_id
    # Not sent (GET /contacts?account_id=), account_id filters the list like any other filter.
    filtered = await svc.call("ListContacts", pb.ListContactsRequest(account_id=others.id), REP1)
    assert list(filtered.items) == []


async def test_hierarchy_custom_fields_and_filters(accounts_service: Running) -> None:
    svc = accounts_service
    parent = await create(svc, "Parent Group")
    child = await create(svc, "Child Co", parent_id=parent.id)
    cycle = await svc.fails(
        "UpdateAccount",
        pb.UpdateAccountRequest(
            account_id=parent.id, account=pb.AccountInput(parent_id=child.id), update_mask=mask("parent_id")
        ),
        REP1,
    )
    assert cycle.code == grpc.StatusCode.INVALID_ARGUMENT and cycle.field_errors[0].field == "parent_id"

    definition = custom_fields_pb2.CustomFieldDefinition(
        entity="account", key="channel", label="Channel", type="enum", options=["direct", "partner"]
    )
    await svc.definitions.UpsertCustomField(
        custom_fields_pb2.UpsertCustomFieldRequest(definition=definition), metadata=outgoing_metadata(*ADMIN)
    )
    # Lead definitions live in the leads service: the accounts service names the field it refuses.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await svc.definitions.ListCustomFields(
            custom_fields_pb2.ListCustomFieldsRequest(entity="lead"), metadata=outgoing_metadata(*ADMIN)
        )
    refused = from_rpc_error(caught.value)
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT and refused.field_errors[0].field == "entity"
    bad = pb.AccountInput(name="Custom Co", region="cn-east")
    bad.custom.update({"channel": "retail"})
    invalid = await svc.fails("CreateAccount", pb.CreateAccountRequest(account=bad), REP1)
    assert invalid.code == grpc.StatusCode.INVALID_ARGUMENT
    assert invalid.field_errors[0].field == "custom.channel"
    good = pb.AccountInput(name="Custom Co", region="cn-east")
    good.custom.update({"channel": "partner"})
    created = (await svc.call("CreateAccount", pb.CreateAccountRequest(account=good), REP1)).account
    filtered = await svc.call(
        "ListAccounts",
        pb.ListAccountsRequest(custom=[custom_fields_pb2.CustomFieldFilter(key="channel", value="partner")]),
        REP1,
    )
    assert [a.id for a in filtered.items] == [created.id]
    nope = custom_fields_pb2.CustomFieldFilter(key="nope", value="x")
    unknown = await svc.fails("ListAccounts", pb.ListAccountsRequest(custom=[nope]), REP1)
    assert unknown.code == grpc.StatusCode.INVALID_ARGUMENT and unknown.field_errors[0].field == "custom.nope"
    children = await svc.call("ListAccounts", pb.ListAccountsRequest(parent_id=parent.id), REP1)
    assert [a.id for a in children.items] == [child.id]
    search = await svc.call("ListAccounts", pb.ListAccountsRequest(q="child"), REP1)
    assert [a.id for a in search.items] == [child.id]
    # Rep-2 sees none of rep-1's accounts.
    assert not (await svc.call("ListAccounts", pb.ListAccountsRequest(), REP2)).items


async def test_tag_and_name_search_through_the_multicolumn_gin_index(accounts_service: Running) -> None:
    """`tags @> ... AND name ILIKE` is one scan of ix_accounts_tags_name_gin (migration 0002), each condition
    alone too; the rows and their order are those of the conditions, whatever the plan."""
    svc = accounts_service
    made = {
        name: await create(svc, name, who=ADMIN, tags=tags)
        for name, tags in [
            ("Gin Steel 1", ["hot"]),
            ("Gin Steel 2", ["cold"]),
            ("Gin Foods 3", ["hot"]),
            ("Gin steel 4", ["hot", "cold"]),
            ("Gin 100%_Steel 5", ["hot"]),
        ]
    }
    page = parse_page(2, "", "")
    cases = [
        (AccountFilter(q="steel", tags=["hot"]), ["Gin Steel 1", "Gin steel 4", "Gin 100%_Steel 5"]),
        (AccountFilter(q="%_steel", tags=["hot"]), ["Gin 100%_Steel 5"]),
        (AccountFilter(q="gin steel", tags=["hot", "cold"]), ["Gin steel 4"]),
        (AccountFilter(q="Gin Steel"), ["Gin Steel 1", "Gin Steel 2", "Gin steel 4"]),
        (AccountFilter(tags=["cold"]), ["Gin Steel 2", "Gin steel 4"]),
    ]
    async with svc.ctx.uow.engine.begin() as conn:
        assert await conn.scalar(text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_accounts_tags_name_gin'"))
        # A handful of rows is a sequential scan; take it away to check the index answers the same.
        await conn.execute(text("SET LOCAL enable_seqscan = off"))
        await conn.execute(text("SET LOCAL enable_indexscan = off"))
        for f, expected in cases:
            expected_ids = sorted(made[name].id for name in expected)
            seen: list[str] = []
            cursor = ""
            while True:
                rows, cursor = await list_accounts(conn, f, None, parse_page(page.limit, cursor, ""))
                seen += [row.id for row in rows]
                if not cursor:
                    break
            assert seen == expected_ids, f
        plan = "\n".join(
            await conn.scalars(
                text("EXPLAIN SELECT id FROM accounts WHERE tags @> ARRAY['hot'] AND name ILIKE '%steel%' ORDER BY id")
            )
        )
        assert "ix_accounts_tags_name_gin" in plan and "BitmapAnd" not in plan, plan


async def test_keyset_paging_and_idempotency(accounts_service: Running) -> None:
    svc = accounts_service
    first = await svc.call("CreateAccount", pb.CreateAccountRequest(account=account("Paged 0"), idempotency_key="k1"))
    repeat = await svc.call("CreateAccount", pb.CreateAccountRequest(account=account("Paged 0"), idempotency_key="k1"))
    assert repeat.account.id == first.account.id
    for n in range(1, 5):
        await create(svc, f"Paged {n}", who=ADMIN)
    seen: list[str] = []
    cursor = ""
    while True:
        page = await svc.call(
            "ListAccounts",
            pb.ListAccountsRequest(q="Paged", page=common_pb2.PageRequest(limit=2, cursor=cursor, sort="-name")),
        )
        seen += [a.name for a in page.items]
        cursor = page.page_info.next_cursor
        if not cursor:
            break
    assert seen == [f"Paged {n}" for n in range(4, -1, -1)]
    for sort, order in (("updated_at", range(5)), ("-updated_at", range(4, -1, -1))):  # a time sort's cursor
        seen, cursor = [], ""
        while True:
            page = await svc.call(
                "ListAccounts",
                pb.ListAccountsRequest(q="Paged", page=common_pb2.PageRequest(limit=2, cursor=cursor, sort=sort)),
            )
            seen += [a.name for a in page.items]
            cursor = page.page_info.next_cursor
            if not cursor:
                break
        assert seen == [f"Paged {n}" for n in order], sort


async def test_pool_return_job_and_reminders(accounts_service: Running) -> None:
    svc = accounts_service
    quiet = await create(svc, "Quiet C", tier="C")
    busy = await create(svc, "Busy A", tier="A")
    later = utcnow() + timedelta(days=8)
    svc.ctx.clock = lambda: later
    with acting_as(SYSTEM, ALL_RECORDS):
        returned = await handlers.return_inactive_accounts(svc.ctx, batch_size=100)
    assert returned == 1
    pool = await svc.call("ListPoolAccounts", pb.ListPoolAccountsRequest(), REP2)
    assert [a.id for a in pool.items] == [quiet.id]

    rule = accounts_pb2.ReminderRule(
        name="A not contacted", tiers=["A"], inactive_days=3, task_title="Call them", due_in_hours=0, enabled=True
    )
    await svc.call("CreateReminderRule", pb.CreateReminderRuleRequest(rule=rule), ADMIN)
    with acting_as(SYSTEM, ALL_RECORDS):
        assert await handlers.raise_reminders(svc.ctx, batch_size=100) == 1
        assert await handlers.raise_reminders(svc.ctx, batch_size=100) == 0  # one open task per account
    svc.ctx.clock = lambda: later + timedelta(hours=1)
    overdue = await svc.call("ListTasks", pb.ListTasksRequest(due="overdue"), REP1)
    assert [t.account_id for t in overdue.items] == [busy.id]
    assert overdue.items[0].source == "reminder_rule"


async def test_bulk_transfer_moves_accounts_contacts_and_tasks(accounts_service: Running) -> None:
    svc = accounts_service
    a1 = await create(svc, "Leaver One")
    a2 = await create(svc, "Leaver Two")
    await svc.call(
        "CreateContact", pb.CreateContactRequest(contact=pb.ContactInput(account_id=a1.id, name="Han")), REP1
    )
    await svc.call("CreateTask", pb.CreateTaskRequest(task=pb.TaskInput(account_id=a1.id, title="follow up")), REP1)
    request = pb.BulkTransferAccountsRequest(from_owner_id="rep-1", to_owner_id="rep-2", idempotency_key="leave-1")
    result = await svc.call("BulkTransferAccounts", request, manager())
    assert (result.accounts_transferred, result.contacts_transferred, result.tasks_transferred) == (2, 1, 1)
    assert sorted(result.account_ids) == sorted([a1.id, a2.id])  # for their own audit rows
    again = await svc.call("BulkTransferAccounts", request, manager())
    assert again == result  # the same answer, nothing moved again
    mine = await svc.call("ListAccounts", pb.ListAccountsRequest(), REP2)
    assert {a.name for a in mine.items} == {"Leaver One", "Leaver Two"}
    tasks = await svc.call("ListTasks", pb.ListTasksRequest(), REP2)
    assert [t.title for t in tasks.items] == ["follow up"]
    await svc.wait_events(
        lambda rs: (
            sum(
                1
                for r in rs
                if r.event_type == "crm.accounts.account.transferred"
                and r.decode(events_pb2.AccountTransferred).bulk_transfer_id == result.bulk_transfer_id
            )
            == 2
        )
    )


async def test_import_maven_accounts_keeps_hierarchy_and_typos(accounts_service: Running) -> None:
    svc = accounts_service
    rows = list(csv.DictReader((DATASETS / "maven-crm-sales-opportunities" / "accounts.csv").open()))
    assert len(rows) == 85
    ids: dict[str, str] = {}
    pending = rows
    while pending:  # parents before their subsidiaries
        ready = [r for r in pending if not r["subsidiary_of"] or r["subsidiary_of"] in ids]
        assert ready, "subsidiary_of names an account missing from the file"
        for r in ready:
            request = pb.AccountInput(
                name=r["account"],
                industry=r["sector"],
                size=r["employees"],
                region=r["office_location"],
                annual_revenue=common_pb2.Money(amount=str(Decimal(r["revenue"]) * 1_000_000), currency="USD"),
                parent_id=ids.get(r["subsidiary_of"], ""),
            )
            created = await svc.call("CreateAccount", pb.CreateAccountRequest(account=request), ADMIN)
            ids[r["account"]] = created.account.id
        pending = [r for r in pending if r["account"] not in ids]
    for r in rows:
        got = (await svc.call("GetAccount", pb.GetAccountRequest(account_id=ids[r["account"]]))).account
        assert got.parent_id == ids.get(r["subsidiary_of"], "")
        assert got.industry == r["sector"]  # "technolgy" stays as data
    technolgy = await svc.call(
        "ListAccounts", pb.ListAccountsRequest(industries=["technolgy"], page=common_pb2.PageRequest(limit=100))
    )
    assert len(technolgy.items) == sum(1 for r in rows if r["sector"] == "technolgy")


async def test_concurrent_claims_have_one_winner_and_replicas_return_each_account_once(
    accounts_service: Running,
) -> None:
    svc = accounts_service
    pooled = await svc.call("CreateAccount", pb.CreateAccountRequest(account=account("Contested"), in_pool=True))
    outcomes = await asyncio.gather(
        svc.call("ClaimAccount", pb.ClaimAccountRequest(account_id=pooled.account.id), REP2),
        svc.call("ClaimAccount", pb.ClaimAccountRequest(account_id=pooled.account.id), REP3),
        return_exceptions=True,
    )
    winners = [o for o in outcomes if not isinstance(o, BaseException)]
    losers = [from_rpc_error(o) for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(winners) == 1 and len(losers) == 1
    assert losers[0].code == grpc.StatusCode.FAILED_PRECONDITION

    quiet = [await create(svc, f"Quiet {n}", tier="C") for n in range(6)]
    later = utcnow() + timedelta(days=8)
    svc.ctx.clock = lambda: later
    with acting_as(SYSTEM, ALL_RECORDS):
        # Two "replicas" run the timer at once; SKIP LOCKED splits the rows between them.
        counts = await asyncio.gather(
            handlers.return_inactive_accounts(svc.ctx, batch_size=100),
            handlers.return_inactive_accounts(svc.ctx, batch_size=100),
        )
    ids = {a.id for a in quiet} | {pooled.account.id}  # the claimed one (no tier counts as C) too
    assert sum(counts) == len(ids)
    records = await svc.wait_events(
        lambda rs: {r.key for r in rs if r.event_type == "crm.accounts.account.released"} >= ids
    )
    released = [r.key for r in records if r.event_type == "crm.accounts.account.released" and r.key in ids]
    assert sorted(released) == sorted(ids)  # each exactly once


async def test_deal_activity_from_sales_events_keeps_the_account_active(
    consuming_service: Running, kafka_settings: KafkaSettings
) -> None:
    svc = consuming_service
    month_ago = utcnow() - timedelta(days=30)
    svc.ctx.clock = lambda: month_ago
    with acting_as(*REP1):  # a tier-C account created a month ago, never touched since
        old = await handlers.create_account(
            svc.ctx, {"name": "Deal Maker", "tier": "C"}, idempotency_key="", in_pool=False
        )
    svc.ctx.clock = utcnow
    deal = sales_pb2.Opportunity(id="opp-1", account_id=old.id, stage="solution_demo")
    await produce_event(
        kafka_settings.bootstrap_servers, sales_events.OpportunityStageChanged(opportunity=deal), key=deal.id
    )
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        got = (await svc.call("GetAccount", pb.GetAccountRequest(account_id=old.id))).account
        if got.HasField("last_activity_at"):
            break
        assert asyncio.get_running_loop().time() < deadline, "the stage change never reached the account"
        await asyncio.sleep(0.2)
    # The deal moved just now: the month-old account is not quiet, so it stays with its owner.
    with acting_as(SYSTEM, ALL_RECORDS):
        assert await handlers.return_inactive_accounts(svc.ctx, batch_size=100) == 0
    svc.ctx.clock = lambda: utcnow() + timedelta(days=8)
    with acting_as(SYSTEM, ALL_RECORDS):
        assert await handlers.return_inactive_accounts(svc.ctx, batch_size=100) == 1


async def test_the_dedupe_lookup_probes_the_unique_index_under_a_generic_plan(postgres_url: str) -> None:
    """Every create and rename looks its name + region up; a prepared statement's generic plan must
    still probe the partial unique index, not read the table."""
    await _migrate(postgres_url)
    engine = create_engine(postgres_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO accounts (id, name, dedupe_key, tags, custom, created_at, updated_at)"
                    " SELECT 'acc-' || g, 'Account ' || g, 'account ' || g, '{}', '{}', now(), now()"
                    " FROM generate_series(1, 20000) AS g"
                )
            )
            await conn.execute(text("ANALYZE accounts"))
        async with engine.begin() as conn:
            plan = await generic_plan(conn, repo.live_account_with_dedupe_key("account 7"))
            found = await repo.find_by_dedupe_key(conn, "account 7")
        assert "Index Scan using ux_accounts_dedupe on accounts" in plan, plan
        assert found is not None and found.id == "acc-7"
    finally:
        await engine.dispose()
