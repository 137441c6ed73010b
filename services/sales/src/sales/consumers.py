"""Kafka event handlers of the sales service.

- ERP inbound (`erp.payments.v1`, `erp.invoices.v1`): the same rules as the API. The external
  reference is the idempotency key, so a posting repeated under a new event id changes nothing;
  a message that breaks a rule raises a domain error, which sends it to `<topic>.dlt` with the reason.
  An invoice posting naming `invoice_id` issues that requested invoice; without, it adds one.
  Each posting is audited (`crm.audit.v1`, actor `erp`): it reaches no gateway that would audit it.
- Accounts (`crm.accounts.v1`): merged accounts re-point deals and contracts; transferred
  accounts take the previous owner's open deals and running contracts to the new owner.

Every handler runs in the consumer's transaction, together with the inbox row of the event.
"""

from typing import Any

from crm.accounts.v1 import events_pb2 as account_events
from crm.erp.v1 import invoices_pb2, payments_pb2
from crm.sales.v1 import sales_pb2
from crm_platform.audit import audit_of_change, audit_recorded
from crm_platform.consumer import ReceivedEvent
from crm_platform.ids import new_id
from crm_platform.money import money_from_proto
from crm_platform.outbox import Transaction
from crm_platform.principal import ALL_RECORDS, Principal, acting_as
from crm_platform.timeutil import given_time

from sales.handlers import SalesHandlers

# Postings from the ERP are attributed to it, with full record scope (it books for every contract).
ERP = Principal(user_id="erp", roles=("erp_integration",), kind="api_key")


class SalesConsumers:
    def __init__(self, handlers: SalesHandlers) -> None:
        self.handlers = handlers

    async def erp_payment_posted(self, tx: Transaction, event: ReceivedEvent[payments_pb2.ErpPaymentPosted]) -> None:
        message = event.message
        with acting_as(ERP, ALL_RECORDS, event.headers.id):
            payment, created = await self.handlers.record_payment_in(
                tx,
                contract_id=message.contract_id or event.key,
                amount=money_from_proto(message.amount, field="amount"),
                received_at=given_time(message.received_at, "received_at"),
                method=message.method,
                external_reference=message.external_reference,
                scope=ALL_RECORDS,
            )
        self._audit(tx, event, "payments", payment, None, changed=created)

    async def erp_invoice_issued(self, tx: Transaction, event: ReceivedEvent[invoices_pb2.ErpInvoiceIssued]) -> None:
        message = event.message
        with acting_as(ERP, ALL_RECORDS, event.headers.id):
            posting = await self.handlers.record_erp_invoice(
                tx,
                contract_id=message.contract_id or event.key,
                amount=money_from_proto(message.amount, field="amount"),
                number=message.number,
                issued_at=given_time(message.issued_at, "issued_at"),
                external_reference=message.external_reference,
                invoice_id=message.invoice_id,
            )
        self._audit(tx, event, "invoices", posting.invoice, posting.previous, changed=posting.changed)

    def _audit(
        self,
        tx: Transaction,
        event: ReceivedEvent[Any],
        resource: str,
        record: sales_pb2.Payment | sales_pb2.Invoice,
        previous: sales_pb2.Payment | sales_pb2.Invoice | None,
        *,
        changed: bool,
    ) -> None:
        """An ERP posting reaches the CRM without a request for the gateway to audit: its audit
        record goes out with the write (`crm_platform.audit`): `create` (`previous` None) or `update`
        with what it changed, or `replay` for a posting that changed nothing."""
        origin: dict[str, Any] = {
            "actor": ERP,
            "resource": resource,
            "record_id": record.id,
            "occurred_at": self.handlers.clock(),
            "request_id": event.headers.id,
            "method": "KAFKA",
            "path": f"{event.topic}/{event.partition}/{event.offset}",
            "client_address": event.headers.source[:64],  # who posted it, as the event says
        }
        if changed:
            action = "create" if previous is None else "update"
            audit = audit_of_change(action=action, record=record, previous=previous, **origin)
        else:
            reason = "posted before under its external_reference; nothing changed"
            audit = audit_recorded(id=new_id(), action="replay", reason=reason, **origin)
        tx.publish(audit, key=record.id)

    async def account_merged(self, tx: Transaction, event: ReceivedEvent[account_events.AccountMerged]) -> None:
        message = event.message
        if not message.duplicate_id or not message.survivor_id:
            return
        await self.handlers.repoint_account(tx, duplicate_id=message.duplicate_id, survivor_id=message.survivor_id)

    async def account_transferred(
        self, tx: Transaction, event: ReceivedEvent[account_events.AccountTransferred]
    ) -> None:
        message = event.message
        if not message.account.id or not message.new_owner_id:
            return
        await self.handlers.follow_account_owner(
            tx,
            account_id=message.account.id,
            previous_owner_id=message.previous_owner_id,
            new_owner_id=message.new_owner_id,
            team=message.account.team,
            region=message.account.region,
        )
