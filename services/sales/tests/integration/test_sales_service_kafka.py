"""The sales service as it runs (gRPC server, outbox relay, consumers) on PostgreSQL and a broker:
ERP postings on the inbound topics with the API's rules, duplicates and dead letters, account
events re-pointing deals, and outbound events decoded with the published protos."""

import asyncio
from decimal import Decimal

import grpc
import pytest
from crm.accounts.v1 import accounts_pb2
from crm.accounts.v1 import events_pb2 as account_events
from crm.common.v1 import common_pb2
from crm.erp.v1 import invoices_pb2, payments_pb2
from crm.sales.v1 import events_pb2
from crm.sales.v1 import sales_service_pb2 as pb
from crm.sales.v1.sales_service_pb2_grpc import SalesServiceStub
from crm_platform.config import KafkaSettings
from crm_platform.ids import new_id
from crm_platform.principal import ALL_RECORDS, Principal, outgoing_metadata
from crm_platform.testing.kafka import EventCollector, produce_event, produce_raw
from sales.__main__ import build
from sales.config import SalesSettings
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration


def cny(amount: str) -> common_pb2.Money:
    return common_pb2.Money(amount=amount, currency="CNY")


def caller(user_id: str, *roles: str) -> tuple[tuple[str, str | bytes], ...]:
    return outgoing_metadata(Principal(user_id=user_id, roles=roles, team="east"), ALL_RECORDS)


async def test_erp_postings_events_and_account_moves(engine: AsyncEngine, kafka_settings: KafkaSettings) -> None:
    settings = SalesSettings(grpc_port=0, kafka=kafka_settings, outbox_poll_seconds=0.02, shutdown_grace_seconds=5)
    app = build(settings, engine)
    port = await app.start()
    run = new_id()
    rep, manager = caller("rep1", "sales_rep"), caller("mgr", "sales_manager")
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
            EventCollector(
                kafka_settings.bootstrap_servers, ["crm.sales.v1", "erp.payments.v1.dlt", "erp.invoices.v1.dlt"]
            ) as events,
        ):
            stub = SalesServiceStub(channel)
            account = f"acc-{run}"
            opportunity = (
                await stub.CreateOpportunity(
                    pb.CreateOpportunityRequest(
                        account_id=account, name="Deal", amount=cny("1200.00"), idempotency_key=f"lead-{run}"
                    ),
                    metadata=rep,
                )
            ).opportunity
            with pytest.raises(grpc.aio.AioRpcError) as gate:
                await stub.MoveOpportunityStage(
                    pb.MoveOpportunityStageRequest(id=opportunity.id, stage="solution_demo"), metadata=rep
                )
            assert gate.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            await stub.WinOpportunity(pb.WinOpportunityRequest(id=opportunity.id), metadata=rep)
            contract = (
                await stub.CreateContract(pb.CreateContractRequest(opportunity_id=opportunity.id), metadata=rep)
            ).contract
            await stub.SubmitContract(pb.SubmitContractRequest(id=contract.id), metadata=rep)
            with pytest.raises(grpc.aio.AioRpcError) as wrong_role:
                await stub.ApproveContract(pb.ApproveContractRequest(id=contract.id), metadata=caller("f", "finance"))
            assert wrong_role.value.code() == grpc.StatusCode.PERMISSION_DENIED
            await stub.ApproveContract(pb.ApproveContractRequest(id=contract.id, comment="ok"), metadata=manager)
            await stub.SignContract(pb.SignContractRequest(id=contract.id), metadata=rep)
            await stub.CreatePaymentPlan(
                pb.CreatePaymentPlanRequest(
                    contract_id=contract.id,
                    installments=[
                        pb.InstallmentInput(due_date="2030-01-31", amount=cny("600.00")),
                        pb.InstallmentInput(due_date="2030-02-28", amount=cny("600.00")),
                    ],
                ),
                metadata=caller("fin", "finance"),
            )

            posting = payments_pb2.ErpPaymentPosted(
                contract_id=contract.id, amount=cny("700.00"), method="wire", external_reference=f"SAP-{run}"
            )
            bootstrap = kafka_settings.bootstrap_servers
            # The same posting twice under two event ids (an ERP retry), then an over-payment and garbage.
            await produce_event(bootstrap, posting, key=contract.id, source="/erp/sap")
            await produce_event(bootstrap, posting, key=contract.id, source="/erp/sap")
            over = payments_pb2.ErpPaymentPosted(
                contract_id=contract.id, amount=cny("600.00"), external_reference=f"SAP-{run}-2"
            )
            await produce_event(bootstrap, over, key=contract.id, source="/erp/sap")
            await produce_raw(bootstrap, "erp.payments.v1", key=contract.id, value=b"\xff not protobuf")
            await produce_event(
                bootstrap,
                invoices_pb2.ErpInvoiceIssued(
                    contract_id=contract.id, amount=cny("1200.00"), number=f"FP-{run}", external_reference=f"INV-{run}"
                ),
                key=contract.id,
                source="/erp/sap",
            )

            def dead_letters_for_contract(records: list) -> list:  # type: ignore[type-arg]
                return [r for r in records if r.topic == "erp.payments.v1.dlt" and r.key == contract.id]

            await events.wait_for(lambda records: len(dead_letters_for_contract(records)) >= 2, timeout=60)
            await events.wait_for(
                lambda records: any(
                    r.event_type == "crm.sales.invoice.issued" and r.key != contract.id for r in records
                ),
                timeout=60,
            )
            payments = (await stub.ListPayments(pb.ListPaymentsRequest(contract_id=contract.id), metadata=rep)).items
            assert [(p.external_reference, p.amount.amount) for p in payments] == [(f"SAP-{run}", "700.00")]
            plan = (
                await stub.GetPaymentPlan(pb.GetPaymentPlanRequest(contract_id=contract.id), metadata=rep)
            ).payment_plan
            assert [(i.paid.amount, i.status) for i in plan.installments] == [
                ("600.00", "paid"),
                ("100.00", "partially_paid"),
            ]
            dead = dead_letters_for_contract(events.records)
            reasons = sorted(r.headers["dlt_error"] for r in dead)
            assert any("over-payment" in reason for reason in reasons), reasons
            assert any("missing CloudEvents headers" in reason or "decode" in reason for reason in reasons), reasons

            # Outbound: keyed by the aggregate, CloudEvents headers, protobuf values that decode. The
            # payment is applied before its event is relayed: wait for the event (a busy CI missed it).
            await events.wait_for(
                lambda records: any(
                    r.event_type == "crm.sales.payment.received" and r.key == contract.id for r in records
                ),
                timeout=60,
            )
            received = [r for r in events.of_type("crm.sales.payment.received") if r.key == contract.id]
            assert len(received) == 1
            event = received[0].decode(events_pb2.PaymentReceived)
            assert received[0].headers["content-type"] == "application/protobuf"
            assert (event.payment.amount.amount, event.contract_outstanding.amount) == ("700.00", "500.00")
            signed = [r for r in events.of_type("crm.sales.contract.signed") if r.key == contract.id]
            assert signed[0].decode(events_pb2.ContractSigned).contract.number.startswith("CT-")
            issued = [
                r.decode(events_pb2.InvoiceIssued)
                for r in events.of_type("crm.sales.invoice.issued")
                if r.decode(events_pb2.InvoiceIssued).invoice.contract_id == contract.id
            ]
            assert [(i.invoice.number, i.invoice.external_reference) for i in issued] == [(f"FP-{run}", f"INV-{run}")]

            # Invoices follow the API's rules too: nothing above the uninvoiced amount (all of it
            # is invoiced now), the refusal dead-lettered with its reason; a repeat is not re-booked.
            await produce_event(
                bootstrap,
                invoices_pb2.ErpInvoiceIssued(
                    contract_id=contract.id, amount=cny("0.01"), number=f"FP-{run}-2", external_reference=f"INV-{run}-2"
                ),
                key=contract.id,
                source="/erp/sap",
            )
            refused = await events.wait_for(
                lambda records: any(r.topic == "erp.invoices.v1.dlt" and r.key == contract.id for r in records),
                timeout=60,
            )
            (dead_invoice,) = [r for r in refused if r.topic == "erp.invoices.v1.dlt" and r.key == contract.id]
            assert "uninvoiced" in dead_invoice.headers["dlt_error"] or "exceeds" in dead_invoice.headers["dlt_error"]
            assert dead_invoice.headers["dlt_original_topic"] == "erp.invoices.v1"
            invoices = (await stub.ListInvoices(pb.ListInvoicesRequest(contract_id=contract.id), metadata=rep)).items
            assert [i.external_reference for i in invoices] == [f"INV-{run}"]

            # Accounts: a merge re-points the deal and the contract.
            await produce_event(
                bootstrap,
                account_events.AccountMerged(survivor_id=f"survivor-{run}", duplicate_id=account),
                key=f"survivor-{run}",
                source="/crm/accounts",
            )
            await produce_event(
                bootstrap,
                account_events.AccountTransferred(
                    account=accounts_pb2.Account(id=f"survivor-{run}", team="west"),
                    previous_owner_id="rep1",
                    new_owner_id="rep2",
                ),
                key=f"survivor-{run}",
                source="/crm/accounts",
            )
            for _ in range(200):
                moved = (await stub.GetContract(pb.GetContractRequest(id=contract.id), metadata=rep)).contract
                if moved.account_id == f"survivor-{run}" and moved.owner_id == "rep2":
                    break
                await asyncio.sleep(0.1)
            assert (moved.account_id, moved.owner_id, moved.team) == (f"survivor-{run}", "rep2", "west")
            receivables = await stub.ListReceivables(
                pb.ListReceivablesRequest(account_id=f"survivor-{run}"), metadata=rep
            )
            assert [Decimal(m.amount) for m in receivables.total_outstanding] == [Decimal("500.00")]
    finally:
        await app.stop()
