"""Input rules every route shares (SPEC §3: invalid input is a 422 naming the field).

- Text, numbers and nesting must be storable (`crm_platform.structs.unstorable_values`):
  `reject_unstorable_input` checks path and query parameters and anywhere in a JSON body, before
  any service sees them.
- Integers travel as protobuf int32: request models bound them (`INT32_MAX`), so an out-of-range
  number is a 422 naming the field, not a failure to build the upstream request.
"""

from crm_platform.structs import Location, unstorable_values
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1


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
