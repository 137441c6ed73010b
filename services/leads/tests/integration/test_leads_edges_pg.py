"""Leads at the edges a review found: merges and record scope, import rows of any JSON shape,
campaign and owner columns in imports, duplicates within one file, dedupe on update, claim limits
after reassignment, idempotency keys under concurrency and reuse, and a lead closed mid-conversion."""

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from crm_platform.errors import AlreadyExists, Conflict, FieldError, NotFound, StaleVersion, ValidationFailed
from crm_platform.principal import ScopeKind
from crm_platform.testing.outbox import outbox_events
from leads import repository as repo
from leads.handlers import ActivityInput, ConvertRequest, ImportOptions, ImportPartResult, ImportSpec, RateLimited
from leads.importing import RowMapper
from sqlalchemy import func, select, update

pytestmark = pytest.mark.integration


async def _import(
    env: Any, body: bytes, *, fmt: str = "json", on_duplicate: str = "reject", campaign_id: str = ""
) -> ImportPartResult:
    async def chunks() -> AsyncIterator[bytes]:
        yield body

    mapper = RowMapper(column_map={}, source_map={}, campaign_id=campaign_id)
    options = ImportOptions(mapper=mapper, on_duplicate=on_duplicate)
    return await env.service.import_part(ImportSpec(import_id=f"imp-{id(body)}", format=fmt, options=options), chunks())


def _outcomes(result: ImportPartResult) -> list[tuple[int, str, str]]:
    return [(o.row, o.status, o.field) for o in result.outcomes]


async def _tasks(env: Any, lead_id: str) -> list[tuple[str, str, str]]:
    t = repo.tasks.c
    async with env.engine.connect() as conn:
        rows = await conn.execute(select(t.kind, t.owner_id, t.status).where(t.lead_id == lead_id))
    return [tuple(row) for row in rows]


# --- merges and record scope -----------------------------------------------------------------


async def test_a_merge_never_reads_or_writes_a_lead_outside_the_callers_scope(env: Any) -> None:
    with env.acting("rep1", scope=ScopeKind.OWN):
        secret, _ = await env.service.create_lead({"name": "Secret", "email": "vip@corp.cn", "owner_id": "rep1"})
    with env.acting("rep2", team="west", scope=ScopeKind.OWN):
        with pytest.raises(AlreadyExists) as caught:  # as with reject: nothing of the lead, not even its id
            await env.service.create_lead(
                {"name": "x", "email": "VIP@corp.cn", "company": "NewCo"}, on_duplicate="merge"
            )
        assert caught.value.existing_id == ""
        imported = await _import(
            env, b'[{"name": "x", "email": "vip@corp.cn", "company": "NewCo"}]', on_duplicate="merge"
        )
        assert [(o.status, o.lead_id, o.reason) for o in imported.outcomes] == [
            ("rejected", "", "duplicate of an open lead outside your leads (email)")
        ]
    with env.acting("rep1", scope=ScopeKind.OWN):
        assert (await env.service.get_lead(secret["id"]))["company"] == ""  # untouched
        mine, merged = await env.service.create_lead(
            {"email": "vip@corp.cn", "company": "Own Co"}, on_duplicate="merge"
        )
    assert merged and mine["id"] == secret["id"] and mine["company"] == "Own Co"  # in scope: merged


# --- import rows of any shape, campaigns, owners, duplicates within a file ----------------------


async def test_an_import_row_whose_values_are_not_text_is_rejected_alone_naming_the_field(env: Any) -> None:
    rows = [
        {"name": "Tags of numbers", "tags": [1, 2]},
        {"name": {"first": "Li"}},
        {"name": "Emails", "email": ["a@x.cn"]},
        {"name": "A flag", "company": True},
        {"name": "Tags of nothing", "tags": [None]},
        {"name": "Fine", "phone": 13800138000, "tags": "a;b"},  # a JSON number is the text it was written as
    ]
    with env.acting():
        result = await _import(env, json.dumps(rows).encode())
    assert _outcomes(result) == [
        (1, "rejected", "tags"),
        (2, "rejected", "name"),
        (3, "rejected", "email"),
        (4, "rejected", "company"),
        (5, "rejected", "tags"),
        (6, "accepted", ""),
    ]
    assert result.lead_import["status"] == "completed" and result.lead_import["accepted"] == 1
    with env.acting():
        fine = await env.service.get_lead(result.outcomes[-1].lead_id)
    assert fine["phone_norm"] == "+8613800138000" and fine["tags"] == ["a", "b"]


async def test_an_import_links_only_to_campaigns_that_exist(env: Any) -> None:
    with env.acting():
        campaign = await env.service.create_campaign({"name": "Expo", "channel": "event"}, "")
        with pytest.raises(ValidationFailed) as caught:
            await _import(env, b'[{"name": "Ann"}]', campaign_id="no-such-campaign")
        assert [e.field for e in caught.value.errors] == ["campaign_id"]
        rows = [{"name": "Bo", "campaign_id": "bogus"}, {"name": "Cy", "campaign_id": campaign["id"]}, {"name": "Di"}]
        result = await _import(env, json.dumps(rows).encode())
    assert _outcomes(result) == [(1, "rejected", "campaign_id"), (2, "accepted", ""), (3, "accepted", "")]
    assert result.outcomes[0].reason == "campaign bogus does not exist"


async def test_an_imported_lead_with_an_owner_gets_its_first_contact_task(env: Any) -> None:
    with env.acting():
        result = await _import(env, b"name,owner_id\nBob,rep7\n", fmt="csv")
        lead = await env.service.get_lead(result.outcomes[0].lead_id)
    assert lead["owner_id"] == "rep7" and lead["first_contact_due_at"] is not None and not lead["in_pool"]
    assert await _tasks(env, lead["id"]) == [("first_contact", "rep7", "open")]


async def test_merge_within_one_file_fills_the_earlier_row_as_it_would_a_stored_lead(env: Any) -> None:
    body = b"name,email,phone,company\nAnn,ann@x.cn,,\nAnn B,ann@x.cn,13800138000,AnnCo\nCarl,,+86 138 0013 8000,\n"
    with env.acting():
        result = await _import(env, body, fmt="csv", on_duplicate="merge")
        first = result.outcomes[0].lead_id
        assert [(o.status, o.lead_id) for o in result.outcomes] == [
            ("accepted", first),
            ("merged", first),
            ("merged", first),  # by the phone the second row brought
        ]
        lead = await env.service.get_lead(first)
    assert (lead["name"], lead["company"], lead["phone_norm"]) == ("Ann", "AnnCo", "+8613800138000")
    assert result.lead_import["accepted"] == 1 and result.lead_import["merged"] == 2


# --- updates -----------------------------------------------------------------------------------


async def test_an_update_cannot_give_a_lead_another_open_leads_email_or_phone(env: Any) -> None:
    with env.acting():
        a, _ = await env.service.create_lead({"name": "A", "email": "a@x.cn"})
        b, _ = await env.service.create_lead({"name": "B", "phone": "13800138000"})
        with pytest.raises(AlreadyExists) as caught:  # A is the older match of the pair: it must not hide B
            await env.service.update_lead(
                a["id"], {"email": "a@x.cn", "phone": "13800138000"}, ["email", "phone"], a["version"]
            )
        assert caught.value.existing_id == b["id"]
        same = (await env.service.update_lead(a["id"], {"email": "A@x.cn"}, ["email"], a["version"])).record
    assert same["email_norm"] == "a@x.cn"  # its own email is no duplicate


async def test_setting_status_contacted_by_hand_counts_as_the_first_contact(env: Any) -> None:
    with env.acting():
        lead, _ = await env.service.create_lead({"name": "Gao", "owner_id": "rep1"})
        env.clock.advance(hours=3)
        assert await env.service.flag_overdue_first_contacts() == 1
        flagged = await env.service.get_lead(lead["id"])
        contacted = (
            await env.service.update_lead(lead["id"], {"status": "contacted"}, ["status"], flagged["version"])
        ).record
        qualified = (await env.service.update_lead(lead["id"], {"status": "qualified"}, ["status"], 0)).record
        with pytest.raises(Conflict):  # new, with a first contact and its SLA met
            await env.service.update_lead(lead["id"], {"status": "new"}, ["status"], 0)
    assert contacted["first_contacted_at"] == env.clock.now and not contacted["follow_up_overdue"]
    assert qualified["first_contacted_at"] == contacted["first_contacted_at"]
    assert await _tasks(env, lead["id"]) == [("first_contact", "rep1", "done")]
    published = [event_type for event_type, _ in await outbox_events(env.engine, repo.metadata, lead["id"])]
    assert published.count("crm.leads.lead.contacted") == 1  # for analytics and ERP, as a logged call


# --- the pool ----------------------------------------------------------------------------------


async def test_a_lead_a_rep_enters_is_theirs_and_one_a_manager_enters_goes_by_the_rules(env: Any) -> None:
    with env.acting("rep1", scope=ScopeKind.OWN):
        mine, _ = await env.service.create_lead({"name": "met at the expo"})
        seen = await env.service.get_lead(mine["id"])  # not lost to the pool at once
    with env.acting("manager", scope=ScopeKind.TEAM):
        unassigned, _ = await env.service.create_lead({"name": "from a list"})
    assert (seen["owner_id"], seen["in_pool"], seen["status"]) == ("rep1", False, "new")
    assert seen["first_contact_due_at"] is not None  # the first-contact SLA runs for the rep
    assert (unassigned["owner_id"], unassigned["in_pool"]) == ("", True)  # no rule matches it


async def test_a_claim_of_a_lead_outside_the_pool_tells_only_who_may_see_it_that_it_exists(env: Any) -> None:
    with env.acting("manager"):
        theirs, _ = await env.service.create_lead({"name": "held by rep2", "owner_id": "rep2", "team": "east"})
        mine, _ = await env.service.create_lead({"name": "held by rep1", "owner_id": "rep1", "team": "east"})
    with env.acting("rep1", scope=ScopeKind.OWN), pytest.raises(NotFound):
        await env.service.claim(theirs["id"])  # as GET answers it: 404, not "not in the pool"
    with env.acting("rep1", scope=ScopeKind.OWN), pytest.raises(Conflict) as held:
        await env.service.claim(mine["id"])
    with env.acting("lead-of-east", scope=ScopeKind.TEAM), pytest.raises(Conflict):
        await env.service.claim(theirs["id"])  # a lead of the team, seen by its manager
    assert held.value.reason == "NOT_IN_POOL"


async def test_an_assignment_to_an_owner_or_team_of_only_spaces_is_refused_naming_it(env: Any) -> None:
    with env.acting("manager"):
        lead, _ = await env.service.create_lead({"name": "blank", "owner_id": "rep1"})
        with pytest.raises(ValidationFailed) as blank:
            await env.service.assign(lead["id"], "  ", "\t", 0)
        kept = await env.service.get_lead(lead["id"])
    assert [e.field for e in blank.value.errors] == ["owner_id", "team"]
    assert (kept["owner_id"], kept["version"]) == ("rep1", lead["version"])


async def test_a_claimed_lead_given_to_another_rep_counts_against_nobodys_claim_limit(env: Any) -> None:
    env.service.policy = type(env.service.policy)(pool_claim_limit=1)
    with env.acting("manager"):
        a, _ = await env.service.create_lead({"name": "pa"})
        b, _ = await env.service.create_lead({"name": "pb"})
    with env.acting("rep3"):
        claimed = await env.service.claim(a["id"])
    with env.acting("manager"):
        await env.service.assign(a["id"], "rep4", "", claimed["version"])
    with env.acting("rep4"):
        assert (await env.service.claim(b["id"]))["owner_id"] == "rep4"  # rep4 had claimed nothing
    async with env.engine.connect() as conn:
        claimed_at = await conn.scalar(select(repo.leads.c.claimed_at).where(repo.leads.c.id == a["id"]))
    assert claimed_at is None


# --- idempotency keys --------------------------------------------------------------------------


async def test_concurrent_requests_with_one_key_answer_with_the_first_result(env: Any) -> None:
    with env.acting():
        for round_number in range(3):
            data = {"name": "N", "email": f"n{round_number}@x.cn"}
            first, second = await asyncio.gather(
                *(env.service.create_lead(data, idempotency_key=f"k{round_number}") for _ in range(2))
            )
            assert first[0]["id"] == second[0]["id"]
        # Without an email or phone nothing else serialises the two: the key does.
        first, second = await asyncio.gather(
            *(env.service.create_lead({"name": "No keys"}, idempotency_key="bare") for _ in range(2))
        )
        assert first[0]["id"] == second[0]["id"]
        activity = ActivityInput(lead_id=first[0]["id"], kind="call", idempotency_key="call-1")
        logged = await asyncio.gather(env.service.log_activity(activity), env.service.log_activity(activity))
        assert logged[0][0]["id"] == logged[1][0]["id"]
        activities, _ = await env.service.list_activities(first[0]["id"], limit=10, cursor="")
    assert len(activities) == 1


async def test_a_key_used_for_one_lead_is_refused_for_another(env: Any) -> None:
    with env.acting():
        one, _ = await env.service.create_lead({"name": "One", "company": "One Co", "owner_id": "rep1"})
        two, _ = await env.service.create_lead({"name": "Two", "company": "Two Co", "owner_id": "rep1"})
        await env.service.convert(ConvertRequest(lead_id=one["id"], idempotency_key="same"))
        with pytest.raises(Conflict) as caught:
            await env.service.convert(ConvertRequest(lead_id=two["id"], idempotency_key="same"))
        assert caught.value.reason == "IDEMPOTENCY_KEY_REUSED"
        assert (await env.service.get_lead(two["id"]))["status"] == "new"
        await env.service.log_activity(ActivityInput(lead_id=two["id"], kind="note", idempotency_key="note-1"))
        three, _ = await env.service.create_lead({"name": "Three"})
        with pytest.raises(Conflict) as caught:
            await env.service.log_activity(ActivityInput(lead_id=three["id"], kind="note", idempotency_key="note-1"))
    assert caught.value.reason == "IDEMPOTENCY_KEY_REUSED"


# --- conversion --------------------------------------------------------------------------------


async def test_a_lead_disqualified_while_it_converts_stays_disqualified_and_the_attempt_is_undone(env: Any) -> None:
    """A disqualification waits for a conversion under way; one that checked for a conversion just
    before this one began writes the lead unqualified while it runs (here, as the hook does, while
    the deal is made): the conversion then finds the lead closed and undoes what it made."""
    with env.acting():
        lead, _ = await env.service.create_lead({"name": "Wu", "company": "Wu Co", "owner_id": "rep1"})
    create_opportunity = env.ports.create_opportunity

    async def disqualified_meanwhile(**kw: Any) -> str:
        created = await create_opportunity(**kw)
        leads = repo.leads
        async with env.engine.begin() as conn:  # the disqualification's own transaction
            await conn.execute(
                update(leads)
                .where(leads.c.id == lead["id"])
                .values(status="unqualified", disqualified_reason="spam", version=leads.c.version + 1)
            )
        return str(created)

    env.ports.create_opportunity = disqualified_meanwhile
    with env.acting():
        with pytest.raises(Conflict):
            await env.service.convert(ConvertRequest(lead_id=lead["id"], create_opportunity=True))
        after = await env.service.get_lead(lead["id"])
    assert after["status"] == "unqualified" and after["disqualified_reason"] == "spam"
    assert after["converted_account_id"] == ""
    assert env.ports.accounts == {} and env.ports.contacts == {} and env.ports.opportunities == {}
    assert env.ports.calls[-3:] == ["delete_opportunity", "delete_contact", "delete_account"]
    async with env.engine.connect() as conn:
        state = await conn.scalar(select(repo.conversions.c.state).where(repo.conversions.c.lead_id == lead["id"]))
    assert state == "compensated"


async def test_a_record_planted_under_a_conversions_key_is_neither_adopted_nor_deleted_by_its_undo(env: Any) -> None:
    """Upstream services answer a repeated idempotency key with the first result. A caller who
    creates an account first under the key a conversion would use must not make the saga take that
    account for its own, nor delete it when the attempt is undone."""
    with env.acting():
        lead, _ = await env.service.create_lead({"name": "Zheng", "company": "Zheng Co", "owner_id": "rep1"})
    env.ports.accounts["planted"] = "Someone else's account"
    for nonce_free_key in (f"lead-convert:{lead['id']}:1:account", f"lead-convert:{lead['id']}:1"):
        env.ports.keys[nonce_free_key] = "planted"
    env.ports.fail["contact"] = ValidationFailed([FieldError("account_id", "does not exist")])
    with env.acting(), pytest.raises(ValidationFailed):
        await env.service.convert(ConvertRequest(lead_id=lead["id"]))
    assert env.ports.accounts == {"planted": "Someone else's account"}  # its own was created, then undone
    assert env.ports.calls[-1] == "delete_account"


# --- web forms -------------------------------------------------------------------------------------


async def test_a_web_form_can_be_turned_off_and_a_leaked_key_replaced(env: Any) -> None:
    with env.acting():
        form = await env.service.create_webform({"name": "Expo signup"}, "")
        lead, _ = await env.service.submit_webform(form["form_key"], {"name": "Zhao", "email": "z@x.cn"}, "")
        assert lead["source"] == "webform"

        off = (await env.service.update_webform(form["id"], {"enabled": False}, ["enabled"], 0)).record
        assert not off["enabled"]
        with pytest.raises(NotFound):
            await env.service.submit_webform(form["form_key"], {"name": "Qian"}, "")
        await env.service.update_webform(form["id"], {"enabled": True}, ["enabled"], 0)

        rotated = await env.service.rotate_webform_key(form["id"], "", 0)
        assert rotated["form_key"] != form["form_key"]
        with pytest.raises(NotFound):  # the leaked key is dead at once
            await env.service.submit_webform(form["form_key"], {"name": "Sun"}, "")
        second, _ = await env.service.submit_webform(rotated["form_key"], {"name": "Li", "email": "li@x.cn"}, "")
        assert second["source_detail"] == "Expo signup"
        with pytest.raises(NotFound):
            await env.service.rotate_webform_key("no-such-form", "", 0)


async def test_a_web_forms_settings_change_by_the_paths_named_and_are_checked_as_on_creation(env: Any) -> None:
    with env.acting():
        form = await env.service.create_webform({"name": "Expo signup"}, "")
        changed = (
            await env.service.update_webform(
                form["id"],
                {"name": " Expo 2027 ", "rate_limit_per_minute": 5, "honeypot_field": "fax", "region": "east"},
                ["name", "rate_limit_per_minute", "honeypot_field"],
                0,
            )
        ).record
        assert (changed["name"], changed["rate_limit_per_minute"], changed["honeypot_field"]) == ("Expo 2027", 5, "fax")
        assert changed["region"] == "" and changed["form_key"] == form["form_key"]  # not named: unchanged
        with pytest.raises(ValidationFailed) as caught:
            await env.service.update_webform(
                form["id"], {"name": " ", "rate_limit_per_minute": 0, "honeypot_field": "email"},
                ["name", "rate_limit_per_minute", "honeypot_field"], 0,
            )  # fmt: skip
        assert sorted(e.field for e in caught.value.errors) == ["honeypot_field", "name", "rate_limit_per_minute"]
        for paths in (["form_key"], []):
            with pytest.raises(ValidationFailed) as caught:
                await env.service.update_webform(form["id"], {"form_key": "mine"}, paths, 0)
            assert [e.field for e in caught.value.errors] == ["update_mask"]
        with pytest.raises(ValidationFailed) as caught:
            await env.service.update_webform(form["id"], {"campaign_id": "no-such-campaign"}, ["campaign_id"], 0)
        assert [e.field for e in caught.value.errors] == ["campaign_id"]
        with pytest.raises(NotFound):
            await env.service.update_webform("no-such-form", {"name": "x"}, ["name"], 0)
        off = (await env.service.update_webform(form["id"], {"enabled": False}, ["enabled"], 0)).record
        assert not off["enabled"] and off["name"] == "Expo 2027"


async def test_every_change_of_a_web_form_counts_in_its_version_and_a_stale_version_is_refused(env: Any) -> None:
    with env.acting():
        form = await env.service.create_webform({"name": "Expo signup"}, "")
        renamed = (await env.service.update_webform(form["id"], {"name": "Expo 2027"}, ["name"], 1)).record
        off = (await env.service.update_webform(form["id"], {"enabled": False}, ["enabled"], 2)).record
        rotated = await env.service.rotate_webform_key(form["id"], "", 3)
        assert [form["version"], renamed["version"], off["version"], rotated["version"]] == [1, 2, 3, 4]

        with pytest.raises(StaleVersion) as caught:  # written by someone who last read version 2
            await env.service.update_webform(form["id"], {"name": "Expo 2026"}, ["name"], 2)
        assert caught.value.current_version == 4
        with pytest.raises(StaleVersion):
            await env.service.rotate_webform_key(form["id"], "", 2)
        kept = await env.service.get_webform(form["id"])
        assert (kept["name"], kept["form_key"], kept["version"]) == ("Expo 2027", rotated["form_key"], 4)

        current = (await env.service.update_webform(form["id"], {"enabled": True}, ["enabled"], 4)).record
        anyway = (
            await env.service.update_webform(form["id"], {"region": "east"}, ["region"], 0)
        ).record  # unconditional
        assert (current["version"], anyway["version"]) == (5, 6)


async def test_a_key_rotation_repeated_with_its_idempotency_key_answers_with_the_key_it_drew(env: Any) -> None:
    with env.acting():
        form = await env.service.create_webform({"name": "Expo signup"}, "")
        rotated = await env.service.rotate_webform_key(form["id"], "rotate-1", 1)
        # The client timed out and retries as it sent the first call, If-Match of version 1 included.
        again = await env.service.rotate_webform_key(form["id"], "rotate-1", 1)
        assert (again["form_key"], again["version"]) == (rotated["form_key"], 2)
        lead, _ = await env.service.submit_webform(rotated["form_key"], {"name": "Li", "email": "li@x.cn"}, "")
        assert lead["source_detail"] == "Expo signup"  # the key the client holds works

        other = await env.service.create_webform({"name": "Fair signup"}, "")
        with pytest.raises(Conflict) as caught:
            await env.service.rotate_webform_key(other["id"], "rotate-1", 0)
        assert caught.value.reason == "IDEMPOTENCY_KEY_REUSED"
        with pytest.raises(StaleVersion):  # refused: the key stays free for the call that has the version
            await env.service.rotate_webform_key(form["id"], "rotate-2", 1)
        newer = await env.service.rotate_webform_key(form["id"], "rotate-2", 2)
        assert newer["form_key"] != rotated["form_key"] and newer["version"] == 3


async def lead_count(env: Any) -> int:
    async with env.engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(repo.leads)) or 0)


async def test_a_submission_that_fills_the_honeypot_creates_nothing_and_counts_against_the_rate(env: Any) -> None:
    with env.acting():
        with pytest.raises(ValidationFailed) as caught:
            await env.service.create_webform({"name": "Bad", "honeypot_field": "email"}, "")
        assert [e.field for e in caught.value.errors] == ["honeypot_field"]
        form = await env.service.create_webform(
            {"name": "Trial", "honeypot_field": "fax_number", "rate_limit_per_minute": 2}, ""
        )
        assert form["honeypot_field"] == "fax_number"
        before = await lead_count(env)
        bot = {"name": "Buy now", "email": "bot@spam.example", "fax_number": "http://spam.example"}
        assert await env.service.submit_webform(form["form_key"], bot, "") is None
        assert await lead_count(env) == before

        person, _ = await env.service.submit_webform(
            form["form_key"], {"name": "Zhou", "email": "zhou@x.cn", "fax_number": " ", "budget": "50k"}, ""
        )
        assert person["custom"] == {"budget": "50k"}  # the empty honeypot is not kept as data
        assert await lead_count(env) == before + 1
        with pytest.raises(RateLimited):  # the bot's submission used up the form's minute with the person's
            await env.service.submit_webform(form["form_key"], {"name": "Wu", "email": "wu@x.cn"}, "")


async def test_a_call_logged_as_made_before_the_lead_was_captured_counts_at_capture_on_the_leads_clocks(
    env_each_database: Any,
) -> None:
    env = env_each_database
    with env.acting():
        lead, _ = await env.service.create_lead({"name": "met at an expo", "owner_id": "rep1"})
        years_ago = env.clock.now - timedelta(days=5 * 365)
        call = ActivityInput(lead_id=lead["id"], kind="call", occurred_at=years_ago)
        activity, contacted = await env.service.log_activity(call)
    # Never a negative time to first contact in analytics, nor a last activity before the lead.
    assert contacted["first_contacted_at"] == contacted["last_activity_at"] == lead["created_at"]
    assert contacted["status"] == "contacted"
    assert activity["occurred_at"] == years_ago  # the activity keeps its own time


async def test_a_duplicate_names_the_existing_lead_only_to_who_may_read_it(env: Any) -> None:
    """SPEC §4: 409 with the existing lead id; §3: never reveal a record outside the caller's scope.
    The conflict stays (a second open lead of the person would be a duplicate), the id is not given."""
    with env.acting("rep1", scope=ScopeKind.OWN):
        mine, _ = await env.service.create_lead({"name": "Mine", "email": "dup@corp.cn"})
        with pytest.raises(AlreadyExists) as own:
            await env.service.create_lead({"name": "Again", "email": "dup@corp.cn"})
    with env.acting("rep2", scope=ScopeKind.OWN), pytest.raises(AlreadyExists) as others:
        await env.service.create_lead({"name": "Probe", "email": "dup@corp.cn"})
    assert own.value.existing_id == mine["id"]
    assert others.value.existing_id == "" and mine["id"] not in others.value.detail
