"""Dedupe keys and contact links a review found wrong: a merge (create, import, a row into an earlier
row) never gives a lead an email or phone another open lead holds; a deleted contact links no new
lead (and no late event of it brings its keys back); an update that gives a lead a contact's email
or phone links it, as a create does."""

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from crm.accounts.v1 import accounts_pb2
from crm.leads.v1 import events_pb2
from crm_platform.testing.outbox import outbox_events
from leads import repository as repo
from leads.consumers import apply_contact, apply_contact_deleted
from leads.domain import OPEN_STATUSES
from leads.handlers import ConvertRequest, ImportOptions, ImportPartResult, ImportSpec
from leads.importing import RowMapper
from sqlalchemy import func, select

pytestmark = pytest.mark.integration

PHONE = "13700006169"
PHONE_NORM = "+8613700006169"


async def _import(env: Any, rows: list[dict[str, str]], key: str) -> ImportPartResult:
    async def chunks() -> AsyncIterator[bytes]:
        yield json.dumps(rows).encode()

    options = ImportOptions(mapper=RowMapper(column_map={}, source_map={}), on_duplicate="merge")
    result: ImportPartResult = await env.service.import_part(
        ImportSpec(import_id=key, format="json", options=options), chunks()
    )
    return result


async def _open_leads_with_phone(env: Any, phone_norm: str) -> int:
    c = repo.leads.c
    async with env.engine.connect() as conn:
        query = select(func.count()).where(c.phone_norm == phone_norm, c.status.in_(OPEN_STATUSES))
        return int(await conn.scalar(query) or 0)


async def _contact(env: Any, contact: accounts_pb2.Contact) -> None:
    async with env.service.uow.begin() as tx:
        await apply_contact(tx, contact, "86")


async def _contact_deleted(env: Any, contact_id: str) -> None:
    async with env.service.uow.begin() as tx:
        await apply_contact_deleted(tx, contact_id)


# --- A: merges never fill a key another open lead holds -----------------------------------------


async def test_a_create_merge_leaves_unfilled_a_phone_another_open_lead_holds(env: Any) -> None:
    with env.acting():
        a, _ = await env.service.create_lead({"name": "A", "email": "q1@x.cn"})
        await env.service.create_lead({"name": "B", "phone": PHONE})
        merged, was_merged = await env.service.create_lead(
            {"name": "Q3", "email": "q1@x.cn", "phone": PHONE, "company": "QCo"}, on_duplicate="merge"
        )
    assert was_merged and merged["id"] == a["id"]
    assert (merged["phone"], merged["phone_norm"], merged["company"]) == ("", None, "QCo")  # the rest merged
    assert await _open_leads_with_phone(env, PHONE_NORM) == 1  # B's alone
    _, payload = (await outbox_events(env.engine, repo.metadata, key=a["id"]))[-1]
    assert events_pb2.LeadUpdated.FromString(payload).changed_fields == ["company"]


async def test_a_create_merge_into_the_phones_lead_leaves_unfilled_an_email_another_holds(env: Any) -> None:
    with env.acting():
        b, _ = await env.service.create_lead({"name": "", "phone": PHONE})
        await env.service.create_lead({"name": "A", "email": "q1@x.cn"})
        merged, _ = await env.service.create_lead(
            {"name": "Q3", "email": "q1@x.cn", "phone": PHONE}, on_duplicate="merge"
        )
    assert merged["id"] == b["id"] and (merged["name"], merged["email"], merged["email_norm"]) == ("Q3", "", None)


async def test_an_import_merge_leaves_unfilled_a_key_another_open_lead_holds(env: Any) -> None:
    with env.acting():
        a, _ = await env.service.create_lead({"name": "A", "email": "q1@x.cn"})
        await env.service.create_lead({"name": "B", "phone": PHONE})
        result = await _import(env, [{"name": "Q3", "email": "q1@x.cn", "phone": PHONE, "company": "QCo"}], "imp-a")
        assert [(o.status, o.lead_id) for o in result.outcomes] == [("merged", a["id"])]
        lead = await env.service.get_lead(a["id"])
    assert (lead["phone_norm"], lead["company"]) == (None, "QCo")
    assert await _open_leads_with_phone(env, PHONE_NORM) == 1


async def test_a_key_an_import_merge_filled_makes_a_later_row_of_the_batch_its_duplicate(env: Any) -> None:
    with env.acting():
        a, _ = await env.service.create_lead({"name": "A", "email": "q1@x.cn"})
        rows = [{"name": "Q3", "email": "q1@x.cn", "phone": PHONE}, {"name": "Later", "phone": PHONE, "title": "CTO"}]
        result = await _import(env, rows, "imp-filled")
        lead = await env.service.get_lead(a["id"])
    assert [(o.status, o.lead_id) for o in result.outcomes] == [("merged", a["id"]), ("merged", a["id"])]
    assert (lead["phone_norm"], lead["title"]) == (PHONE_NORM, "CTO")
    assert await _open_leads_with_phone(env, PHONE_NORM) == 1


async def test_a_row_merged_into_an_earlier_row_does_not_bring_it_a_key_an_open_lead_holds(env: Any) -> None:
    with env.acting():
        b, _ = await env.service.create_lead({"name": "B", "phone": PHONE})
        rows = [
            {"name": "N1", "email": "n1@x.cn"},
            {"name": "N1b", "email": "n1@x.cn", "phone": PHONE, "company": "NCo"},
        ]
        result = await _import(env, rows, "imp-rows")
        first = result.outcomes[0].lead_id
        assert [(o.status, o.lead_id) for o in result.outcomes] == [("accepted", first), ("merged", first)]
        lead = await env.service.get_lead(first)
    assert (lead["phone_norm"], lead["company"]) == (None, "NCo")
    assert await _open_leads_with_phone(env, PHONE_NORM) == 1 and first != b["id"]


# --- B: a deleted contact links no new lead -------------------------------------------------------


async def test_a_deleted_contact_links_no_lead_captured_after_it(env_each_database: Any) -> None:
    env = env_each_database
    contact = accounts_pb2.Contact(id="c-del", email="pm@corp.cn", mobile=PHONE, version=1)
    await _contact(env, contact)
    with env.acting():
        before, _ = await env.service.create_lead({"name": "Before", "email": "pm@corp.cn"})
        assert before["matched_contact_id"] == "c-del"
        await _contact_deleted(env, "c-del")
        await _contact_deleted(env, "c-del")  # delivered twice
        after, _ = await env.service.create_lead({"name": "After", "phone": PHONE})
        assert after["matched_contact_id"] == ""
        # An update of the contact applied after its deletion does not bring its keys back.
        await _contact(env, accounts_pb2.Contact(id="c-del", email="pm@corp.cn", mobile=PHONE, version=2))
        later, _ = await env.service.create_lead({"name": "Later", "email": "pm@corp.cn"}, on_duplicate="allow")
        assert later["matched_contact_id"] == ""


async def test_a_lead_linked_to_a_deleted_contact_is_linked_to_another_of_its_keys_or_none(
    env_each_database: Any,
) -> None:
    """A link nobody can open helps no one (a contact a conversion attempt created and its undo
    deleted, maybe as the lead was disqualified): a lead moves to another live contact of its email
    or phone, else to none. A converted lead keeps the link it had when it converted."""
    env = env_each_database
    await _contact(env, accounts_pb2.Contact(id="c-gone", email="pm@corp.cn", version=1))
    with env.acting():
        alone, _ = await env.service.create_lead({"name": "Alone", "email": "pm@corp.cn"})
        closed, _ = await env.service.create_lead({"name": "Closed", "email": "pm@corp.cn"}, on_duplicate="allow")
        await env.service.disqualify(closed["id"], "no budget", 0)
        converted, _ = await env.service.create_lead({"name": "Converted", "email": "pm@corp.cn"}, on_duplicate="allow")
        await env.service.convert(ConvertRequest(converted["id"]))
    await _contact(env, accounts_pb2.Contact(id="c-twin", mobile=PHONE, version=1))
    with env.acting():
        twin, _ = await env.service.create_lead(
            {"name": "Twin", "email": "pm@corp.cn", "phone": PHONE}, on_duplicate="allow"
        )
        assert (alone["matched_contact_id"], twin["matched_contact_id"]) == ("c-gone", "c-gone")

        await _contact_deleted(env, "c-gone")
        leads = (alone, twin, closed, converted)
        links = {lead["name"]: (await env.service.get_lead(lead["id"]))["matched_contact_id"] for lead in leads}
    assert links == {"Alone": "", "Twin": "c-twin", "Closed": "", "Converted": "c-gone"}


async def test_a_deletion_applied_before_the_contacts_creation_keeps_it_out(env_each_database: Any) -> None:
    env = env_each_database
    await _contact_deleted(env, "c-early")
    await _contact(env, accounts_pb2.Contact(id="c-early", email="early@corp.cn", version=1))
    with env.acting():
        lead, _ = await env.service.create_lead({"name": "E", "email": "early@corp.cn"})
    assert lead["matched_contact_id"] == ""


async def test_an_older_snapshot_of_a_contact_does_not_replace_a_newer_one(env_each_database: Any) -> None:
    env = env_each_database
    await _contact(env, accounts_pb2.Contact(id="c-v", email="new@corp.cn", version=3))
    await _contact(env, accounts_pb2.Contact(id="c-v", email="old@corp.cn", version=2))  # late
    await _contact(env, accounts_pb2.Contact(id="c-v", email="new@corp.cn", version=3))  # again
    with env.acting():
        old, _ = await env.service.create_lead({"name": "Old", "email": "old@corp.cn"})
        new, _ = await env.service.create_lead({"name": "New", "email": "new@corp.cn"})
    assert (old["matched_contact_id"], new["matched_contact_id"]) == ("", "c-v")


async def test_a_merge_filling_a_phone_names_the_phone_not_its_normalised_key(env: Any) -> None:
    with env.acting():
        a, _ = await env.service.create_lead({"name": "A", "email": "q2@x.cn"})
        await env.service.create_lead({"email": "q2@x.cn", "phone": PHONE}, on_duplicate="merge")
    _, payload = (await outbox_events(env.engine, repo.metadata, key=a["id"]))[-1]
    assert events_pb2.LeadUpdated.FromString(payload).changed_fields == ["phone"]


# --- C: an update links a lead to the contact it now matches ---------------------------------------


async def test_an_update_giving_a_lead_a_contacts_email_links_it_in_its_event(env: Any) -> None:
    await _contact(env, accounts_pb2.Contact(id="c-pm", email="PM@corp.cn", version=1))
    with env.acting():
        lead, _ = await env.service.create_lead({"name": "PM", "phone": PHONE})
        assert lead["matched_contact_id"] == ""
        updated = (
            await env.service.update_lead(lead["id"], {"email": "pm@corp.cn"}, ["email"], lead["version"])
        ).record
    assert updated["matched_contact_id"] == "c-pm"
    _, payload = (await outbox_events(env.engine, repo.metadata, key=lead["id"]))[-1]
    event = events_pb2.LeadUpdated.FromString(payload)
    assert event.changed_fields == ["email", "matched_contact_id"] and event.lead.matched_contact_id == "c-pm"


async def test_an_update_keeps_the_contact_a_lead_is_linked_to(env: Any) -> None:
    await _contact(env, accounts_pb2.Contact(id="c-1", email="one@corp.cn", version=1))
    await _contact(env, accounts_pb2.Contact(id="c-2", mobile=PHONE, version=1))
    with env.acting():
        lead, _ = await env.service.create_lead({"name": "One", "email": "one@corp.cn"})
        updated = (await env.service.update_lead(lead["id"], {"phone": PHONE}, ["phone"], lead["version"])).record
        renamed = (await env.service.update_lead(updated["id"], {"name": "Uno"}, ["name"], updated["version"])).record
    assert (lead["matched_contact_id"], updated["matched_contact_id"], renamed["matched_contact_id"]) == (
        "c-1",
        "c-1",
        "c-1",
    )


async def test_a_merge_giving_a_lead_a_contacts_email_links_it(env: Any) -> None:
    await _contact(env, accounts_pb2.Contact(id="c-mg", email="mg@corp.cn", version=1))
    with env.acting():
        lead, _ = await env.service.create_lead({"name": "MG", "phone": PHONE})
        merged, was_merged = await env.service.create_lead(
            {"name": "MG", "phone": PHONE, "email": "mg@corp.cn"}, on_duplicate="merge"
        )
    assert was_merged and merged["id"] == lead["id"] and merged["email"] == "mg@corp.cn"
    assert merged["matched_contact_id"] == "c-mg"  # a later conversion into its account links it


# --- C: an import batch and a create of the same email never both make an open lead --------------


async def test_an_import_batch_waits_for_a_create_under_way_and_finds_its_lead(
    env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: the create has checked its email and not committed yet; the batch, which checks
    thousands of keys without a lock each, waits for it and then sees its lead as the duplicate."""
    checked, commit = asyncio.Event(), asyncio.Event()
    probe_for_create = repo.probe_for_create

    async def probe_then_pause(conn: Any, **kw: Any) -> Any:
        probe = await probe_for_create(conn, **kw)
        checked.set()
        await commit.wait()
        return probe

    monkeypatch.setattr(repo, "probe_for_create", probe_then_pause)
    with env.acting():
        creating = asyncio.create_task(env.service.create_lead({"name": "Typed in", "email": "race@x.cn"}))
        await checked.wait()
        importing = asyncio.create_task(_import(env, [{"name": "From a file", "email": "race@x.cn"}], "imp-race"))
        await asyncio.sleep(0.5)
        assert not importing.done()  # held off while the create is under way
        commit.set()
        (created, _), imported = await creating, await importing

    [outcome] = imported.outcomes
    assert (outcome.status, outcome.lead_id) == ("merged", created["id"])
    c = repo.leads.c
    async with env.engine.connect() as conn:
        query = select(func.count()).where(c.email_norm == "race@x.cn", c.status.in_(OPEN_STATUSES))
        assert await conn.scalar(query) == 1
