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
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, cast

from crm.common.v1 import common_pb2, custom_fields_pb2
from crm_platform.timeutil import as_utc
from fastapi.dependencies.utils import request_params_to_args
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import Field, TypeAdapter, ValidationError
from starlette.datastructures import QueryParams

from gateway.inputs import INT32_MAX, INT32_MIN, Instant
from gateway.security.access import Access, FilterFields, filtered_fields
from gateway.security.problems import SecurityProblem

ExportSourceFn = Callable[[Access, Mapping[str, str]], AsyncIterator[Mapping[str, Any]]]
# Validates the filters before anything is audited or streamed (its result is ignored): raises a 422
# naming the parameter (a required filter missing, a value out of range): a `SecurityProblem`, or
# the `RequestValidationError` a list route answers for a value of the wrong type.
ExportCheckFn = Callable[[Mapping[str, str]], object]
# `GrpcListing.shown`.
PageShown = Callable[[Access, list[Mapping[str, Any]]], Awaitable[list[Mapping[str, Any]]]]


@dataclass(frozen=True, slots=True)
class ExportSource:
    resource: str
    fetch: ExportSourceFn
    # Query parameters the source understands as filters; others are refused (422).
    filters: frozenset[str]
    check: ExportCheckFn | None = None
    # The declared field(s) of the filters not named like their field (`tag` filters by `tags`).
    fields: FilterFields = field(default_factory=dict)
    # Prefixes of the query parameters it takes besides `filters`: `custom.` for `custom.<key>=`.
    prefixes: frozenset[str] = frozenset()

    def takes(self, name: str) -> bool:
        """Is the query parameter `name` one of its filters?"""
        return name in self.filters or any(name.startswith(prefix) and name != prefix for prefix in self.prefixes)


_sources: dict[str, ExportSource] = {}


def register_export_source(
    resource: str,
    fetch: ExportSourceFn,
    *,
    filters: Iterable[str] = (),
    check: ExportCheckFn | None = None,
    fields: FilterFields | None = None,
    prefixes: Iterable[str] = (),
) -> None:
    _sources[resource] = ExportSource(
        resource=resource,
        fetch=fetch,
        filters=frozenset(filters),
        check=check,
        fields=fields or {},
        prefixes=frozenset(prefixes),
    )


def invalid_filter(name: str, detail: str) -> SecurityProblem:
    """The 422 of a filter the export source cannot use, naming the query parameter."""
    return SecurityProblem(422, "Unprocessable Content", detail, field=name)


def export_source(resource: str) -> ExportSource | None:
    return _sources.get(resource)


def registered_exports() -> list[str]:
    return sorted(_sources)


_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
# A signed number or an international phone number ('-12.50', '+86 138-0013-8000'): digits and
# separators only, nothing a spreadsheet could call, so kept as it is rather than quoted.
_PLAIN_NUMBER = re.compile(r"[+-]?[\d(][\d .,()-]*")


def csv_cell(value: Any) -> str:
    """A CSV cell: money as `amount currency`, structures as JSON, and a leading quote on anything a
    spreadsheet would run as a formula (CSV injection)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping) and set(value) == {"amount", "currency"}:
        return f"{_formula_quoted(str(value['amount']))} {value['currency']}"
    if isinstance(value, Mapping | list):
        return _formula_quoted(json.dumps(value, ensure_ascii=False, default=str, sort_keys=True))
    return _formula_quoted(str(value))


def _formula_quoted(text: str) -> str:
    if text.startswith(_FORMULA_PREFIXES) and not _PLAIN_NUMBER.fullmatch(text):
        return "'" + text
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
    Its filters are found from the contract itself, so an export takes those of its list route:
    the request's string fields (`owner_id=`), repeated string fields (`status=` fills `statuses`),
    integers and booleans (`min_score=`), timestamps (`created_after=`, RFC 3339 with a time zone, as
    the list's `Instant`) and its custom field filters (`custom.<key>=`), and `sort` when the list
    route takes it. A value the list route refuses (the ticket list declares `status` as the
    statuses there are) is its own 422 naming the parameter, before anything is audited or streamed."""

    upstream: str
    stub: type[Any]
    method: str
    request: type[Message]
    # The list route of the same records: the query parameters it declares check the export's.
    list_route: APIRoute
    page_size: int = 500
    # The RPC needs one of these filters (activities are listed per account or contact).
    requires_one_of: tuple[str, ...] = ()
    # As `ExportSource.fields`: the list route's declaration of its filters.
    fields: FilterFields | None = None
    # Query parameters the list route names otherwise than the request field they fill
    # (`rotting` fills `rotting_only`).
    renamed: Mapping[str, str] = field(default_factory=dict)
    # Request fields no list route takes (the gateway's own lookups of merged accounts): not filters.
    internal: tuple[str, ...] = ()
    # Resources whose scope of the caller goes along, as the list route sends it (an activity's
    # account is checked in the caller's scope for accounts).
    scopes_along: tuple[str, ...] = ()
    # A page of records as the list route leaves them for the caller before the field rules, where
    # what it shows depends on other records (a ticket's account's tier on the caller's sight of it).
    shown: PageShown | None = None

    def check(self, filters: Mapping[str, str]) -> None:
        if self.requires_one_of and not any(filters.get(name) for name in self.requires_one_of):
            names = " or ".join(f"'{name}'" for name in self.requires_one_of)
            raise invalid_filter(self.requires_one_of[0], f"filter {names} is required")
        searchable = filtered_fields(self.fields or {}, "q")
        asked = filters.get(_singular(_SEARCHED_IN), "")
        if _SEARCHED_IN in self._request_fields() and asked and asked not in searchable:
            raise invalid_filter(_singular(_SEARCHED_IN), f"must be one of {', '.join(searchable)}")
        self._filled(self.request(), self._as_listed(filters))

    def _as_listed(self, filters: Mapping[str, str]) -> Mapping[str, str]:
        """`filters` checked as the list route checks them, for its 422 (`status[0]`, not the request's
        `statuses`), and a yes/no filter read as it reads it: `escalated=1` is `true` there, as here."""
        listed = [parameter for parameter in self.list_route.dependant.query_params if parameter.alias in filters]
        values, errors = request_params_to_args(listed, QueryParams(filters))
        if errors:
            raise RequestValidationError(errors)
        read = {parameter.alias: values.get(parameter.name) for parameter in listed}
        return {**filters, **{name: str(value).lower() for name, value in read.items() if isinstance(value, bool)}}

    def sorts(self) -> bool:
        """Does its list route take `sort`? Then so does the export, with the values it takes."""
        return any(parameter.alias == "sort" for parameter in self.list_route.dependant.query_params)

    def _request_fields(self) -> Mapping[str, FieldDescriptor]:
        # The generated classes give the C implementation's descriptors, which type checkers tell
        # apart from (but which behave as) the pure Python ones.
        return cast(Mapping[str, FieldDescriptor], self.request.DESCRIPTOR.fields_by_name)

    def filter_fields(self) -> dict[str, FieldDescriptor]:
        """query name -> the request field it fills (`filter_prefixes` for `custom.<key>`)."""
        result: dict[str, FieldDescriptor] = {}
        for descriptor in self._request_fields().values():
            if descriptor.name in self.internal or _filter_type(descriptor) is None:
                continue
            result[_singular(descriptor.name) if descriptor.is_repeated else descriptor.name] = descriptor
        for query, name in self.renamed.items():
            descriptor = self._request_fields()[name]
            result.pop(_singular(name) if descriptor.is_repeated else name, None)
            result[query] = descriptor
        return result

    def filter_prefixes(self) -> list[str]:
        """`custom.` when the request takes custom field filters (`custom.<key>=value`)."""
        return [f"{name}." for name in self._custom_fields()]

    def _custom_fields(self) -> list[str]:
        return [
            descriptor.name
            for descriptor in self._request_fields().values()
            if descriptor.is_repeated and _message_name(descriptor) == _CUSTOM_FILTER
        ]

    def _filled(self, request: Message, filters: Mapping[str, str]) -> Message:
        """`request` with the filters set (422 naming one whose field cannot take its value)."""
        fields = self.filter_fields()
        custom = self._custom_fields()
        for key, value in filters.items():
            prefix, _, custom_key = key.partition(".")
            if custom_key and prefix in custom:
                getattr(request, prefix).add(key=custom_key, value=value)
                continue
            descriptor = fields.get(key)
            if descriptor is None:
                continue
            if descriptor.is_repeated:
                getattr(request, descriptor.name).append(value)
                continue
            parsed = _parsed(key, _filter_type(descriptor), value)
            if isinstance(parsed, datetime):
                getattr(request, descriptor.name).FromDatetime(as_utc(parsed))
            else:
                setattr(request, descriptor.name, parsed)
        return request

    async def fetch(self, access: Access, filters: Mapping[str, str]) -> AsyncIterator[Mapping[str, Any]]:
        upstreams = access.request.app.state.upstreams
        call = getattr(upstreams.stub(self.upstream, self.stub), self.method)
        cursor = ""
        filters = self._as_listed(filters)
        while True:
            request = self._filled(
                self.request(
                    page=common_pb2.PageRequest(limit=self.page_size, cursor=cursor, sort=filters.get("sort", ""))
                ),
                filters,
            )
            if filters.get("q") and _SEARCHED_IN in self._request_fields():
                # As on the list route: `q` looks only in the fields the caller reads in clear.
                asked = list(getattr(request, _SEARCHED_IN))
                searched = access.searched_fields(filtered_fields(self.fields or {}, "q"), asked)
                request.ClearField(_SEARCHED_IN)
                getattr(request, _SEARCHED_IN).extend(searched)
            along = [access.require_view(resource) for resource in self.scopes_along]
            reply = await call(request, metadata=access.grpc_metadata(*along))
            records: list[Mapping[str, Any]] = [message_dict(item) for item in reply.items]
            for record in await self.shown(access, records) if self.shown else records:
                yield record
            cursor = reply.page_info.next_cursor
            if not cursor:
                return


# The request field naming the fields `q` looks in (ListLeadsRequest.q_fields), filled as on the
# list route; its query parameter (`q_field`) chooses among them.
_SEARCHED_IN = "q_fields"
# The message of a request's `custom.<key>=` filters.
_CUSTOM_FILTER = custom_fields_pb2.CustomFieldFilter.DESCRIPTOR.full_name

# The types a filter's value is read as, by its request field's type; a field of another type (the
# page, a nested message) is no filter. Booleans read as FastAPI reads a list route's (`true`, `1`, ...).
_TEXT: TypeAdapter[str] = TypeAdapter(str)
_INT32: TypeAdapter[int] = TypeAdapter(Annotated[int, Field(ge=INT32_MIN, le=INT32_MAX)])
_BOOL: TypeAdapter[bool] = TypeAdapter(bool)
_INSTANT: TypeAdapter[datetime] = TypeAdapter(Instant)
_SCALAR_TYPES: dict[int, TypeAdapter[Any]] = {
    FieldDescriptor.TYPE_STRING: _TEXT,
    FieldDescriptor.TYPE_INT32: _INT32,
    FieldDescriptor.TYPE_SINT32: _INT32,
    FieldDescriptor.TYPE_SFIXED32: _INT32,
    FieldDescriptor.TYPE_BOOL: _BOOL,
}


def _filter_type(descriptor: FieldDescriptor) -> TypeAdapter[Any] | None:
    """How a filter filling `descriptor` reads its value; None for a field that is no filter
    (repeated fields take text only)."""
    if descriptor.is_repeated:
        return _TEXT if descriptor.type == FieldDescriptor.TYPE_STRING else None
    if _message_name(descriptor) == Timestamp.DESCRIPTOR.full_name:
        return _INSTANT
    return _SCALAR_TYPES.get(descriptor.type)


def _message_name(descriptor: FieldDescriptor) -> str:
    return descriptor.message_type.full_name if descriptor.message_type is not None else ""


def _parsed(name: str, kind: TypeAdapter[Any] | None, value: str) -> Any:
    """`value` as the filter's type: the 422 a list route answers, naming the query parameter."""
    assert kind is not None
    try:
        return kind.validate_python(value)
    except ValidationError as error:
        raise RequestValidationError(
            [{**item, "loc": ("query", name, *item["loc"])} for item in error.errors()]
        ) from None


def _singular(name: str) -> str:
    """`statuses` -> `status`, `priorities` -> `priority`, `tags` -> `tag`: the query parameter name."""
    if name.endswith("ies"):
        return name[:-3] + "y"
    if name.endswith(("ses", "xes")):
        return name[:-2]
    return name.removesuffix("s")


def register_grpc_export(resource: str, listing: GrpcListing) -> None:
    # `sort` is checked as the field its value names (the exports route), not as a field of its own.
    sort: FilterFields = {"sort": ()} if listing.sorts() else {}
    register_export_source(
        resource,
        listing.fetch,
        filters=[*listing.filter_fields(), *sort],
        check=listing.check,
        fields={**(listing.fields or {}), **sort},
        prefixes=listing.filter_prefixes(),
    )
