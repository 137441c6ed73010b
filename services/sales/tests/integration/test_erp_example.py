"""The ERP example of docs/erp-integration.md works as documented: it posts a payment (twice, as a
retry would) that the sales service books once, and decodes the resulting events."""

import importlib.util
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from crm.common.v1 import common_pb2
from crm.sales.v1 import events_pb2
from crm.sales.v1 import sales_service_pb2 as pb
from crm.sales.v1.sales_service_pb2_grpc import SalesServiceStub
from crm_platform.config import KafkaSettings
from crm_platform.ids import new_id
from crm_platform.principal import ALL_RECORDS, Principal, outgoing_metadata
from google.protobuf.message import Message
from sales.__main__ import build
from sales.config import SalesSettings
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[4] / "examples" / "erp_consumer.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("erp_consumer_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_the_example_posts_payments_and_decodes_events(
    engine: AsyncEngine, kafka_settings: KafkaSettings
) -> None:
    example = load_example()
    app = build(SalesSettings(grpc_port=0, kafka=kafka_settings, outbox_poll_seconds=0.02), engine)
    port = await app.start()
    metadata = outgoing_metadata(Principal(user_id="mgr", roles=("sales_manager",), team="east"), ALL_RECORDS)
    # Another manager approves: nobody approves the contract they submitted.
    approver = outgoing_metadata(Principal(user_id="mgr-2", roles=("sales_manager",), team="east"), ALL_RECORDS)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = SalesServiceStub(channel)
            contract = (
                await stub.CreateContract(
                    pb.CreateContractRequest(
                        account_id="acc-erp", title="Support", amount=common_pb2.Money(amount="900.00", currency="CNY")
                    ),
                    metadata=metadata,
                )
            ).contract
            await stub.SubmitContract(pb.SubmitContractRequest(id=contract.id), metadata=metadata)
            await stub.ApproveContract(pb.ApproveContractRequest(id=contract.id), metadata=approver)
            await stub.SignContract(pb.SignContractRequest(id=contract.id), metadata=metadata)
            reference = f"BANK-{new_id()}"
            for _ in range(2):
                await example.post_payment(
                    kafka_settings.bootstrap_servers,
                    contract_id=contract.id,
                    amount="250.00",
                    currency="CNY",
                    reference=reference,
                )

            def paid(event_type: str, message: Message) -> bool:
                return isinstance(message, events_pb2.PaymentReceived) and message.payment.contract_id == contract.id

            seen = await example.consume(kafka_settings.bootstrap_servers, f"erp-example-{new_id()}", until=paid)
            payments = (
                await stub.ListPayments(pb.ListPaymentsRequest(contract_id=contract.id), metadata=metadata)
            ).items
    finally:
        await app.stop()
    ours = [m for _, m in seen if getattr(getattr(m, "contract", None), "id", "") == contract.id]
    assert {type(m).__name__ for m in ours} >= {"ContractCreated", "ContractSigned"}
    [received] = [m for _, m in seen if paid("", m)]
    assert (received.payment.external_reference, received.contract_outstanding.amount) == (reference, "650.00")
    assert [p.external_reference for p in payments] == [reference]
    assert example.describe("crm.sales.payment.received", received).startswith(f"payment {reference} 250.00 CNY")
