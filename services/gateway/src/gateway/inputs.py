"""Input rules every route shares (SPEC §3: invalid input is a 422 naming the field).

- Text must be storable: PostgreSQL text and JSONB cannot hold U+0000, and protobuf strings must
  be valid UTF-8 (JSON allows lone surrogates). `reject_unstorable_input` refuses such text in path
  and query parameters and anywhere in a JSON body, before any service sees it.
- Numbers must be finite: Python's JSON parser takes NaN and Infinity (and 1e999 as Infinity),
  which JSON does not have and neither JSONB nor the services' JSON conversion can carry; and an
  integer in a free-form value (`custom`) travels as a protobuf double, so it must fit one.
- Values nest at most `MAX_NESTING` levels, which a protobuf Struct can carry.
- Integers travel as protobuf int32: request models bound them (`INT32_MAX`), so an out-of-range
  number is a 422 naming the field, not a failure to build the upstream request.
"""

import math
import sys
from collections.abc import Iterator
from typing import Any

from crm_platform.structs import MAX_NESTING, TOO_DEEP
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1

Location = tuple[str | int, ...]


def text_problem(value: str) -> str | None:
    """Why a string cannot be stored, or None."""
    if "\x00" in value:
        return "must not contain NUL characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8 text"
    return None


NOT_FINITE = "must be a finite number (JSON has no NaN or Infinity)"
OUT_OF_RANGE = "is out of range for a number"


def unstorable_values(value: Any, loc: Location) -> Iterator[tuple[Location, str]]:
    """(location, problem) of every unstorable string (keys included), every number that is not
    finite and every object or array nested too deep in a JSON value."""
    if isinstance(value, (dict, list)) and len(loc) > MAX_NESTING:
        yield loc, TOO_DEEP
        return
    if isinstance(value, str):
        problem = text_problem(value)
        if problem:
            yield loc, problem
    elif isinstance(value, float):
        if not math.isfinite(value):
            yield loc, NOT_FINITE
    elif isinstance(value, int):
        if abs(value) > sys.float_info.max:
            yield loc, OUT_OF_RANGE
    elif isinstance(value, dict):
        for key, item in value.items():
            problem = text_problem(key) if isinstance(key, str) else None
            if problem:
                yield loc, f"has a key that {problem}"
                continue
            yield from unstorable_values(item, (*loc, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from unstorable_values(item, (*loc, index))


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
