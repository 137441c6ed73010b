"""Export sources: each resource router registers how to page through its records in the
caller's scope; the exports route applies field rules, audit and the export rate limit.

    async def leads_source(access: Access, filters: Mapping[str, str]) -> AsyncIterator[Mapping[str, Any]]:
        cursor = ""
        while True:
            reply = await stub.ListLeads(..., metadata=access.grpc_metadata())
            for lead in reply.leads: yield lead_to_dict(lead)
            if not reply.page.next_cursor: return
            cursor = reply.page.next_cursor

    register_export_source("leads", leads_source, filters={"status", "owner_id", "q"})
"""

import csv
import io
import json
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from crm.common.v1 import common_pb2
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from gateway.security.access import Access, FilterFields
from gateway.security.problems import SecurityProblem

ExportSourceFn = Callable[[Access, Mapping[str, str]], AsyncIterator[Mapping[str, Any]]]
# Validates the filters before anything is audited or streamed (its result is ignored): raises a 422
# `SecurityProblem` naming the parameter (a required filter missing, a value out of range).
ExportCheckFn = Callable[[Mapping[str, str]], object]


@dataclass(frozen=True, slots=True)
class ExportSource:
    resource: str
    fetch: ExportSourceFn
    # Query parameters the source understands as filters; others are refused (422).
    filters: frozenset[str]
    check: ExportCheckFn | None = None
    # The declared field(s) of the filters not named like their field (`tag` filters by `tags`).
    fields: FilterFields = field(default_factory=dict)


_sources: dict[str, ExportSource] = {}


def register_export_source(
    resource: str,
    fetch: ExportSourceFn,
    *,
    filters: Iterable[str] = (),
    check: ExportCheckFn | None = None,
    fields: FilterFields | None = None,
) -> None:
    _sources[resource] = ExportSource(
        resource=resource, fetch=fetch, filters=frozenset(filters), check=check, fields=fields or {}
    )


def invalid_filter(name: str, detail: str) -> SecurityProblem:
    """The 422 of a filter the export source cannot use, naming the query parameter."""
    return SecurityProblem(422, "Unprocessable Content", detail, field=name)


def export_source(resource: str) -> ExportSource | None:
    return _sources.get(resource)


def registered_exports() -> list[str]:
    return sorted(_sources)


_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> str:
    """A CSV cell: money as `amount currency`, structures as JSON, and a leading quote on anything a
    spreadsheet would run as a formula (CSV injection)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, Mapping) and set(value) == {"amount", "currency"}:
        text = f"{value['amount']} {value['currency']}"
    elif isinstance(value, Mapping | list):
        text = json.dumps(value, ensure_ascii=False, default=str, sort_keys=True)
    else:
        text = str(value)
    if text.startswith(_FORMULA_PREFIXES):
        text = "'" + text
    return text


def csv_line(values: Iterable[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow([csv_cell(value) for value in values])
    return buffer.getvalue()


def message_dict(message: Message) -> dict[str, Any]:
    """A resource message as JSON-like data in the REST API's field names (money stays
    `{amount, currency}`, timestamps RFC 3339)."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


@dataclass(frozen=True, slots=True)
class GrpcListing:
    """A List RPC of an owning service: `<Request>(page=PageRequest, ...)` -> `(items, page_info)`.
    Filters are the request's string fields (`owner_id=`) and repeated string fields (`status=` fills
    `statuses`), found from the contract itself."""

    upstream: str
    stub: type[Any]
    method: str
    request: type[Message]
    page_size: int = 500
    # The RPC needs one of these filters (activities are listed per account or contact).
    requires_one_of: tuple[str, ...] = ()
    # As `ExportSource.fields`: the list route's declaration of its filters.
    fields: FilterFields | None = None

    def check(self, filters: Mapping[str, str]) -> None:
        if self.requires_one_of and not any(filters.get(name) for name in self.requires_one_of):
            names = " or ".join(f"'{name}'" for name in self.requires_one_of)
            raise invalid_filter(self.requires_one_of[0], f"filter {names} is required")

    def filter_fields(self) -> dict[str, tuple[str, bool]]:
        """query name -> (request field, repeated?)."""
        result: dict[str, tuple[str, bool]] = {}
        for descriptor in self.request.DESCRIPTOR.fields:
            if descriptor.type != FieldDescriptor.TYPE_STRING:
                continue
            repeated = descriptor.is_repeated
            name = descriptor.name
            if repeated:
                result[_singular(name)] = (name, True)
            else:
                result[name] = (name, False)
        return result

    async def fetch(self, access: Access, filters: Mapping[str, str]) -> AsyncIterator[Mapping[str, Any]]:
        upstreams = access.request.app.state.upstreams
        call = getattr(upstreams.stub(self.upstream, self.stub), self.method)
        fields = self.filter_fields()
        cursor = ""
        while True:
            request = self.request(
                page=common_pb2.PageRequest(limit=self.page_size, cursor=cursor, sort=filters.get("sort", ""))
            )
            for key, value in filters.items():
                if key in fields:
                    name, repeated = fields[key]
                    if repeated:
                        getattr(request, name).append(value)
                    else:
                        setattr(request, name, value)
            reply = await call(request, metadata=access.grpc_metadata())
            for item in reply.items:
                yield message_dict(item)
            cursor = reply.page_info.next_cursor
            if not cursor:
                return


def _singular(name: str) -> str:
    """`statuses` -> `status`, `priorities` -> `priority`, `tags` -> `tag`: the query parameter name."""
    if name.endswith("ies"):
        return name[:-3] + "y"
    if name.endswith(("ses", "xes")):
        return name[:-2]
    return name.removesuffix("s")


def register_grpc_export(resource: str, listing: GrpcListing) -> None:
    register_export_source(
        resource, listing.fetch, filters=listing.filter_fields(), check=listing.check, fields=listing.fields
    )
