"""`Idempotency-Key` on the writes whose service takes no key: updates, deletes and state changes
(SPEC §3: writes accept it; a repeated key returns the first result).

Creates pass their key to the owning service, which keeps it with what it created in the same
transaction. The other writes are answered here, from the gateway's database: the first request
under a key claims it, runs, and its successful answer (status, body, ETag, Location) is kept; the
same request sent again under that key gets that answer (header `Idempotent-Replayed: true`) and
nothing is done again. Keys are the caller's own and each route's, as on creates:

- another request (another record, body, query, or the caller's roles, team or region since: the
  kept answer was shown under them) under a used key is a 422 naming `Idempotency-Key`;
- a key whose first request is still running is a 409 (`REQUEST_IN_PROGRESS`, retry shortly); one
  left running longer than `STALLED_AFTER` (its gateway stopped) is taken over by the retry, and
  the stalled request, should it end after all, neither keeps its answer nor frees the key;
- a first request that failed (4xx, 5xx) keeps nothing: a retry runs again.

Kept answers expire after `CRM_GATEWAY_IDEMPOTENCY_RETENTION_HOURS` (a day), as the services' keys.
A replay changes nothing and reveals only what the first answer showed the same caller under the
same grants, so it is not audited again.
"""

import hashlib
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from crm_platform.idempotency import KEY_LENGTH
from fastapi import Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from gateway.conventions import IDEMPOTENCY_KEY_HEADER
from gateway.security.access import authenticate
from gateway.security.replays import KeptAnswer, WriteReplays, key_refused

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
REPLAYED_HEADER = "Idempotent-Replayed"
# The answer's headers a replay gives back (the rest are the request's own: X-Request-ID, ...).
KEPT_HEADERS = ("content-type", "etag", "location", "link")


def write_fingerprint(request: Request, body: bytes, grants: str) -> str:
    """What tells one request from another: the route and record, the query (in any order), how the
    body is to be read (its content type: an import's format and charset) and the body itself."""
    query = "&".join(f"{name}={value}" for name, value in sorted(request.query_params.multi_items()))
    content_type = request.headers.get("content-type", "")
    digest = hashlib.sha256()
    for part in (request.method, request.url.path, query, content_type, grants):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(body)
    return digest.hexdigest()


def _dependants(dependant: Dependant) -> Iterator[Dependant]:
    yield dependant
    for sub in dependant.dependencies:
        yield from _dependants(sub)


def replayed_here(route: APIRoute) -> bool:
    """Does the gateway keep this route's answers by key? Writes of an authenticated caller whose
    service takes no key (a route that takes `Idempotency-Key` itself passes it on)."""
    parts = list(_dependants(route.dependant))
    takes_key = any(field.alias == IDEMPOTENCY_KEY_HEADER.alias for part in parts for field in part.header_params)
    authenticated = any(part.call is authenticate for part in parts)
    return bool((route.methods or set()) & WRITE_METHODS) and authenticated and not takes_key


Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class ReplayableRoute(APIRoute):
    """An API route whose write, sent with `Idempotency-Key`, is answered once (`WriteReplays`)."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        if replayed_here(self):  # documented as the routes that take the header themselves document it
            described = {
                "name": IDEMPOTENCY_KEY_HEADER.alias,
                "in": "header",
                "required": False,
                "schema": {"type": "string", "maxLength": KEY_LENGTH},
                "description": IDEMPOTENCY_KEY_HEADER.description,
            }
            self.openapi_extra = {**(self.openapi_extra or {}), "parameters": [described]}

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()
        if not replayed_here(self):
            return handler
        route = f"{','.join(sorted(self.methods or ()))} {self.path}"

        async def replaying(request: Request) -> Response:
            key = request.headers.get(IDEMPOTENCY_KEY_HEADER.alias, "")
            if not key:
                return await handler(request)
            return await _answer_once(request, handler, route, key)

        return replaying


async def _answer_once(request: Request, handler: Handler, route: str, key: str) -> Response:
    if len(key) > KEY_LENGTH:
        raise key_refused(key, f"must be at most {KEY_LENGTH} characters")
    principal = await authenticate(request)  # 401 and 429 as for any request, before the key is looked at
    caller = f"{principal.kind}:{principal.user_id}"
    grants = f"{sorted(principal.roles)}|{principal.team}|{principal.region}"
    replays: WriteReplays = request.app.state.security.replays
    claimed = await replays.claim(caller, route, key, write_fingerprint(request, await request.body(), grants))
    if isinstance(claimed, KeptAnswer):
        return Response(claimed.body, claimed.status_code, headers={**claimed.headers, REPLAYED_HEADER: "true"})
    try:
        response = await handler(request)
    except BaseException:
        await replays.release(caller, route, key, claimed)
        raise
    body: Any = getattr(response, "body", None)
    if 200 <= response.status_code < 300 and isinstance(body, bytes):
        headers = {name: value for name, value in response.headers.items() if name in KEPT_HEADERS}
        await replays.keep(caller, route, key, claimed, KeptAnswer(response.status_code, headers, body))
    else:
        await replays.release(caller, route, key, claimed)
    return response
