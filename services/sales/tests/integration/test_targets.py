"""Sales targets and attainment (业绩达成率) on a real database: versions, one target per owner or
team and period, record scope, and attainment rows against the forecast's won deals."""

from datetime import date
from decimal import Decimal

import pytest
from crm_platform.errors import AlreadyExists, NotFound, PermissionDenied, StaleVersion, ValidationFailed
from crm_platform.money import Money
from sales import domain as d
from sales.handlers import ForecastQuery, LineItemIn, OpportunityIn, Page, SalesHandlers
from sales.testing import as_user

pytestmark = pytest.mark.integration


def cny(amount: str) -> Money:
    return Money(Decimal(amount), "CNY")


async def set_target(sales: SalesHandlers, period: str, amount: Money, *, owner_id: str = "", team: str = "") -> str:
    target = await sales.create_target(idempotency_key="", owner_id=owner_id, team=team, period=period, amount=amount)
    return target.id


async def deal(
    sales: SalesHandlers, owner: str, amount: str, *, won_on: date | None = None, closes_on: date | None = None
) -> None:
    """A deal of `owner` in team east: won on `won_on`, else open in the commit category."""
    with as_user(owner, "sales_rep", team="east"):
        opp = await sales.create_opportunity(
            OpportunityIn(
                account_id=f"acc-{owner}-{amount}",
                name="Deal",
                line_items=[LineItemIn("p", "GTX", "GTX", Decimal(1), cny(amount), Decimal(0))],
                expected_close_date=closes_on,
                forecast_category=d.ForecastCategory.COMMIT,
            )
        )
        if won_on:
            await sales.win(opp.id, expected_version=0, close_date=won_on, amount=None)


async def test_a_target_changes_and_is_deleted_at_its_version(sales: SalesHandlers) -> None:
    with as_user("boss", "sales_manager", team="east", scope="team"):
        created = await sales.create_target(
            idempotency_key="", owner_id="rep1", team="", period="2026-12", amount=cny("100000")
        )
        assert (created.owner_id, created.team, created.period, created.version) == ("rep1", "east", "2026-12", 1)
        assert (created.amount.amount, created.amount.currency, created.set_by) == ("100000.00", "CNY", "boss")
        changed = await sales.update_target(created.id, expected_version=1, amount=cny("120000"))
        assert (changed.previous.amount.amount, changed.record.amount.amount) == ("100000.00", "120000.00")
        assert changed.record.version == 2
        with pytest.raises(StaleVersion):
            await sales.update_target(created.id, expected_version=1, amount=cny("1"))
        with pytest.raises(StaleVersion):
            await sales.delete_target(created.id, expected_version=1)
        deleted = await sales.delete_target(created.id, expected_version=2)
        assert deleted.amount.amount == "120000.00"
        with pytest.raises(NotFound):
            await sales.get_target(created.id)


async def test_a_repeated_idempotency_key_answers_the_first_target(sales: SalesHandlers) -> None:
    with as_user("boss", "sales_manager", team="east", scope="team"):
        first = await sales.create_target(
            idempotency_key="k-1", owner_id="rep1", team="", period="2026-12", amount=cny("5")
        )
        again = await sales.create_target(
            idempotency_key="k-1", owner_id="rep1", team="", period="2026-12", amount=cny("5")
        )
    assert again.id == first.id


async def test_ill_formed_periods_and_amounts_are_refused_naming_the_field(sales: SalesHandlers) -> None:
    with as_user("boss", "sales_manager", team="east", scope="team"):
        for period, amount, field in [
            ("2026-13", cny("1"), "period"),
            ("Q4-2026", cny("1"), "period"),
            ("2026-Q4", cny("0"), "amount.amount"),
            ("2026-Q4", cny("0.001"), "amount.amount"),
        ]:
            with pytest.raises(ValidationFailed) as refused:
                await set_target(sales, period, amount, owner_id="rep1")
            assert [e.field for e in refused.value.errors] == [field]
    with as_user("admin", "admin", team=""):
        with pytest.raises(ValidationFailed) as refused:
            await set_target(sales, "2026-Q4", cny("1"))  # a team's target, and the caller has no team
        assert [e.field for e in refused.value.errors] == ["team"]


async def test_one_target_per_owner_or_team_and_period(sales_each_database: SalesHandlers) -> None:
    """The partial unique indexes, on SQLite as on PostgreSQL: an owner's and a team's targets of one
    period stand side by side, a second one of either is a 409 naming the first to who may read it."""
    sales = sales_each_database
    with as_user("boss", "sales_manager", team="east", scope="team"):
        owners = await set_target(sales, "2026-Q4", cny("10"), owner_id="rep1")
        teams = await set_target(sales, "2026-Q4", cny("30"))
        await set_target(sales, "2026-12", cny("5"), owner_id="rep1")
        for owner_id, existing in (("rep1", owners), ("", teams)):
            with pytest.raises(AlreadyExists) as taken:
                await set_target(sales, "2026-Q4", cny("1"), owner_id=owner_id)
            assert taken.value.existing_id == existing
    # rep1 moved to the west team: their east target is not the west manager's to see.
    with as_user("west-boss", "sales_manager", team="west", scope="team"):
        with pytest.raises(AlreadyExists) as taken:
            await set_target(sales, "2026-Q4", cny("1"), owner_id="rep1")
        assert taken.value.existing_id == ""
        await set_target(sales, "2026-Q4", cny("1"))  # the west team's own


async def test_targets_are_listed_and_changed_only_within_the_record_scope(sales: SalesHandlers) -> None:
    with as_user("boss", "sales_manager", team="east", scope="team"):
        rep1s = await set_target(sales, "2026-11", cny("10"), owner_id="rep1")
        rep1_q1 = await set_target(sales, "2027-Q1", cny("40"), owner_id="rep1")
        east = await set_target(sales, "2026-Q4", cny("30"))
        with pytest.raises(PermissionDenied):
            await set_target(sales, "2026-Q4", cny("30"), team="west")
    with as_user("west-boss", "sales_manager", team="west", scope="team"):
        west = await set_target(sales, "2026-Q4", cny("20"))
        assert [t.id for t in (await sales.list_targets(Page(), from_date=None, to_date=None)).items] == [west]
        with pytest.raises(NotFound):
            await sales.get_target(east)
        with pytest.raises(NotFound):
            await sales.update_target(east, expected_version=0, amount=cny("1"))
        with pytest.raises(NotFound):
            await sales.delete_target(rep1s, expected_version=0)
    with as_user("rep1", "sales_rep", team="east", scope="own"):
        mine = await sales.list_targets(Page(), from_date=None, to_date=None)
        assert sorted(t.id for t in mine.items) == sorted([rep1s, rep1_q1])  # not the team's
    with as_user("analyst", "analyst", scope="all"):
        seen: list[str] = []
        cursor = ""
        while True:
            page = await sales.list_targets(Page(limit=1, cursor=cursor), from_date=None, to_date=None)
            seen += [t.id for t in page.items]
            cursor = page.next_cursor
            if not cursor:
                break
        assert sorted(seen) == sorted([rep1s, rep1_q1, east, west])
        # Periods overlapping December: the month is not, the quarters are.
        december = await sales.list_targets(Page(), from_date=date(2026, 12, 1), to_date=date(2026, 12, 31))
        assert sorted(t.id for t in december.items) == sorted([east, west])
        from_2027 = await sales.list_targets(Page(), from_date=date(2027, 2, 1), to_date=None, owner_id="rep1")
        assert [t.id for t in from_2027.items] == [rep1_q1]
        assert [t.id for t in (await sales.list_targets(Page(), from_date=None, to_date=None, team="west")).items] == [
            west
        ]


async def test_attainment_compares_targets_with_the_forecasts_won_deals(sales: SalesHandlers) -> None:
    await deal(sales, "rep1", "60000", won_on=date(2026, 11, 10))
    await deal(sales, "rep1", "50000", closes_on=date(2026, 11, 28))  # commit, open at 10 %
    await deal(sales, "rep2", "5000", won_on=date(2026, 11, 12))  # won without a target
    with as_user("boss", "sales_manager", team="east", scope="team"):
        await set_target(sales, "2026-11", cny("80000"), owner_id="rep1")
        await set_target(sales, "2026-11", cny("1000"), owner_id="rep3")  # nothing won yet
        await set_target(sales, "2026-Q4", cny("200000"))  # the team's quarter
        await set_target(sales, "2026-Q4", cny("999"), owner_id="rep1")  # a quarter: not in months
        by_owner = await sales.attainment(ForecastQuery(from_date=date(2026, 11, 1), to_date=date(2026, 11, 30)))
        by_team = await sales.attainment(ForecastQuery(quarter=True, by_team=True))
        forecast = await sales.forecast(ForecastQuery(from_date=date(2026, 11, 1), to_date=date(2026, 11, 30)))
    assert [_row(x) for x in by_owner] == [
        ("2026-11", "rep1", Decimal(80000), Decimal(60000), Decimal("0.75"), Decimal(50000), Decimal(5000)),
        ("2026-11", "rep2", None, Decimal(5000), None, Decimal(0), Decimal(0)),
        ("2026-11", "rep3", Decimal(1000), Decimal(0), Decimal(0), Decimal(0), Decimal(0)),
    ]
    # Closed won is the forecast's own figure.
    assert {x.group: x.closed_won for x in forecast} == {x.group: x.closed_won for x in by_owner if x.group != "rep3"}
    assert [_row(x) for x in by_team] == [
        ("2026-Q4", "east", Decimal(200000), Decimal(65000), Decimal("0.325"), Decimal(50000), Decimal(5000))
    ]
    # A quarter without its own target: the sum of its three monthly targets, once each month has one.
    with as_user("boss", "sales_manager", team="east", scope="team"):
        quarter = ForecastQuery(quarter=True)
        assert {x.group: x.target for x in await sales.attainment(quarter)} == {"rep1": Decimal(999), "rep2": None}
        for month in ("2026-10", "2026-11"):
            await set_target(sales, month, cny("20000"), owner_id="rep2")
        assert {x.group: x.target for x in await sales.attainment(quarter)}["rep2"] is None  # two of three
        await set_target(sales, "2026-12", cny("10000"), owner_id="rep2")
        rows = {x.group: _row(x) for x in await sales.attainment(quarter)}
    assert rows["rep2"] == ("2026-Q4", "rep2", Decimal(50000), Decimal(5000), Decimal("0.1"), Decimal(0), Decimal(0))
    # Quarter to date: the quarter's target is still its three months', not the months of the range.
    with as_user("boss", "sales_manager", team="east", scope="team"):
        to_date = ForecastQuery(quarter=True, from_date=date(2026, 10, 1), to_date=date(2026, 11, 20))
        assert {x.group: x.target for x in await sales.attainment(to_date)}["rep2"] == Decimal(50000)
    assert rows["rep1"][2] == Decimal(999)  # its own quarterly target, not its months'
    # A rep sees their own row: the forecast's scope applies to targets too.
    with as_user("rep1", "sales_rep", team="east", scope="own"):
        [own] = await sales.attainment(ForecastQuery())
    assert _row(own) == (
        "2026-11",
        "rep1",
        Decimal(80000),
        Decimal(60000),
        Decimal("0.75"),
        Decimal(50000),
        Decimal(5000),
    )


def _row(line: d.AttainmentLine) -> tuple[object, ...]:
    return (line.period, line.group, line.target, line.closed_won, line.attainment, line.commit, line.weighted)
