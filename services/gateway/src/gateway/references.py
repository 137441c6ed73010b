"""A body's references to records another service owns (a deal's account, primary contact, source
lead and campaign; a direct contract's account; a ticket's contact), checked before the owning
service stores them: each must exist, or the request is a 422 naming the field, as for references
within one service (`crm_platform.errors.missing_reference`); a deal's primary contact and a
ticket's contact must work at its account. An import's deals name accounts too: a row naming one
that may not be named is rejected alone (`rows_naming_no_account`).

What is checked is existence, not the caller's sight: a rep may name an account another rep owns,
so that a second deal on it meets anti-collision (a 409 naming the first) rather than a 422 that
hides why. Nothing of the record read is shown. The check needs the owner up: when it is down the
request is a 503 to retry, never a reference stored unchecked. A request repeated under its
Idempotency-Key still answers with its first result when the check fails now (`check_or_replay`).
Because the 422 tells whether an id exists, each one is audited (`SecurityRuntime.audit_refused`).
The owner may still delete the record a moment later; that is the eventual consistency the event
flow settles (deals follow account merges, analytics drops what is deleted)."""

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import grpc
from crm.accounts.v1 import accounts_pb2
from crm.accounts.v1 import accounts_service_pb2 as accounts_pb
from crm.accounts.v1.accounts_service_pb2_grpc import AccountsServiceStub
from crm.common.v1 import common_pb2
from crm.leads.v1 import leads_service_pb2 as leads_pb
from crm.leads.v1.leads_service_pb2_grpc import LeadsServiceStub
from crm.sales.v1 import sales_service_pb2 as sales_pb
from crm.sales.v1.sales_service_pb2_grpc import SalesServiceStub
from crm_platform.errors import Conflict, FieldError, ValidationFailed
from crm_platform.grpc_errors import from_rpc_error
from crm_platform.idempotency import NOTHING_TO_REPLAY, REPLAY_ONLY_METADATA
from crm_platform.pagination import MAX_LIMIT
from crm_platform.principal import ALL_RECORDS, outgoing_metadata
from google.protobuf.message import Message

from gateway.security import Access
from gateway.upstreams import Upstreams

Metadata = tuple[tuple[str, str | bytes], ...]
T = TypeVar("T")
Fetch = Callable[[Upstreams, str, Metadata], Awaitable[Message]]


@dataclass(frozen=True)
class Referent:
    """A kind of record a body may name: its name in messages, how to read it."""

    noun: str
    fetch: Fetch


async def _account(upstreams: Upstreams, record_id: str, metadata: Metadata) -> Message:
    stub = upstreams.stub("accounts", AccountsServiceStub)
    reply: accounts_pb.GetAccountResponse = await stub.GetAccount(
        accounts_pb.GetAccountRequest(account_id=record_id), metadata=metadata
    )
    return reply.account


async def _contact(upstreams: Upstreams, record_id: str, metadata: Metadata) -> Message:
    stub = upstreams.stub("accounts", AccountsServiceStub)
    reply: accounts_pb.GetContactResponse = await stub.GetContact(
        accounts_pb.GetContactRequest(contact_id=record_id), metadata=metadata
    )
    return reply.contact


async def _lead(upstreams: Upstreams, record_id: str, metadata: Metadata) -> Message:
    stub = upstreams.stub("leads", LeadsServiceStub)
    reply: leads_pb.GetLeadResponse = await stub.GetLead(leads_pb.GetLeadRequest(lead_id=record_id), metadata=metadata)
    return reply.lead


async def _campaign(upstreams: Upstreams, record_id: str, metadata: Metadata) -> Message:
    stub = upstreams.stub("leads", LeadsServiceStub)
    reply: leads_pb.GetCampaignResponse = await stub.GetCampaign(
        leads_pb.GetCampaignRequest(campaign_id=record_id), metadata=metadata
    )
    return reply.campaign


ACCOUNT = Referent("account", _account)
CONTACT = Referent("contact", _contact)
LEAD = Referent("lead", _lead)
CAMPAIGN = Referent("campaign", _campaign)


class References:
    """The references of one request body: `field -> (kind, id)`; empty ids name nothing."""

    def __init__(self, access: Access) -> None:
        self._access = access
        self._upstreams: Upstreams = access.request.app.state.upstreams
        self._wanted: dict[str, tuple[Referent, str, str | None]] = {}

    def add(
        self, field: str, referent: Referent, record_id: str | None, *, on_account: str | None = None
    ) -> "References":
        """`on_account`: the record must belong to that account (a deal's primary contact works at the
        deal's account; a ticket's contact at the ticket's)."""
        if record_id:
            self._wanted[field] = (referent, record_id, on_account)
        return self

    async def check_or_replay(self, idempotency_key: str, write: Callable[[Metadata], Awaitable[T]]) -> T:
        """`check`, then the write (`write(())`). When the check fails for a request with an
        Idempotency-Key, the key's first request may have passed it (the account merged since, its
        owner down now): the write goes again wanting only that first result (its metadata
        `REPLAY_ONLY_METADATA`), which answers as a repeat always does; with no first result, or no
        key, the check's failure stands."""
        try:
            await self._check()
        except (ValidationFailed, grpc.aio.AioRpcError) as refused:
            if idempotency_key:
                try:
                    return await write((REPLAY_ONLY_METADATA,))
                except grpc.aio.AioRpcError as error:
                    if from_rpc_error(error).reason != NOTHING_TO_REPLAY:
                        raise
            if isinstance(refused, ValidationFailed):
                await _audit_refused(self._access, refused)
            raise refused from None
        return await write(())

    async def check(self) -> None:
        """Reads every named record concurrently. One 422 names every field whose record is missing,
        merged away or on another account than it must be (audited); any other failure of an owner
        propagates."""
        try:
            await self._check()
        except ValidationFailed as refused:
            await _audit_refused(self._access, refused)
            raise

    async def _check(self) -> None:
        """`check` unaudited: `check_or_replay` may yet answer its failure with a replay."""
        fields = list(self._wanted)
        found = await asyncio.gather(*(self._read(*self._wanted[field][:2]) for field in fields))
        errors = [
            error
            for field, record in zip(fields, found, strict=True)
            if (error := self._problem(field, record)) is not None
        ]
        if errors:
            raise ValidationFailed(errors)

    def _problem(self, field: str, record: Message | None) -> FieldError | None:
        referent, record_id, on_account = self._wanted[field]
        problem = _record_problem(referent, record_id, record, on_account)
        return FieldError(field, problem) if problem else None

    async def _read(self, referent: Referent, record_id: str) -> Message | None:
        try:
            return await referent.fetch(self._upstreams, record_id, _over_all_records(self._access))
        except grpc.aio.AioRpcError as error:
            # INVALID_ARGUMENT: an id the owner could never have issued (too long, malformed).
            if error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                return None
            raise


async def _audit_refused(access: Access, refused: ValidationFailed) -> None:
    await access.runtime.audit_refused(access.request, access.principal, access.resource, access.action, refused)


def _record_problem(referent: Referent, record_id: str, record: Message | None, on_account: str | None) -> str:
    """Why a body may not name the record it names ("" when it may)."""
    if record is None:
        return f"{referent.noun} {record_id} does not exist"
    if merged_into := getattr(record, "merged_into_id", ""):
        # A merged-away account lives on only as a pointer: name the survivor.
        return f"{referent.noun} {record_id} was merged into {merged_into}"
    if on_account and getattr(record, "account_id", "") != on_account:
        return f"{referent.noun} {record_id} is not on account {on_account}"
    return ""


async def rows_naming_no_account(access: Access, account_of_row: Mapping[int, str]) -> dict[int, str]:
    """Of an import's rows (by number, with the account each names), those whose account may not be
    named (it does not exist, or was merged away), with why; rows naming none are left to the owning
    service. Such a row may still be one imported before (a file sent again after a merge): the
    owning service judges that, and `audit_refused_rows` records the rows refused in the end.
    Many rows name few accounts: the accounts service lists the distinct ids, a page of them per
    call, concurrently, over all records."""
    wanted = {account_id for account_id in account_of_row.values() if account_id}
    found = await listed_accounts(access, wanted, _over_all_records(access))
    problems = {account_id: _record_problem(ACCOUNT, account_id, found.get(account_id), None) for account_id in wanted}
    return {row: problems[account_id] for row, account_id in account_of_row.items() if problems.get(account_id)}


async def listed_accounts(
    access: Access, account_ids: Iterable[str], metadata: Metadata
) -> dict[str, accounts_pb2.Account]:
    """Those of `account_ids` the accounts service lists under `metadata` (its record scope; merged
    ones included), by id: a page of the distinct ids per call, concurrently."""
    wanted = sorted(set(account_ids))
    upstreams: Upstreams = access.request.app.state.upstreams
    stub = upstreams.stub("accounts", AccountsServiceStub)
    pages = [wanted[start : start + MAX_LIMIT] for start in range(0, len(wanted), MAX_LIMIT)]
    replies: list[accounts_pb.ListAccountsResponse] = await asyncio.gather(
        *(
            stub.ListAccounts(
                accounts_pb.ListAccountsRequest(
                    ids=page, include_merged=True, page=common_pb2.PageRequest(limit=len(page))
                ),
                metadata=metadata,
            )
            for page in pages
        )
    )
    return {account.id: account for reply in replies for account in reply.items}


async def audit_refused_rows(access: Access, refused: Mapping[int, str]) -> None:
    """One `refused` audit row naming each import row refused for its account (`rows[i].account_id`),
    as `References.check` audits a body's: the answer told whether the ids exist. The import itself
    answers 200, with a result per row."""
    if refused:
        errors = [FieldError(f"rows[{row}].account_id", problem) for row, problem in sorted(refused.items())]
        await access.runtime.audit_refused(
            access.request, access.principal, access.resource, "import", ValidationFailed(errors), status=200
        )


async def refuse_if_deals_name_campaign(access: Access, campaign_id: str) -> None:
    """A campaign that deals name stays (their source, its ROI): a 409 CAMPAIGN_IN_USE naming one, as
    the leads service answers for its leads and web forms. Sales is asked over all records: a deal out
    of the caller's sight dangles all the same."""
    upstreams: Upstreams = access.request.app.state.upstreams
    stub = upstreams.stub("sales", SalesServiceStub)
    reply: sales_pb.ListOpportunitiesResponse = await stub.ListOpportunities(
        sales_pb.ListOpportunitiesRequest(campaign_id=campaign_id, page=common_pb2.PageRequest(limit=1)),
        metadata=_over_all_records(access),
    )
    if reply.items:
        raise Conflict(
            f"cannot delete a campaign in use by deals (one is {reply.items[0].id}): end it (set its end date) instead",
            existing_id=reply.items[0].id,
            reason="CAMPAIGN_IN_USE",
        )


def _over_all_records(access: Access) -> Metadata:
    """The caller, over every record: an owner is asked what exists, not what the caller may see."""
    return outgoing_metadata(access.principal, ALL_RECORDS, access.request_id)
