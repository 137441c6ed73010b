"""Input rules every route shares (SPEC §3: invalid input is a 422 naming the field).

- Text, numbers and nesting must be storable (`crm_platform.structs.unstorable_values`):
  `reject_unstorable_input` checks path and query parameters and anywhere in a JSON body, before
  any service sees them.
- Integers travel as protobuf int32: request models bound them (`INT32_MAX`), so an out-of-range
  number is a 422 naming the field, not a failure to build the upstream request.
- Every JSON body is a `RequestBody`: unknown fields are refused and values are taken as JSON gives
  them, never coerced (`true` is no integer, `"5"` no number, `1` no boolean). Dates and date-times
  are `CalendarDate` and `Instant`; text a request must give is `NonBlank`.
- A query parameter the route does not take is refused too (`reject_unknown_query_parameters`): a
  misspelt filter must not answer as if there were none. A route takes the query parameters it
  declares (and its dependencies do) and those its `openapi_extra` documents, such as every
  `custom.<key>` of the lists that filter by custom fields (`prefixed_query_parameters`).
"""

import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Annotated, Any, ClassVar

from crm_platform.structs import Location, unstorable_values
from fastapi import Request
from fastapi._compat import field_annotation_is_sequence
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Strict,
    StringConstraints,
    model_validator,
)

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1


class RequestBody(BaseModel):
    """A JSON request body: unknown fields are errors (never dropped), and values are not coerced
    (pydantic's strict mode). Every route's body model derives from it; the public web form
    submission takes extra fields (they become the lead's custom data)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ReplacementBody(RequestBody):
    """The body of a PUT that replaces a record: it may carry back the fields the server sets on the
    record as the API returned it (`read_only`: its id, version, times, a stage's position), which
    are ignored, so a client can PUT what it read. Any other unknown field is still an error. Only
    these models pay for the check: the other bodies are validated without it."""

    read_only: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _without_read_only_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {name: value for name, value in data.items() if name not in cls.read_only}
        return data


# Text a request must give (a name, the id of the record to act on): empty or only whitespace is a
# 422, not a record named "   " or owned by nobody. A pattern (some character that is not
# whitespace), not a validator function: a field's `max_length` then stays a limit on the text, and
# the OpenAPI schema shows the rule. The error handler words its error as "must not be blank".
NON_BLANK_PATTERN = r"\S"
NonBlank = Annotated[str, StringConstraints(pattern=NON_BLANK_PATTERN)]
# An id a request may leave out, where "" means the same as leaving it out: only whitespace is refused.
OptionalId = Annotated[NonBlank | None, BeforeValidator(lambda value: None if value == "" else value)]


def comma_separated_choices(*choices: str) -> AfterValidator:
    """The values of a list filter that may come comma-separated (`?tier=A,B` as `?tier=A&tier=B`)
    must each be one of `choices`: any other is a 422 naming the query parameter, not a list filtered
    by nothing (or the owning service's error naming its own request field)."""

    def one_of(value: str) -> str:
        unknown = [part.strip() for part in value.split(",") if part.strip() and part.strip() not in choices]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not one of {', '.join(choices)}")
        return value

    return AfterValidator(one_of)


# FastAPI validates the parsed JSON as Python values, where strict mode takes only `date` and
# `datetime` objects: these types take the JSON string (and only a string: pydantic would read a
# number as seconds since 1970) in its RFC 3339 form.
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_DATE_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}.*")


def _date_text(value: object) -> object:
    if not (isinstance(value, str) and _DATE.fullmatch(value)):
        raise ValueError("must be a date as YYYY-MM-DD")
    return value


def _date_time_text(value: object) -> object:
    if not (isinstance(value, str) and _DATE_TIME.fullmatch(value)):
        raise ValueError("must be an RFC 3339 date-time with a time zone, such as 2025-01-31T09:00:00Z")
    return value


def _within_utc(value: datetime) -> datetime:
    """Year 1 or 9999 with an offset can fall outside the years a datetime holds once in UTC."""
    try:
        value.astimezone(UTC)
    except OverflowError:
        raise ValueError("must be between years 1 and 9999 in UTC") from None
    return value


CalendarDate = Annotated[date, Strict(False), BeforeValidator(_date_text)]
# An instant: a date-time without a time zone names no instant, so it is refused, not taken as UTC.
Instant = Annotated[AwareDatetime, Strict(False), BeforeValidator(_date_time_text), AfterValidator(_within_utc)]


def period_problem(start_name: str, start: date | None, end: date | None, *, end_inclusive: bool) -> str | None:
    """Why a filter's period can hold nothing (it ends before it starts), said of its end; else None.
    Such a filter is the caller's mistake, not an empty answer."""
    if start is None or end is None or end > start or (end_inclusive and end == start):
        return None
    return f"must be {'on or ' if end_inclusive else ''}after {start_name}"


def check_period(start_name: str, start: date | None, end_name: str, end: date | None, *, end_inclusive: bool) -> None:
    """422 naming the query parameter `end_name` when the period can hold nothing (`period_problem`)."""
    problem = period_problem(start_name, start, end, end_inclusive=end_inclusive)
    if problem is not None:
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("query", end_name), "msg": problem, "input": end}]
        )


def check_same_as_path(field: str, given: str | None, in_path: str) -> None:
    """422 naming the body's `field` when it names another record than the path does (a contact
    posted under one account naming another): the request contradicts itself."""
    if given is not None and given != in_path:
        message = f"must be {in_path!r}, as in the path, or left out"
        raise RequestValidationError([{"type": "value_error", "loc": ("body", field), "msg": message, "input": given}])


async def reject_unstorable_input(request: Request) -> None:
    """422 naming each path parameter, query parameter or JSON body field whose text or number
    cannot be stored.

    The body is looked at only when the route takes a JSON body, which FastAPI has already read
    (a streamed upload is left to the service that parses it)."""
    found: list[tuple[Location, str]] = []
    for name, value in request.path_params.items():
        found.extend(unstorable_values(value, ("path", name)))
    for name, value in request.query_params.multi_items():
        found.extend(unstorable_values(value, ("query", name)))
    route = request.scope.get("route")
    if isinstance(route, APIRoute) and route.body_field is not None and await request.body():
        try:
            body = await request.json()
        except ValueError:
            body = None  # not JSON: FastAPI answers for the body itself
        found.extend(unstorable_values(body, ("body",)))
    if found:
        raise RequestValidationError(
            [{"type": "value_error", "loc": loc, "msg": problem, "input": None} for loc, problem in found]
        )


# The OpenAPI extension of a parameter that stands for every query parameter named `<prefix><key>`.
NAME_PREFIX = "x-name-prefix"


def prefixed_query_parameters(prefix: str, description: str) -> dict[str, Any]:
    """The `openapi_extra` of a route that reads the query parameters named `<prefix><key>` itself
    (custom field filters: `custom.<key>=value`): they are taken, and documented the way OpenAPI 3.1
    documents free-form query parameters, as one exploded object whose properties are the parameters."""
    parameter = {
        "name": prefix.rstrip("."),
        "in": "query",
        "description": description,
        "style": "form",
        "explode": True,
        "schema": {
            "type": "object",
            "propertyNames": {"pattern": f"^{re.escape(prefix)}"},
            "additionalProperties": {"type": "string"},
        },
        NAME_PREFIX: prefix,
    }
    return {"parameters": [parameter]}


@dataclass(frozen=True, slots=True)
class QueryParameters:
    """The query parameters a route takes: by name, and every one named with one of `prefixes`;
    `single` are those of `names` that take one value (the others take a list: `?status=a&status=b`)."""

    names: frozenset[str]
    prefixes: tuple[str, ...]
    single: frozenset[str]

    def takes(self, name: str) -> bool:
        return name in self.names or name.startswith(self.prefixes)


def _declared_query_parameters(dependant: Dependant) -> Iterator[tuple[str, bool]]:
    """(name, whether it takes a list) of each query parameter `dependant` and its dependencies declare."""
    for parameter in dependant.query_params:
        yield parameter.alias, field_annotation_is_sequence(parameter.field_info.annotation)
    for dependency in dependant.dependencies:
        yield from _declared_query_parameters(dependency)


# Where a route keeps its `QueryParameters`: routes are not hashable, so no cache can be keyed by them.
_ROUTE_ATTRIBUTE = "crm_query_parameters"


def query_parameters(route: APIRoute) -> QueryParameters:
    """The query parameters `route` takes: those it and its dependencies declare, and those its
    `openapi_extra` documents. Worked out on its first request, then kept on the route. (Dependencies
    given to `include_router` are not looked at: the gateway gives none.)"""
    taken: QueryParameters | None = getattr(route, _ROUTE_ATTRIBUTE, None)
    if taken is None:
        declared = dict(_declared_query_parameters(route.dependant))
        names = set(declared)
        prefixes: list[str] = []
        for parameter in (route.openapi_extra or {}).get("parameters", []):
            if parameter.get("in") != "query":
                continue
            if NAME_PREFIX in parameter:
                prefixes.append(parameter[NAME_PREFIX])
            else:
                names.add(parameter["name"])
        single = frozenset(name for name, takes_list in declared.items() if not takes_list)
        taken = QueryParameters(frozenset(names), tuple(prefixes), single)
        setattr(route, _ROUTE_ATTRIBUTE, taken)
    return taken


def unknown_query_parameters(names: Iterable[str]) -> RequestValidationError:
    """The 422 naming query parameters a route does not take."""
    return RequestValidationError(
        [
            {"type": "extra_forbidden", "loc": ("query", name or "(no name)"), "msg": "unknown query parameter"}
            for name in names
        ]
    )


def reject_unknown_query_parameters(request: Request) -> None:
    """422 naming each query parameter the matched route does not take (`query_parameters`), and
    each one that takes one value but was given several: `?q=a&q=b` would search for b alone."""
    route = request.scope.get("route")
    if not request.scope["query_string"] or not isinstance(route, APIRoute):
        return
    taken = query_parameters(route)
    given = Counter(name for name, _ in request.query_params.multi_items())
    unknown = [name for name in given if not taken.takes(name)]
    if unknown:
        raise unknown_query_parameters(unknown)
    repeated = [name for name, count in given.items() if count > 1 and name in taken.single]
    if repeated:
        raise RequestValidationError(
            [
                {"type": "value_error", "loc": ("query", name), "msg": "given more than once; it takes one value"}
                for name in repeated
            ]
        )
