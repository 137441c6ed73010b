"""Imports on PostgreSQL at their limits and after a crash: a 422 means nothing of its request was
written; rows past the row limit are rejected one by one; a part cut short is resumed only with the
rows it committed; an import shows when it last moved, and its stored rejections name the lead a
duplicate row duplicates. Through the gRPC API, and through the real gateway for the HTTP answers."""

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc
import httpx
import pytest
from crm.leads.v1 import leads_service_pb2, leads_service_pb2_grpc
from crm_platform.principal import Principal, RecordScope, ScopeKind, outgoing_metadata
from crm_platform.timeutil import from_timestamp
from leads import repository as repo
from sqlalchemy import func, select

pytestmark = pytest.mark.integration

METADATA = outgoing_metadata(Principal(user_id="importer", roles=("admin",), team="ops"), RecordScope(ScopeKind.ALL))


def csv_of(*names: str) -> bytes:
    return ("name,email\n" + "".join(f"{name},{name.lower()}@x.cn\n" for name in names)).encode()


async def send(
    stub: leads_service_pb2_grpc.LeadsServiceStub,
    data: bytes,
    *,
    key: str,
    part: int = 0,
    final: bool = False,
    part_bytes: int = 0,
) -> leads_service_pb2.ImportLeadsResponse:
    header = leads_service_pb2.ImportHeader(
        format="csv", import_key=key, part=part, final=final, part_bytes=part_bytes, report_accepted=True
    )

    async def requests() -> AsyncIterator[leads_service_pb2.ImportLeadsRequest]:
        yield leads_service_pb2.ImportLeadsRequest(header=header)
        for start in range(0, len(data), 16):
            yield leads_service_pb2.ImportLeadsRequest(chunk=data[start : start + 16])

    response: leads_service_pb2.ImportLeadsResponse = await stub.ImportLeads(requests(), metadata=METADATA)
    return response


async def refusal(stub: leads_service_pb2_grpc.LeadsServiceStub, data: bytes, **kwargs: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await send(stub, data, **kwargs)
    return caught.value


async def status_of(stub: leads_service_pb2_grpc.LeadsServiceStub, key: str) -> leads_service_pb2.LeadImport:
    request = leads_service_pb2.GetLeadImportRequest(import_id=key)
    return (await stub.GetLeadImport(request, metadata=METADATA)).lead_import


async def leads_of(env: Any, key: str) -> list[str]:
    async with env.engine.connect() as conn:
        query = select(repo.leads.c.name).where(repo.leads.c.import_id == key).order_by(repo.leads.c.name)
        return list(await conn.scalars(query))


async def events_of(env: Any) -> int:
    async with env.engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(env.service.uow.outbox)) or 0)


def crash_on_batch(env: Any, number: int) -> None:
    """The next import dies when it hands over batch `number` (the ones before commit), as a killed
    process would; each batch commits 5 minutes after the one before."""
    original = env.service.import_batch
    calls = 0

    async def crashing(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == number:
            env.service.import_batch = original
            raise RuntimeError("killed")
        env.clock.advance(minutes=5)
        return await original(*args, **kwargs)

    env.service.import_batch = crashing


async def test_rows_past_the_row_limit_are_rejected_one_by_one_and_the_import_completes(
    env: Any, stub: leads_service_pb2_grpc.LeadsServiceStub
) -> None:
    env.service.settings.import_batch_size = 2
    env.service.settings.import_max_rows = 3

    response = await send(stub, csv_of("A", "B", "C", "D", "E"), key="rows")

    assert response.lead_import.status == "completed"
    progress = response.lead_import.progress
    assert (progress.rows_seen, progress.accepted, progress.rejected) == (5, 3, 2)
    assert [(r.row, r.status, r.field) for r in response.rows] == [
        (1, "accepted", ""),
        (2, "accepted", ""),
        (3, "accepted", ""),
        (4, "rejected", "row"),
        (5, "rejected", "row"),
    ]
    assert "limit of 3 rows" in response.rows[3].reason
    assert await leads_of(env, "rows") == ["A", "B", "C"]
    assert [r.row for r in (await status_of(stub, "rows")).rejected_rows] == [4, 5]


async def test_a_part_that_takes_the_import_past_its_byte_limit_is_refused_before_any_row_is_written(
    env: Any, stub: leads_service_pb2_grpc.LeadsServiceStub
) -> None:
    env.service.settings.import_batch_size = 1
    first = csv_of("A")
    env.service.settings.import_max_bytes = len(first) + 60
    await send(stub, first, key="bytes", part=1, part_bytes=len(first))
    events = await events_of(env)

    second = csv_of("B", "C", "D", "E", "F", "G", "H")[len(b"name,email\n") :]  # 7 rows of 9 bytes
    refused = await refusal(stub, second, key="bytes", part=2, final=True, part_bytes=len(second))

    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"larger than {len(first) + 60} bytes" in (refused.details() or "")
    assert await leads_of(env, "bytes") == ["A"] and await events_of(env) == events
    # Nothing of the part was taken: a smaller part 2 completes the import.
    done = await send(stub, b"B,b@x.cn\n", key="bytes", part=2, final=True, part_bytes=9)
    assert done.lead_import.status == "completed" and done.lead_import.progress.accepted == 2
    assert await leads_of(env, "bytes") == ["A", "B"]


async def test_a_part_cut_short_and_sent_again_with_other_rows_is_refused_before_anything_is_written(
    env: Any, stub: leads_service_pb2_grpc.LeadsServiceStub
) -> None:
    env.service.settings.import_batch_size = 2
    original = csv_of("A", "B", "C", "D", "E", "F")
    crash_on_batch(env, 2)  # rows 1-2 are committed
    await refusal(stub, original, key="cut")
    assert await leads_of(env, "cut") == ["A", "B"]
    events = await events_of(env)

    reordered = csv_of("B", "A", "C", "D", "E", "F")  # a re-export: the same rows in another order
    shorter = csv_of("A")  # ends before the committed rows do
    for other in (reordered, shorter):
        refused = await refusal(stub, other, key="cut")
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "import_key" in (refused.details() or "") and "after row 2" in (refused.details() or "")
    assert await leads_of(env, "cut") == ["A", "B"] and await events_of(env) == events
    assert (await status_of(stub, "cut")).status == "running"  # still resumable

    resumed = await send(stub, original, key="cut")
    assert resumed.lead_import.status == "completed"
    assert (resumed.lead_import.progress.accepted, resumed.lead_import.progress.skipped) == (6, 2)
    assert await leads_of(env, "cut") == ["A", "B", "C", "D", "E", "F"]
    assert (await status_of(stub, "cut")).progress.skipped == 2  # kept with the import, not only answered


async def test_a_later_part_cut_short_is_resumed_only_with_its_own_rows(
    env: Any, stub: leads_service_pb2_grpc.LeadsServiceStub
) -> None:
    env.service.settings.import_batch_size = 2
    await send(stub, csv_of("A"), key="parts", part=1)
    second = b"B,b@x.cn\nC,c@x.cn\nD,d@x.cn\n"
    crash_on_batch(env, 2)  # rows 2-3 (B, C) are committed
    await refusal(stub, second, key="parts", part=2, final=True)

    refused = await refusal(stub, second.replace(b"C,c", b"X,x"), key="parts", part=2, final=True)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and "import_key" in (refused.details() or "")
    done = await send(stub, second, key="parts", part=2, final=True)

    assert done.lead_import.status == "completed" and done.lead_import.progress.skipped == 2
    assert await leads_of(env, "parts") == ["A", "B", "C", "D"]


async def test_an_empty_csv_file_is_refused_as_a_file_without_a_header_row(
    env: Any, stub: leads_service_pb2_grpc.LeadsServiceStub
) -> None:
    refused = await refusal(stub, b"", key="empty")
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no header row" in (refused.details() or "")
    assert (await status_of(stub, "empty")).status == "failed"


async def test_an_import_shows_when_it_last_moved_so_a_stalled_one_can_be_told_from_a_live_one(
    env: Any, stub: leads_service_pb2_grpc.LeadsServiceStub
) -> None:
    env.service.settings.import_batch_size = 2
    started = env.clock.now
    crash_on_batch(env, 3)  # two batches commit, 5 minutes apart, then the process dies
    await refusal(stub, csv_of("A", "B", "C", "D", "E"), key="moving")

    stalled = await status_of(stub, "moving")
    assert stalled.status == "running" and stalled.progress.accepted == 4
    assert from_timestamp(stalled.started_at) == started
    assert from_timestamp(stalled.updated_at) == started + timedelta(minutes=10)

    env.clock.advance(hours=1)
    resumed = await send(stub, csv_of("A", "B", "C", "D", "E"), key="moving")
    assert from_timestamp(resumed.lead_import.updated_at) == started + timedelta(minutes=10, hours=1)


async def test_stored_rejections_name_the_lead_a_row_duplicates(
    env: Any, stub: leads_service_pb2_grpc.LeadsServiceStub
) -> None:
    first = await send(stub, csv_of("Li"), key="first")
    again = await send(stub, csv_of("Li"), key="again")

    lead_id = first.rows[0].lead_id
    assert [(r.row, r.lead_id) for r in again.rows] == [(1, lead_id)]
    stored = (await status_of(stub, "again")).rejected_rows
    assert [(r.row, r.field, r.lead_id) for r in stored] == [(1, "email", lead_id)]


async def test_through_the_gateway_a_422_or_413_for_a_too_large_import_leaves_nothing_written(
    env: Any, admin: httpx.AsyncClient
) -> None:
    env.service.settings.import_batch_size = 2
    env.service.settings.import_max_bytes = 300_000
    headers = {"Content-Type": "text/csv"}
    # 40 rows of 10 kB: the gateway streams its first 256 kB before the rest, enough for batches
    # to commit before the service would count past its limit.
    over_service_limit = b"name,notes\n" + b"".join(b"R%d,%s\n" % (n, b"x" * 10_000) for n in range(40))

    too_large = await admin.post("/api/v1/leads/import?import_key=g-bytes", content=over_service_limit, headers=headers)
    over_body_limit = await admin.post(
        "/api/v1/leads/import?import_key=g-body", content=over_service_limit * 3, headers=headers
    )

    assert too_large.status_code == 422, too_large.text
    assert too_large.headers["content-type"].startswith("application/problem+json")
    assert too_large.json()["errors"] == [{"field": "file", "message": "the import is larger than 300000 bytes"}]
    assert await leads_of(env, "g-bytes") == [] and await events_of(env) == 0
    assert over_body_limit.status_code == 413, over_body_limit.text
    assert (await admin.get("/api/v1/leads/imports/g-body")).status_code == 404  # the service never saw it

    env.service.settings.import_max_rows = 8
    past_rows = await admin.post(
        "/api/v1/leads/import?import_key=g-rows", content=csv_of(*"ABCDEFGHI"), headers=headers
    )
    assert past_rows.status_code == 200, past_rows.text
    assert past_rows.json()["import"]["status"] == "completed"
    assert [(r["row"], r["field"]) for r in past_rows.json()["rows"]] == [("9", "row")]
    status = (await admin.get("/api/v1/leads/imports/g-rows")).json()
    assert status["updated_at"] and [r["row"] for r in status["rejected_rows"]] == ["9"]


async def test_a_part_sent_twice_at_once_is_applied_once_and_both_answers_are_its_result(
    env: Any, stub: leads_service_pb2_grpc.LeadsServiceStub
) -> None:
    env.service.settings.import_batch_size = 2
    part = csv_of("Ann", "Bo", "Cy", "Di", "Ed")

    answers = await asyncio.gather(*(send(stub, part, key="twice", part=1, final=True) for _ in range(4)))

    assert await leads_of(env, "twice") == ["Ann", "Bo", "Cy", "Di", "Ed"]
    progress = {(a.lead_import.progress.rows_seen, a.lead_import.progress.accepted, a.lead_import.progress.rejected)
                for a in answers}  # fmt: skip
    assert progress == {(5, 5, 0)}
    assert await events_of(env) == 5
