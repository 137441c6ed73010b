"""The one custom field definitions servicer every owning service registers, over a real gRPC server
(the interceptor maps its errors) on SQLite and on PostgreSQL."""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from crm.common.v1 import custom_fields_pb2 as pb
from crm.common.v1.custom_fields_pb2_grpc import CustomFieldServiceStub, add_CustomFieldServiceServicer_to_server
from crm_platform import custom_fields as cf
from crm_platform.custom_fields_service import (
    SERVICE_NAME,
    CustomFieldServicer,
    definitions_table,
    load_definitions,
)
from crm_platform.db import create_engine
from crm_platform.grpc_errors import RemoteError, from_rpc_error
from crm_platform.grpc_server import GrpcServer
from crm_platform.idempotency import idempotency_table
from crm_platform.principal import ALL_RECORDS, Principal, outgoing_metadata
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

ADMIN = outgoing_metadata(Principal(user_id="admin", roles=("admin",)), ALL_RECORDS)


@dataclass
class Served:
    stub: CustomFieldServiceStub
    engine: AsyncEngine
    table: Any
    changes: list[str] = field(default_factory=list)

    async def upsert(
        self, expected_version: int = 0, *, create_only: bool = False, idempotency_key: str = "", **fields: Any
    ) -> pb.CustomFieldDefinition:
        request = pb.UpsertCustomFieldRequest(
            definition=pb.CustomFieldDefinition(**fields),
            expected_version=expected_version,
            create_only=create_only,
            idempotency_key=idempotency_key,
        )
        return (await self.stub.UpsertCustomField(request, metadata=ADMIN)).definition

    async def keys(self, entity: str) -> list[str]:
        reply = await self.stub.ListCustomFields(pb.ListCustomFieldsRequest(entity=entity), metadata=ADMIN)
        return [d.key for d in reply.items]

    async def fails(self, call: Any) -> RemoteError:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        return from_rpc_error(caught.value)


@pytest.fixture
async def served(each_database_url: str) -> AsyncIterator[Served]:
    metadata = MetaData()
    table = definitions_table(metadata, "custom_field_definitions")
    keys = idempotency_table(metadata)
    engine = create_engine(each_database_url)
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    changes: list[str] = []
    # As the accounts service registers it: the entities it owns.
    servicer = CustomFieldServicer(
        engine,
        table,
        keys=keys,
        entities=("account", "contact"),
        on_change=lambda: changes.append("changed"),
    )
    server = GrpcServer(
        service="definitions-test",
        service_names=[SERVICE_NAME],
        register=lambda s: add_CustomFieldServiceServicer_to_server(servicer, s),
    )
    port = await server.start("127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Served(stub=CustomFieldServiceStub(channel), engine=engine, table=table, changes=changes)
    finally:
        await channel.close()
        await server.stop(0)
        await engine.dispose()


async def test_upsert_version_conflict_list_delete_and_unowned_entities(served: Served) -> None:
    tier = await served.upsert(entity="account", key="tier", label=" Tier ", type="enum", options=["a", "b"])
    assert (tier.version, tier.label, list(tier.options)) == (1, "Tier", ["a", "b"])
    assert tier.HasField("created_at")

    # If-Match on the current version writes; on an older one it is refused with the current version.
    renamed = await served.upsert(1, entity="account", key="tier", label="Tier class", type="enum", options=["a"])
    assert renamed.version == 2 and renamed.created_at == tier.created_at
    stale = await served.fails(served.upsert(1, entity="account", key="tier", label="Lost", type="text"))
    assert stale.code == grpc.StatusCode.ABORTED and stale.reason == "STALE_VERSION"
    assert stale.metadata["current_version"] == "2"
    missing = await served.fails(served.upsert(3, entity="account", key="nope", label="Nope", type="text"))
    assert missing.code == grpc.StatusCode.NOT_FOUND
    # 0 is unconditional: it overwrites whatever version is stored.
    assert (await served.upsert(entity="account", key="tier", label="Tier", type="text", pii=True)).version == 3

    invalid = await served.fails(served.upsert(entity="account", key="Bad Key", label="x", type="enum"))
    assert invalid.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {e.field for e in invalid.field_errors} == {"key", "options"}

    await served.upsert(entity="contact", key="wechat_alt", label="WeChat (alt)", type="text", pii=True)
    await served.upsert(entity="account", key="segment", label="Segment", type="text", required=True)
    assert await served.keys("account") == ["segment", "tier"]
    assert await served.keys("contact") == ["wechat_alt"]
    async with served.engine.connect() as conn:
        loaded = await load_definitions(conn, served.table, "account")
    assert [(d.key, d.type, d.required, d.pii) for d in loaded] == [
        ("segment", cf.FieldType.TEXT, True, False),
        ("tier", cf.FieldType.TEXT, False, True),
    ]

    # Entities another service owns are refused naming `entity`, before any write.
    for call in (
        served.upsert(entity="lead", key="budget", label="Budget", type="decimal"),
        served.stub.ListCustomFields(pb.ListCustomFieldsRequest(entity="ticket"), metadata=ADMIN),
        served.stub.DeleteCustomField(pb.DeleteCustomFieldRequest(entity="opportunity", key="x"), metadata=ADMIN),
        served.stub.ListCustomFields(pb.ListCustomFieldsRequest(entity=""), metadata=ADMIN),
    ):
        refused = await served.fails(call)
        assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [e.field for e in refused.field_errors] == ["entity"]

    tier_again = pb.DeleteCustomFieldRequest(entity="account", key="tier")
    await served.stub.DeleteCustomField(tier_again, metadata=ADMIN)
    # Gone; and a key no definition can have (PostgreSQL would refuse the NUL) is simply not found.
    for request in (tier_again, pb.DeleteCustomFieldRequest(entity="account", key="a\x00b")):
        gone = await served.fails(served.stub.DeleteCustomField(request, metadata=ADMIN))
        assert gone.code == grpc.StatusCode.NOT_FOUND
    assert await served.keys("account") == ["segment"]
    # One notification per committed change (4 upserts of account.tier/segment, 1 of contact, 1 delete).
    assert served.changes == ["changed"] * 6


async def test_concurrent_creates_of_one_key_both_apply(served: Served) -> None:
    # Both read "absent"; the second insert finds the first one's row and updates it instead of failing.
    created = await asyncio.gather(
        *(served.upsert(entity="contact", key="hobby", label=f"Hobby {n}", type="text") for n in (1, 2))
    )
    assert sorted(d.version for d in created) == [1, 2]


async def test_a_create_only_upsert_of_an_existing_key_is_already_exists_and_changes_nothing(served: Served) -> None:
    created = await served.upsert(
        create_only=True, entity="account", key="tier", label="Tier", type="enum", options=["a"]
    )
    assert created.version == 1

    duplicate = await served.fails(
        served.upsert(create_only=True, entity="account", key="tier", label="T", type="bool")
    )

    assert duplicate.code == grpc.StatusCode.ALREADY_EXISTS and duplicate.reason == "DUPLICATE"
    assert duplicate.metadata["existing_id"] == "account.tier"
    async with served.engine.connect() as conn:
        [tier] = await load_definitions(conn, served.table, "account")
    assert (tier.type, tier.options, tier.version) == (cf.FieldType.ENUM, ("a",), 1)
    assert served.changes == ["changed"]


async def test_of_concurrent_create_only_upserts_of_one_key_one_creates_and_the_others_are_refused(
    served: Served,
) -> None:
    outcomes = await asyncio.gather(
        *(
            served.upsert(create_only=True, entity="contact", key="hobby", label=f"Hobby {n}", type="text")
            for n in (1, 2)
        ),
        return_exceptions=True,
    )
    [created] = [o for o in outcomes if isinstance(o, pb.CustomFieldDefinition)]
    [refused] = [from_rpc_error(o) for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert created.version == 1
    assert refused.code == grpc.StatusCode.ALREADY_EXISTS


async def test_a_create_repeated_under_its_idempotency_key_answers_the_first_definition(served: Served) -> None:
    tier = {"entity": "account", "key": "tier", "label": "Tier", "type": "enum", "options": ["a"]}
    first = await served.upsert(create_only=True, idempotency_key="k-1", **tier)
    await served.upsert(1, entity="account", key="tier", label="Tier level", type="enum", options=["a", "b"])

    repeated = await served.upsert(create_only=True, idempotency_key="k-1", **tier)

    assert repeated == first  # as the first create answered, though the definition changed since
    without_key = await served.fails(served.upsert(create_only=True, **tier))
    assert without_key.code == grpc.StatusCode.ALREADY_EXISTS
    other_request = await served.fails(served.upsert(create_only=True, idempotency_key="k-1", **{**tier, "label": "T"}))
    assert other_request.code == grpc.StatusCode.INVALID_ARGUMENT and "idempotency_key" in other_request.message
    async with served.engine.connect() as conn:
        [stored] = await load_definitions(conn, served.table, "account")
    assert (stored.label, stored.version) == ("Tier level", 2)
