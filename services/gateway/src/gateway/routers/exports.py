"""`GET /api/v1/exports/{resource}?format=csv`: a permissioned, rate-limited, audited CSV stream.

Export is its own action in the policy; the rows are the caller's in-scope records with the same
field rules as any read (hidden columns left out, masked values masked, custom values defined as pii
masked for callers who see personal data masked)."""

import inspect
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Annotated, Any, Literal

import grpc
from crm.accounts.v1 import accounts_service_pb2 as accounts_pb
from crm.accounts.v1.accounts_service_pb2_grpc import AccountsServiceStub
from crm.leads.v1 import leads_service_pb2 as leads_pb
from crm.leads.v1.leads_service_pb2_grpc import LeadsServiceStub
from crm.sales.v1 import sales_service_pb2 as sales_pb
from crm.sales.v1.sales_service_pb2_grpc import SalesServiceStub
from crm.servicedesk.v1 import servicedesk_service_pb2 as servicedesk_pb
from crm.servicedesk.v1.servicedesk_service_pb2_grpc import ServiceDeskServiceStub
from fastapi import Path, Query, Request
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute

from gateway.errors import ResponseBrokenOff
from gateway.inputs import reject_unstorable_input, unknown_query_parameters
from gateway.routers import accounts, leads, sales, service_desk
from gateway.routers.accounts import ACCOUNT_FILTER_FIELDS, CONTACT_FILTER_FIELDS, check_saved_segment
from gateway.routers.custom_fields import check_custom_filters, presenter
from gateway.routers.leads import LEAD_FILTERS
from gateway.routers.sales import OPPORTUNITY_FILTERS, PAYMENT_FILTERS
from gateway.routers.service_desk import TICKET_FILTERS
from gateway.routing import ResourceRouter
from gateway.security import CurrentPrincipal
from gateway.security.access import Access, filtered_fields, runtime_of
from gateway.security.audit import mask_pii
from gateway.security.exports import (
    GrpcListing,
    csv_line,
    export_source,
    invalid_filter,
    register_grpc_export,
    registered_exports,
)
from gateway.security.masking import mask_value
from gateway.security.problems import SecurityProblem, forbidden, not_found, rate_limited

router = ResourceRouter(tags=["exports"])
logger = logging.getLogger(__name__)

_CSV_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "CSV rows, header first. At most `X-Export-Row-Limit` rows: an export with more is broken off"
        " (the transfer ends incomplete, never as a shorter whole file); narrow it with filters",
        "content": {"text/csv": {"schema": {"type": "string"}}},
        "headers": {
            "X-Export-Row-Limit": {"description": "the most rows one export holds", "schema": {"type": "integer"}}
        },
    },
    401: {"description": "Not authenticated"},
    403: {"description": "Export not allowed, or a filter on a field the caller cannot read"},
    404: {"description": "Unknown or non-exportable resource"},
    422: {"description": "A query parameter the resource's export does not take, or a filter it refuses"},
    429: {"description": "Export rate limit (see Retry-After)"},
}


EXPORT_PATH = "/api/v1/exports/{resource}"


@router.get("/exports/{resource}", response_class=StreamingResponse, responses=_CSV_RESPONSE)
async def export_resource(
    request: Request,
    principal: CurrentPrincipal,
    resource: Annotated[str, Path(max_length=60, pattern=r"^[a-z_]+$")],
    format: Annotated[Literal["csv"], Query(description="only csv for now")] = "csv",
) -> StreamingResponse:
    """The caller's in-scope records of one resource as CSV, header first: its own permission
    (`export`), rate limited and audited, with the field rules of any read (hidden columns left out,
    masked values masked)."""
    runtime = runtime_of(request)
    source = export_source(resource)
    if resource not in runtime.policy.resources or source is None:
        raise not_found(f"{resource} cannot be exported")
    await reject_unstorable_input(request)  # as every other route: a 422 before the audit and the rate limit
    decision = runtime.policy.decide(principal, resource, "export")
    access = Access(runtime=runtime, request=request, principal=principal, decision=decision)
    filters = {key: value for key, value in request.query_params.items() if key != "format"}
    try:
        if not decision.allowed:
            raise forbidden(f"you may not export {resource}")
        # The filters depend on the resource: this route checks its query parameters itself.
        unknown = [name for name in filters if not source.takes(name)]
        if unknown:
            raise unknown_query_parameters(unknown)
        # An export filters by one value of a parameter; a repeated one would quietly export the
        # records of its last value only.
        names = [name for name, _ in request.query_params.multi_items()]
        if repeated := sorted({name for name in names if names.count(name) > 1}):
            raise invalid_filter(repeated[0], f"an export takes one value of '{repeated[0]}'; export once per value")
        if source.check is not None:
            source.check(filters)
        # Each filter is checked as the field it filters by (`tag`: `tags`), as on the list route.
        named = [
            field
            for name in filters
            if name not in ("sort", "q") and not name.startswith("custom.")
            for field in filtered_fields(source.fields, name)
        ]
        if "sort" in filters:
            named.append(filters["sort"])
        access.check_filter(named)
        # `q` looks only in the fields the caller reads in clear, as on the list route (the source
        # fills the request's `q_fields` the same way); `q_field` chooses among them.
        asked = [filters["q_field"]] if filters.get("q_field") else []
        if filters.get("q") or asked:
            access.searched_fields(filtered_fields(source.fields, "q"), asked)
        custom = [name.removeprefix("custom.") for name in filters if name.startswith("custom.")]
        await check_custom_filters(access, custom)
        if resource == "accounts" and filters.get("segment_id"):
            await check_saved_segment(access, filters["segment_id"])
    except SecurityProblem as problem:
        if problem.status == 403:
            await runtime.audit_denied(request, principal, resource, "export", problem)
        raise
    if filters.get("owner_id") == "me":
        filters["owner_id"] = principal.user_id
    wait = runtime.export_limiter.acquire(f"{principal.kind}:{principal.user_id}")
    if wait:
        raise rate_limited(wait, "export rate limit exceeded")
    columns = access.readable_fields()
    await access.audit("export", fields=columns, reason=f"filters: {_audited_filters(filters, access)}")
    max_rows = runtime.settings.export_max_rows

    present = await presenter(access)
    records = aiter(source.fetch(access, filters))
    # The first page is read before the response starts, so a service that is down or refuses
    # the call gives a proper problem response instead of a truncated file.
    try:
        first = await anext(records, None)
    except grpc.aio.AioRpcError as error:
        await runtime.audit_upstream_denied(request, principal, resource, "export", error)
        raise

    async def all_records() -> AsyncIterator[Mapping[str, Any]]:
        if first is None:
            return
        yield first
        async for record in records:
            yield record

    async def rows() -> AsyncIterator[str]:
        count = 0
        header = list(columns)
        try:
            async for record in all_records():
                if count == max_rows:
                    # More records than one export may hold. The 200 and the first rows are sent:
                    # breaking the transfer off (no last chunk) is the one way left to say that the
                    # file is not whole; ending it would hand out a shorter file as if it were.
                    logger.warning("export of %s broken off after its limit of %d rows", resource, max_rows)
                    raise ExportTooLarge(f"the export of {resource} has more than {max_rows} rows")
                shown = present(record)
                if count == 0:
                    # A resource whose policy declares no fields: its first record names the columns.
                    header = header or list(shown)
                    yield csv_line(header)
                yield csv_line(shown.get(column) for column in header)
                count += 1
            if count == 0:
                yield csv_line(header)
        finally:
            await access.flush()

    return StreamingResponse(
        rows(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{resource}.csv"', "X-Export-Row-Limit": str(max_rows)},
    )


def _audited_filters(filters: Mapping[str, str], access: Access) -> str:
    """The export's filters for its audit row, personal data masked: the values of pii fields, of
    `q` (which may search phones and e-mails) and of custom fields (which may hold any)."""
    shown = mask_pii(filters, access.spec)
    for name, value in filters.items():
        if name == "q" or name.startswith("custom."):
            shown[name] = mask_value(value, "text")
    return ", ".join(f"{name}={value}" for name, value in sorted(shown.items())) or "none"


class ExportTooLarge(ResponseBrokenOff):
    """An export has more rows than `CRM_GATEWAY_EXPORT_MAX_ROWS`: raised mid-stream, it breaks the
    transfer off."""


def _list_route(endpoint: Callable[..., Any]) -> APIRoute:
    """The route serving the list `endpoint`: its query parameters check those of the records' export."""
    routes = (route for module in (leads, accounts, sales, service_desk) for route in module.router.routes)
    return next(route for route in routes if isinstance(route, APIRoute) and route.endpoint is endpoint)


# What can be exported: the owning services' List RPCs, paged through in the caller's scope, their
# filters checked as the list routes declare them (a filter named as its field needs no entry).
# Reports, the forecast and the audit trail register their sources in their own routers (analytics,
# sales, audit).
for _resource, _listing in {
    "leads": GrpcListing(
        "leads",
        LeadsServiceStub,
        "ListLeads",
        leads_pb.ListLeadsRequest,
        _list_route(leads.list_leads),
        # `q_field` narrows where `q` looks: its value names the field, checked as `q`'s are
        # (`Access.searched_fields`), so it declares none.
        fields={**LEAD_FILTERS, "q_field": ()},
    ),
    "campaigns": GrpcListing(
        "leads", LeadsServiceStub, "ListCampaigns", leads_pb.ListCampaignsRequest, _list_route(leads.list_campaigns)
    ),
    "accounts": GrpcListing(
        "accounts",
        AccountsServiceStub,
        "ListAccounts",
        accounts_pb.ListAccountsRequest,
        _list_route(accounts.list_accounts),
        # A saved segment's own filters are checked (check_saved_segment).
        fields={**ACCOUNT_FILTER_FIELDS, "segment_id": ()},
        internal=("include_merged",),
    ),
    "contacts": GrpcListing(
        "accounts",
        AccountsServiceStub,
        "ListContacts",
        accounts_pb.ListContactsRequest,
        _list_route(accounts.list_contacts),
        fields=CONTACT_FILTER_FIELDS,
    ),
    "opportunities": GrpcListing(
        "sales",
        SalesServiceStub,
        "ListOpportunities",
        sales_pb.ListOpportunitiesRequest,
        _list_route(sales.list_opportunities),
        fields=OPPORTUNITY_FILTERS,
        renamed={"rotting": "rotting_only"},
    ),
    "quotes": GrpcListing(
        "sales", SalesServiceStub, "ListQuotes", sales_pb.ListQuotesRequest, _list_route(sales.list_quotes)
    ),
    "contracts": GrpcListing(
        "sales", SalesServiceStub, "ListContracts", sales_pb.ListContractsRequest, _list_route(sales.list_contracts)
    ),
    "payments": GrpcListing(
        "sales",
        SalesServiceStub,
        "ListPayments",
        sales_pb.ListPaymentsRequest,
        _list_route(sales.list_payments),
        fields=PAYMENT_FILTERS,
    ),
    "invoices": GrpcListing(
        "sales", SalesServiceStub, "ListInvoices", sales_pb.ListInvoicesRequest, _list_route(sales.list_invoices)
    ),
    "tickets": GrpcListing(
        "service_desk",
        ServiceDeskServiceStub,
        "ListTickets",
        servicedesk_pb.ListTicketsRequest,
        _list_route(service_desk.list_tickets),
        fields=TICKET_FILTERS,
        shown=service_desk.without_unseen_account_tiers,
    ),
    "csat": GrpcListing(
        "service_desk",
        ServiceDeskServiceStub,
        "ListCsatResponses",
        servicedesk_pb.ListCsatResponsesRequest,
        _list_route(service_desk.list_csat),
    ),
    # The accounts service lists activities per account (or a contact's account): one is required.
    "activities": GrpcListing(
        "accounts",
        AccountsServiceStub,
        "ListActivities",
        accounts_pb.ListActivitiesRequest,
        _list_route(accounts.list_activities),
        requires_one_of=("account_id", "contact_id"),
        scopes_along=("accounts",),
    ),
}.items():
    register_grpc_export(_resource, _listing)


def describe_export_filters() -> None:
    """Documents, in the export route's OpenAPI description, the filters each resource's export takes.
    One path template serves every resource, so its parameters cannot say; called once every router
    has registered its sources (`gateway.app`), again by each app the same."""
    lines = []
    for resource in registered_exports():
        source = export_source(resource)
        assert source is not None
        names = ", ".join(
            [f"`{name}`" for name in sorted(source.filters)]
            + [f"`{prefix}<key>`" for prefix in sorted(source.prefixes)]
        )
        lines.append(f"- `{resource}`: {names}")
    filters = (
        "The filters each resource takes, as query parameters, each value checked as on its list route "
        "(any other parameter is a 422 naming it):\n\n" + "\n".join(lines)
    )
    for route in router.routes:
        if isinstance(route, APIRoute) and route.path == EXPORT_PATH:
            route.description = f"{inspect.cleandoc(export_resource.__doc__ or '')}\n\n{filters}"
