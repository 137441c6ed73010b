"""The shared idempotency keys on real databases (SQLite and PostgreSQL): a remembered result is
recalled, keys are independent per operation and caller, of concurrent identical requests
exactly one wins, and a key reused with another request is refused."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import grpc
import pytest
from crm.leads.v1.leads_service_pb2 import SubmitWebformRequest
from crm_platform import idempotency
from crm_platform.config import ServiceSettings
from crm_platform.db import create_engine, delete_expired
from crm_platform.errors import Conflict, FieldError, ValidationFailed
from crm_platform.grpc_client import create_channel, noting_replays, replay_noted
from crm_platform.grpc_errors import from_rpc_error
from crm_platform.grpc_server import GrpcServer
from crm_platform.ids import new_id
from crm_platform.outbox import UnitOfWork, add_messaging_tables
from crm_platform.principal import Principal, RecordScope, ScopeKind, acting_as
from crm_platform.service import ServiceApp
from crm_platform.timeutil import utcnow
from google.protobuf.wrappers_pb2 import StringValue
from sqlalchemy import Column, MetaData, String, Table, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

metadata = MetaData()
keys = idempotency.idempotency_table(metadata)
things = Table("things", metadata, Column("id", String(36), primary_key=True))
add_messaging_tables(metadata)  # as in every service


@pytest.fixture
async def engine(each_database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(each_database_url)
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    yield engine
    await engine.dispose()


async def test_a_remembered_result_is_recalled(engine: AsyncEngine) -> None:
    now = utcnow()
    async with engine.begin() as conn:
        await idempotency.remember(conn, keys, operation="create", caller="u1", key="k1", result="id-1", now=now)
        await idempotency.remember(
            conn, keys, operation="convert", caller="u1", key="k1", result={"lead_id": "L", "merged": True}, now=now
        )
    async with engine.connect() as conn:
        assert await idempotency.recall(conn, keys, operation="create", caller="u1", key="k1") == "id-1"
        recalled = await idempotency.recall(conn, keys, operation="convert", caller="u1", key="k1")
        assert recalled == {"lead_id": "L", "merged": True}
        assert await idempotency.recall(conn, keys, operation="create", caller="u1", key="other") is None


async def test_an_empty_key_asks_for_no_idempotency(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await idempotency.remember(conn, keys, operation="create", caller="u1", key="", result="x", now=utcnow())
        assert (
            await idempotency.claim(conn, keys, operation="create", caller="u1", key="", result="y", now=utcnow())
            is None
        )
        assert await idempotency.recall(conn, keys, operation="create", caller="u1", key="") is None
        assert await conn.scalar(select(func.count()).select_from(keys)) == 0


async def test_the_same_key_of_another_caller_or_operation_is_independent(engine: AsyncEngine) -> None:
    now = utcnow()
    async with engine.begin() as conn:
        for operation, caller, result in [("create", "u1", "a"), ("create", "u2", "b"), ("update", "u1", "c")]:
            earlier = await idempotency.claim(
                conn, keys, operation=operation, caller=caller, key="same", result=result, now=now
            )
            assert earlier is None
    async with engine.connect() as conn:
        assert await idempotency.recall(conn, keys, operation="create", caller="u1", key="same") == "a"
        assert await idempotency.recall(conn, keys, operation="create", caller="u2", key="same") == "b"
        assert await idempotency.recall(conn, keys, operation="update", caller="u1", key="same") == "c"


async def _claim_as(engine: AsyncEngine, user: str, result: str, *, resuming: bool, replay_only: bool = False) -> Any:
    """`CallerKeys.claim` of key "k" by `user`, served as the gRPC layer serves such a call."""
    caller_keys = idempotency.CallerKeys(keys)
    with (
        acting_as(Principal(user_id=user), RecordScope(ScopeKind.ALL, owner_id=user)),
        idempotency.serving_fingerprint(None, resuming=resuming, replay_only=replay_only),
    ):
        async with engine.begin() as conn:
            return await caller_keys.claim(conn, "create", "k", result, utcnow())


async def test_a_resuming_calls_key_is_everyones_and_one_kept_as_a_callers_still_answers(
    engine: AsyncEngine,
) -> None:
    """A conversion begun by one person and resumed (or undone) by another finds what its key made."""
    assert await _claim_as(engine, "rep", "first", resuming=True) is None
    assert await _claim_as(engine, "manager", "second", resuming=True) == "first"
    assert await _claim_as(engine, "manager", "x", resuming=True, replay_only=True) == "first"
    # Not resuming, the key is the caller's own as ever.
    assert await _claim_as(engine, "manager", "own", resuming=False) is None
    # A key a resuming call recorded as its caller's (before they were shared) still answers it.
    async with engine.begin() as conn:
        await conn.execute(update(keys).where(keys.c.caller == idempotency.RESUMED_CALLER).values(caller="rep"))
    assert await _claim_as(engine, "rep", "third", resuming=True) == "first"


async def test_a_resuming_call_wanting_only_a_result_its_key_never_had_is_refused(engine: AsyncEngine) -> None:
    with pytest.raises(Conflict) as refused:
        await _claim_as(engine, "rep", "first", resuming=True, replay_only=True)

    assert refused.value.reason == idempotency.NOTHING_TO_REPLAY


async def test_a_claimed_key_answers_with_the_first_result(engine: AsyncEngine) -> None:
    now = utcnow()
    async with engine.begin() as conn:
        assert await idempotency.claim(conn, keys, operation="op", caller="", key="k", result="first", now=now) is None
    async with engine.begin() as conn:
        assert await idempotency.claim(conn, keys, operation="op", caller="", key="k", result="second", now=now) == (
            "first"
        )


async def test_remembering_a_used_key_again_fails_and_rolls_back(engine: AsyncEngine) -> None:
    now = utcnow()
    async with engine.begin() as conn:
        await idempotency.remember(conn, keys, operation="op", caller="u", key="k", result="t1", now=now)
    with pytest.raises(IntegrityError):
        async with engine.begin() as conn:
            await conn.execute(insert(things).values(id="t2"))
            await idempotency.remember(conn, keys, operation="op", caller="u", key="k", result="t2", now=now)
    async with engine.connect() as conn:
        assert list((await conn.execute(select(things.c.id))).scalars()) == []


async def _create(engine: AsyncEngine, thing_id: str, *, claim_first: bool) -> str:
    """What a creating handler does: claim (or remember) the key in the creating transaction."""
    now = utcnow()
    try:
        async with engine.begin() as conn:
            if claim_first:
                earlier = await idempotency.claim(
                    conn, keys, operation="create", caller="u", key="dup", result=thing_id, now=now
                )
                if earlier is not None:
                    return str(earlier)
            await conn.execute(insert(things).values(id=thing_id))
            await asyncio.sleep(0.05)  # hold the transaction open while the others arrive
            if not claim_first:
                await idempotency.remember(
                    conn, keys, operation="create", caller="u", key="dup", result=thing_id, now=now
                )
            return thing_id
    except IntegrityError:
        async with engine.connect() as conn:
            earlier = await idempotency.recall(conn, keys, operation="create", caller="u", key="dup")
        assert earlier is not None
        return str(earlier)


@pytest.mark.parametrize("claim_first", [True, False], ids=["claim", "remember"])
async def test_of_concurrent_duplicates_one_wins(engine: AsyncEngine, claim_first: bool) -> None:
    answers = await asyncio.gather(*(_create(engine, f"t{n}", claim_first=claim_first) for n in range(5)))
    async with engine.connect() as conn:
        created = list((await conn.execute(select(things.c.id))).scalars())
    assert len(created) == 1
    assert set(answers) == set(created)


async def test_keys_past_the_retention_expire_in_batches_and_newer_ones_stay(engine: AsyncEngine) -> None:
    now = utcnow()
    async with engine.begin() as conn:
        for n in range(5):
            await idempotency.remember(
                conn, keys, operation="create", caller="u1", key=f"old-{n}", result="x", now=now - timedelta(days=2)
            )
        await idempotency.remember(conn, keys, operation="create", caller="u1", key="new", result="y", now=now)
    cutoff = now - timedelta(days=1)

    first = await delete_expired(engine, keys, "created_at", before=cutoff, limit=3)
    second = await delete_expired(engine, keys, "created_at", before=cutoff, limit=3)
    third = await delete_expired(engine, keys, "created_at", before=cutoff, limit=3)

    assert (first, second, third) == (3, 2, 0)
    async with engine.connect() as conn:
        assert await idempotency.recall(conn, keys, operation="create", caller="u1", key="new") == "y"
        assert await idempotency.recall(conn, keys, operation="create", caller="u1", key="old-0") is None


async def test_every_service_with_idempotency_keys_runs_their_expiry(engine: AsyncEngine) -> None:
    app = ServiceApp(
        settings=ServiceSettings(service_name="probe", idempotency_retention_hours=1),
        engine=engine,
        metadata=metadata,
        uow=UnitOfWork(engine, metadata, source="/crm/probe"),
        service_names=[],
        register=lambda server: None,
    )
    [expiry] = [job for job in app.jobs if job.name == "idempotency-key-expiry"]
    now = utcnow()
    async with engine.begin() as conn:
        await idempotency.remember(
            conn, keys, operation="op", caller="", key="hour-old", result="a", now=now - timedelta(minutes=61)
        )
        await idempotency.remember(conn, keys, operation="op", caller="", key="fresh", result="b", now=now)

    assert await expiry.run_once() == 1
    async with engine.connect() as conn:
        assert await idempotency.recall(conn, keys, operation="op", caller="", key="fresh") == "b"


async def test_a_key_longer_than_the_table_holds_is_the_callers_error(engine: AsyncEngine) -> None:
    """A 422 naming the key, whichever service and call: PostgreSQL would refuse it with a 500."""
    long_key = "k" * (idempotency.KEY_LENGTH + 1)
    async with engine.begin() as conn:
        with pytest.raises(ValidationFailed) as claimed:
            await idempotency.claim(conn, keys, operation="op", caller="u1", key=long_key, result="x", now=utcnow())
        with pytest.raises(ValidationFailed) as recalled:
            await idempotency.recall(conn, keys, operation="op", caller="u1", key=long_key)
    assert claimed.value.errors[0].field == recalled.value.errors[0].field == "idempotency_key"


# Fingerprints of two requests, as the gRPC layer takes them (`request_fingerprint`).
ONE_REQUEST, ANOTHER_REQUEST = "1" * 64, "2" * 64
REUSED = [FieldError("idempotency_key", "was used with a different request")]


async def _create_with_key(engine: AsyncEngine, thing_id: str, key: str = "k") -> str:
    """A creating handler, serving a request with that key."""
    async with engine.begin() as conn:
        earlier = await idempotency.claim(
            conn, keys, operation="create", caller="u", key=key, result=thing_id, now=utcnow()
        )
        if earlier is not None:
            return str(earlier)
        await conn.execute(insert(things).values(id=thing_id))
        return thing_id


async def _serve(engine: AsyncEngine, thing_id: str, fingerprint: str | None) -> str:
    """`_create_with_key` for a request of that fingerprint, as the gRPC layer serves it."""
    with idempotency.serving_fingerprint(fingerprint):
        return await _create_with_key(engine, thing_id)


async def _things(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return list((await conn.execute(select(things.c.id))).scalars())


async def test_the_same_request_again_with_its_key_answers_with_the_first_result(engine: AsyncEngine) -> None:
    assert await _serve(engine, "t1", ONE_REQUEST) == "t1"
    assert await _serve(engine, "t2", ONE_REQUEST) == "t1"
    assert await _things(engine) == ["t1"]


async def test_a_key_used_with_another_request_is_refused_and_nothing_is_done(engine: AsyncEngine) -> None:
    await _serve(engine, "t1", ONE_REQUEST)

    with pytest.raises(ValidationFailed) as refused:
        await _serve(engine, "t2", ANOTHER_REQUEST)

    assert refused.value.errors == REUSED
    assert await _things(engine) == ["t1"]


async def test_a_remembered_key_recalled_for_another_request_is_refused(engine: AsyncEngine) -> None:
    with idempotency.serving_fingerprint(ONE_REQUEST):
        async with engine.begin() as conn:
            await idempotency.remember(conn, keys, operation="convert", caller="u", key="k", result="L", now=utcnow())
    async with engine.connect() as conn:
        with idempotency.serving_fingerprint(ONE_REQUEST):
            assert await idempotency.recall(conn, keys, operation="convert", caller="u", key="k") == "L"
        with idempotency.serving_fingerprint(ANOTHER_REQUEST), pytest.raises(ValidationFailed) as refused:
            await idempotency.recall(conn, keys, operation="convert", caller="u", key="k")
    assert refused.value.errors == REUSED


async def test_a_key_recorded_without_a_fingerprint_answers_any_request(engine: AsyncEngine) -> None:
    """Keys recorded before fingerprints were (or by a call from no gRPC request) answer as they did."""
    assert await _serve(engine, "t1", None) == "t1"

    assert await _serve(engine, "t2", ANOTHER_REQUEST) == "t1"
    assert await _things(engine) == ["t1"]


async def test_a_request_answered_with_its_keys_earlier_result_is_marked_so(engine: AsyncEngine) -> None:
    with idempotency.serving_fingerprint(ONE_REQUEST):
        assert await _create_with_key(engine, "t1") == "t1"
        first_from_earlier = idempotency.answered_from_earlier()
    with idempotency.serving_fingerprint(ONE_REQUEST):
        assert await _create_with_key(engine, "t2") == "t1"
        again_from_earlier = idempotency.answered_from_earlier()

    assert (first_from_earlier, again_from_earlier) == (False, True)
    assert not idempotency.answered_from_earlier()  # nothing served now


PROBE_SUBMIT = "/crm.test.v1.Probe/Submit"


@asynccontextmanager
async def _probe_service(engine: AsyncEngine) -> AsyncIterator[Any]:
    """A keyed creating method (`_create_with_key`) served by the gRPC layer over a real connection:
    a callable of it, on a channel as every client makes them. It answers with the thing's id and
    how many calls it has served, so an answer tells which call built it."""
    calls = 0

    async def submit(request: SubmitWebformRequest, context: Any) -> StringValue:
        nonlocal calls
        calls += 1
        return StringValue(value=f"{await _create_with_key(engine, new_id(), request.idempotency_key)} {calls}")

    server = GrpcServer(
        service="probe",
        service_names=["crm.test.v1.Probe"],
        register=lambda s: s.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "crm.test.v1.Probe",
                    {
                        "Submit": grpc.unary_unary_rpc_method_handler(
                            submit,
                            request_deserializer=SubmitWebformRequest.FromString,
                            response_serializer=StringValue.SerializeToString,
                        )
                    },
                ),
            )
        ),
    )
    port = await server.start("127.0.0.1", 0)
    channel = create_channel(f"127.0.0.1:{port}", default_deadline_seconds=5)
    try:
        yield channel.unary_unary(
            PROBE_SUBMIT,
            request_serializer=SubmitWebformRequest.SerializeToString,
            response_deserializer=StringValue.FromString,
        )
    finally:
        await channel.close()
        await server.stop(0)


async def test_the_grpc_layer_fingerprints_each_keyed_request(engine: AsyncEngine) -> None:
    """Over a real connection: a key reused with another request is INVALID_ARGUMENT naming the key;
    a caller that resumes what its key began gets the first result, whatever it sends now; a caller
    that wants only the result a key already has gets it, and for a new key a refusal (nothing done)."""
    async with _probe_service(engine) as call:
        first = await call(SubmitWebformRequest(form_key="f", fields={"name": "Li"}, idempotency_key="k"))
        again = await call(SubmitWebformRequest(form_key="f", fields={"name": "Li"}, idempotency_key="k"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(SubmitWebformRequest(form_key="f", fields={"name": "Wang"}, idempotency_key="k"))
        resumed = await call(
            SubmitWebformRequest(form_key="f", fields={"name": "Wang"}, idempotency_key="k"),
            metadata=(idempotency.RESUMING_METADATA,),
        )
        replayed = await call(
            SubmitWebformRequest(form_key="f", fields={"name": "Li"}, idempotency_key="k"),
            metadata=(idempotency.REPLAY_ONLY_METADATA,),
        )
        with pytest.raises(grpc.aio.AioRpcError) as nothing:
            await call(
                SubmitWebformRequest(form_key="f", fields={"name": "Li"}, idempotency_key="k2"),
                metadata=(idempotency.REPLAY_ONLY_METADATA,),
            )
        later = await call(SubmitWebformRequest(form_key="f", fields={"name": "Li"}, idempotency_key="k2"))

    assert again == resumed == replayed == first
    assert from_rpc_error(refused.value).field_errors == REUSED
    assert (nothing.value.code(), from_rpc_error(nothing.value).reason) == (
        grpc.StatusCode.FAILED_PRECONDITION, idempotency.NOTHING_TO_REPLAY,
    )  # fmt: skip
    # The refused replay left the key unused: its first real request creates.
    assert sorted(await _things(engine)) == sorted([first.value.split()[0], later.value.split()[0]])


async def test_an_answer_with_an_earlier_result_says_so_and_the_client_notes_it(engine: AsyncEngine) -> None:
    """The gRPC layer sends `REPLAYED_METADATA` with such an answer only; a client within
    `noting_replays` notes the call (the gateway audits it as a replay, not as a second create)."""
    request = SubmitWebformRequest(form_key="f", fields={"name": "Li"}, idempotency_key="k")
    async with _probe_service(engine) as submit:
        with noting_replays():
            first_call = submit(request)
            await first_call
            after_first = replay_noted()
            again_call = submit(request)
            await again_call
            after_again = replay_noted()

        assert not idempotency.replayed(await first_call.trailing_metadata())
        assert idempotency.replayed(await again_call.trailing_metadata())
    assert (after_first, after_again) == (False, True)
    assert not replay_noted()  # outside `noting_replays`


async def test_a_repeat_gets_the_first_answer_itself_not_one_built_again(engine: AsyncEngine) -> None:
    """SPEC §3: the gRPC layer keeps a keyed call's answer and answers its repeats with it, though
    the handler, finding the key taken, built another (the record as it is by then)."""
    request = SubmitWebformRequest(form_key="f", fields={"name": "Li"}, idempotency_key="k")
    async with _probe_service(engine) as submit:
        first = await submit(request)
        again = await submit(request)
        other = await submit(SubmitWebformRequest(form_key="f", fields={"name": "Li"}, idempotency_key="k2"))
        async with engine.begin() as conn:  # a key recorded before answers were kept has none
            await conn.execute(update(keys).where(keys.c.key == "k2").values(answer=None))
        other_again = await submit(SubmitWebformRequest(form_key="f", fields={"name": "Li"}, idempotency_key="k2"))

    thing = first.value.split()[0]
    assert (first.value, again.value) == (f"{thing} 1", f"{thing} 1")  # not "thing 2": call 2's own answer
    assert other_again.value == f"{other.value.split()[0]} 4"  # built again, of the same thing


async def test_an_answer_is_kept_only_with_the_type_it_was_given_as() -> None:
    """A key's answer is read back only as the message type it was kept as: another method sharing
    the operation name gets the answer its handler built."""
    built, kept = StringValue(value="built now"), StringValue(value="kept").SerializeToString()
    with idempotency.serving_fingerprint(None):
        idempotency.answer_from_earlier(b"google.protobuf.BytesValue\0" + kept)
        assert idempotency.first_answer(built) is built
        idempotency.answer_from_earlier(b"google.protobuf.StringValue\0" + kept)
        assert idempotency.first_answer(built) == StringValue(value="kept")
