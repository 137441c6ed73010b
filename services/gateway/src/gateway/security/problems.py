"""The security layer's refusals, rendered as RFC 9457 problem+json (401, 403, 404, 413, 429)."""

from collections.abc import Mapping

from fastapi import Request
from fastapi.responses import JSONResponse

PROBLEM_JSON = "application/problem+json"


class SecurityProblem(Exception):
    """A request the security layer refuses; carries everything the response needs."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        field: str = "",
        headers: Mapping[str, str] | None = None,
        action: str = "",
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.field = field
        self.headers = dict(headers or {})
        # The action refused when it is not the route's own (a CSV answer needs `export` besides
        # `read`): what the audit row of the denial names.
        self.action = action

    def body(self, instance: str = "") -> dict[str, object]:
        body: dict[str, object] = {
            "type": f"https://crm.example/problems/{self.title.lower().replace(' ', '-')}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance:
            body["instance"] = instance
        if self.field:
            body["errors"] = [{"field": self.field, "message": self.detail}]
        return body


def unauthenticated(detail: str) -> SecurityProblem:
    return SecurityProblem(401, "Unauthenticated", detail, headers={"WWW-Authenticate": 'Bearer realm="crm"'})


def forbidden(detail: str, *, field: str = "", action: str = "") -> SecurityProblem:
    return SecurityProblem(403, "Forbidden", detail, field=field, action=action)


def not_found(detail: str = "not found") -> SecurityProblem:
    return SecurityProblem(404, "Not Found", detail)


def rate_limited(retry_after: int, detail: str = "too many requests") -> SecurityProblem:
    return SecurityProblem(429, "Too Many Requests", detail, headers={"Retry-After": str(retry_after)})


def problem_response(problem: SecurityProblem, instance: str = "") -> JSONResponse:
    return JSONResponse(
        problem.body(instance), status_code=problem.status, headers=problem.headers, media_type=PROBLEM_JSON
    )


async def handle_security_problem(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, SecurityProblem)
    return problem_response(error, request.url.path)
