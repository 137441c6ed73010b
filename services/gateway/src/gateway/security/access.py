"""The per-request face of the policy: `require(resource, action)` authenticates, rate-limits,
decides, audits refusals and hands the route an `Access` that applies the same decision to the
gRPC call (record scope), to writes, filters and to what the response shows."""

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple

import grpc
from crm_platform.audit import changed_fields
from crm_platform.grpc_client import noting_replays, replay_noted
from crm_platform.ids import new_id
from crm_platform.principal import Principal, RecordScope, outgoing_metadata, resource_scope_key
from fastapi import Depends, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from gateway.inputs import reject_unknown_query_parameters, reject_unstorable_input
from gateway.middleware import current_request_id
from gateway.security.audit import AuditEntry, diff_for_audit
from gateway.security.masking import mask_value
from gateway.security.policy import ACTIONS, Decision, FieldRule, GrantSet, ResourceSpec, covers
from gateway.security.problems import SecurityProblem, forbidden, rate_limited

if TYPE_CHECKING:
    from gateway.security.runtime import SecurityRuntime

# Declared so the OpenAPI document lists both ways to authenticate; the values are read from the
# request headers by the authenticator itself.
bearer_scheme = HTTPBearer(auto_error=False, description="OIDC access token (JWT)")
api_key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key of a machine client")

Sensitive = tuple[str, list[str]]
# A route's filters: query parameter -> the declared field it filters by, or the fields it searches
# (`q`); none for a parameter checked another way (a saved segment's own filters).
FilterFields = Mapping[str, str | tuple[str, ...]]
# Why a `replay` audit row changed nothing.
REPLAY_REASON = "answered with the result of the earlier request under the same Idempotency-Key"


class FieldView(NamedTuple):
    """How one field shows on the records read under one grant set: what presenting it needs from
    the policy, worked out once rather than for every record (`SecurityRuntime.field_views`)."""

    path: str
    hidden: bool
    masked: bool
    type: str
    sensitive: bool
    # The policy has rules for fields inside this one (`line_items.discount_percent`).
    nested: bool


# (grant set, path prefix) -> key -> how that field shows.
FieldViews = dict[tuple[GrantSet, str], dict[str, FieldView]]


def filtered_fields(filters: FilterFields, name: str) -> tuple[str, ...]:
    """The declared fields the filter `name` filters by (a filter not in `filters`: the field of its name)."""
    fields = filters.get(name, name)
    return (fields,) if isinstance(fields, str) else fields


def runtime_of(request: Request) -> "SecurityRuntime":
    runtime = getattr(request.app.state, "security", None)
    if runtime is None:
        raise RuntimeError("security is not installed on this app (gateway.security.install_security)")
    return runtime  # type: ignore[no-any-return]


def client_address_of(request: Request) -> str:
    """Where a request came from, for its audit row: the client a trusted proxy names in
    X-Forwarded-For (uvicorn's proxy headers, `CRM_GATEWAY_FORWARDED_ALLOW_IPS`), else the peer."""
    return request.client.host if request.client is not None else ""


def request_id_of(request: Request) -> str:
    current = current_request_id() or getattr(request.state, "request_id", None) or request.headers.get("x-request-id")
    if not current:
        current = new_id()
        request.state.request_id = current
    return str(current)


async def authenticate(
    request: Request,
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)] = None,
    _api_key: Annotated[str | None, Security(api_key_scheme)] = None,
) -> Principal:
    """The caller (401 otherwise), rate-limited per principal (429). Cached on the request."""
    cached = getattr(request.state, "principal", None)
    if isinstance(cached, Principal):
        return cached
    runtime = runtime_of(request)
    try:
        principal = await runtime.authenticator.authenticate(request.headers)
    except SecurityProblem as problem:
        if problem.status == 401:
            # Failed logins are limited per client address, so guessing is slow and cannot flood the audit.
            client = request.client.host if request.client else "unknown"
            wait = runtime.auth_failure_limiter.acquire(f"ip:{client}")
            if wait:
                raise rate_limited(wait, "too many failed authentications") from problem
            await runtime.audit_denied(request, None, "", "authenticate", problem)
        raise
    wait = runtime.rate_limiter.acquire(f"{principal.kind}:{principal.user_id}")
    if wait:
        raise rate_limited(wait, f"rate limit exceeded for {principal.user_id}")
    request.state.principal = principal
    return principal


CurrentPrincipal = Annotated[Principal, Depends(authenticate)]


# The record ids one `read_sensitive` audit row lists: 5,000 ids of up to 36 characters keep its
# event far below the broker's message limit (crm_platform.outbox.MAX_EVENT_BYTES).
_SENSITIVE_READS_PER_ROW = 5_000


class Access:
    """What the authenticated caller may do with one resource in this request."""

    def __init__(
        self,
        *,
        runtime: "SecurityRuntime",
        request: Request,
        principal: Principal,
        decision: Decision,
    ) -> None:
        self.runtime = runtime
        self.request = request
        self.principal = principal
        self.decision = decision
        self.resource = decision.resource
        self.action = decision.action
        self.spec: ResourceSpec = runtime.policy.resource(decision.resource)
        self.request_id = request_id_of(request)
        self._sensitive_reads: list[Sensitive] = []
        self._replay_audited = False
        self._masks_personal_data: bool | None = None
        self._field_views = runtime.field_views(decision)
        # Accesses of composed-view parts: their sensitive reads are flushed with this one's.
        self._views: list[Access] = []
        # The custom keys this caller sees masked (pii ones, when personal data is masked for them):
        # set by `require` for writes, as a masked field is never theirs to set.
        self.masked_custom: frozenset[str] = frozenset()

    # --- service calls ---------------------------------------------------------------------
    @property
    def scope(self) -> RecordScope:
        assert self.decision.scope is not None  # an Access exists only for allowed decisions
        return self.decision.scope

    @property
    def replayed(self) -> bool:
        """Did the service answer this request's keyed write with its Idempotency-Key's earlier
        result? Its audit rows are then `replay` rows: nothing was done again."""
        return replay_noted()

    def grpc_metadata(self, *writes_for_caller: "Access") -> tuple[tuple[str, str | bytes], ...]:
        """Principal, record scope and request id for the owning service's call. `writes_for_caller`:
        the caller's access to other resources that service writes on their behalf (a lead
        conversion's accounts, contacts and deals); the scope of each goes along too, under
        `resource_scope_key`, for the service's own calls to their owners."""
        metadata = outgoing_metadata(self.principal, self.scope, self.request_id)
        return metadata + tuple(
            (resource_scope_key(view.resource), view.scope.to_proto().SerializeToString()) for view in writes_for_caller
        )

    def allows_record(self, record: Mapping[str, Any]) -> bool:
        """In scope? For records the gateway already holds (composed views); services filter their own."""
        return covers(self.scope, record)

    def page_limit(self, limit: int | None, default: int = 50) -> int:
        """The page size to ask for: the caller's `limit`, capped at the configured maximum."""
        if limit is None:
            return min(default, self.runtime.settings.max_page_size)
        return max(1, min(limit, self.runtime.settings.max_page_size))

    # --- writes and filters ----------------------------------------------------------------
    def check_write(self, fields: Iterable[str] | Mapping[str, Any]) -> None:
        """403 naming the first field this caller may not set (nothing has been changed yet).
        A mapping is checked with its nested paths (`custom.x`, `line_items.discount_percent`).
        Narrows the record scope to that of the grants that may set all the fields: call it before
        `grpc_metadata()`, so the owning service applies that scope."""
        paths = _paths(fields) if isinstance(fields, Mapping) else list(fields)
        refused = self.decision.narrow_to_writers(paths)
        if refused is None:  # a custom value shown masked (a pii one) is not the caller's to set either
            refused = next((p for p in paths if p.startswith("custom.") and p[7:] in self.masked_custom), None)
        if refused is not None:
            raise forbidden(f"you may not set field '{refused}' of {self.resource}", field=refused)

    def resolve_me(self, user_id: str | None) -> str:
        """A user id a request names, `me` standing for the caller (`owner_id=me`, `assignee_id=me`)."""
        return self.principal.user_id if user_id == "me" else user_id or ""

    def check_filter(self, fields: Iterable[str]) -> None:
        """403 when filtering or sorting by a field the caller cannot read in clear (`-x` = sort by x)."""
        for name in fields:
            path = name.lstrip("-+")
            if not path:
                continue
            if self.decision.read_rule(path) < FieldRule.READ:
                raise forbidden(f"you may not filter or sort by field '{path}' of {self.resource}", field=path)

    def in_clear(self, fields: Iterable[str]) -> list[str]:
        """Those of `fields` the caller reads in clear (neither hidden nor masked): what a search may
        look in without revealing what a mask hides."""
        return [name for name in fields if self.decision.read_rule(name) >= FieldRule.READ]

    def searched_fields(self, fields: Iterable[str], asked: Iterable[str] = ()) -> list[str]:
        """Where a search (`q`) over `fields` looks for this caller: those it reads in clear
        (`in_clear`), so marketing, who sees lead emails masked, finds leads by name and company;
        `asked`, the caller's own choice among them, must each be read in clear. 403 naming the
        first field when the search would look in none, or in one the caller does not read in clear."""
        chosen = list(asked)
        if chosen:
            self.check_filter(chosen)
            return chosen
        fields = list(fields)
        searched = self.in_clear(fields)
        if not searched:
            self.check_filter(fields)
        return searched

    def check_filters(self, filters: FilterFields) -> None:
        """`check_filter` for the route's filters the request uses: `filters` declares the field(s)
        each filter query parameter filters by."""
        used = [name for name in filters if name in self.request.query_params]
        self.check_filter(field for name in used for field in filtered_fields(filters, name))

    def masks_personal_data(self) -> bool:
        """Does the caller see personal data of this resource masked? Custom fields defined as `pii`
        are then masked too, like phone and email (SPEC §5, §9). The resource's own `pii` fields
        decide (a caller who sees one of them masked or hidden); a resource that declares none
        (opportunities, tickets) follows the caller's rules for the personal data of the resources
        it may read: an analyst, who sees contacts' phones masked, sees a ticket's pii values masked."""
        if self._masks_personal_data is None:
            policy = self.runtime.policy
            if _pii_fields(self.spec):
                masks = _masks_pii_fields(self.decision, self.spec)
            else:
                masks = any(
                    _masks_pii_fields(decision, spec)
                    for name, spec in policy.resources.items()
                    if _pii_fields(spec) and (decision := policy.decide(self.principal, name, "read")).allowed
                )
            self._masks_personal_data = masks
        return self._masks_personal_data

    def may(self, action: str) -> bool:
        """May the caller also do `action` on this resource?"""
        return self.runtime.policy.decide(self.principal, self.resource, action).allowed

    def ensure(self, action: str) -> None:
        """403 unless the caller may also do `action` on this resource (routes needing two actions)."""
        if not self.may(action):
            raise forbidden(f"you may not {action} {self.resource}", action=action)

    def view(self, resource: str, action: str = "read") -> "Access | None":
        """The caller's access to another resource (parts of a composed view), None when not allowed."""
        decision = self.runtime.policy.decide(self.principal, resource, action)
        if not decision.allowed:
            return None
        view = Access(runtime=self.runtime, request=self.request, principal=self.principal, decision=decision)
        self._views.append(view)
        return view

    def require_view(self, resource: str, action: str = "read") -> "Access":
        """`view` for a route that answers with records of another resource only (a lead's tasks):
        403 when the caller may not `action` that resource."""
        view = self.view(resource, action)
        if view is None:
            raise forbidden(f"you may not {action} {resource}")
        return view

    # --- responses -------------------------------------------------------------------------
    def present(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """The record as this caller may see it: hidden fields dropped, masked fields masked.
        Reads of fields flagged `sensitive` are queued for the audit trail."""
        sensitive: list[str] = []
        shown = self._present(record, self.decision.record_grants(record), "", sensitive)
        if sensitive:
            self._sensitive_reads.append((str(record.get("id", "")), sensitive))
        return shown

    def present_many(self, records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        return [self.present(record) for record in records]

    def present_derived(self, values: Mapping[str, Any], *, like: str) -> dict[str, Any]:
        """Values computed from the declared field `like` (a contract's receivables from its amount)
        shown as the caller sees that field: left out when it is hidden, masked when it is masked."""
        rule = self.decision.read_rule(like)
        if rule is FieldRule.HIDDEN:
            return {}
        if rule is FieldRule.MASKED:
            kind = self.spec.field(like).type
            return {
                key: [mask_value(v, kind) for v in value] if isinstance(value, list) else mask_value(value, kind)
                for key, value in values.items()
            }
        return dict(values)

    def readable_fields(self) -> list[str]:
        """Declared top-level fields the caller sees on some record (hidden ones and credentials left
        out): export columns."""
        return [
            name
            for name, spec in self.spec.fields.items()
            if "." not in name
            and not (spec is not None and spec.credential)
            and self.decision.best_read_rule(name) > FieldRule.HIDDEN
        ]

    def _present(
        self, record: Mapping[str, Any], grants: GrantSet, prefix: str, sensitive: list[str]
    ) -> dict[str, Any]:
        """`grants`: the read grants covering the top-level record, whose rules apply to nested paths too."""
        views = self._field_views.get((grants, prefix))
        if views is None:
            views = self._field_views[(grants, prefix)] = {}
        result: dict[str, Any] = {}
        for key, value in record.items():
            view = views.get(key)
            if view is None:
                view = views[key] = self._field_view(f"{prefix}{key}", grants)
            # Unpacked once: this loop runs for every field of every record shown.
            path, hidden, masked, field_type, is_sensitive, nested = view
            if hidden:
                continue
            if masked:
                result[key] = mask_value(value, field_type)
                continue
            if is_sensitive and value not in (None, "", [], {}):
                sensitive.append(path)
            if nested and isinstance(value, Mapping):
                result[key] = self._present(value, grants, f"{path}.", sensitive)
            elif nested and isinstance(value, list):
                result[key] = [
                    self._present(item, grants, f"{path}.", sensitive) if isinstance(item, Mapping) else item
                    for item in value
                ]
            else:
                result[key] = value
        return result

    def _field_view(self, path: str, grants: GrantSet) -> FieldView:
        rule = self.decision.read_rule(path, grants)
        field_spec = self.spec.field(path)
        return FieldView(
            path=path,
            hidden=rule is FieldRule.HIDDEN,
            masked=rule is FieldRule.MASKED,
            type=field_spec.type,
            sensitive=field_spec.sensitive,
            nested=self.runtime.nested_prefixes(self.resource, path),
        )

    # --- audit -----------------------------------------------------------------------------
    async def audit_write(
        self,
        record_id: str,
        before: Mapping[str, Any] | None,
        after: Mapping[str, Any] | None,
        *,
        action: str | None = None,
        reason: str = "",
        status_code: int | None = None,
    ) -> None:
        """One audit row for a write: the changed fields, before and after, PII masked (custom
        values too, those of fields defined as pii). `before=None` is a create, `after=None` a delete.
        Pass the stored record as it was before the write and as the service returned it after.
        A write the service answered with its Idempotency-Key's earlier result is a `replay` row.
        `status_code`: what the route answers when not the status it declares (a create that merged: 200)."""
        if action is None:
            action = "create" if before is None else "delete" if after is None else self.action
        if self.replayed:
            await self._audit_replay(action, record_id)
            return
        custom_pii: frozenset[str] | None = frozenset()
        if "custom" in changed_fields(before, after):
            lookup = self.runtime.custom_pii_keys
            custom_pii = await lookup(self) if lookup is not None else None
        fields, old, new = diff_for_audit(before, after, self.spec, custom_pii=custom_pii)
        entry = self._entry(
            action, record_id, fields=fields, before=old, after=new, reason=reason, status_code=status_code
        )
        await self.runtime.audit.record([entry])

    async def audit(self, action: str, record_id: str = "", *, fields: Iterable[str] = (), reason: str = "") -> None:
        """An audit row for anything else worth tracing (exports, approvals, ...); in a request the
        service answered with its Idempotency-Key's earlier result, the request's `replay` row."""
        if self.replayed:
            await self._audit_replay(action, record_id)
            return
        await self.runtime.audit.record([self._entry(action, record_id, fields=list(fields), reason=reason)])

    async def audit_each(self, action: str, records: Iterable[tuple[str, str]]) -> None:
        """One audit row per (record id, reason), written together: the leads an import part merged
        into, each on its own trail. None in a replayed request (its `replay` row stands for it)."""
        entries = [self._entry(action, record_id, reason=reason) for record_id, reason in records]
        if entries and not self.replayed:
            await self.runtime.audit.record(entries)

    async def audit_bulk_transfer(
        self,
        transfer_id: str,
        from_owner_id: str,
        to_owner_id: str,
        reason: str,
        moved_ids: Iterable[str],
        *,
        to_team: str = "",
    ) -> None:
        """A departing owner's records handed to another (人走客户不走): one row for the transfer and
        one on the trail of each record it moved, naming it, written together. In a replayed request
        its `replay` row alone (the first request wrote these)."""
        moved = f"{from_owner_id} -> {to_owner_id}: {reason.strip()}"
        fields = ["owner_id", "team"] if to_team else ["owner_id"]
        if self.replayed:
            await self._audit_replay("bulk_transfer", transfer_id)
            return
        entries = [self._entry("bulk_transfer", transfer_id, fields=fields, reason=moved)]
        entries += [
            self._entry("transfer", record_id, fields=fields, reason=f"{moved} ({transfer_id})")
            for record_id in moved_ids
        ]
        await self.runtime.audit.record(entries)

    async def _audit_replay(self, action: str, record_id: str) -> None:
        """The one row of a request done again under its Idempotency-Key, however many rows its
        first run wrote (a create and its collision override): the service answered with the first
        request's result and changed nothing, so no fields; the first `action` is in the reason."""
        if self._replay_audited:
            return
        self._replay_audited = True
        await self.runtime.audit.record([self._entry("replay", record_id, reason=f"{action}: {REPLAY_REASON}")])

    async def flush(self) -> None:
        """Writes the queued sensitive-read rows of this access and of its views (called by
        `require` when the route returns)."""
        await self.runtime.audit.record(self._take_sensitive_reads())

    def _take_sensitive_reads(self) -> list[AuditEntry]:
        """A row for each of this access and its views that read sensitive fields; the queues emptied."""
        entries = [entry for view in self._views for entry in view._take_sensitive_reads()]
        reads, self._sensitive_reads = self._sensitive_reads, []
        if not reads:
            return entries
        fields = sorted({name for _, names in reads for name in names})
        if len(reads) == 1:
            return [*entries, self._entry("read_sensitive", reads[0][0], fields=fields)]
        # A page of records is one row (the ids listed), not one row per record; an export's
        # thousands, a row per _SENSITIVE_READS_PER_ROW ids, so each row's event stays publishable.
        ids = [record_id for record_id, _ in reads]
        size = _SENSITIVE_READS_PER_ROW
        chunks = [ids[start : start + size] for start in range(0, len(ids), size)]
        return [*entries, *(self._entry("read_sensitive", "", fields=fields, after={"record_ids": c}) for c in chunks)]

    def _entry(self, action: str, record_id: str, *, status_code: int | None = None, **values: Any) -> AuditEntry:
        return AuditEntry(
            actor=self.principal,
            action=action,
            resource=self.resource,
            record_id=record_id,
            request_id=self.request_id,
            client_address=client_address_of(self.request),
            method=self.request.method,
            path=self.request.url.path,
            status_code=status_code or declared_status(self.request),
            **values,
        )


# The keys of the custom fields of an access's resource defined as pii (None when the definitions
# cannot be read: every custom value is then masked in the audit trail).
CustomPiiKeys = Callable[[Access], Awaitable[frozenset[str] | None]]


def _pii_fields(spec: ResourceSpec) -> list[str]:
    return [name for name, field_spec in spec.fields.items() if field_spec is not None and field_spec.pii]


def _masks_pii_fields(decision: Decision, spec: ResourceSpec) -> bool:
    """Does the decision show some `pii` field of the resource masked or hidden?"""
    return any(decision.read_rule(name) < FieldRule.READ for name in _pii_fields(spec))


def _paths(values: Mapping[str, Any], prefix: str = "") -> list[str]:
    paths: list[str] = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        paths.append(path)
        if isinstance(value, Mapping) and not _is_money(value):
            paths.extend(_paths(value, f"{path}."))
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, Mapping):
                    paths.extend(p for p in _paths(item, f"{path}.") if p not in paths)
    return paths


def _is_money(value: Mapping[str, Any]) -> bool:
    return set(value) <= {"amount", "currency"}


def declared_status(request: Request) -> int:
    """The status the request's route answers on success: the one it declares (201 for a create,
    204 for a delete), else 200. An allowed request's audit rows are written before its answer
    exists, so this is the status they record."""
    route = request.scope.get("route")
    return (route.status_code if isinstance(route, APIRoute) else None) or 200


def addressed_record(request: Request) -> str:
    """The id of the record the request's path addresses (its last path parameter), else "": a
    refusal is traced on the record it was about."""
    return str(next(reversed(request.path_params.values()), ""))


async def _reject_unstorable_input(request: Request, rows: str) -> None:
    """`reject_unstorable_input`, but for what it finds in a row of the body's `rows` (if named):
    anywhere under ("body", rows, index)."""
    try:
        await reject_unstorable_input(request)
    except RequestValidationError as error:
        in_a_row = ("body", rows)
        others = [
            item for item in error.errors() if not (rows and item["loc"][:2] == in_a_row and len(item["loc"]) > 2)
        ]
        if others:
            raise RequestValidationError(others) from error


def require(resource: str, action: str, *, denied: str = "", rows: str = "") -> Callable[..., AsyncIterator[Access]]:
    """A FastAPI dependency: the caller must be allowed `action` on `resource`. `denied` names
    what the route does when the grant stands for more than its action's name says (managing
    scoring rules needs `assign` on leads): the 403 says "you may not <denied>". `rows` names the
    body's list of rows of a route that answers row by row (an import): an unstorable row is left to
    the route, which rejects it alone; the rest of the request is checked here, as every route's is.

    Unknown actions fail at import time; unknown resources when the gateway starts
    (`SecurityRuntime.check_routes`)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; known: {', '.join(ACTIONS)}")

    async def dependency(request: Request, principal: CurrentPrincipal) -> AsyncIterator[Access]:
        runtime = runtime_of(request)
        decision = runtime.policy.decide(principal, resource, action)
        if not decision.allowed:
            problem = forbidden(f"you may not {denied or f'{action} {resource}'}")
            await runtime.audit_denied(
                request, principal, resource, action, problem, record_id=addressed_record(request)
            )
            raise problem
        # Allowed callers learn about unknown query parameters and unstorable text or numbers (422)
        # before the route calls a service.
        reject_unknown_query_parameters(request)
        await _reject_unstorable_input(request, rows)
        access = Access(runtime=runtime, request=request, principal=principal, decision=decision)
        if request.method not in ("GET", "HEAD") and runtime.custom_pii_keys and access.masks_personal_data():
            # The caller reads pii custom values masked: sent back unchanged, a mask would replace them.
            access.masked_custom = await runtime.custom_pii_keys(access) or frozenset()
        # The service calls of the request answered with an earlier result are audited as replays.
        with noting_replays():
            try:
                yield access
            except SecurityProblem as problem:
                # A field the caller may not write or filter by: a denied request, audited too.
                if problem.status == 403:
                    refused = problem.action or action
                    await runtime.audit_denied(
                        request, principal, resource, refused, problem, record_id=addressed_record(request)
                    )
                raise
            except grpc.aio.AioRpcError as error:
                await runtime.audit_upstream_denied(request, principal, resource, action, error)
                raise
            finally:
                await access.flush()

    dependency.crm_requirement = (resource, action)  # type: ignore[attr-defined]
    dependency.__name__ = f"require_{resource}_{action}"
    return dependency
