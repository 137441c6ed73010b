"""The leads gRPC service on PostgreSQL: the import API with the real Leads.csv, and the events of
the outbox observed on the broker with their CloudEvents headers."""

import asyncio
import csv
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from crm.leads.v1 import events_pb2, leads_service_pb2, leads_service_pb2_grpc
from crm_platform.config import KafkaSettings
from crm_platform.idempotency import replayed
from crm_platform.outbox import OutboxRelay
from crm_platform.principal import Principal, RecordScope, ScopeKind, outgoing_metadata
from crm_platform.testing.fixtures import create_topics
from crm_platform.testing.kafka import EventCollector
from crm_platform.testing.outbox import outbox_events
from leads import domain
from leads import repository as repo
from sqlalchemy import func, select, text

pytestmark = pytest.mark.integration

LEADS_CSV = Path(__file__).resolve().parents[4] / ".." / "shared" / "datasets" / "x-education-leads" / "Leads.csv"
COLUMN_MAP = {"Prospect ID": "external_id", "Lead Source": "source", "Country": "region"}
METADATA = outgoing_metadata(Principal(user_id="importer", roles=("admin",), team="ops"), RecordScope(ScopeKind.ALL))


def parts_of(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


async def send(
    stub: leads_service_pb2_grpc.LeadsServiceStub,
    data: bytes,
    *,
    part: int = 0,
    final: bool = False,
    key: str = "x1",
    column_map: dict[str, str] | None = None,
    assign: bool = False,
) -> leads_service_pb2.ImportLeadsResponse:
    columns = COLUMN_MAP if column_map is None else column_map
    header = leads_service_pb2.ImportHeader(
        format="csv", import_key=key, column_map=columns, part=part, final=final, assign=assign
    )

    async def requests() -> AsyncIterator[leads_service_pb2.ImportLeadsRequest]:
        yield leads_service_pb2.ImportLeadsRequest(header=header)
        for chunk in parts_of(data, 64 * 1024):  # a quoted field or a character may be cut anywhere
            yield leads_service_pb2.ImportLeadsRequest(chunk=chunk)

    response: leads_service_pb2.ImportLeadsResponse = await stub.ImportLeads(requests(), metadata=METADATA)
    return response


async def answered_as_replay(
    stub: leads_service_pb2_grpc.LeadsServiceStub, data: bytes, *, key: str, part: int = 0
) -> bool:
    """Whether the service marks its answer to this import request as the earlier result's."""
    header = leads_service_pb2.ImportHeader(format="csv", import_key=key, part=part, final=True)

    async def requests() -> AsyncIterator[leads_service_pb2.ImportLeadsRequest]:
        yield leads_service_pb2.ImportLeadsRequest(header=header)
        yield leads_service_pb2.ImportLeadsRequest(chunk=data)

    call = stub.ImportLeads(requests(), metadata=METADATA)
    await call
    return replayed(await call.trailing_metadata())


async def test_import_leads_csv_in_parts_counts_every_row_and_is_idempotent(
    env: Any, stub: leads_service_pb2_grpc.LeadsServiceStub
) -> None:
    data = LEADS_CSV.read_bytes()
    with LEADS_CSV.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_detail = Counter(row["Lead Source"] for row in rows)
    by_source = Counter(domain.map_source(row["Lead Source"])[0] for row in rows)

    pieces = parts_of(data, 700_000)  # each part fits a 1 MiB request body
    for number, piece in enumerate(pieces, start=1):
        response = await send(stub, piece, part=number, final=number == len(pieces))
    summary = response.lead_import
    assert summary.status == "completed" and summary.parts_received == len(pieces)
    progress = summary.progress
    assert progress.rows_seen == len(rows) == 9240
    assert progress.accepted + progress.merged + progress.rejected == len(rows)
    assert progress.accepted == len(rows)  # every Prospect ID is new

    detail_counts = await stub.SummarizeLeads(
        leads_service_pb2.SummarizeLeadsRequest(group_by="source_detail", import_id="x1"), metadata=METADATA
    )
    assert {c.key: c.count for c in detail_counts.counts} == dict(by_detail)
    source_counts = await stub.SummarizeLeads(
        leads_service_pb2.SummarizeLeadsRequest(group_by="source"), metadata=METADATA
    )
    assert {c.key: c.count for c in source_counts.counts} == dict(by_source)

    # The same part again (a client retry) applies nothing twice.
    again = await send(stub, pieces[0], part=1)
    assert again.lead_import.progress.accepted == len(rows)
    # The whole file under a new key: every row is a duplicate of its open lead, with the reason.
    rerun = await send(stub, data, key="x2")
    assert rerun.lead_import.progress.rejected == len(rows) and rerun.lead_import.progress.accepted == 0
    assert all(r.status == "rejected" and "duplicate of open lead" in r.reason for r in rerun.rows)
    assert len(rerun.rows) == len(rows)
    total = await stub.SummarizeLeads(leads_service_pb2.SummarizeLeadsRequest(group_by="status"), metadata=METADATA)
    assert total.total == len(rows)


async def test_an_import_key_names_one_file_so_other_rows_under_it_are_refused_not_dropped(
    env: Any, stub: leads_service_pb2_grpc.LeadsServiceStub
) -> None:
    first, second = b"name,email\nK-1,k1@x.cn\n", b"K-2,k2@x.cn\n"
    await send(stub, first, key="k1", part=1, column_map={})
    done = await send(stub, second, key="k1", part=2, final=True, column_map={})
    assert done.lead_import.status == "completed" and done.lead_import.progress.accepted == 2

    retried = await send(stub, second, key="k1", part=2, final=True, column_map={})  # a client retry
    assert retried.lead_import.progress.accepted == 2
    assert await answered_as_replay(stub, second, key="k1", part=2)  # audited as a replay by the gateway
    assert not await answered_as_replay(stub, b"name,email\nK-9,k9@x.cn\n", key="k9")
    with pytest.raises(grpc.aio.AioRpcError) as another_part:
        await send(stub, b"K-3,k3@x.cn\n", key="k1", part=3, final=True, column_map={})
    with pytest.raises(grpc.aio.AioRpcError) as changed_part:
        await send(stub, b"K-4,k4@x.cn\n", key="k1", part=2, final=True, column_map={})
    assert another_part.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "complete" in (another_part.value.details() or "")
    assert changed_part.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "import_key" in (changed_part.value.details() or "")

    whole = b"name,email\nW-1,w1@x.cn\n"
    assert (await send(stub, whole, key="w1", column_map={})).lead_import.progress.accepted == 1
    assert (await send(stub, whole, key="w1", column_map={})).lead_import.progress.accepted == 1
    with pytest.raises(grpc.aio.AioRpcError) as other_file:
        await send(stub, b"name,email\nW-2,w2@x.cn\n", key="w1", column_map={})
    assert other_file.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    listed = await stub.ListLeads(leads_service_pb2.ListLeadsRequest(q="@x.cn"), metadata=METADATA)
    assert sorted(lead.name for lead in listed.items) == ["K-1", "K-2", "K-9", "W-1"]


async def test_import_reports_bad_rows_and_resumes_after_a_crash(
    env: Any, stub: leads_service_pb2_grpc.LeadsServiceStub
) -> None:
    text = (
        "Name,Email,Phone,Lead Source,Notes\n"
        'Li Lei,li@x.cn,13800138000,Google,"multi\nline"\n'
        "Bad Mail,not-an-email,,Google,\n"
        "Han Mei,han@x.cn,abc,Facebook,\n"
        "Twin,LI@x.cn,,Google,\n"
        "short,row\n"
        ",,,,\n"
        "Wang,wang@x.cn,+1 415 555 0100,Something New,\n"
    )
    # Crash simulation: the first run dies after committing the first batch (size 2 here).
    env.service.settings.import_batch_size = 2
    original = env.service.import_batch
    calls = 0

    async def crashing(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("killed")
        return await original(*args, **kwargs)

    env.service.import_batch = crashing
    with pytest.raises(grpc.aio.AioRpcError):
        await send(stub, text.encode(), key="bad", column_map={})
    env.service.import_batch = original
    response = await send(stub, text.encode(), key="bad", column_map={})
    progress = response.lead_import.progress
    assert progress.skipped == 2  # committed by the crashed run
    results = {r.row: r for r in response.rows}
    assert 2 not in results and results[3].field == "phone"  # row 2 was reported by the crashed run
    assert "duplicate of open lead" in results[4].reason and results[4].field == "email"
    assert results[5].field == "row" and "columns" in results[5].reason
    assert 6 not in results  # a row of empty cells is no row (its number is kept: Wang is still 7)
    assert (progress.rows_seen, progress.accepted, progress.rejected) == (6, 2, 4)
    status = await stub.GetLeadImport(leads_service_pb2.GetLeadImportRequest(import_id="bad"), metadata=METADATA)
    assert sorted(r.row for r in status.lead_import.rejected_rows) == [2, 3, 4, 5]
    wang = await stub.ListLeads(leads_service_pb2.ListLeadsRequest(q="wang"), metadata=METADATA)
    assert wang.items[0].source == "other" and wang.items[0].source_detail == "Something New"
    assert wang.items[0].phone == "+1 415 555 0100"


async def test_imported_leads_are_assigned_within_caps_and_linked_to_known_contacts(
    env: Any, stub: leads_service_pb2_grpc.LeadsServiceStub
) -> None:
    from crm.accounts.v1 import accounts_pb2
    from leads.consumers import apply_contact
    from leads.domain import AssignmentRule

    async with env.service.uow.begin() as tx:
        await apply_contact(tx, accounts_pb2.Contact(id="c-7", email="zhao@corp.cn"), "86")
    with env.acting("admin", roles=("admin",)):
        rule = await env.service.create_assignment_rule(
            AssignmentRule(id="", position=1, user_ids=("u1", "u2"), strategy="least_loaded", capacity=2), "all", ""
        )
    rows = "".join(f"Lead {n},lead{n}@x.cn,Google\n" for n in range(5))
    text = "Name,Email,Lead Source\nZhao,ZHAO@corp.cn,Google\n" + rows
    response = await send(stub, text.encode(), key="assign", column_map={}, assign=True)
    assert response.lead_import.progress.accepted == 6
    listed = await stub.ListLeads(leads_service_pb2.ListLeadsRequest(), metadata=METADATA)
    owners = Counter(lead.owner_id for lead in listed.items)
    # One batch: the caps count the leads assigned earlier in the same batch.
    assert owners == {"u1": 2, "u2": 2, "": 2}
    assert await env.loads_kept() == await env.loads_counted() == {"u1": 2, "u2": 2}
    zhao = next(lead for lead in listed.items if lead.name == "Zhao")
    assert zhao.matched_contact_id == "c-7"
    assert all(lead.matched_contact_id == "" for lead in listed.items if lead.name != "Zhao")
    # Each assignment's event names the rule that made it, as a create's does.
    assigned = [
        events_pb2.LeadAssigned.FromString(payload)
        for lead in listed.items
        for event_type, payload in await outbox_events(env.engine, repo.metadata, key=lead.id)
        if event_type == "crm.leads.lead.assigned"
    ]
    assert len(assigned) == 4 and {event.rule_id for event in assigned} == {rule["id"]}


async def test_bad_input_is_rejected_with_the_field(stub: leads_service_pb2_grpc.LeadsServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateLead(
            leads_service_pb2.CreateLeadRequest(lead=leads_service_pb2.LeadInput(name="x", source="tv")),
            metadata=METADATA,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "source" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await send(stub, b"a,b\n1,2\n", key="m1", part=3)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_events_reach_the_broker_with_cloudevents_headers(
    env: Any, stub: leads_service_pb2_grpc.LeadsServiceStub, kafka_settings: KafkaSettings
) -> None:
    await create_topics(kafka_settings, "crm.leads.v1")
    relay = OutboxRelay(env.engine, repo.metadata, kafka_settings, service="leads")
    task = asyncio.create_task(relay.run())
    try:
        async with EventCollector(kafka_settings.bootstrap_servers, ["crm.leads.v1"]) as events:
            created = await stub.CreateLead(
                leads_service_pb2.CreateLeadRequest(
                    lead=leads_service_pb2.LeadInput(name="Evented", email="ev@x.cn", owner_id="rep9")
                ),
                metadata=METADATA,
            )
            lead_id = created.lead.id
            records = await events.wait_for(
                lambda rs: (
                    {r.event_type for r in rs if r.key == lead_id}
                    >= {"crm.leads.lead.created", "crm.leads.lead.assigned"}
                )
            )
    finally:
        await relay.stop()
        await task
    mine = [r for r in records if r.key == lead_id]
    assert [r.event_type for r in mine] == ["crm.leads.lead.created", "crm.leads.lead.assigned"]
    headers = mine[0].headers
    assert headers["ce_specversion"] == "1.0" and headers["ce_source"] == "crm/leads" and headers["ce_id"]
    assert headers["ce_subject"] == lead_id and headers["content-type"] == "application/protobuf"
    assert mine[0].decode(events_pb2.LeadCreated).lead.email == "ev@x.cn"


async def test_batches_written_while_the_next_is_checked_see_each_other(
    env: Any, stub: leads_service_pb2_grpc.LeadsServiceStub
) -> None:
    from leads.domain import AssignmentRule

    with env.acting("admin", roles=("admin",)):
        await env.service.create_assignment_rule(
            AssignmentRule(id="", position=1, user_ids=("u1", "u2", "u3"), strategy="round_robin", capacity=2,
                           team="east-sales"),
            "all", "",
        )  # fmt: skip
    env.service.settings.import_batch_size = 2
    # Rows 3 and 6 repeat rows of earlier batches: each batch's dedupe sees the batches committed before it.
    text = "Name,Email\n" + "".join(
        f"{name},{email}\n"
        for name, email in [
            ("A", "a@x.cn"), ("B", "b@x.cn"), ("A again", "A@x.cn"), ("C", "c@x.cn"), ("D", "d@x.cn"),
            ("B again", "b@x.cn"), ("E", "e@x.cn"), ("F", "f@x.cn"), ("G", "g@x.cn"),
        ]
    )  # fmt: skip
    response = await send(stub, text.encode(), key="pipelined", column_map={}, assign=True)
    progress = response.lead_import.progress
    assert (progress.rows_seen, progress.accepted, progress.rejected) == (9, 7, 2)
    assert {r.row: r.field for r in response.rows if r.status == "rejected"} == {3: "email", 6: "email"}
    listed = await stub.ListLeads(leads_service_pb2.ListLeadsRequest(), metadata=METADATA)
    by_name = {lead.name: lead for lead in listed.items}
    # Round robin goes on from batch to batch; with two leads each, the seventh finds every rep full.
    owners = [by_name[name].owner_id for name in ("A", "B", "C", "D", "E", "F", "G")]
    assert owners == ["u1", "u2", "u3", "u1", "u2", "u3", ""]
    assert all(by_name[name].team == "east-sales" for name in "ABCDEF") and by_name["G"].in_pool
    async with env.engine.connect() as conn:
        types = Counter(t for (t,) in await conn.execute(select(repo.metadata.tables["outbox"].c.type)))
        tasks = await conn.scalar(select(func.count()).select_from(repo.tasks))
    assert types == {"crm.leads.lead.created": 7, "crm.leads.lead.assigned": 6}
    assert tasks == 6
    async with env.engine.begin() as conn:  # seven turns taken, none for the duplicate rows
        rule_id = await conn.scalar(select(repo.assignment_rules.c.id))
        assert await repo.take_turns(conn, {rule_id: 1}) == {rule_id: [7]}


async def test_the_duplicate_lookup_probes_the_index_even_when_most_leads_have_no_external_id(env: Any) -> None:
    """Most leads carry no external id, so the statistics say an unknown key matches every lead: a
    plan scanning the table once per key of the batch would then look as cheap as the index."""
    async with env.engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO leads (id, name, email, email_norm, source, status, owner_id, team, tags, custom,"
                " created_at, updated_at)"
                " SELECT 'seed-' || g, 'Seed', '', '', 'website', 'new', '', '', '[]', '{}', now(), now()"
                " FROM generate_series(1, 20000) AS g"
            )
        )
        await conn.execute(text("ANALYZE leads"))
    async with env.engine.begin() as conn:
        keys = {"emails": [], "phones": [], "externals": [f"PID-{n}" for n in range(500)]}
        assert await repo.open_leads_with_keys(conn, **keys) == []
        plan = "\n".join(row[0] for row in await conn.execute(text(f"EXPLAIN {repo.OPEN_WITH_KEYS.text}"), keys))
    assert "Seq Scan on leads" not in plan
    assert "Index Cond: ((external_id)::text = k_2.v)" in plan


async def test_a_part_whose_rule_is_deleted_meanwhile_fails_retryably_and_can_be_sent_again(
    env: Any, stub: leads_service_pb2_grpc.LeadsServiceStub
) -> None:
    from leads.domain import AssignmentRule

    with env.acting("admin", roles=("admin",)):
        rule = await env.service.create_assignment_rule(
            AssignmentRule(id="", position=1, user_ids=("u1",), strategy="round_robin"), "all", ""
        )
    text = b"Name,Email\nA,a@x.cn\nB,b@x.cn\n"
    async with env.engine.begin() as holder:  # an admin deleting the rule (and its turns)
        await holder.execute(repo.assignment_rules.delete().where(repo.assignment_rules.c.id == rule["id"]))
        sending = asyncio.create_task(send(stub, text, key="racing", column_map={}, assign=True, final=True))
        await asyncio.sleep(0.5)
        assert not sending.done()  # taking the batch's turns of the rule being deleted
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sending
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    response = await send(stub, text, key="racing", column_map={}, assign=True, final=True)
    assert (response.lead_import.progress.accepted, response.lead_import.progress.rejected) == (2, 0)
    listed = await stub.ListLeads(leads_service_pb2.ListLeadsRequest(), metadata=METADATA)
    assert sorted(lead.name for lead in listed.items) == ["A", "B"]
    assert all(lead.in_pool and not lead.owner_id for lead in listed.items)  # no rule is left
