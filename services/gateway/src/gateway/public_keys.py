"""Public routes authenticated by a key in their path instead of a login: a web form's `form_key`
(`POST /webforms/{form_key}/submissions`), a ticket's `survey_key` (`/csat-surveys/{survey_key}`).

The key is the credential, so: its shape is checked before any service hears of it
(`PublicKeyPath`); it never reaches the audit trail, not even in the path (`path_without_key`); and
a key the owning service does not know is a failed authentication, audited as denied and limited
per client address like failed logins (`deny_unknown_key`), so keys cannot be guessed quickly nor
the audit trail flooded.
"""

import re
from typing import Annotated

from fastapi import Path, Request

from gateway.security.access import runtime_of
from gateway.security.problems import not_found, rate_limited

# What the services' keys are made of (`secrets.token_urlsafe`: 32 characters of [A-Za-z0-9_-]),
# with room for longer ones: anything else is a 422 naming the key, and no service is called.
PUBLIC_KEY_PATTERN = r"^[A-Za-z0-9_-]+$"
PUBLIC_KEY_MIN_LENGTH = 8
PUBLIC_KEY_MAX_LENGTH = 64

PublicKeyPath = Annotated[
    str,
    Path(
        min_length=PUBLIC_KEY_MIN_LENGTH,
        max_length=PUBLIC_KEY_MAX_LENGTH,
        pattern=PUBLIC_KEY_PATTERN,
        description="the key that authenticates the request (a credential: who holds it may use it)",
    ),
]


# The paths of the routes above, whose raw path holds a key: not traced (a span's `url.path` would
# keep it where more people read than the audit trail), and logged as their template.
_KEYED_PATH = re.compile(r"^/api/v1/(csat-surveys/[^/]+|webforms/[^/]+/submissions)/?$")
_KEY_PARAMETERS = ("{form_key}", "{survey_key}")


def holds_public_key(path: str) -> bool:
    """Does this raw request path carry a public key (`/csat-surveys/<key>`)?"""
    return _KEYED_PATH.match(path) is not None


def path_for_logs(request: Request) -> str:
    """The request's path as a log line may hold it: a public route's as its template."""
    route_path = getattr(request.scope.get("route"), "path", "")
    if any(parameter in route_path for parameter in _KEY_PARAMETERS) or holds_public_key(request.url.path):
        return route_path or "(a public route's path, holding its key)"
    return request.url.path


def path_without_key(request: Request, name: str, key: str) -> str:
    """The request's path with the key's segment written as its template (`{survey_key}`), as the
    audit trail (and its events) keeps it: whoever reads the trail could use the key."""
    return "/".join(f"{{{name}}}" if segment == key else segment for segment in request.url.path.split("/"))


async def deny_unknown_key(
    request: Request,
    path: str,
    *,
    resource: str,
    action: str,
    message: str,
    too_many: str = "too many requests with unknown keys",
) -> None:
    """A key the owning service does not know (it answered NOT_FOUND) is a failed authentication:
    audited as one (outcome `denied`, an anonymous actor, the reason `<action>: <message>`, `path`
    without the key), and limited per client address like failed logins: past the limit a 429
    saying `too_many`, and no audit row, so guesses cannot flood the trail. The caller then answers
    the service's 404.

    `resource` and `action` name what the key was presented for (`webforms` / `submit`, `csat` /
    `read_survey`), `message` what was not found (`no such web form`)."""
    runtime = runtime_of(request)
    client = request.client.host if request.client else "unknown"
    if wait := runtime.auth_failure_limiter.acquire(f"ip:{client}"):
        raise rate_limited(wait, too_many)
    await runtime.audit_denied(request, None, resource, action, not_found(message), path=path)
