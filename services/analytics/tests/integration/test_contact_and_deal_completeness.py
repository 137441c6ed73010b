"""Data completeness of contacts and deals on PostgreSQL, events applied through the consumer's
handlers (no broker): each from its own events (a later edit counts, a stale snapshot applied late
changes nothing, a deleted contact leaves for good), a merged account's contacts on the survivor in
either order of the topics, the caller's record scope and the owner, team and period filters, rep
performance counting a rep's contacts and deals, a redelivery changing nothing and a rebuild's
replay restoring the same rows. The contact read model keeps which key fields are filled, never
their values."""

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from analytics import repository as repo
from analytics.domain import ChurnPolicy
from analytics.handlers import ReportFilter, Reports
from analytics.testing import deliver
from crm.accounts.v1 import accounts_pb2
from crm.accounts.v1 import events_pb2 as accounts_events
from crm.common.v1 import common_pb2
from crm.sales.v1 import events_pb2 as sales_events
from crm.sales.v1 import sales_pb2
from crm_platform.db import transaction
from crm_platform.principal import ALL_RECORDS, Principal, RecordScope, ScopeKind, acting_as
from crm_platform.timeutil import to_timestamp, utcnow
from google.protobuf.message import Message
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

Row = tuple[int, Decimal | None, dict[str, int]]


@pytest.fixture
def reports(engine: AsyncEngine) -> Reports:
    return Reports(engine, reporting_currency="CNY", churn_policy=ChurnPolicy())


def days_ago(days: float) -> Any:
    return to_timestamp(utcnow() - timedelta(days=days))


def account(account_id: str, owner: str = "r1", team: str = "east") -> Message:
    return accounts_events.AccountCreated(
        account=accounts_pb2.Account(
            id=account_id,
            name=account_id,
            owner_id=owner,
            team=team,
            region="cn-east",
            version=1,
            created_at=days_ago(9),
        )
    )


def contact(
    contact_id: str,
    account_id: str = "A1",
    *,
    owner: str = "r1",
    team: str = "east",
    version: int = 1,
    age: float = 3,
    **fields: Any,
) -> accounts_pb2.Contact:
    return accounts_pb2.Contact(
        id=contact_id,
        account_id=account_id,
        owner_id=owner,
        team=team,
        region="cn-east",
        version=version,
        created_at=days_ago(age),
        **fields,
    )


def created(c: accounts_pb2.Contact) -> Message:
    return accounts_events.ContactCreated(contact=c)


def updated(c: accounts_pb2.Contact, *changed: str) -> Message:
    return accounts_events.ContactUpdated(contact=c, changed_fields=list(changed))


def deleted(contact_id: str, account_id: str = "A1") -> Message:
    return accounts_events.ContactDeleted(contact_id=contact_id, account_id=account_id)


FULL_CONTACT = {"name": "Li Lei", "title": "CTO", "mobile": "13800000000", "email": "li@acme.cn"}
FULL_CONTACT |= {"decision_role": "decision_maker"}


def deal(
    deal_id: str,
    *,
    owner: str = "r1",
    team: str = "east",
    version: int = 1,
    age: float = 3,
    amount: str = "0",
    **fields: Any,
) -> sales_pb2.Opportunity:
    return sales_pb2.Opportunity(
        id=deal_id,
        account_id="A1",
        name=deal_id,
        owner_id=owner,
        team=team,
        region="cn-east",
        status="open",
        stage="initial_contact",
        amount=common_pb2.Money(amount=amount, currency="CNY"),
        created_at=days_ago(age),
        version=version,
        **fields,
    )


def full_deal(deal_id: str, **changes: Any) -> sales_pb2.Opportunity:
    item = sales_pb2.LineItem(product_id="p-1", product_name="CRM Pro", quantity="2")
    fields = {"amount": "12000", "expected_close_date": "2026-12-31", "primary_contact_id": "C1"}
    fields |= {"line_items": [item], "next_step": "demo on Friday"}
    return deal(deal_id, **{**fields, **changes})


def deal_created(o: sales_pb2.Opportunity) -> Message:
    return sales_events.OpportunityCreated(opportunity=o)


async def completeness(
    reports: Reports, f: ReportFilter | None = None, scope: RecordScope = ALL_RECORDS
) -> dict[str, Row]:
    """Per entity: records, overall completeness and how many records fill each key field."""
    with acting_as(Principal(user_id="caller", roles=("sales_manager",)), scope):
        rows = await reports.data_completeness(f or ReportFilter())
    return {row.entity: (row.records, row.completeness, {name: n for name, n, _ in row.fields}) for row in rows}


async def contact_rows(engine: AsyncEngine) -> dict[str, tuple[Any, ...]]:
    c = repo.contacts.c
    async with engine.connect() as conn:
        found = await conn.execute(select(c.id, c.account_id, c.team, c.deleted, c.completeness))
    return {row.id: tuple(row)[1:] for row in found}


async def test_contacts_and_deals_have_their_completeness_from_their_events(
    engine: AsyncEngine, reports: Reports
) -> None:
    await deliver(
        engine,
        [
            account("A1"),
            created(contact("C1", **FULL_CONTACT)),
            created(contact("C2", name="Han Meimei", phone="021-5555")),
            deal_created(full_deal("D1")),
            # Sales gives a deal created without an amount or line items an amount of 0: none given.
            deal_created(deal("D2", product_line="CRM Pro")),
        ],
    )

    got = await completeness(reports)

    assert list(got) == ["lead", "account", "contact", "opportunity"]
    assert got["lead"] == (0, None, {name: 0 for name in got["lead"][2]})
    assert got["contact"] == (
        2,
        Decimal("0.7000"),
        {"name": 2, "title": 1, "phone": 2, "email": 1, "decision_role": 1},
    )
    assert got["opportunity"] == (
        2,
        Decimal("0.6000"),
        {"amount": 1, "expected_close_date": 1, "primary_contact": 1, "products": 2, "next_step": 1},
    )
    # Which key fields are filled, never their values: no name, phone number or email address.
    async with engine.connect() as conn:
        stored = (await conn.execute(select(repo.contacts).where(repo.contacts.c.id == "C1"))).one()._asdict()
    assert stored["filled"] == ["name", "title", "phone", "email", "decision_role"]
    assert not {"Li Lei", "13800000000", "li@acme.cn", "CTO", "decision_maker"} & {str(v) for v in stored.values()}


async def test_a_contact_or_deal_edited_later_counts_as_edited_and_a_stale_snapshot_changes_nothing(
    engine: AsyncEngine, reports: Reports
) -> None:
    sparse = contact("C1", name="Li Lei")
    richer = contact("C1", version=2, name="Li Lei", title="CTO", email="li@acme.cn")
    bare = deal("D1")
    priced = deal("D1", version=2, amount="5000", next_step="call back")
    await deliver(engine, [account("A1"), created(sparse), deal_created(bare)])
    assert (await completeness(reports))["contact"][:2] == (1, Decimal("0.2000"))
    assert (await completeness(reports))["opportunity"][:2] == (1, Decimal("0.0000"))

    await deliver(engine, [updated(richer, "title", "email"), sales_events.OpportunityUpdated(opportunity=priced)])
    # The older snapshots again, late (another event id: the inbox does not know them).
    await deliver(engine, [updated(sparse), sales_events.OpportunityUpdated(opportunity=bare)])

    got = await completeness(reports)
    assert got["contact"] == (1, Decimal("0.6000"), {"name": 1, "title": 1, "phone": 0, "email": 1, "decision_role": 0})
    assert got["opportunity"][:2] == (1, Decimal("0.4000"))
    assert got["opportunity"][2]["amount"] == got["opportunity"][2]["next_step"] == 1


async def test_a_deleted_contact_leaves_for_good(engine: AsyncEngine, reports: Reports) -> None:
    kept, gone = contact("C1", **FULL_CONTACT), contact("C2", name="Han Meimei")
    await deliver(engine, [account("A1"), created(kept), created(gone), deleted("C2"), deleted("C2")])
    # A stale snapshot of it redelivered late brings it back neither to the report nor to rep performance.
    await deliver(engine, [updated(contact("C2", name="Han Meimei", title="CFO"), "title")])
    # A deletion applied before anything else of its contact (a replay of a partition ahead of the others).
    await deliver(engine, [deleted("C3"), created(contact("C3", name="Wang Wu"))])

    assert (await completeness(reports))["contact"][:2] == (1, Decimal("1.0000"))
    with acting_as(Principal(user_id="caller", roles=("sales_manager",)), ALL_RECORDS):
        (rep,) = await reports.rep_performance(ReportFilter())
    # Account A1 (name and region of 8 key fields) and contact C1 (all 5): (0.25 + 1) / 2.
    assert (rep.owner_id, rep.data_completeness) == ("r1", Decimal("0.6250"))
    rows = await contact_rows(engine)
    assert (rows["C2"][2], rows["C3"][2]) == (True, True)


async def test_a_deal_projected_before_its_key_fields_were_kept_counts_from_its_next_event(
    engine: AsyncEngine, reports: Reports
) -> None:
    await deliver(engine, [account("A1"), deal_created(full_deal("D1"))])
    # D0 as the migration found it: projected before, which of its key fields are filled unknown (NULL).
    old = {"id": "D0", "account_id": "A1", "owner_id": "r1", "team": "east", "region": "cn-east", "history": []}
    async with transaction(engine) as conn:
        await conn.execute(insert(repo.opportunities).values(**old, created_at=utcnow() - timedelta(days=3), version=1))

    assert (await completeness(reports))["opportunity"][:2] == (1, Decimal("1.0000"))
    with acting_as(Principal(user_id="caller", roles=("sales_manager",)), ALL_RECORDS):
        (rep,) = await reports.rep_performance(ReportFilter())
    assert rep.data_completeness == Decimal("0.6250")  # account A1 (0.25) and D1 (1): not D0 as none filled

    await deliver(engine, [sales_events.OpportunityUpdated(opportunity=deal("D0", version=2, amount="100"))])
    assert (await completeness(reports))["opportunity"][:2] == (2, Decimal("0.6000"))


async def test_a_merged_accounts_contacts_follow_the_survivor_in_either_order(
    engine: AsyncEngine, reports: Reports
) -> None:
    merge = accounts_events.AccountMerged(duplicate_id="DUP", survivor_id="SUR", moved_contact_ids=["C1", "C2"])
    await deliver(engine, [account("SUR", owner="r2", team="west"), account("DUP", owner="r1", team="east")])
    # C1 applied before the merge, C2 after it (its creation under the duplicate's id, applied late).
    await deliver(engine, [created(contact("C1", "DUP", **FULL_CONTACT)), merge])
    await deliver(engine, [created(contact("C2", "DUP", name="Han Meimei"))])

    rows = await contact_rows(engine)
    assert (rows["C1"][0], rows["C2"][0]) == ("SUR", "SUR")
    # The accounts service moves them to the survivor's owner and territory, each a new version.
    moved = {"account_id": "SUR", "owner": "r2", "team": "west", "version": 2}
    await deliver(
        engine,
        [
            updated(contact("C1", **{**moved, **FULL_CONTACT}), "account_id", "owner_id", "team"),
            updated(contact("C2", **moved, name="Han Meimei"), "account_id", "owner_id", "team"),
        ],
    )
    west, east = RecordScope(ScopeKind.TEAM, team="west"), RecordScope(ScopeKind.TEAM, team="east")
    assert (await completeness(reports, scope=west))["contact"][:2] == (2, Decimal("0.6000"))
    assert (await completeness(reports, scope=east))["contact"][:2] == (0, None)
    assert {row[0] for row in (await contact_rows(engine)).values()} == {"SUR"}


async def test_the_callers_scope_and_the_owner_team_and_period_filters_apply(
    engine: AsyncEngine, reports: Reports
) -> None:
    await deliver(
        engine,
        [
            account("A1"),
            created(contact("C1", **FULL_CONTACT)),  # r1, east, 3 days old
            created(contact("C2", owner="r2", name="Han Meimei")),  # r2, east
            created(contact("C3", owner="r3", team="west", name="Wang Wu", title="CFO")),  # r3, west
            created(contact("C4", name="Zhao Liu", age=30)),  # r1, east, a month old
            deal_created(full_deal("D1")),  # r1, east
            deal_created(full_deal("D2", owner="r3", team="west", next_step="")),  # r3, west
            deal_created(deal("D3", owner="r2", age=30, amount="100")),  # r2, east, a month old
        ],
    )

    def records(got: dict[str, Row]) -> tuple[Any, ...]:
        return got["contact"][:2] + got["opportunity"][:2]

    east = RecordScope(ScopeKind.TEAM, team="east")
    assert records(await completeness(reports, scope=east)) == (3, Decimal("0.4667"), 2, Decimal("0.6000"))
    west = RecordScope(ScopeKind.TEAM, team="west")
    assert records(await completeness(reports, scope=west)) == (1, Decimal("0.4000"), 1, Decimal("0.8000"))
    own = RecordScope(ScopeKind.OWN, owner_id="r2")
    assert records(await completeness(reports, scope=own)) == (1, Decimal("0.2000"), 1, Decimal("0.2000"))
    nobody = RecordScope(ScopeKind.TEAM, team="")
    assert records(await completeness(reports, scope=nobody)) == (0, None, 0, None)
    assert records(await completeness(reports, ReportFilter(owner_id="r1"))) == (2, Decimal("0.6000"), 1, Decimal(1))
    assert records(await completeness(reports, ReportFilter(team="west"))) == (1, Decimal("0.4000"), 1, Decimal("0.8"))
    # The period compares with each record's creation: C4 and D3 were created a month ago.
    week = ReportFilter(period_from=utcnow() - timedelta(days=7))
    assert records(await completeness(reports, week, scope=east)) == (2, Decimal("0.6000"), 1, Decimal(1))
    month_ago = ReportFilter(period_to=utcnow() - timedelta(days=7))
    assert records(await completeness(reports, month_ago)) == (1, Decimal("0.2000"), 1, Decimal("0.2000"))


async def test_rep_performance_counts_a_reps_contacts_and_deals(engine: AsyncEngine, reports: Reports) -> None:
    await deliver(
        engine,
        [
            account("A1"),  # r1: name and region of 8 key fields, 0.25
            created(contact("C1", **FULL_CONTACT)),  # r1: 1
            deal_created(deal("D1", amount="100")),  # r1: amount alone, 0.2
            created(contact("C2", owner="r2", name="Han Meimei")),  # r2, a contact alone: 0.2
            deal_created(full_deal("D2", owner="r3", team="west")),  # r3, in another team
        ],
    )
    east = RecordScope(ScopeKind.TEAM, team="east")
    with acting_as(Principal(user_id="caller", roles=("sales_manager",)), east):
        rows = await reports.rep_performance(ReportFilter())

    assert [(row.owner_id, row.team, row.data_completeness) for row in rows] == [
        ("r1", "east", Decimal("0.4833")),
        ("r2", "east", Decimal("0.2000")),
    ]


async def test_a_redelivery_changes_nothing_and_a_rebuilds_replay_restores_the_rows(
    engine: AsyncEngine, reports: Reports
) -> None:
    merge = accounts_events.AccountMerged(duplicate_id="DUP", survivor_id="SUR", moved_contact_ids=["C1"])
    accounts = [account("SUR"), account("DUP"), merge]
    contacts = [
        created(contact("C1", "DUP", name="Li Lei")),
        updated(contact("C1", "SUR", version=2, **FULL_CONTACT), "account_id", "title"),
        created(contact("C2", "SUR", name="Han Meimei")),
        deleted("C2", "SUR"),
        created(contact("C3", "SUR", name="Wang Wu", phone="021-5555", owner="r2")),
    ]
    deals = [deal_created(deal("D1")), sales_events.OpportunityUpdated(opportunity=full_deal("D1", version=2))]
    await deliver(engine, accounts + contacts + deals)
    want_report = await completeness(reports)
    want_rows = await contact_rows(engine)
    assert want_report["contact"][:2] == (2, Decimal("0.7000"))
    assert want_report["opportunity"][:2] == (1, Decimal("1.0000"))

    await deliver(engine, accounts + contacts + deals)  # everything again, under new event ids
    assert await completeness(reports) == want_report
    assert await contact_rows(engine) == want_rows

    async with transaction(engine) as conn:
        await repo.start_next_generation(conn, "analytics-projection")
        assert await repo.count_rows(conn, repo.contacts) == 0
        assert await repo.count_rows(conn, repo.opportunities) == 0
    assert (await completeness(reports))["contact"][:2] == (0, None)

    # The replay reads the topics side by side: here the contacts' partition before the accounts'.
    await deliver(engine, contacts + deals + accounts)
    assert await completeness(reports) == want_report
    assert await contact_rows(engine) == want_rows


async def test_an_account_merged_into_another_or_deleted_leaves_the_accounts_completeness(
    engine: AsyncEngine, reports: Reports
) -> None:
    merge = accounts_events.AccountMerged(duplicate_id="DUP", survivor_id="SUR")
    await deliver(engine, [account("SUR"), account("DUP"), account("GONE"), merge])
    await deliver(engine, [accounts_events.AccountDeleted(account_id="GONE")])

    assert (await completeness(reports))["account"][:2] == (1, Decimal("0.2500"))  # the survivor alone
    with acting_as(Principal(user_id="caller", roles=("sales_manager",)), ALL_RECORDS):
        (rep,) = await reports.rep_performance(ReportFilter())
    assert rep.data_completeness == Decimal("0.2500")
