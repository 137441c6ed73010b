"""The real gateway app: every route authenticates, every guarded route names a policy resource,
and through HTTP every (route, role) cell the policy denies is a 403 — never a 2xx — while the
cells it allows get past the security layer. Resources or actions of the policy that no route
serves yet are reported (a warning listing them), not silently ignored.

No services run here (no upstream is configured, so calls answer 503 at once): allowed cells end
in 4xx/5xx from the missing upstream or the empty body, which is fine — what is checked is the
security decision."""

import warnings
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from gateway.app import create_app
from gateway.config import Settings
from gateway.security.exports import registered_exports
from gateway.security.policy import PolicyError, load_policy
from gateway.security.runtime import api_routes, authenticated_routes, declared_routes

pytestmark = pytest.mark.integration

SECRET = "real-routes-secret-" + "z" * 30
# Public on purpose: probes, the webform intake (authenticated by its form key, SPEC §4) and a
# ticket's CSAT survey link (by its survey key, SPEC §7).
PUBLIC = {
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("POST", "/api/v1/webforms/{form_key}/submissions"),
    ("GET", "/api/v1/csat-surveys/{survey_key}"),
    ("POST", "/api/v1/csat-surveys/{survey_key}"),
}
POLICY = load_policy()
DUMMY_ID = "00000000-0000-7000-8000-000000000000"


def test_every_api_route_authenticates(real_app: FastAPI) -> None:
    unauthenticated = api_routes(real_app) - authenticated_routes(real_app)
    assert unauthenticated == PUBLIC


def test_routes_name_policy_resources_and_coverage_is_reported(real_app: FastAPI) -> None:
    declared = declared_routes(real_app)
    assert declared, "no route uses require(): the security mechanism is not wired"
    assert {d["resource"] for d in declared} <= set(POLICY.resources)
    served = {(d["resource"], d["action"]) for d in declared} | {(r, "export") for r in registered_exports()}
    missing = sorted(
        f"{resource}:{action}"
        for resource, spec in POLICY.resources.items()
        for action in spec.actions
        if (resource, action) not in served
    )
    if missing:
        warnings.warn(f"policy cells without a route yet: {', '.join(missing)}", UserWarning, stacklevel=1)
    # Every cell is either served or listed: nothing is silently dropped.
    total = sum(len(spec.actions) for spec in POLICY.resources.values())
    assert len(served & {(r, a) for r, s in POLICY.resources.items() for a in s.actions}) + len(missing) == total


def concrete(path: str) -> str:
    parts = [DUMMY_ID if part.startswith("{") and part.endswith("}") else part for part in path.split("/")]
    return "/".join(parts)


@pytest.mark.parametrize("role", POLICY.roles)
async def test_real_routes_follow_the_policy(role: str, real_app: FastAPI, real_app_auth: Any) -> None:
    headers = real_app_auth(role)
    mismatches: list[str] = []
    transport = httpx.ASGITransport(app=real_app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        for declaration in declared_routes(real_app):
            method, path = declaration["method"], declaration["path"]
            resource, action = declaration["resource"], declaration["action"]
            allowed = POLICY.decide(_principal(role), resource, action).allowed
            kwargs: dict[str, Any] = {"headers": headers}
            if method in ("POST", "PUT", "PATCH"):
                kwargs["json"] = {}
            response = await client.request(method, concrete(path), **kwargs)
            label = f"{role} {method} {path} ({resource}:{action})"
            if not allowed:
                if response.status_code != 403:
                    mismatches.append(f"{label}: denied by the policy but got {response.status_code}")
            else:
                refused_action = response.status_code == 403 and f"may not {action} {resource}" in response.text
                if response.status_code == 401 or refused_action:
                    mismatches.append(f"{label}: allowed by the policy but got {response.status_code}")
            if 200 <= response.status_code < 300 and not allowed:
                mismatches.append(f"{label}: UNAUTHORISED 2xx")
    assert not mismatches, "\n".join(mismatches)


def _principal(role: str) -> Any:
    from crm_platform.principal import Principal

    return Principal(user_id="u-real", roles=(role,), team="team-a", region="north")


def test_openapi_documents_security_responses(real_app: FastAPI) -> None:
    schema = real_app.openapi()
    guarded = declared_routes(real_app)
    assert "Problem" in schema["components"]["schemas"]
    for declaration in guarded:
        operation = schema["paths"][declaration["path"]][declaration["method"].lower()]
        assert {"401", "403", "429"} <= set(operation["responses"]), declaration
    schemes = schema["components"].get("securitySchemes", {})
    assert any(s.get("scheme") == "bearer" for s in schemes.values())


def test_a_bad_policy_file_stops_the_gateway_naming_the_line(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\nresources:\n  leads:\n    actions: [read]\nroles:\n  r:\n    grants:\n"
        "      leads: {actions: [read], scope: everywhere}\n"
    )
    settings = Settings(
        dev_mode=True,
        dev_jwt_secret=SECRET,
        policy_path=str(policy),
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'g.db'}",
    )
    with pytest.raises(PolicyError, match=r"policy.yaml, line 8: roles\.r\.grants\.leads\.scope"):
        create_app(settings)


def test_a_route_naming_an_unknown_resource_stops_the_gateway(tmp_path: Path) -> None:
    from fastapi import APIRouter, Depends
    from gateway.security import install_security, require

    app = FastAPI()
    runtime = install_security(
        app,
        Settings(dev_mode=True, dev_jwt_secret=SECRET, database_url=f"sqlite+aiosqlite:///{tmp_path / 'g.db'}"),
    )
    router = APIRouter()

    @router.get("/widgets")
    async def widgets(access: Any = Depends(require("widgets", "read"))) -> None:  # noqa: B008
        return None

    app.include_router(router, prefix="/api/v1")
    with pytest.raises(ValueError, match="unknown resource 'widgets'"):
        runtime.check_routes(app)
    with pytest.raises(ValueError, match="unknown action"):
        require("leads", "destroy")
