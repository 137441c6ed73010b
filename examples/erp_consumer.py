"""An ERP integration in a few lines: read the CRM's sales events, and post payments back.

Needs only `aiokafka` and the CRM's published protobuf contracts (the `crm-contracts` package,
generated from `proto/`). Run it against the local stack (`make run`) or any Kafka:

    .venv/bin/python examples/erp_consumer.py --bootstrap 127.0.0.1:9092 consume
    .venv/bin/python examples/erp_consumer.py --bootstrap 127.0.0.1:9092 post-payment \\
        --contract <contract id> --amount 1000.00 --currency CNY --reference BANK-2026-0001

See docs/erp-integration.md for the topics, headers and guarantees.
"""

import argparse
import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from crm.common.v1 import common_pb2, options_pb2
from crm.erp.v1 import payments_pb2
from crm.sales.v1 import events_pb2
from google.protobuf.message import Message

SALES_TOPIC = "crm.sales.v1"


def event_catalogue() -> dict[str, type[Message]]:
    """CloudEvents type → protobuf message class, read from the contract's own options."""
    catalogue: dict[str, type[Message]] = {}
    for name in events_pb2.DESCRIPTOR.message_types_by_name:
        message_class = getattr(events_pb2, name)
        event_type = message_class.DESCRIPTOR.GetOptions().Extensions[options_pb2.event_type]
        catalogue[event_type] = message_class
    return catalogue


CATALOGUE = event_catalogue()


def decode(headers: list[tuple[str, bytes]], value: bytes) -> tuple[str, str, Message | None]:
    """(event id, event type, message) of one Kafka record; the message is None for event types
    this consumer does not know (newer ones): skip them, do not fail."""
    values = {name: raw.decode() for name, raw in headers}
    event_type = values.get("ce_type", "")
    message_class = CATALOGUE.get(event_type)
    return values.get("ce_id", ""), event_type, message_class.FromString(value) if message_class else None


def describe(event_type: str, message: Message) -> str:
    """One line per event, the way a finance system would book it."""
    match message:
        case events_pb2.ContractSigned(contract=contract):
            return f"contract {contract.number} signed: {contract.amount.amount} {contract.amount.currency}"
        case events_pb2.PaymentPlanCreated(payment_plan=plan):
            dues = ", ".join(f"{i.due_date} {i.amount.amount}" for i in plan.installments)
            return f"payment plan for contract {plan.contract_id}: {dues}"
        case events_pb2.PaymentReceived(payment=payment, contract_outstanding=outstanding):
            return (
                f"payment {payment.external_reference} {payment.amount.amount} {payment.amount.currency}; "
                f"outstanding {outstanding.amount}"
            )
        case events_pb2.InstallmentOverdue(contract_id=contract_id, installment=installment):
            return f"installment {installment.sequence} of contract {contract_id} overdue since {installment.due_date}"
        case events_pb2.InvoiceRequested(invoice=invoice) | events_pb2.InvoiceIssued(invoice=invoice):
            return f"invoice {invoice.id} {invoice.status}: {invoice.amount.amount} {invoice.amount.currency}"
        case _:
            return event_type


async def consume(
    bootstrap: str, group: str, max_events: int = 0, until: Callable[[str, Message], bool] | None = None
) -> list[tuple[str, Message]]:
    """Reads the sales topic as consumer group `group`, committing after each handled batch
    (at-least-once: deduplicate by the `ce_id` header when booking). Stops after `max_events`
    events, or at the first event for which `until` is true (both optional)."""
    consumer = AIOKafkaConsumer(
        SALES_TOPIC, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    seen: list[tuple[str, Message]] = []
    await consumer.start()
    try:
        done = False
        while not done and (max_events <= 0 or len(seen) < max_events):
            batches = await consumer.getmany(timeout_ms=1000)
            for records in batches.values():
                for record in records:
                    event_id, event_type, message = decode(list(record.headers), record.value or b"")
                    if message is None:
                        continue
                    print(f"{event_id} key={record.key.decode() if record.key else ''} {describe(event_type, message)}")
                    seen.append((event_type, message))
                    done = done or (until is not None and until(event_type, message))
            if batches:
                await consumer.commit()
    finally:
        await consumer.stop()
    return seen


def cloudevents_headers(message: Message, *, key: str, source: str) -> list[tuple[str, bytes]]:
    event_type = message.DESCRIPTOR.GetOptions().Extensions[options_pb2.event_type]
    headers = {
        "ce_specversion": "1.0",
        "ce_id": str(uuid.uuid4()),
        "ce_type": event_type,
        "ce_source": source,
        "ce_time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "ce_subject": key,
        "ce_dataschema": message.DESCRIPTOR.full_name,
        "content-type": "application/protobuf",
    }
    return [(name, value.encode()) for name, value in headers.items()]


async def post_payment(
    bootstrap: str, *, contract_id: str, amount: str, currency: str, reference: str, method: str = "wire"
) -> None:
    """Books a payment in the CRM. `reference` is the idempotency key: resending it is safe."""
    message = payments_pb2.ErpPaymentPosted(
        contract_id=contract_id,
        amount=common_pb2.Money(amount=amount, currency=currency),
        method=method,
        external_reference=reference,
    )
    message.received_at.FromDatetime(datetime.now(UTC))
    topic = message.DESCRIPTOR.file.GetOptions().Extensions[options_pb2.event_topic]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(
            topic,
            key=contract_id.encode(),
            value=message.SerializeToString(),
            headers=cloudevents_headers(message, key=contract_id, source="/erp/example"),
        )
    finally:
        await producer.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    commands = parser.add_subparsers(dest="command", required=True)
    consume_cmd = commands.add_parser("consume", help="print the sales events")
    consume_cmd.add_argument("--group", default="erp-example")
    consume_cmd.add_argument("--max-events", type=int, default=0, help="stop after this many (0: run forever)")
    post = commands.add_parser("post-payment", help="post a payment to erp.payments.v1")
    post.add_argument("--contract", required=True)
    post.add_argument("--amount", required=True, help='decimal string, e.g. "1000.00"')
    post.add_argument("--currency", default="CNY")
    post.add_argument("--reference", required=True, help="unique per payment; the idempotency key")
    post.add_argument("--method", default="wire")
    args = parser.parse_args(argv)
    task: Any
    if args.command == "consume":
        task = consume(args.bootstrap, args.group, args.max_events)
    else:
        task = post_payment(
            args.bootstrap,
            contract_id=args.contract,
            amount=args.amount,
            currency=args.currency,
            reference=args.reference,
            method=args.method,
        )
    asyncio.run(task)


if __name__ == "__main__":
    main()
