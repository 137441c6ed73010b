"""A minimal service built on crm_platform, used by the platform tests and benchmarks: a `notes` table, events of
type `crm.audit.record.recorded` (any event message would do) and a gRPC method taking raw bytes.

Run as a process: `python -m crm_platform.testing.sample_service <database_url> <bootstrap> <port>`.
"""

import sys
from typing import Any

import grpc
from crm.audit.v1 import events_pb2
from sqlalchemy import Column, MetaData, String, Table, insert, text
from sqlalchemy.ext.asyncio import AsyncEngine

from crm_platform.config import KafkaSettings, ServiceSettings
from crm_platform.db import UtcDateTime, create_engine, is_postgres
from crm_platform.ids import new_id
from crm_platform.migrations import OUTBOX_NOTIFY_SQL
from crm_platform.outbox import Transaction, UnitOfWork, add_messaging_tables
from crm_platform.service import ServiceApp, run_event_loop
from crm_platform.timeutil import utcnow

metadata = MetaData()
notes = Table(
    "notes",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("key", String(200), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
)
add_messaging_tables(metadata)

SERVICE = "crm.test.v1.NotesService"


async def create_schema(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
        if is_postgres(engine):
            for statement in OUTBOX_NOTIFY_SQL:
                await conn.execute(text(statement))


async def add_note(tx: Transaction, key: str) -> str:
    """A use case: one row and one event, in one transaction."""
    note_id = new_id()
    await tx.conn.execute(insert(notes).values(id=note_id, key=key, created_at=utcnow()))
    tx.publish(events_pb2.AuditRecorded(id=note_id, record_id=key, action="create"), key=key)
    return note_id


def build_app(engine: AsyncEngine, kafka: KafkaSettings, port: int = 0) -> ServiceApp:
    uow = UnitOfWork(engine, metadata, source="/crm/test")

    async def add(request: bytes, context: Any) -> bytes:
        async with uow.begin() as tx:
            note_id = await add_note(tx, request.decode())
        return note_id.encode()

    handler = grpc.method_handlers_generic_handler(SERVICE, {"AddNote": grpc.unary_unary_rpc_method_handler(add)})
    settings = ServiceSettings(
        service_name="notes", grpc_port=port, kafka=kafka, shutdown_grace_seconds=5.0, outbox_poll_seconds=0.02
    )
    return ServiceApp(
        settings=settings,
        engine=engine,
        metadata=metadata,
        uow=uow,
        service_names=[SERVICE],
        register=lambda server: server.add_generic_rpc_handlers((handler,)),
        topics=["crm.audit.v1"],
    )


async def _main(database_url: str, bootstrap: str, port: int) -> None:
    engine = create_engine(database_url)
    await create_schema(engine)
    kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_partitions=6)
    await build_app(engine, kafka, port).serve()


if __name__ == "__main__":
    run_event_loop(_main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
