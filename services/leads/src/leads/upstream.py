"""The conversion ports over gRPC: accounts (account, contact) and sales (opportunity).

Calls carry the caller's principal and scope, so ownership and permissions stay the caller's.
Every create is a step of a conversion attempt, keyed by the step; a retry resumes the step with
the lead and the options as they are by then, and wants the record the key first created
(`RESUMING_METADATA`), not a refusal of the key as used with a different request. Asked with
`replay_only`, a create only tells what its key made ("" for nothing, or deleted since): the undo
of an attempt whose answer was lost finds the record so.
Remote errors become domain errors: a business rejection triggers compensation, while
UNAVAILABLE/DEADLINE_EXCEEDED become `Unavailable` (the saga keeps its progress for a retry).
"""

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import grpc
from crm.accounts.v1 import accounts_service_pb2, accounts_service_pb2_grpc
from crm.common.v1 import common_pb2
from crm.sales.v1 import sales_service_pb2, sales_service_pb2_grpc
from crm_platform.errors import (
    AlreadyExists,
    Conflict,
    CrmError,
    FieldError,
    NotFound,
    PermissionDenied,
    Unavailable,
    ValidationFailed,
    missing_reference,
)
from crm_platform.grpc_client import create_channel
from crm_platform.grpc_errors import from_rpc_error
from crm_platform.idempotency import NOTHING_TO_REPLAY, REPLAY_ONLY_METADATA, RESUMING_METADATA
from crm_platform.principal import current_principal, current_request_id, current_scope, outgoing_metadata

from leads.handlers import ConvertRequest

log = logging.getLogger(__name__)

ACCOUNTS = "crm.accounts.v1.AccountsService"
SALES = "crm.sales.v1.SalesService"
# The service a step calls, as a caller hears of it when it does not answer.
SERVICE_OF_STEP = {
    "account": "the accounts service",
    "contact": "the accounts service",
    "opportunity": "the sales service",
}


def domain_error(error: grpc.aio.AioRpcError, *, step: str) -> CrmError:
    service = SERVICE_OF_STEP[step]
    remote = from_rpc_error(error, service=service)
    detail = f"{step}: {remote.message}"
    match remote.code:
        case grpc.StatusCode.INVALID_ARGUMENT:
            errors = [FieldError(f"{step}.{e.field}", e.message) for e in remote.field_errors]
            return ValidationFailed(errors or [FieldError(step, remote.message)])
        case grpc.StatusCode.NOT_FOUND:
            return NotFound(step, remote.metadata.get("id", ""))
        case grpc.StatusCode.ALREADY_EXISTS:
            return AlreadyExists(detail, existing_id=remote.metadata.get("existing_id", ""))
        case grpc.StatusCode.FAILED_PRECONDITION | grpc.StatusCode.ABORTED:
            return Conflict(
                detail, existing_id=remote.metadata.get("existing_id", ""), reason=remote.reason or "CONFLICT"
            )
        case grpc.StatusCode.PERMISSION_DENIED:
            return PermissionDenied(detail, field=remote.metadata.get("field", ""))
        case grpc.StatusCode.UNAVAILABLE | grpc.StatusCode.DEADLINE_EXCEEDED:
            return Unavailable(f"{step} failed: {remote.message}")  # the service's words, or from_rpc_error's
        case _:
            # No rejection the caller can act on, and its text may be gRPC's own: it goes to the log.
            log.error("%s failed: %s %s", step, remote.code.name, remote.message)
            return Unavailable(f"{step} failed: {service} failed ({remote.code.name})")


class GrpcConversionPorts:
    def __init__(
        self, accounts_target: str, sales_target: str, deadline_seconds: float, *, call_secret: str = ""
    ) -> None:
        # Creates are idempotent by key and deletes by id, so UNAVAILABLE may be retried by the channel.
        accounts_methods = [
            (ACCOUNTS, m)
            for m in (
                *("GetAccount", "CreateAccount", "GetContact", "CreateContact", "DeleteContact", "DeleteAccount"),
                *("ListContacts", "ListActivities"),
            )
        ]
        self._accounts_channel = create_channel(
            accounts_target,
            idempotent_methods=accounts_methods,
            default_deadline_seconds=deadline_seconds,
            call_secret=call_secret,  # signs for the user the conversion acts for (crm_platform.call_auth)
        )
        self._sales_channel = create_channel(
            sales_target,
            idempotent_methods=[(SALES, m) for m in ("CreateOpportunity", "DeleteOpportunity", "ListOpportunities")],
            default_deadline_seconds=deadline_seconds,
            call_secret=call_secret,
        )
        self.accounts = accounts_service_pb2_grpc.AccountsServiceStub(self._accounts_channel)
        self.sales = sales_service_pb2_grpc.SalesServiceStub(self._sales_channel)
        self.deadline = deadline_seconds

    async def close(self) -> None:
        await self._accounts_channel.close()
        await self._sales_channel.close()

    def _metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return outgoing_metadata(current_principal(), current_scope(), current_request_id())

    async def _call(self, step: str, method: Any, request: Any) -> Any:
        try:
            return await method(request, metadata=self._metadata(), timeout=self.deadline)
        except grpc.aio.AioRpcError as error:
            raise domain_error(error, step=step) from error

    async def _create(self, step: str, method: Any, request: Any, *, replay_only: bool) -> Any | None:
        """A conversion step's create, resuming what its key began; None when it only asks what the
        key made (`replay_only`) and that is nothing, or deleted since."""
        metadata = (*self._metadata(), RESUMING_METADATA)
        if replay_only:
            metadata = (*metadata, REPLAY_ONLY_METADATA)
        try:
            return await method(request, metadata=metadata, timeout=self.deadline)
        except grpc.aio.AioRpcError as error:
            refused = domain_error(error, step=step)
            nothing = isinstance(refused, NotFound) or getattr(refused, "reason", "") == NOTHING_TO_REPLAY
            if replay_only and nothing:
                return None
            raise refused from error

    async def get_account(self, account_id: str) -> None:
        try:
            reply = await self._call(
                "account", self.accounts.GetAccount, accounts_service_pb2.GetAccountRequest(account_id=account_id)
            )
        except NotFound:
            raise missing_reference("account_id", "account", account_id) from None
        if survivor := reply.account.merged_into_id:
            # A merged-away account lives on only as a pointer: its deals would hang off no account.
            merged = f"account {account_id} was merged into {survivor}"
            raise ValidationFailed([FieldError("account_id", merged)])

    async def create_account(self, *, key: str, lead: Mapping[Any, Any], name: str, replay_only: bool = False) -> str:
        account = accounts_service_pb2.AccountInput(
            name=name,
            industry=lead["industry"],
            region=lead["region"],
            owner_id=lead["owner_id"],
            team=lead["team"],
            tags=list(lead["tags"] or []),
        )
        response = await self._create(
            "account",
            self.accounts.CreateAccount,
            accounts_service_pb2.CreateAccountRequest(account=account, idempotency_key=key),
            replay_only=replay_only,
        )
        return "" if response is None else str(response.account.id)

    async def contact_account_id(self, contact_id: str) -> str:
        try:
            response = await self._call(
                "contact", self.accounts.GetContact, accounts_service_pb2.GetContactRequest(contact_id=contact_id)
            )
        except NotFound:
            return ""  # deleted, or out of the caller's scope on contacts: the conversion creates one
        return str(response.contact.account_id)

    async def create_contact(
        self, *, key: str, account_id: str, lead: Mapping[Any, Any], replay_only: bool = False
    ) -> str:
        contact = accounts_service_pb2.ContactInput(
            account_id=account_id,
            name=lead["name"] or lead["company"],
            title=lead["title"],
            phone=lead["phone"],
            email=lead["email"],
            is_primary=True,
            tags=list(lead["tags"] or []),
        )
        response = await self._create(
            "contact",
            self.accounts.CreateContact,
            accounts_service_pb2.CreateContactRequest(contact=contact, idempotency_key=key),
            replay_only=replay_only,
        )
        return "" if response is None else str(response.contact.id)

    async def create_opportunity(
        self,
        *,
        key: str,
        account_id: str,
        contact_id: str,
        lead: Mapping[Any, Any],
        request: ConvertRequest,
        replay_only: bool = False,
    ) -> str:
        message = sales_service_pb2.CreateOpportunityRequest(
            idempotency_key=key,
            account_id=account_id,
            primary_contact_id=contact_id,
            name=request.opportunity_name.strip() or f"{lead['company'] or lead['name']} opportunity",
            pipeline_id=request.pipeline_id,
            owner_id=lead["owner_id"],
            team=lead["team"],
            region=lead["region"],
            source_lead_id=lead["id"],
            campaign_id=lead["campaign_id"],
            expected_close_date=request.expected_close_date.isoformat() if request.expected_close_date else "",
        )
        if request.opportunity_amount is not None:
            message.amount.CopyFrom(
                common_pb2.Money(
                    amount=format(request.opportunity_amount.amount, "f"), currency=request.opportunity_amount.currency
                )
            )
        response = await self._create("opportunity", self.sales.CreateOpportunity, message, replay_only=replay_only)
        return "" if response is None else str(response.opportunity.id)

    async def delete_opportunity(self, opportunity_id: str) -> None:
        try:
            await self._call(
                "opportunity",
                self.sales.DeleteOpportunity,
                sales_service_pb2.DeleteOpportunityRequest(id=opportunity_id),
            )
        except NotFound:
            return  # already gone: compensation is idempotent

    async def delete_contact(self, contact_id: str) -> None:
        try:
            await self._call(
                "contact", self.accounts.DeleteContact, accounts_service_pb2.DeleteContactRequest(contact_id=contact_id)
            )
        except NotFound:
            return  # already gone: compensation is idempotent

    async def delete_account(self, account_id: str) -> None:
        try:
            await self._call(
                "account", self.accounts.DeleteAccount, accounts_service_pb2.DeleteAccountRequest(account_id=account_id)
            )
        except NotFound:
            return

    async def account_used_besides(self, account_id: str, *, contact_id: str, opportunity_id: str) -> bool:
        page = common_pb2.PageRequest(limit=2)  # the attempt's own and one more are enough to tell
        # Three independent reads, side by side: an undo waits for the slowest, not for their sum.
        contacts, activities, deals = await asyncio.gather(
            self._call(
                "account",
                self.accounts.ListContacts,
                accounts_service_pb2.ListContactsRequest(page=page, account_id=account_id),
            ),
            self._call(
                "account",
                self.accounts.ListActivities,
                accounts_service_pb2.ListActivitiesRequest(page=page, account_id=account_id),
            ),
            self._call(
                "opportunity",
                self.sales.ListOpportunities,
                sales_service_pb2.ListOpportunitiesRequest(page=page, account_id=account_id),
            ),
        )
        return (
            any(contact.id != contact_id for contact in contacts.items)
            or bool(activities.items)
            or any(deal.id != opportunity_id for deal in deals.items)
        )
