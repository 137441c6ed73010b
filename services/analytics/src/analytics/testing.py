"""Test support: events applied to the read models through the handlers the consumer calls, each in
its own transaction under its own event id, without a broker."""

from collections.abc import Sequence

from crm_platform.cloudevents import CloudEventHeaders
from crm_platform.consumer import ReceivedEvent
from crm_platform.db import transaction
from crm_platform.ids import new_id
from crm_platform.outbox import Transaction
from crm_platform.timeutil import utcnow
from google.protobuf.message import Message
from sqlalchemy.ext.asyncio import AsyncEngine

from analytics.consumers import handlers

HANDLERS = handlers()


async def deliver(engine: AsyncEngine, messages: Sequence[Message], *, key: str = "") -> None:
    """Each event in its own transaction, through the handler the consumer would call."""
    for message in messages:
        headers = CloudEventHeaders(id=new_id(), type="test", source="/test", time=utcnow())
        event = ReceivedEvent(headers=headers, message=message, key=key, topic="", partition=0, offset=0)
        async with transaction(engine) as conn:
            await HANDLERS[type(message)](Transaction(conn=conn, source="/test"), event)
