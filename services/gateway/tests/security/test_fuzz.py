"""Against the whole running system (PostgreSQL, broker, every service, the gateway), as the e2e
tests run it:

- the record-scope matrix on real leads and accounts (the owning service filters by the scope the
  gateway decided) and the security path end to end (masking, exports, audit);
- schemathesis over the gateway's OpenAPI with a valid admin token: no operation may answer 5xx,
  and every response must conform to the schema documented for its status code.

`CRM_FUZZ_MAX_EXAMPLES` sets the examples per operation (`make fuzz` runs more than `make test`)."""

import csv
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from crm_platform.testing import infra
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance

pytestmark = pytest.mark.e2e

MAX_EXAMPLES = int(os.environ.get("CRM_FUZZ_MAX_EXAMPLES", "8"))

# Failures found by this test in routes owned by other teams, reported to them and tracked here so
# that every OTHER operation stays guarded: a new 5xx or schema violation anywhere else fails the
# test. Each entry is shown as a warning on every run; remove it when fixed.
KNOWN_FAILURES: dict[str, str] = {}


@pytest.fixture(scope="module")
def fuzz_stack(postgres_admin_url: str | None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from crm_devstack.stack import start_stack, stop_stack

    if postgres_admin_url is None:
        if infra.in_ci():
            pytest.fail("PostgreSQL is required for the fuzz tests in CI", pytrace=False)
        pytest.skip("PostgreSQL is not available for the fuzz tests")
    work_dir: Path = tmp_path_factory.mktemp("fuzz-stack")
    running = start_stack(postgres_admin_url=postgres_admin_url, work_dir=work_dir)
    yield running
    stop_stack(running, postgres_admin_url)


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_stack: object) -> schemathesis.BaseSchema:
    base_url: str = fuzz_stack.base_url  # type: ignore[attr-defined]
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json")


@pytest.fixture(scope="module")
def admin_headers(fuzz_stack: object) -> dict[str, str]:
    token = fuzz_stack.token("fuzz-admin", ["admin"], team="team-a", region="north")  # type: ignore[attr-defined]
    return {"Authorization": f"Bearer {token}"}


def _bearer(stack: object, sub: str, role: str) -> dict[str, str]:
    token = stack.token(sub, [role], team="team-a", region="north")  # type: ignore[attr-defined]
    return {"Authorization": f"Bearer {token}"}


def test_security_through_the_running_stack(fuzz_stack: object) -> None:
    """Scope, masking, exports and audit with the real leads service behind the gateway."""
    base_url: str = fuzz_stack.base_url  # type: ignore[attr-defined]
    with httpx.Client(base_url=base_url, timeout=30) as client:
        rep_a = _bearer(fuzz_stack, "rep-a", "sales_rep")
        manager = _bearer(fuzz_stack, "boss", "sales_manager")
        body = {"name": "Scope Test", "phone": "13812345678", "email": "scope.test@example.com", "source": "website"}
        created = client.post("/api/v1/leads", json={**body, "owner_id": "rep-a", "team": "team-a"}, headers=manager)
        assert created.status_code == 201, created.text
        lead = created.json()
        assert lead["owner_id"] == "rep-a"
        # Another rep of the same team: outside the record scope, so it does not exist for them.
        rep_b = _bearer(fuzz_stack, "rep-b", "sales_rep")
        assert client.get(f"/api/v1/leads/{lead['id']}", headers=rep_b).status_code == 404
        assert lead["id"] not in {item["id"] for item in client.get("/api/v1/leads", headers=rep_b).json()["items"]}
        # Writing a field the rep may not write: 403 naming it, nothing changed.
        refused = client.patch(f"/api/v1/leads/{lead['id']}", json={"owner_id": "rep-b"}, headers=rep_a)
        assert refused.status_code == 403 and refused.json()["errors"][0]["field"] == "owner_id"
        assert client.get(f"/api/v1/leads/{lead['id']}", headers=rep_a).json()["phone"] == "13812345678"
        assert client.get(f"/api/v1/leads/{lead['id']}", headers=manager).json()["owner_id"] == "rep-a"
        # Marketing sees every lead with contact details masked, in reads and in exports.
        marketing = _bearer(fuzz_stack, "mk", "marketing")
        seen = client.get(f"/api/v1/leads/{lead['id']}", headers=marketing).json()
        assert (seen["phone"], seen["email"]) == ("138****5678", "s***@example.com")
        export = client.get("/api/v1/exports/leads?format=csv", headers=marketing)
        assert export.status_code == 200, export.text
        rows = {row["id"]: row for row in csv.DictReader(io.StringIO(export.text))}
        assert rows[lead["id"]]["phone"] == "138****5678"
        assert client.get("/api/v1/exports/leads", headers=rep_a).status_code == 403
        # The audit trail has the create, the export and the refusals.
        admin = _bearer(fuzz_stack, "root", "admin")
        trail = client.get(f"/api/v1/audit-events?resource=leads&record_id={lead['id']}", headers=admin).json()
        creates = [item for item in trail["items"] if item["action"] == "create"]
        assert creates and creates[0]["actor"]["user_id"] == "boss"
        assert "13812345678" not in str(creates[0]["after"])
        exports = client.get("/api/v1/audit-events?action=export&actor=mk", headers=admin).json()["items"]
        assert exports and exports[0]["resource"] == "leads"
        denied = client.get("/api/v1/audit-events?action=denied&actor=rep-a", headers=admin).json()["items"]
        assert {item["status_code"] for item in denied} == {403}


POSITIONS = {
    "own": {"owner_id": "rep-a", "team": "team-a", "region": "north"},
    "same_team": {"owner_id": "rep-b", "team": "team-a", "region": "north"},
    "same_region": {"owner_id": "rep-c", "team": "team-b", "region": "north"},
    "other": {"owner_id": "rep-d", "team": "team-c", "region": "south"},
}
COVERS = {
    "own": {"own"},
    "team": {"own", "same_team"},
    "region": {"own", "same_team", "same_region"},
    "all": set(POSITIONS),
}


@pytest.mark.parametrize(
    ("resource", "create_query"),
    [("leads", "?on_duplicate=allow"), ("accounts", "")],
)
def test_record_scope_matrix_through_the_running_stack(fuzz_stack: object, resource: str, create_query: str) -> None:
    """Every role x (read, update) x record position on real records: the owning service applies
    the scope the gateway decided, so the answers match the policy cell by cell."""
    from crm_platform.principal import Principal
    from gateway.security.policy import FieldRule, load_policy

    def principal_of(role: str) -> Principal:
        return Principal(user_id="rep-a", roles=(role,), team="team-a", region="north")

    policy = load_policy()
    base_url: str = fuzz_stack.base_url  # type: ignore[attr-defined]
    mismatches: list[str] = []
    with httpx.Client(base_url=base_url, timeout=30) as client:
        admin = _bearer(fuzz_stack, "root", "admin")
        ids = {}
        for position, where in POSITIONS.items():
            body = {"name": f"matrix {resource} {position}", **where}
            if resource == "leads":
                body["source"] = "website"
            created = client.post(f"/api/v1/{resource}{create_query}", json=body, headers=admin)
            assert created.status_code == 201, created.text
            ids[position] = created.json()["id"]
        for role in policy.roles:
            token = fuzz_stack.token("rep-a", [role], team="team-a", region="north")  # type: ignore[attr-defined]
            headers = {"Authorization": f"Bearer {token}"}
            grant = policy.grant(role, resource)
            for action in ("read", "update"):
                for position, record_id in ids.items():
                    if grant is None or action not in grant.actions:
                        want = 403
                    elif position not in COVERS[grant.scope.value]:
                        want = 404
                    else:
                        want = 200
                    if action == "read":
                        read = client.get(f"/api/v1/{resource}/{record_id}", headers=headers)
                        got = read.status_code
                        if got == 200:
                            decision = policy.decide(principal_of(role), resource, "read")
                            shown_hidden = [k for k in read.json() if decision.read_rule(k) is FieldRule.HIDDEN]
                            if shown_hidden:
                                mismatches.append(f"{role} read {resource}: hidden fields shown {shown_hidden}")
                    else:
                        body = {"industry": f"{role}-edit"}
                        got = client.patch(f"/api/v1/{resource}/{record_id}", json=body, headers=headers).status_code
                    if got != want:
                        mismatches.append(f"{role} {action} {resource} [{position}]: expected {want}, got {got}")
            if grant is not None and "read" in grant.actions:
                listing = client.get(f"/api/v1/{resource}?limit=500", headers=headers)
                listed = {item["id"] for item in listing.json()["items"]}
                leaked = {p for p, i in ids.items() if i in listed} - COVERS[grant.scope.value]
                if leaked:
                    mismatches.append(f"{role} list {resource}: out-of-scope {sorted(leaked)}")
    assert not mismatches, "\n".join(mismatches)


def label(operation: schemathesis.APIOperation) -> str:
    return f"{operation.method.upper()} {operation.path}"


def fuzz_operation(operation: schemathesis.APIOperation, headers: dict[str, str]) -> str | None:
    """Runs hypothesis over one operation; the first failure's description, or None."""

    @given(case=operation.as_strategy())
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(headers=headers, checks=[not_a_server_error, response_schema_conformance], timeout=30)

    try:
        run()
    except (Exception, BaseExceptionGroup) as error:  # noqa: BLE001 - collect every operation's failure
        return f"{label(operation)}: {type(error).__name__}: {str(error)[:1500]}"
    return None


def test_gateway_api_has_no_5xx_and_conforms(
    fuzz_schema: schemathesis.BaseSchema, admin_headers: dict[str, str]
) -> None:
    failures: list[str] = []
    known: list[str] = []
    operations = 0
    for result in fuzz_schema.get_all_operations():
        operation = result.ok()
        operations += 1
        failure = fuzz_operation(operation, admin_headers)
        if failure is None:
            continue
        if label(operation) in KNOWN_FAILURES:
            known.append(f"{label(operation)} ({KNOWN_FAILURES[label(operation)]})")
        else:
            failures.append(failure)
    if known:
        warnings.warn(f"known fuzz failures still open: {'; '.join(known)}", UserWarning, stacklevel=1)
    assert operations > 10
    assert not failures, f"{len(failures)} of {operations} operations failed:\n" + "\n\n".join(failures)
