"""Web behaviour in lead scoring (反复看产品页就打个高分): a marketing system reports engagements
(page views, e-mail opens and clicks, downloads, webinars), each recorded once per lead by its
sender's event id, and scoring rules count them by kind and URL. Each open lead a call recorded on
is rescored once in its transaction, as an activity rescores it; an engagement is no contact. A
batch is one INSERT and one count of engagements however many items it has. A lead's engagements
are listed newest first, a page at a time, to whoever may read the lead."""

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import grpc
import httpx
import pytest
from crm.common.v1 import common_pb2
from crm.leads.v1 import events_pb2, leads_service_pb2, leads_service_pb2_grpc
from crm_platform.errors import NotFound, ValidationFailed
from crm_platform.principal import Principal, RecordScope, ScopeKind, outgoing_metadata
from crm_platform.testing.outbox import outbox_events
from crm_platform.timeutil import to_timestamp
from leads import domain
from leads import repository as repo
from leads.domain import EngagementInput, ScoringRule
from sqlalchemy import event, func, select

pytestmark = pytest.mark.integration

PRODUCT_VIEWS = ScoringRule(id="", engagement_kind="page_view", url_contains="/Product", min_count=3, points=30)


async def _rule(env: Any, rule: ScoringRule = PRODUCT_VIEWS) -> Any:
    with env.acting("admin", roles=("admin",)):
        created = await env.service.create_scoring_rule(rule, "keeps viewing the product page", "")
    await env.service.rescore_stale_leads()
    return created


async def _lead(env: Any, name: str = "ann", **values: Any) -> Any:
    with env.acting("admin", roles=("admin",)):
        lead, _ = await env.service.create_lead({"name": name, **values})
    return lead


def _views(env: Any, lead_id: str = "", *ids: str, url: str = "https://x.cn/product/a", **given: Any) -> list[Any]:
    when = env.clock() - timedelta(minutes=10)
    return [
        EngagementInput(kind="page_view", external_id=i, occurred_at=when, url=url, lead_id=lead_id, **given)
        for i in ids
    ]


async def _record(env: Any, items: list[Any], **acting: Any) -> list[tuple[str, str, str]]:
    with env.acting(**({"user": "mkt", "roles": ("marketing",)} | acting)):
        outcomes = await env.service.record_engagements(items)
    return [(o.status, o.lead_id, o.field) for o in outcomes]


async def _stored(env: Any, lead_id: str) -> Any:
    async with env.engine.connect() as conn:
        return await repo.load_lead(conn, lead_id)


async def _history(env: Any, lead_id: str) -> list[tuple[int, int]]:
    h = repo.score_history.c
    async with env.engine.connect() as conn:
        rows = await conn.execute(select(h.previous_score, h.score).where(h.lead_id == lead_id).order_by(h.id))
        return [(before, after) for before, after in rows]


async def _engagements(env: Any, lead_id: str) -> int:
    async with env.engine.connect() as conn:
        query = select(func.count()).where(repo.engagements.c.lead_id == lead_id)
        return int(await conn.scalar(query) or 0)


async def _events(env: Any, lead_id: str) -> list[str]:
    return [event_type for event_type, _ in await outbox_events(env.engine, repo.metadata, lead_id)]


async def _scored(env: Any, lead_id: str) -> list[events_pb2.LeadScored]:
    events = await outbox_events(env.engine, repo.metadata, lead_id)
    return [events_pb2.LeadScored.FromString(payload) for kind, payload in events if kind == "crm.leads.lead.scored"]


async def test_three_views_of_the_product_page_raise_the_score_with_history_and_lead_scored(env: Any) -> None:
    rule = await _rule(env)
    lead = await _lead(env)
    versions_before = lead["version"]

    # Two views: not yet; the third (another product page, its URL in capitals) counts.
    assert await _record(env, _views(env, lead["id"], "e1", "e2")) == [("recorded", lead["id"], "")] * 2
    assert (await _stored(env, lead["id"]))["score"] == 0
    third = _views(env, lead["id"], "e3", url="https://X.cn/PRODUCT/b?utm_source=mail")
    assert await _record(env, third) == [("recorded", lead["id"], "")]

    scored = await _stored(env, lead["id"])
    assert (scored["score"], scored["version"], scored["updated_at"]) == (30, versions_before + 1, env.clock())
    assert await _history(env, lead["id"]) == [(0, 0), (0, 30)]
    [event] = await _scored(env, lead["id"])
    assert (event.previous_score, event.score, list(event.matched_rule_ids)) == (0, 30, [rule["id"]])


async def test_views_of_other_pages_or_other_kinds_do_not_count(env: Any) -> None:
    await _rule(env)
    lead = await _lead(env)
    items = [
        *_views(env, lead["id"], "p1", "p2", "p3", url="https://x.cn/pricing"),
        EngagementInput(
            kind="email_click",
            external_id="c1",
            occurred_at=env.clock(),
            url="https://x.cn/product",
            lead_id=lead["id"],
        ),
    ]
    assert [status for status, _, _ in await _record(env, items)] == ["recorded"] * 4
    assert (await _stored(env, lead["id"]))["score"] == 0
    assert await _scored(env, lead["id"]) == []


async def test_a_resent_batch_counts_nothing_twice(env: Any) -> None:
    await _rule(env)
    lead = await _lead(env)
    batch = _views(env, lead["id"], "e1", "e2")
    await _record(env, batch)

    # Resent with one new view, and one event twice in the batch itself.
    again = [*batch, *_views(env, lead["id"], "e3", "e3")]
    assert [status for status, _, _ in await _record(env, again)] == ["duplicate", "duplicate", "recorded", "duplicate"]
    assert await _engagements(env, lead["id"]) == 3
    assert (await _stored(env, lead["id"]))["score"] == 30  # three views, not five
    assert [status for status, _, _ in await _record(env, again)] == ["duplicate"] * 4
    assert len(await _scored(env, lead["id"])) == 1


async def test_the_same_event_id_on_two_leads_is_two_engagements(env: Any) -> None:
    one, two = await _lead(env, "one"), await _lead(env, "two")
    outcomes = await _record(env, [*_views(env, one["id"], "e1"), *_views(env, two["id"], "e1")])
    assert outcomes == [("recorded", one["id"], ""), ("recorded", two["id"], "")]


async def test_an_email_names_the_callers_one_open_lead_with_it(env: Any) -> None:
    await _rule(env)
    lead = await _lead(env, email="Ann@Example.com")
    closed = await _lead(env, "closed", email="bob@example.com")
    with env.acting("admin", roles=("admin",)):
        await env.service.disqualify(closed["id"], "no budget", 0)

    outcomes = await _record(env, _views(env, "", "e1", "e2", "e3", email=" ANN@example.COM "))
    assert outcomes == [("recorded", lead["id"], "")] * 3
    assert (await _stored(env, lead["id"]))["score"] == 30

    with env.acting("mkt", roles=("marketing",)):
        [nobody, only_closed] = await env.service.record_engagements(
            [*_views(env, "", "e4", email="nobody@example.com"), *_views(env, "", "e5", email="bob@example.com")]
        )
    assert (nobody.status, nobody.field) == ("rejected", "items[0].email")
    assert nobody.reason == "items[0].email: no open lead you may see has this email"
    assert (only_closed.status, only_closed.reason) == ("rejected", nobody.reason.replace("[0]", "[1]"))


async def test_an_email_two_open_leads_have_is_rejected_naming_the_email(env: Any) -> None:
    one = await _lead(env, "one", email="twice@example.com")
    with env.acting("admin", roles=("admin",)):
        await env.service.create_lead({"name": "two", "email": "twice@example.com"}, on_duplicate="allow")

    with env.acting("mkt", roles=("marketing",)):
        [outcome, by_id] = await env.service.record_engagements(
            [*_views(env, "", "e1", email="twice@example.com"), *_views(env, one["id"], "e1")]
        )
    assert (outcome.status, outcome.field) == ("rejected", "items[0].email")
    assert "2 open leads have this email" in outcome.reason
    assert (by_id.status, by_id.lead_id) == ("recorded", one["id"])


async def test_a_lead_out_of_the_callers_scope_is_rejected_as_one_that_does_not_exist(env: Any) -> None:
    theirs = await _lead(env, "theirs", owner_id="rep2", team="west", email="west@example.com")

    as_rep = {"user": "rep1", "roles": ("sales_rep",), "scope": ScopeKind.OWN}
    with env.acting(**as_rep):
        hidden, missing, by_email = await env.service.record_engagements(
            [
                *_views(env, theirs["id"], "e1"),
                *_views(env, "no-such-lead", "e2"),
                *_views(env, "", "e3", email="west@example.com"),
            ]
        )
    assert (hidden.status, hidden.field) == ("rejected", "items[0].lead_id")
    assert hidden.reason == f"items[0].lead_id: lead {theirs['id']} not found"
    assert missing.reason == "items[1].lead_id: lead no-such-lead not found"
    assert by_email.reason == "items[2].email: no open lead you may see has this email"
    assert await _engagements(env, theirs["id"]) == 0


async def test_an_engagement_is_no_contact(env: Any) -> None:
    await _rule(env)
    lead = await _lead(env, owner_id="rep1")
    assert lead["status"] == "new" and lead["first_contact_due_at"] is not None

    await _record(env, _views(env, lead["id"], "e1", "e2", "e3"))

    after = await _stored(env, lead["id"])
    assert after["score"] == 30
    for name in ("status", "first_contacted_at", "first_contact_due_at", "last_activity_at", "follow_up_overdue"):
        assert after[name] == lead[name], name
    async with env.engine.connect() as conn:
        tasks = (await conn.execute(select(repo.tasks.c.kind, repo.tasks.c.status))).all()
    assert [(kind, status) for kind, status in tasks] == [("first_contact", "open")]
    assert "crm.leads.lead.contacted" not in await _events(env, lead["id"])
    # The first-contact SLA still runs: due two hours on, the lead is overdue.
    env.clock.advance(hours=3)
    assert await env.service.flag_overdue_first_contacts() == 1


async def test_a_closed_lead_records_engagements_and_keeps_the_score_it_closed_with(env: Any) -> None:
    await _rule(env)
    lead = await _lead(env)
    with env.acting("admin", roles=("admin",)):
        closed = (await env.service.disqualify(lead["id"], "no budget", 0)).record

    assert [s for s, _, _ in await _record(env, _views(env, lead["id"], "e1", "e2", "e3"))] == ["recorded"] * 3
    after = await _stored(env, lead["id"])
    assert (after["score"], after["version"]) == (closed["score"], closed["version"])
    assert await _engagements(env, lead["id"]) == 3


async def test_a_rule_change_rescores_with_the_engagements_counted(env: Any) -> None:
    lead = await _lead(env)
    await _record(env, _views(env, lead["id"], "e1", "e2", "e3"))  # no rule counts them yet
    assert (await _stored(env, lead["id"]))["score"] == 0

    rule = await _rule(env)  # the rescoring job scores the open leads under the new rule
    assert (await _stored(env, lead["id"]))["score"] == 30
    with env.acting("admin", roles=("admin",)):
        await env.service.update_scoring_rule(
            ScoringRule(id=rule["id"], engagement_kind="page_view", url_contains="/product", min_count=4, points=30),
            "four views",
            rule["version"],
        )
    assert await env.service.rescore_stale_leads() == 1
    assert (await _stored(env, lead["id"]))["score"] == 0
    assert await _history(env, lead["id"]) == [(0, 0), (0, 30), (30, 0)]


async def test_a_lead_update_rescores_with_its_engagements(env: Any) -> None:
    await _rule(env)
    lead = await _lead(env)
    await _record(env, _views(env, lead["id"], "e1", "e2", "e3"))
    with env.acting("admin", roles=("admin",)):
        updated = (await env.service.update_lead(lead["id"], {"company": "Acme"}, ["company"], 0)).record
    assert updated["score"] == 30  # an update's rescoring counts them too, not only the call's


async def test_items_at_fault_are_rejected_naming_the_field_and_the_others_recorded(env: Any) -> None:
    lead = await _lead(env)
    now = env.clock()
    items = [
        EngagementInput(kind="page_visit", external_id="e1", occurred_at=now, lead_id=lead["id"]),
        EngagementInput(kind="download", external_id="", occurred_at=now, lead_id=lead["id"]),
        EngagementInput(kind="download", external_id="e3", occurred_at=now + timedelta(hours=1), lead_id=lead["id"]),
        EngagementInput(kind="webinar", external_id="e4", occurred_at=None, lead_id=lead["id"]),
        EngagementInput(kind="download", external_id="e5", occurred_at=now, url="u" * 2001, lead_id=lead["id"]),
        EngagementInput(kind="download", external_id="e6", occurred_at=now, lead_id=lead["id"]),
    ]
    outcomes = await _record(env, items)
    assert [(status, field) for status, _, field in outcomes] == [
        ("rejected", "items[0].kind"),
        ("rejected", "items[1].external_id"),
        ("rejected", "items[2].occurred_at"),
        ("rejected", "items[3].occurred_at"),
        ("rejected", "items[4].url"),
        ("recorded", ""),
    ]
    assert await _engagements(env, lead["id"]) == 1


async def test_more_than_500_items_are_refused_whole(env: Any) -> None:
    lead = await _lead(env)
    items = _views(env, lead["id"], *(f"e{i}" for i in range(domain.MAX_ENGAGEMENTS + 1)))
    with pytest.raises(ValidationFailed) as caught, env.acting("mkt", roles=("marketing",)):
        await env.service.record_engagements(items)
    assert [e.field for e in caught.value.errors] == ["items"]
    assert await _engagements(env, lead["id"]) == 0


async def test_deleting_a_lead_deletes_its_engagements(env: Any) -> None:
    lead = await _lead(env)
    await _record(env, _views(env, lead["id"], "e1"))
    with env.acting("admin", roles=("admin",)):
        await env.service.delete_lead(lead["id"], 0)
    assert await _engagements(env, lead["id"]) == 0


MARKETING = outgoing_metadata(Principal(user_id="mkt", roles=("marketing",)), RecordScope(ScopeKind.ALL))


def _pb_view(lead_id: str, external_id: str, when: datetime) -> leads_service_pb2.EngagementInput:
    return leads_service_pb2.EngagementInput(
        lead_id=lead_id, kind="page_view", url="/product", occurred_at=to_timestamp(when), external_id=external_id
    )


async def test_over_grpc_results_come_item_by_item_and_too_many_is_invalid_argument(
    env: Any, stub: leads_service_pb2_grpc.LeadsServiceStub
) -> None:
    lead = await _lead(env)
    when = env.clock() - timedelta(minutes=1)
    request = leads_service_pb2.RecordLeadEngagementsRequest(
        items=[_pb_view(lead["id"], "e1", when), _pb_view(lead["id"], "e1", when), _pb_view("", "e2", when)]
    )
    answer = await stub.RecordLeadEngagements(request, metadata=MARKETING)

    assert [(r.index, r.status, r.lead_id, r.field) for r in answer.results] == [
        (0, "recorded", lead["id"], ""),
        (1, "duplicate", lead["id"], ""),
        (2, "rejected", "", "items[2].lead_id"),
    ]
    assert (answer.recorded, answer.duplicates, answer.rejected) == (1, 1, 1)

    too_many = leads_service_pb2.RecordLeadEngagementsRequest(items=[_pb_view(lead["id"], "e", when)] * 501)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RecordLeadEngagements(too_many, metadata=MARKETING)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "items" in (caught.value.details() or "")


async def test_through_the_gateway_engagement_rules_and_engagements_score_a_lead(
    env: Any, admin: httpx.AsyncClient, bearer: Callable[[str, str], dict[str, str]]
) -> None:
    rule = {
        "name": "product page",
        "engagement_kind": "page_view",
        "url_contains": "/product",
        "min_count": 3,
        "points": 30,
    }
    created = await admin.post("/api/v1/lead-scoring-rules", json=rule)
    assert created.status_code == 201, created.text
    assert (created.json()["engagement_kind"], created.json()["url_contains"]) == ("page_view", "/product")
    bad = await admin.post("/api/v1/lead-scoring-rules", json={**rule, "engagement_kind": "page_visit"})
    assert bad.status_code == 422, bad.text
    assert [e["field"] for e in bad.json()["errors"]] == ["engagement_kind"]
    lead = await _lead(env, email="ann@example.com")

    when = (env.clock() - timedelta(minutes=5)).isoformat()
    items = [{"email": "ann@example.com", "kind": "page_view", "url": "https://x.cn/product", "occurred_at": when,
              "external_id": f"e{i}"} for i in range(3)]  # fmt: skip
    answer = await admin.post("/api/v1/lead-engagements", json={"items": items}, headers=bearer("mkt", "marketing"))

    assert answer.status_code == 200, answer.text
    assert answer.json()["recorded"] == 3
    assert [r["status"] for r in answer.json()["results"]] == ["recorded"] * 3
    assert (await _stored(env, lead["id"]))["score"] == 30
    # A sales rep works their own leads: this one is not theirs.
    as_rep = await admin.post("/api/v1/lead-engagements", json={"items": items[:1]}, headers=bearer("rep", "sales_rep"))
    assert as_rep.status_code == 200, as_rep.text
    assert as_rep.json()["results"][0]["status"] == "rejected"


async def test_the_rescoring_of_an_engagement_is_in_its_transaction(env: Any) -> None:
    """A call that fails after recording leaves neither the engagements nor the score."""
    await _rule(env)
    lead = await _lead(env)
    original = env.service._after_activity_change

    async def failing(*args: Any, **kwargs: Any) -> Any:
        await original(*args, **kwargs)
        raise RuntimeError("the database went away")

    env.service._after_activity_change = failing
    with pytest.raises(RuntimeError):
        await _record(env, _views(env, lead["id"], "e1", "e2", "e3"))
    assert await _engagements(env, lead["id"]) == 0
    assert (await _stored(env, lead["id"]))["score"] == 0


async def test_a_batch_records_each_event_id_once_per_lead_on_each_database(env_each_database: Any) -> None:
    env = env_each_database
    await _rule(env)
    one, two = await _lead(env, "one"), await _lead(env, "two")
    batch = [
        *_views(env, one["id"], "e1", "e2"),
        *_views(env, two["id"], "e1"),
        *_views(env, one["id"], "e1", "e3"),  # e1 again in the same batch: the first is recorded
        *_views(env, "no-such-lead", "e4"),
    ]
    with env.acting("mkt", roles=("marketing",)):
        outcomes = await env.service.record_engagements(batch)

    assert [(o.status, o.lead_id, o.field) for o in outcomes] == [
        ("recorded", one["id"], ""),
        ("recorded", one["id"], ""),
        ("recorded", two["id"], ""),
        ("duplicate", one["id"], ""),
        ("recorded", one["id"], ""),
        ("rejected", "", "items[5].lead_id"),
    ]
    assert outcomes[3].reason == "external_id 'e1' was recorded on this lead before"
    assert (await _engagements(env, one["id"]), await _engagements(env, two["id"])) == (3, 1)
    assert ((await _stored(env, one["id"]))["score"], (await _stored(env, two["id"]))["score"]) == (30, 0)
    assert [status for status, _, _ in await _record(env, batch)] == ["duplicate"] * 5 + ["rejected"]
    assert len(await _scored(env, one["id"])) == 1


async def test_a_batch_is_one_insert_and_one_count_of_engagements_whatever_its_size(env_each_database: Any) -> None:
    env = env_each_database
    await _rule(env, ScoringRule(id="", engagement_kind="page_view", min_count=1000, points=30))  # counts, never met
    leads = [await _lead(env, f"lead {i}") for i in range(2)]
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    counted: list[int] = []
    for size in (3, 30):
        batch = [item for lead in leads for item in _views(env, lead["id"], *(f"{size}-{n}" for n in range(size)))]
        statements.clear()
        event.listen(env.engine.sync_engine, "before_cursor_execute", seen)
        try:
            outcomes = await _record(env, batch)
        finally:
            event.remove(env.engine.sync_engine, "before_cursor_execute", seen)
        assert [status for status, _, _ in outcomes] == ["recorded"] * len(batch)
        assert sum(s.startswith("INSERT INTO lead_engagements") for s in statements) == 1
        assert sum("FROM lead_engagements" in s for s in statements) == 1
        counted.append(len(statements))
    assert counted[0] == counted[1]


async def _listed(env: Any, lead_id: str, kind: str = "", **acting: Any) -> list[list[str]]:
    """The external ids of each page (of two) of the lead's engagements, following the cursors."""
    pages: list[list[str]] = []
    cursor = ""
    with env.acting(**({"user": "mkt", "roles": ("marketing",)} | acting)):
        while True:
            rows, cursor = await env.service.list_engagements(lead_id, kind, limit=2, cursor=cursor)
            pages.append([row["external_id"] for row in rows])
            if not cursor:
                return pages


def _engagement(lead_id: str, external_id: str, when: datetime, kind: str = "page_view") -> EngagementInput:
    return EngagementInput(kind=kind, external_id=external_id, occurred_at=when, url="https://x.cn/p", lead_id=lead_id)


async def test_a_leads_engagements_are_listed_newest_first_a_page_at_a_time(env: Any) -> None:
    lead, other = await _lead(env), await _lead(env, "other")
    start = env.clock() - timedelta(days=1)
    await _record(
        env,
        [
            _engagement(lead["id"], "morning", start),
            _engagement(lead["id"], "noon-1", start + timedelta(hours=3), "email_open"),
            _engagement(lead["id"], "noon-2", start + timedelta(hours=3), "email_click"),  # same time: by id
            _engagement(lead["id"], "evening", start + timedelta(hours=8), "download"),
            _engagement(other["id"], "theirs", start + timedelta(hours=5)),
        ],
    )
    # Reported later than the others, it happened before most: listed by when it happened.
    await _record(env, [_engagement(lead["id"], "late-report", start + timedelta(hours=1))])

    assert await _listed(env, lead["id"]) == [["evening", "noon-2"], ["noon-1", "late-report"], ["morning"]]
    with env.acting("mkt", roles=("marketing",)):
        [newest], _ = await env.service.list_engagements(lead["id"], "", limit=1, cursor="")
    assert {name: newest[name] for name in ("lead_id", "kind", "url", "occurred_at", "actor_id", "recorded_at")} == {
        "lead_id": lead["id"],
        "kind": "download",
        "url": "https://x.cn/p",
        "occurred_at": start + timedelta(hours=8),
        "actor_id": "mkt",
        "recorded_at": env.clock(),
    }


async def test_the_kind_filter_lists_that_kind_only_and_an_unknown_kind_is_refused(env: Any) -> None:
    lead = await _lead(env)
    start = env.clock() - timedelta(hours=6)
    await _record(
        env,
        [
            _engagement(lead["id"], f"{kind}-{n}", start + timedelta(minutes=n), kind)
            for n in range(3)
            for kind in ("page_view", "email_click")
        ],
    )

    assert await _listed(env, lead["id"], "email_click") == [["email_click-2", "email_click-1"], ["email_click-0"]]
    assert await _listed(env, lead["id"], "webinar") == [[]]
    with pytest.raises(ValidationFailed) as caught, env.acting("mkt", roles=("marketing",)):
        await env.service.list_engagements(lead["id"], "page_visit", limit=0, cursor="")
    assert [e.field for e in caught.value.errors] == ["kind"]


async def test_engagements_of_a_lead_out_of_the_callers_scope_are_not_found_as_of_one_that_does_not_exist(
    env: Any,
) -> None:
    mine = await _lead(env, "mine", owner_id="rep1")
    theirs = await _lead(env, "theirs", owner_id="rep2", team="west")
    await _record(env, [*_views(env, mine["id"], "e1"), *_views(env, theirs["id"], "e2")])

    as_rep = {"user": "rep1", "roles": ("sales_rep",), "scope": ScopeKind.OWN}
    assert await _listed(env, mine["id"], **as_rep) == [["e1"]]
    for lead_id in (theirs["id"], "no-such-lead"):
        with pytest.raises(NotFound) as caught, env.acting(**as_rep):
            await env.service.list_engagements(lead_id, "", limit=0, cursor="")
        assert str(caught.value) == f"lead {lead_id} not found"


async def test_over_grpc_a_page_goes_on_with_its_own_lists_cursor_and_an_unknown_lead_is_not_found(
    env: Any, stub: leads_service_pb2_grpc.LeadsServiceStub
) -> None:
    lead = await _lead(env)
    await _record(env, _views(env, lead["id"], "e1", "e2", "e3"))

    def listing(cursor: str = "", kind: str = "", lead_id: str = lead["id"]) -> Any:
        page = common_pb2.PageRequest(limit=2, cursor=cursor)
        request = leads_service_pb2.ListLeadEngagementsRequest(lead_id=lead_id, kind=kind, page=page)
        return stub.ListLeadEngagements(request, metadata=MARKETING)

    first = await listing()
    rest = await listing(first.page_info.next_cursor)
    assert [e.external_id for e in first.items] == ["e3", "e2"]  # one time: the last recorded first
    assert ([e.external_id for e in rest.items], rest.page_info.next_cursor) == (["e1"], "")
    assert (first.items[0].lead_id, first.items[0].kind, first.items[0].actor_id) == (lead["id"], "page_view", "mkt")

    for cursor, kind, lead_id, code in [
        (first.page_info.next_cursor, "page_view", lead["id"], grpc.StatusCode.INVALID_ARGUMENT),  # another list
        ("", "tv", lead["id"], grpc.StatusCode.INVALID_ARGUMENT),
        ("", "", "no-such-lead", grpc.StatusCode.NOT_FOUND),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await listing(cursor, kind, lead_id)
        assert caught.value.code() == code, caught.value.details()


async def test_through_the_gateway_a_leads_engagements_are_read_as_the_lead_is(
    env: Any, admin: httpx.AsyncClient, bearer: Callable[[str, str], dict[str, str]]
) -> None:
    lead = await _lead(env, owner_id="rep2", team="west")
    await _record(env, _views(env, lead["id"], "e1", "e2"))
    path = f"/api/v1/leads/{lead['id']}/engagements"

    first = await admin.get(path, params={"limit": 1})
    assert first.status_code == 200, first.text
    rest = await admin.get(path, params={"limit": 1, "cursor": first.json()["next_cursor"]})
    assert [[e["external_id"] for e in page.json()["items"]] for page in (first, rest)] == [["e2"], ["e1"]]
    assert rest.json()["next_cursor"] is None
    assert first.json()["items"][0]["occurred_at"] == (env.clock() - timedelta(minutes=10)).isoformat().replace(
        "+00:00", "Z"
    )

    unknown_kind = await admin.get(path, params={"kind": "page_visit"})
    assert unknown_kind.status_code == 422, unknown_kind.text
    assert [e["field"] for e in unknown_kind.json()["errors"]] == ["kind"]
    # A rep reads their own leads (and the pool): this one is another rep's, not found as no lead is.
    for lead_path in (path, "/api/v1/leads/no-such-lead/engagements"):
        as_rep = await admin.get(lead_path, headers=bearer("rep", "sales_rep"))
        assert as_rep.status_code == 404, as_rep.text
