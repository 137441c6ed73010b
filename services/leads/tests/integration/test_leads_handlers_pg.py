"""The leads use cases on a real PostgreSQL database (events checked in the outbox)."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from crm.audit.v1.events_pb2 import AuditRecorded
from crm.leads.v1 import events_pb2
from crm_platform.errors import AlreadyExists, Conflict, NotFound, StaleVersion, Unavailable, ValidationFailed
from crm_platform.ids import new_id
from crm_platform.money import Money
from crm_platform.principal import ScopeKind
from crm_platform.testing.outbox import outbox_events
from crm_platform.testing.plans import generic_plan
from crm_platform.timeutil import as_utc
from leads import repository as repo
from leads.domain import AssignmentRule, ScoringRule, Thresholds
from leads.handlers import ActivityInput, ConvertRequest, LeadFilters
from sqlalchemy import select, text

pytestmark = pytest.mark.integration


async def outbox_types(env: Any, key: str | None = None) -> list[str]:
    query = select(repo.metadata.tables["outbox"].c.type).order_by(repo.metadata.tables["outbox"].c.seq)
    if key:
        query = query.where(repo.metadata.tables["outbox"].c.key == key)
    async with env.engine.connect() as conn:
        return [t for (t,) in await conn.execute(query)]


async def test_create_dedupe_reject_merge_allow(env: Any) -> None:
    with env.acting():
        lead, merged = await env.service.create_lead(
            {"name": "Li Lei", "email": " LI.LEI@Example.com", "phone": "138 0013 8000", "tags": ["a"]}
        )
        assert not merged and lead["email"] == "li.lei@example.com" and lead["phone_norm"] == "+8613800138000"
        assert lead["in_pool"] and lead["status"] == "new"
        with pytest.raises(AlreadyExists) as caught:
            await env.service.create_lead({"name": "Other", "phone": "+86 13800138000"})
        assert caught.value.existing_id == lead["id"]
        same, merged = await env.service.create_lead(
            {"name": "Other", "email": "li.lei@example.com", "company": "ACME", "tags": ["b"]}, on_duplicate="merge"
        )
        assert merged and same["id"] == lead["id"] and same["company"] == "ACME" and same["tags"] == ["a", "b"]
        assert same["name"] == "Li Lei"
        other, merged = await env.service.create_lead(
            {"name": "Twin", "email": "li.lei@example.com"}, on_duplicate="allow"
        )
        assert other["id"] != lead["id"] and not merged
        with pytest.raises(ValidationFailed) as bad:
            await env.service.create_lead({"name": "x", "email": "nope", "source": "tv"})
        assert {e.field for e in bad.value.errors} == {"email", "source"}
        with pytest.raises(ValidationFailed):
            await env.service.create_lead({"name": "x"}, on_duplicate="maybe")
    assert await outbox_types(env, lead["id"]) == ["crm.leads.lead.created", "crm.leads.lead.updated"]


async def test_concurrent_creates_of_one_person_make_one_lead(env_each_database: Any) -> None:
    env = env_each_database

    async def create(n: int) -> str:
        try:
            await env.service.create_lead({"name": f"Han Meimei {n}", "email": "han@example.com"})
        except AlreadyExists:
            return "duplicate"
        return "created"

    for _ in range(5):  # several rounds: the race only shows when commits land while others wait
        with env.acting():
            results = await asyncio.gather(*(create(n) for n in range(8)))
        assert results.count("created") == 1
        async with env.engine.begin() as conn:
            await conn.execute(repo.leads.update().values(status="disqualified"))


async def test_idempotent_create_returns_the_first_result(env: Any) -> None:
    with env.acting():
        first, _ = await env.service.create_lead({"name": "A", "email": "a@x.cn"}, idempotency_key="k1")
        again, _ = await env.service.create_lead({"name": "A", "email": "a@x.cn"}, idempotency_key="k1")
    assert again["id"] == first["id"]


async def test_lead_is_linked_to_a_known_contact(env: Any) -> None:
    from crm.accounts.v1 import accounts_pb2
    from leads.consumers import apply_contact

    async with env.service.uow.begin() as tx:
        await apply_contact(tx, accounts_pb2.Contact(id="c-1", email="Wang@Corp.cn", mobile="139 0000 1111"), "86")
    with env.acting():
        lead, _ = await env.service.create_lead({"name": "Wang", "phone": "13900001111"})
    assert lead["matched_contact_id"] == "c-1"


async def test_scoring_rules_grades_and_history(env: Any) -> None:
    with env.acting("admin", roles=("admin",)):
        await env.service.create_scoring_rule(
            ScoringRule(id="", field="industry", operator="equals", value="software", points=50), "software", "s1"
        )
        await env.service.create_scoring_rule(
            ScoringRule(id="", activity_kind="visit", min_count=1, points=40), "visit", ""
        )
        await env.service.set_thresholds(Thresholds(a=85, b=50, c=30))
        lead, _ = await env.service.create_lead({"name": "S", "industry": "Software"})
        assert (lead["score"], lead["grade"]) == (50, "B")
        _, lead = await env.service.log_activity(ActivityInput(lead_id=lead["id"], kind="visit"))
        assert (lead["score"], lead["grade"]) == (90, "A")
        history, _ = await env.service.score_history(lead["id"], limit=50, cursor="")
    assert [(h["score"], h["grade"]) for h in history] == [(50, "B"), (90, "A")]
    assert "crm.leads.lead.scored" in await outbox_types(env, lead["id"])


async def test_assignment_round_robin_capacity_and_pool(env: Any) -> None:
    with env.acting("admin", roles=("admin",)):
        await env.service.create_assignment_rule(
            AssignmentRule(id="", position=1, user_ids=("u1", "u2"), strategy="round_robin", capacity=2,
                           regions=frozenset({"east"}), team="east-sales"),
            "east", "",
        )  # fmt: skip
        owners = []
        for i in range(5):
            lead, _ = await env.service.create_lead({"name": f"L{i}", "region": "East"})
            owners.append(lead["owner_id"])
        west, _ = await env.service.create_lead({"name": "W", "region": "west"})
    assert owners == ["u1", "u2", "u1", "u2", ""]  # the fifth finds both reps at capacity
    assert west["in_pool"] and not west["owner_id"]
    async with env.engine.connect() as conn:
        tasks = (await conn.execute(select(repo.tasks).where(repo.tasks.c.owner_id == "u1"))).mappings().all()
    assert len(tasks) == 2 and all(t["kind"] == "first_contact" for t in tasks)


async def test_concurrent_creates_never_pass_a_reps_cap(env: Any) -> None:
    with env.acting("admin", roles=("admin",)):
        await env.service.create_assignment_rule(
            AssignmentRule(id="", position=1, user_ids=("u1", "u2"), strategy="round_robin", capacity=3), "all", ""
        )

    async def create(n: int) -> str:
        with env.acting("admin", roles=("admin",)):
            lead, _ = await env.service.create_lead({"name": f"C{n}", "email": f"c{n}@example.com"})
        return str(lead["owner_id"])

    owners = await asyncio.gather(*(create(n) for n in range(12)))
    assert sorted(owners) == [""] * 6 + ["u1"] * 3 + ["u2"] * 3
    assert await env.loads_kept() == await env.loads_counted() == {"u1": 3, "u2": 3}


def _lead_row(name: str, *, owner_id: str) -> dict[str, Any]:
    now = datetime.now(UTC)
    return repo.LEAD_DEFAULTS | {
        "id": new_id(), "name": name, "source": "other", "status": "new", "owner_id": owner_id,
        "created_at": now, "updated_at": now,
    }  # fmt: skip


async def test_a_create_waiting_for_the_rule_reads_the_loads_its_holder_committed(env: Any) -> None:
    with env.acting("admin", roles=("admin",)):
        rule = await env.service.create_assignment_rule(
            AssignmentRule(id="", position=1, user_ids=("u1", "u2"), strategy="least_loaded", capacity=3), "all", ""
        )
    probe = {
        "email_norm": None, "phone_norm": None, "check_duplicates": True, "user_ids": ("u1", "u2"), "loads": True,
        "take_turn": False, "lock_loads": True,
    }  # fmt: skip
    async with env.engine.begin() as holder:
        await repo.probe_for_create(holder, rule_id=rule["id"], **probe)

        async def waiter() -> repo.CreateProbe:
            async with env.engine.begin() as conn:
                return await repo.probe_for_create(conn, rule_id=rule["id"], **probe)

        waiting = asyncio.create_task(waiter())
        await asyncio.sleep(0.3)
        assert not waiting.done()  # blocked on the reps' rows
        await holder.execute(repo.leads.insert().values(_lead_row("held", owner_id="u1")))
    assert (await waiting).loads == {"u1": 1, "u2": 0}


async def test_round_robin_creates_under_one_rule_do_not_wait_for_each_other(env: Any) -> None:
    with env.acting("admin", roles=("admin",)):
        rule = await env.service.create_assignment_rule(
            AssignmentRule(id="", position=1, user_ids=("u1", "u2", "u3"), strategy="round_robin"), "all", ""
        )
    async with env.engine.begin() as holder:  # a create under the rule, between its turn and its commit
        taken = await repo.take_turns(holder, {rule["id"]: 1})
        await holder.execute(repo.leads.insert().values(_lead_row("held", owner_id="u1")))
        with env.acting("admin", roles=("admin",)):
            lead, _ = await asyncio.wait_for(env.service.create_lead({"name": "next"}), timeout=5)
    assert taken == {rule["id"]: [0]} and lead["owner_id"] == "u2"

    async def create(n: int) -> str:
        with env.acting("admin", roles=("admin",)):
            created, _ = await env.service.create_lead({"name": f"R{n}"})
        return str(created["owner_id"])

    owners = await asyncio.gather(*(create(n) for n in range(12)))  # turns 2 to 13: each rep gets 4
    assert sorted(owners) == ["u1"] * 4 + ["u2"] * 4 + ["u3"] * 4


async def test_a_create_whose_rep_fills_meanwhile_picks_again_and_leaves_nothing_behind(env: Any) -> None:
    with env.acting("admin", roles=("admin",)):
        await env.service.create_assignment_rule(
            AssignmentRule(id="", position=1, user_ids=("u1", "u2"), strategy="round_robin", capacity=1), "all", ""
        )
    async with env.engine.begin() as holder:  # u1's last place, taken but not yet committed
        await holder.execute(repo.leads.insert().values(_lead_row("held", owner_id="u1")))

        async def create() -> Any:
            with env.acting("admin", roles=("admin",)):
                return (await env.service.create_lead({"name": "late", "email": "late@example.com"}))[0]

        creating = asyncio.create_task(create())  # turn 0 picks u1, who looked free
        await asyncio.sleep(0.3)
        assert not creating.done()  # waiting on u1's row
    lead = await creating
    assert lead["owner_id"] == "u2"  # u1 was full once the holder committed: picked again with the loads locked
    async with env.engine.connect() as conn:
        late = (await conn.execute(select(repo.leads.c.id).where(repo.leads.c.name == "late"))).all()
    assert [row.id for row in late] == [lead["id"]]
    assert await outbox_types(env, lead["id"]) == ["crm.leads.lead.created", "crm.leads.lead.assigned"]
    assert await env.loads_kept() == await env.loads_counted() == {"u1": 1, "u2": 1}


async def test_a_create_whose_rule_is_deleted_meanwhile_is_assigned_by_the_rules_left(env: Any) -> None:
    with env.acting("admin", roles=("admin",)):
        first = await env.service.create_assignment_rule(
            AssignmentRule(id="", position=1, user_ids=("u1", "u2"), strategy="round_robin"), "first", ""
        )
        await env.service.create_assignment_rule(
            AssignmentRule(id="", position=2, user_ids=("u3",), strategy="round_robin"), "second", ""
        )
        await env.service.rules.get()  # the service still matches the first rule
    async with env.engine.begin() as holder:  # an admin deleting the first rule (and its turns)
        await holder.execute(repo.assignment_rules.delete().where(repo.assignment_rules.c.id == first["id"]))

        async def create() -> Any:
            with env.acting("admin", roles=("admin",)):
                return (await env.service.create_lead({"name": "racing"}))[0]

        creating = asyncio.create_task(create())
        await asyncio.sleep(0.3)
        assert not creating.done()  # taking a turn of the first rule, whose sequence is being dropped
    lead = await creating
    assert lead["owner_id"] == "u3"
    assert await outbox_types(env, lead["id"]) == ["crm.leads.lead.created", "crm.leads.lead.assigned"]

    with env.acting("admin", roles=("admin",)):
        second = (await env.service.list_assignment_rules(limit=50, cursor=""))[0][0]
        await env.service.rules.get()
    async with env.engine.begin() as holder:  # the same race for an assignment by the rules
        await holder.execute(repo.assignment_rules.delete().where(repo.assignment_rules.c.id == second["id"]))

        async def assign() -> Any:
            with env.acting("admin", roles=("admin",)):
                return (await env.service.assign(lead["id"], "", "", 0)).record

        assigning = asyncio.create_task(assign())
        await asyncio.sleep(0.3)
        assert not assigning.done()
    assert (await assigning)["in_pool"]  # no rule is left


async def test_concurrent_creates_under_rules_that_share_a_rep_do_not_deadlock(env: Any) -> None:
    with env.acting("admin", roles=("admin",)):
        for position, region, reps in ((1, "east", ("u1", "u2")), (2, "west", ("u3", "u2"))):
            await env.service.create_assignment_rule(
                AssignmentRule(id="", position=position, user_ids=reps, strategy="least_loaded", capacity=100,
                               regions=frozenset({region})),
                region, "",
            )  # fmt: skip

    async def create(n: int) -> str:
        with env.acting("admin", roles=("admin",)):
            lead, _ = await env.service.create_lead({"name": f"S{n}", "region": ("east", "west")[n % 2]})
        return str(lead["owner_id"])

    owners = await asyncio.gather(*(create(n) for n in range(16)))
    assert "" not in owners
    assert await env.loads_kept() == await env.loads_counted()
    assert sum((await env.loads_kept()).values()) == 16


async def test_least_loaded_assignment(env: Any) -> None:
    with env.acting("admin", roles=("admin",)):
        for i in range(2):
            await env.service.create_lead({"name": f"pre{i}", "owner_id": "u1"})
        await env.service.create_assignment_rule(
            AssignmentRule(id="", position=1, user_ids=("u1", "u2"), strategy="least_loaded"), "all", ""
        )
        owners = [(await env.service.create_lead({"name": f"n{i}"}))[0]["owner_id"] for i in range(3)]
    assert owners == ["u2", "u2", "u1"]


async def test_activity_contacts_the_lead_and_creates_a_follow_up(env: Any) -> None:
    with env.acting():
        lead, _ = await env.service.create_lead({"name": "C", "owner_id": "rep1"})
        assert lead["first_contact_due_at"] == env.clock.now + timedelta(hours=2)
        env.clock.advance(minutes=30)
        _activity, lead = await env.service.log_activity(
            ActivityInput(
                lead_id=lead["id"], kind="call", outcome="reached", next_follow_up_at=env.clock.now.replace(day=5)
            )
        )
        assert lead["status"] == "contacted" and lead["first_contacted_at"] == env.clock.now
        tasks, _ = await env.service.list_tasks(lead["id"], "", limit=50, cursor="")
        with pytest.raises(ValidationFailed):
            await env.service.log_activity(ActivityInput(lead_id=lead["id"], kind="fax"))
    assert [(t["kind"], t["status"]) for t in tasks] == [("first_contact", "done"), ("follow_up", "open")]
    assert "crm.leads.lead.contacted" in await outbox_types(env, lead["id"])


async def test_a_note_comes_with_the_leads_update_and_a_call_with_its_contact(env: Any) -> None:
    """Every activity reaches the event stream (analytics counts a rep's notes as follow-ups): a
    contact activity with `lead.contacted`, any other with the `lead.updated` it caused."""
    with env.acting():
        lead, _ = await env.service.create_lead({"name": "N", "owner_id": "rep1"})
        env.clock.advance(minutes=5)
        note, _ = await env.service.log_activity(ActivityInput(lead_id=lead["id"], kind="note", notes="left a message"))
        env.clock.advance(minutes=5)
        call, _ = await env.service.log_activity(ActivityInput(lead_id=lead["id"], kind="call"))
        # Written up later: it happened before the call, so the lead's last activity stays.
        backdated, _ = await env.service.log_activity(
            ActivityInput(lead_id=lead["id"], kind="note", occurred_at=env.clock.now - timedelta(minutes=2))
        )
    events = await outbox_events(env.engine, repo.metadata, key=lead["id"])
    updated = [events_pb2.LeadUpdated.FromString(p) for t, p in events if t == "crm.leads.lead.updated"]
    contacted = [events_pb2.LeadContacted.FromString(p) for t, p in events if t == "crm.leads.lead.contacted"]
    assert [(u.activity.id, u.activity.kind, list(u.changed_fields)) for u in updated] == [
        (note["id"], "note", ["last_activity_at"]),
        (backdated["id"], "note", []),
    ]
    assert [(c.activity.id, c.activity.kind) for c in contacted] == [(call["id"], "call")]


async def test_last_activity_at_is_the_latest_activity_whatever_order_they_are_logged_in(
    env_each_database: Any,
) -> None:
    # Regression: on SQLite (make run) the second activity of a lead failed (naive and aware times compared).
    env = env_each_database
    start = env.clock.now
    with env.acting():
        lead, _ = await env.service.create_lead({"name": "A", "owner_id": "rep1"})
        env.clock.advance(hours=3)
        for after in (timedelta(hours=2), timedelta(hours=1), timedelta(hours=2, minutes=30)):
            _activity, lead = await env.service.log_activity(
                ActivityInput(lead_id=lead["id"], kind="note", notes="n", occurred_at=start + after)
            )
    assert as_utc(lead["last_activity_at"]) == start + timedelta(hours=2, minutes=30)


async def test_scope_hides_other_reps_leads(env: Any) -> None:
    with env.acting("rep1"):
        lead, _ = await env.service.create_lead({"name": "mine", "owner_id": "rep1"})
    with env.acting("rep2", scope=ScopeKind.OWN), pytest.raises(NotFound):
        await env.service.get_lead(lead["id"])
    with env.acting("rep2", scope=ScopeKind.OWN):
        rows, _ = await env.service.list_leads(LeadFilters(), limit=50, cursor="", sort="")
    assert rows == []


async def test_update_with_version_and_status_rules(env: Any) -> None:
    with env.acting():
        lead, _ = await env.service.create_lead({"name": "U", "owner_id": "rep1"})
        with pytest.raises(StaleVersion):
            await env.service.update_lead(lead["id"], {"title": "CEO"}, ["title"], 99)
        row = (
            await env.service.update_lead(lead["id"], {"title": "CEO", "status": "qualified"}, ["title", "status"], 1)
        ).record
        assert (row["title"], row["status"], row["version"]) == ("CEO", "qualified", 2)
        with pytest.raises(ValidationFailed):
            await env.service.update_lead(lead["id"], {"score": 5}, ["score"], 0)
        disqualified = (await env.service.disqualify(lead["id"], "no budget", 0)).record
        assert disqualified["status"] == "unqualified"
        with pytest.raises(Conflict):
            await env.service.update_lead(lead["id"], {"status": "new"}, ["status"], 0)


async def test_list_filters_and_keyset_paging(env: Any) -> None:
    with env.acting():
        for i in range(7):
            await env.service.create_lead({"name": f"P{i}", "source": "ad" if i % 2 else "event", "region": "north"})
        seen: list[str] = []
        cursor = ""
        while True:
            rows, cursor = await env.service.list_leads(
                LeadFilters(sources=["ad"], region="north"), limit=2, cursor=cursor, sort="-created_at"
            )
            seen += [r["name"] for r in rows]
            if not cursor:
                break
    assert seen == ["P5", "P3", "P1"]


async def test_tag_filter_on_postgresql(env: Any) -> None:
    # Regression (fuzz): `tag=` compiled to `tags LIKE '%' || $1::JSONB || '%'`, which PostgreSQL
    # rejects, so every tag-filtered list answered 500.
    with env.acting():
        await env.service.create_lead({"name": "Tagged", "source": "ad", "tags": ["vip", "2026"]})
        await env.service.create_lead({"name": "Other", "source": "ad", "tags": ["vipx"]})
        rows, _ = await env.service.list_leads(LeadFilters(tag="vip"), limit=50, cursor="", sort="")
        odd, _ = await env.service.list_leads(LeadFilters(tag='%"\u0013'), limit=50, cursor="", sort="")
    assert [r["name"] for r in rows] == ["Tagged"] and odd == []


async def test_search_and_tag_filters_take_percent_and_underscore_literally(env_each_database: Any) -> None:
    env = env_each_database
    with env.acting():
        await env.service.create_lead({"name": "Discount 100% club", "tags": ["a_b"]})
        await env.service.create_lead({"name": "Discount 1000 club", "email": "x_y@corp.cn", "tags": ["axb"]})

        async def names(**filters: Any) -> list[str]:
            rows, _ = await env.service.list_leads(LeadFilters(**filters), limit=50, cursor="", sort="name")
            return [r["name"] for r in rows]

        assert await names(q="%") == ["Discount 100% club"]
        assert await names(q="100%") == ["Discount 100% club"]
        assert await names(q="x_y") == ["Discount 1000 club"]
        assert await names(q="_") == ["Discount 1000 club"]  # in its email, not as a wildcard
        assert await names(tag="a_b") == ["Discount 100% club"]
        # A search in the name and company only (the caller sees emails masked) does not match one.
        assert await names(q="x_y", q_fields=["name", "company"]) == []
        assert sorted(await names(q="club", q_fields=["name"])) == ["Discount 100% club", "Discount 1000 club"]
        with pytest.raises(ValidationFailed) as unknown:
            await names(q="x", q_fields=["mobile"])
    assert [e.field for e in unknown.value.errors] == ["q_fields"]


async def test_a_search_finds_a_lead_by_its_phone_as_written_any_way(env_each_database: Any) -> None:
    env = env_each_database
    with env.acting():
        await env.service.create_lead({"name": "Phoned", "phone": "+86 138 0013 8000"})
        await env.service.create_lead({"name": "Other", "phone": "139 1234 5678"})

        async def names(**filters: Any) -> list[str]:
            rows, _ = await env.service.list_leads(LeadFilters(**filters), limit=50, cursor="", sort="name")
            return [r["name"] for r in rows]

        assert await names(q="138 0013") == ["Phoned"]
        assert await names(q="13800138000") == ["Phoned"]
        assert await names(q="0013-8000") == ["Phoned"]
        # Too few digits to mean a phone, or a phone the caller may not search (q_fields): not by it.
        assert await names(q="138") == []
        assert await names(q="138 0013", q_fields=["name", "company", "email"]) == []


async def test_sla_overdue_and_recycling_timers(env_each_database: Any) -> None:
    # On SQLite too (make run): its times came back without an offset and the timers' checks failed.
    env = env_each_database
    with env.acting():
        late, _ = await env.service.create_lead({"name": "late", "owner_id": "rep1"})
        worked, _ = await env.service.create_lead({"name": "worked", "owner_id": "rep1"})
        await env.service.log_activity(ActivityInput(lead_id=worked["id"], kind="call"))
    env.clock.advance(hours=2, minutes=1)
    assert await env.service.flag_overdue_first_contacts() == 1
    assert await env.service.flag_overdue_first_contacts() == 0  # flagged once
    env.clock.advance(days=3)
    assert await env.service.recycle_idle_leads() == 2
    with env.acting():
        recycled = await env.service.get_lead(late["id"])
    assert recycled["in_pool"] and recycled["status"] == "recycled" and recycled["owner_id"] == ""
    types = await outbox_types(env, late["id"])
    assert types[-4:] == [
        "crm.leads.lead.follow_up_overdue",
        "crm.audit.record.recorded",
        "crm.leads.lead.recycled",
        "crm.audit.record.recorded",
    ]
    # No request made these changes: the service audits them (the gateway stores the records in its trail).
    flagged, audit = [
        AuditRecorded.FromString(payload)
        for kind, payload in await outbox_events(env.engine, repo.metadata, late["id"])
        if kind == "crm.audit.record.recorded"
    ]
    assert (flagged.actor.user_id, flagged.action, flagged.record_id) == ("system", "flag_overdue", late["id"])
    assert (flagged.method, flagged.path) == ("JOB", "first-contact-sla")
    assert flagged.reason.startswith("not contacted by ") and flagged.reason.endswith("Z")
    assert "follow_up_overdue" in flagged.fields and flagged.after["follow_up_overdue"] is True
    assert "owner_id" not in flagged.fields
    assert (audit.actor.user_id, audit.action, audit.resource, audit.record_id) == (
        "system",
        "recycle",
        "leads",
        late["id"],
    )
    assert audit.reason == "no activity for 3 days" and (audit.method, audit.path) == ("JOB", "recycle-idle-leads")
    assert {"owner_id", "in_pool", "status"} <= set(audit.fields)
    assert (audit.before["owner_id"], audit.after["status"], audit.after["in_pool"]) == ("rep1", "recycled", True)
    assert audit.after["owner_id"] is None and "name" not in audit.fields  # only what changed ("" is unset)


async def test_pool_claim_limit_and_release(env: Any) -> None:
    env.service.policy = type(env.service.policy)(pool_claim_limit=1)
    with env.acting():
        a, _ = await env.service.create_lead({"name": "pa"})
        b, _ = await env.service.create_lead({"name": "pb"})
        pool, _ = await env.service.list_pool(region="", industry="", source="", limit=10, cursor="")
        assert {r["id"] for r in pool} == {a["id"], b["id"]}
        claimed = await env.service.claim(a["id"])
        assert claimed["owner_id"] == "rep1" and not claimed["in_pool"]
        with pytest.raises(Conflict) as caught:
            await env.service.claim(b["id"])
        assert "limit" in caught.value.detail
        released = (await env.service.release(a["id"], "not my region")).record
        assert released["in_pool"] and released["status"] == "recycled"
        again = await env.service.claim(b["id"])
    assert again["owner_id"] == "rep1"


async def test_conversion_is_idempotent(env: Any) -> None:
    with env.acting():
        lead, _ = await env.service.create_lead({"name": "Zhang", "company": "Zhang Co", "owner_id": "rep1"})
        request = ConvertRequest(
            lead_id=lead["id"], create_opportunity=True, opportunity_amount=Money(Decimal("1200.50"), "CNY"),
            idempotency_key="conv-1",
        )  # fmt: skip
        result = await env.service.convert(request)
        again = await env.service.convert(request)
    assert result.lead["status"] == "converted"
    assert (again.account_id, again.contact_id, again.opportunity_id) == (
        result.account_id, result.contact_id, result.opportunity_id,
    )  # fmt: skip
    assert len(env.ports.accounts) == len(env.ports.contacts) == len(env.ports.opportunities) == 1
    assert (await outbox_types(env, lead["id"]))[-1] == "crm.leads.lead.converted"


async def test_conversion_compensates_a_partial_failure_and_resumes_after_an_outage(env: Any) -> None:
    with env.acting():
        lead, _ = await env.service.create_lead({"name": "Qian", "company": "Qian Co", "owner_id": "rep1"})
        env.ports.fail["opportunity"] = ValidationFailed([])
        with pytest.raises(ValidationFailed):
            await env.service.convert(ConvertRequest(lead_id=lead["id"], create_opportunity=True))
        assert env.ports.accounts == {} and env.ports.contacts == {}  # compensated
        assert (await env.service.get_lead(lead["id"]))["status"] == "new"
        env.ports.fail = {"contact": Unavailable("accounts down")}
        with pytest.raises(Unavailable):
            await env.service.convert(ConvertRequest(lead_id=lead["id"]))
        assert len(env.ports.accounts) == 1  # kept for the retry
        env.ports.fail = {}
        result = await env.service.convert(ConvertRequest(lead_id=lead["id"]))
    assert len(env.ports.accounts) == 1 and result.account_id in env.ports.accounts
    assert result.contact_id in env.ports.contacts and result.lead["converted_contact_id"] == result.contact_id


async def test_a_half_undone_conversion_is_finished_before_the_next_attempt(env: Any) -> None:
    with env.acting():
        lead, _ = await env.service.create_lead({"name": "Zhou", "company": "Zhou Co", "owner_id": "rep1"})
        # The opportunity is refused, the contact is deleted, the account cannot be (service down).
        env.ports.fail = {"opportunity": ValidationFailed([]), "delete_account": Unavailable("accounts down")}
        with pytest.raises(ValidationFailed):
            await env.service.convert(ConvertRequest(lead_id=lead["id"], create_opportunity=True))
        assert env.ports.contacts == {} and len(env.ports.accounts) == 1
        env.ports.fail = {"delete_account": Unavailable("accounts down")}
        with pytest.raises(Unavailable):  # still cannot undo: no new attempt on top of the old one
            await env.service.convert(ConvertRequest(lead_id=lead["id"], create_opportunity=True))
        assert env.ports.contacts == {} and env.ports.opportunities == {}
        env.ports.fail = {}
        result = await env.service.convert(ConvertRequest(lead_id=lead["id"], create_opportunity=True))
    assert list(env.ports.accounts) == [result.account_id]  # the first attempt's account is gone
    assert list(env.ports.contacts) == [result.contact_id] and list(env.ports.opportunities) == [result.opportunity_id]
    assert env.ports.contacts[result.contact_id] == result.account_id


@pytest.mark.parametrize("amount", ["1e400", "1" * 40, "0.129"])
async def test_a_campaign_cost_the_column_cannot_hold_as_given_is_refused(env: Any, amount: str) -> None:
    # Stored as Infinity, rounded through a float or to the cent, the cost then failed analytics
    # (not a finite number) or was silently another: the campaign fell out of the ROI reports.
    cost = Money(Decimal(amount), "CNY")
    with env.acting("mkt", roles=("marketing",)):
        with pytest.raises(ValidationFailed) as bad:
            await env.service.create_campaign({"name": "Expo", "cost": cost}, "")
        assert [e.field for e in bad.value.errors] == ["cost.amount"]
        campaign = await env.service.create_campaign({"name": "Expo", "cost": Money(Decimal("0.10"), "CNY")}, "")
        with pytest.raises(ValidationFailed) as bad:
            await env.service.update_campaign(campaign["id"], {"cost": cost}, ["cost"], campaign["version"])
        assert [e.field for e in bad.value.errors] == ["cost.amount"]
        kept = await env.service.get_campaign(campaign["id"])
    assert kept["cost_amount"] == Decimal("0.10")


async def test_campaign_and_webform_intake_with_rate_limit(env: Any) -> None:
    from leads.handlers import RateLimited

    with env.acting("mkt", roles=("marketing",)):
        campaign = await env.service.create_campaign(
            {"name": "Expo", "channel": "event", "cost": Money(Decimal("5000.00"), "CNY"), "starts_on": "2026-03-01",
             "ends_on": "2026-03-03"}, "c1",
        )  # fmt: skip
        with pytest.raises(ValidationFailed) as bad:
            await env.service.create_campaign({"name": "", "starts_on": "2026-13-01"}, "")
        assert {e.field for e in bad.value.errors} == {"name", "starts_on"}
        form = await env.service.create_webform(
            {"name": "Expo form", "campaign_id": campaign["id"], "rate_limit_per_minute": 2}, ""
        )
    lead, merged = await env.service.submit_webform(
        form["form_key"], {"name": "Sun", "email": "sun@x.cn", "budget": "10k"}, ""
    )
    assert lead["source"] == "webform" and lead["campaign_id"] == campaign["id"] and lead["custom"] == {"budget": "10k"}
    _, merged = await env.service.submit_webform(
        form["form_key"], {"name": "Sun", "email": "sun@x.cn", "company": "Sun"}, ""
    )
    assert merged
    with pytest.raises(RateLimited):
        await env.service.submit_webform(form["form_key"], {"name": "Third", "email": "t@x.cn"}, "")
    with pytest.raises(NotFound):
        await env.service.submit_webform("wrong-key", {"name": "x"}, "")
    assert "crm.leads.campaign.created" in await outbox_types(env, campaign["id"])
    # Windows that closed over an hour ago are forgotten; the current one keeps counting.
    env.clock.advance(minutes=61)
    await env.service.submit_webform(form["form_key"], {"name": "Later", "email": "later@x.cn"}, "")
    assert await env.service.forget_past_webform_windows() == 1
    assert await env.service.forget_past_webform_windows() == 0
    await env.service.submit_webform(form["form_key"], {"name": "Later 2", "email": "later2@x.cn"}, "")
    with pytest.raises(RateLimited):
        await env.service.submit_webform(form["form_key"], {"name": "Later 3", "email": "later3@x.cn"}, "")


async def test_custom_fields_are_validated_against_their_definitions(env: Any) -> None:
    from crm.common.v1 import custom_fields_pb2 as cf_pb
    from leads.__main__ import custom_field_servicer

    definitions = custom_field_servicer(env.service)
    with env.acting("admin", roles=("admin",)):
        budget = cf_pb.CustomFieldDefinition(entity="lead", key="budget", label="Budget", type="decimal", required=True)
        await definitions.UpsertCustomField(cf_pb.UpsertCustomFieldRequest(definition=budget), None)
        with pytest.raises(ValidationFailed) as missing:
            await env.service.create_lead({"name": "No budget"})
        assert missing.value.errors[0].field == "custom.budget"
        with pytest.raises(ValidationFailed) as unknown:
            await env.service.create_lead({"name": "x", "custom": {"budget": "10", "colour": "red"}})
        assert unknown.value.errors[0].field == "custom.colour"
        with pytest.raises(ValidationFailed) as wrong:
            await env.service.create_lead({"name": "x", "custom": {"budget": "lots"}})
        assert wrong.value.errors[0].field == "custom.budget"
        lead, _ = await env.service.create_lead({"name": "Rich", "custom": {"budget": "1200.50"}})
        updated = (await env.service.update_lead(lead["id"], {"custom": {"budget": "99"}}, ["custom"], 0)).record
        assert updated["custom"]["budget"] == "99"
        listed = await definitions.ListCustomFields(cf_pb.ListCustomFieldsRequest(entity="lead"), None)
        assert [d.key for d in listed.items] == ["budget"]
        await definitions.DeleteCustomField(cf_pb.DeleteCustomFieldRequest(entity="lead", key="budget"), None)
        with pytest.raises(NotFound):
            await definitions.DeleteCustomField(cf_pb.DeleteCustomFieldRequest(entity="lead", key="budget"), None)
        # The deleted definition no longer applies: the value is refused as undefined, not as a decimal.
        with pytest.raises(ValidationFailed) as undefined:
            await env.service.create_lead({"name": "y", "custom": {"budget": "lots"}})
        assert undefined.value.errors[0].message == "is not a defined custom field"


@asynccontextmanager
async def second_replica(env: Any) -> AsyncIterator[Any]:
    """Another instance of the service with its own engine, as a second pod would run it."""
    from crm_platform.db import create_engine
    from crm_platform.outbox import UnitOfWork
    from leads.handlers import LeadsService

    engine = create_engine(env.url)
    try:
        yield LeadsService(
            engine=engine,
            uow=UnitOfWork(engine, repo.metadata, source="crm/leads"),
            settings=env.service.settings,
            clock=env.clock,
        )
    finally:
        await engine.dispose()


async def seed_open_leads(env: Any, *, assigned: str, last_activity: str, first_contact_due: str) -> None:
    """20,000 open leads (seed-1 ... seed-20000), a quarter of them unassigned; the times are SQL
    expressions of `g` (the lead's number) and the parameters `long_ago` and `lately`."""
    now = env.clock()
    async with env.engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO leads (id, name, email, source, status, owner_id, team, tags, custom, created_at,"
                " updated_at, assigned_at, last_activity_at, first_contact_due_at)"
                " SELECT 'seed-' || g, 'Seed', '', 'website', CASE WHEN g % 2 = 1 THEN 'new' ELSE 'contacted' END,"
                "  CASE WHEN g % 4 = 0 THEN '' ELSE 'rep' || g % 7 END, '', '[]', '{}', now(), now(),"
                f"  {assigned}, {last_activity}, {first_contact_due}"
                " FROM generate_series(1, 20000) AS g"
            ),
            {"long_ago": now - timedelta(days=10), "lately": now - timedelta(days=1)},
        )
        await conn.execute(text("ANALYZE leads"))


async def test_the_sla_timer_walks_only_the_leads_awaiting_first_contact_by_due_time(env: Any) -> None:
    """At scale nearly every lead was contacted long ago: a run must not read the table."""
    due = "CASE WHEN g IN (1, 3, 5) THEN CAST(:long_ago AS timestamptz) END"
    held = "CASE WHEN g % 4 = 0 THEN NULL ELSE CAST(:long_ago AS timestamptz) END"
    await seed_open_leads(env, assigned=held, last_activity="CAST(:lately AS timestamptz)", first_contact_due=due)
    async with env.engine.begin() as conn:
        plan = await generic_plan(conn, repo.overdue_first_contacts(env.clock(), 200))
    assert "Index Scan using ix_leads_sla_due on leads" in plan, plan
    assert await env.service.flag_overdue_first_contacts() == 3  # seed-1, seed-3 and seed-5: due, new, held
    async with env.engine.connect() as conn:
        flagged = await conn.scalars(select(repo.leads.c.id).where(repo.leads.c.follow_up_overdue))
        assert sorted(flagged) == ["seed-1", "seed-3", "seed-5"]


async def test_the_recycling_timer_walks_only_the_held_leads_by_assignment_time(env: Any) -> None:
    """At scale most open leads are unassigned or worked lately: a run must not read them all."""
    held = "CASE WHEN g % 4 = 0 THEN NULL ELSE CAST(:long_ago AS timestamptz) END"
    worked = "CASE WHEN g <= 3 THEN NULL ELSE CAST(:lately AS timestamptz) END"
    await seed_open_leads(env, assigned=held, last_activity=worked, first_contact_due="NULL")
    cutoff = env.service.policy.recycle_cutoff(env.clock())
    async with env.engine.begin() as conn:
        plan = await generic_plan(conn, repo.idle_held_leads(cutoff, 200))
    assert "Index Scan using ix_leads_recycle_due on leads" in plan, plan
    assert await env.service.recycle_idle_leads() == 3  # seed-1, seed-2 and seed-3: never worked
    async with env.engine.connect() as conn:
        pooled = await conn.scalars(select(repo.leads.c.id).where(repo.leads.c.status == "recycled"))
        assert sorted(pooled) == ["seed-1", "seed-2", "seed-3"]


async def test_two_replicas_flag_each_overdue_lead_once(env_each_database: Any) -> None:
    env = env_each_database
    with env.acting():
        for i in range(12):
            await env.service.create_lead({"name": f"o{i}", "owner_id": "rep1"})
    env.clock.advance(hours=3)
    async with second_replica(env) as replica:
        acted = await asyncio.gather(env.service.flag_overdue_first_contacts(), replica.flag_overdue_first_contacts())
        acted_again = await asyncio.gather(
            env.service.flag_overdue_first_contacts(), replica.flag_overdue_first_contacts()
        )
    assert sum(acted) == 12 and sum(acted_again) == 0
    assert (await outbox_types(env)).count("crm.leads.lead.follow_up_overdue") == 12


async def test_two_replicas_recycle_each_idle_lead_once(env_each_database: Any) -> None:
    env = env_each_database
    with env.acting():
        for i in range(12):
            await env.service.create_lead({"name": f"idle{i}", "owner_id": "rep1"})
    env.clock.advance(days=3, hours=1)
    async with second_replica(env) as replica:
        acted = await asyncio.gather(env.service.recycle_idle_leads(), replica.recycle_idle_leads())
        acted_again = await asyncio.gather(env.service.recycle_idle_leads(), replica.recycle_idle_leads())
    assert sum(acted) == 12 and sum(acted_again) == 0
    assert (await outbox_types(env)).count("crm.leads.lead.recycled") == 12


async def test_leads_are_filtered_by_custom_fields(env: Any) -> None:
    """`ListLeads(custom=[...])`: typed by the definitions (JSONB containment, GIN-indexed);
    an undefined key or a value not of the field's type is refused naming `custom.<key>`."""
    from crm.common.v1 import custom_fields_pb2 as cf_pb
    from crm.leads.v1 import leads_service_pb2
    from leads.__main__ import custom_field_servicer
    from leads.servicer import LeadsServicer
    from sqlalchemy import text

    definitions = custom_field_servicer(env.service)
    servicer = LeadsServicer(env.service)

    async def listed(*pairs: tuple[str, str], **filters: Any) -> list[str]:
        custom = [cf_pb.CustomFieldFilter(key=key, value=value) for key, value in pairs]
        request = leads_service_pb2.ListLeadsRequest(custom=custom, **filters)
        return sorted(lead.name for lead in (await servicer.ListLeads(request, None)).items)

    with env.acting("admin", roles=("admin",)):
        for key, kind, options in (
            ("seats", "number", []),
            ("vip", "bool", []),
            ("products", "multi_enum", ["crm", "erp"]),
        ):
            definition = cf_pb.CustomFieldDefinition(entity="lead", key=key, label=key, type=kind, options=options)
            await definitions.UpsertCustomField(cf_pb.UpsertCustomFieldRequest(definition=definition), None)
        await env.service.create_lead(
            {"name": "big", "custom": {"seats": 120, "vip": True, "products": ["erp", "crm"]}}
        )
        await env.service.create_lead({"name": "small", "custom": {"seats": 3, "vip": False, "products": ["crm"]}})
        await env.service.create_lead({"name": "plain"})

        assert await listed(("seats", "120")) == ["big"]
        assert await listed(("seats", "120.0"), ("vip", "true")) == ["big"]
        assert await listed(("vip", "false")) == ["small"]
        assert await listed(("products", "crm")) == ["big", "small"]
        assert await listed(("products", "erp"), ("vip", "false")) == []
        assert await listed(("products", "crm"), q="sma") == ["small"]
        assert await listed() == ["big", "plain", "small"]
        with pytest.raises(ValidationFailed) as unknown:
            await listed(("colour", "red"))
        assert [e.field for e in unknown.value.errors] == ["custom.colour"]
        with pytest.raises(ValidationFailed) as wrong:
            await listed(("seats", "many"), ("products", "hr"))
        assert [e.field for e in wrong.value.errors] == ["custom.seats", "custom.products"]

    async with env.engine.connect() as conn:
        index = await conn.scalar(text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_leads_custom_gin'"))
    assert index is not None and "jsonb_path_ops" in index


async def test_an_email_change_onto_another_open_lead_names_it_only_to_who_may_read_it(env: Any) -> None:
    with env.acting("rep1", scope=ScopeKind.OWN):
        mine, _ = await env.service.create_lead({"name": "Mine", "owner_id": "rep1"})
    with env.acting("rep2", scope=ScopeKind.OWN):
        theirs, _ = await env.service.create_lead({"name": "Theirs", "email": "bob@beta.cn", "owner_id": "rep2"})
    with env.acting("rep1", scope=ScopeKind.OWN), pytest.raises(AlreadyExists) as hidden:
        await env.service.update_lead(mine["id"], {"email": "bob@beta.cn"}, ["email"], 0)
    with env.acting("manager1", roles=("sales_manager",)), pytest.raises(AlreadyExists) as named:
        await env.service.update_lead(mine["id"], {"email": "bob@beta.cn"}, ["email"], 0)

    assert hidden.value.existing_id == "" and theirs["id"] not in hidden.value.detail
    assert named.value.existing_id == theirs["id"]
