"""What a service's outbox holds, for tests that check the events a change wrote."""

from sqlalchemy import MetaData, select
from sqlalchemy.ext.asyncio import AsyncEngine


async def outbox_events(engine: AsyncEngine, metadata: MetaData, key: str | None = None) -> list[tuple[str, bytes]]:
    """(type, payload) of the events in the outbox (of `key` only, if given), in the order written."""
    outbox = metadata.tables["outbox"]
    query = select(outbox.c.type, outbox.c.payload).order_by(outbox.c.seq)
    if key is not None:
        query = query.where(outbox.c.key == key)
    async with engine.connect() as conn:
        return [(event_type, payload) for event_type, payload in await conn.execute(query)]
