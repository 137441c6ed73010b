"""Who is calling and which records they may touch, carried from the gateway in gRPC metadata.

The gateway authenticates and decides the record scope; services apply the scope inside their
queries (`scope_clause`), so lists, counts and paging never include out-of-scope records. With
`CRM_INTERNAL_CALL_SECRET` set, callers sign this metadata and services refuse it unsigned
(`crm_platform.call_auth`).
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from enum import StrEnum

from crm.common.v1 import common_pb2
from sqlalchemy import ColumnElement, Table, and_, false, true

from crm_platform.telemetry import trace_metadata

# Every key of the caller's identity or scopes starts with `x-crm-principal` or `x-crm-scope`: the
# prefixes `call_auth` signs.
PRINCIPAL_KEY = "x-crm-principal-bin"
SCOPE_KEY = "x-crm-scope-bin"
REQUEST_ID_KEY = "x-request-id"


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    roles: tuple[str, ...] = ()
    team: str = ""
    region: str = ""
    name: str = ""
    kind: str = "user"

    def has_role(self, *roles: str) -> bool:
        return any(role in self.roles for role in roles)

    def to_proto(self) -> common_pb2.Principal:
        return common_pb2.Principal(
            user_id=self.user_id,
            name=self.name,
            roles=list(self.roles),
            team=self.team,
            region=self.region,
            kind=self.kind,
        )

    @classmethod
    def from_proto(cls, message: common_pb2.Principal) -> "Principal":
        return cls(
            user_id=message.user_id,
            roles=tuple(message.roles),
            team=message.team,
            region=message.region,
            name=message.name,
            kind=message.kind or "user",
        )


class ScopeKind(StrEnum):
    OWN = "own"
    TEAM = "team"
    REGION = "region"
    ALL = "all"


_SCOPE_TO_PROTO = {
    ScopeKind.OWN: common_pb2.RecordScope.KIND_OWN,
    ScopeKind.TEAM: common_pb2.RecordScope.KIND_TEAM,
    ScopeKind.REGION: common_pb2.RecordScope.KIND_REGION,
    ScopeKind.ALL: common_pb2.RecordScope.KIND_ALL,
}
_SCOPE_FROM_PROTO = {value: key for key, value in _SCOPE_TO_PROTO.items()}


@dataclass(frozen=True, slots=True)
class RecordScope:
    kind: ScopeKind
    owner_id: str = ""
    team: str = ""
    region: str = ""

    def to_proto(self) -> common_pb2.RecordScope:
        return common_pb2.RecordScope(
            kind=_SCOPE_TO_PROTO[self.kind], owner_id=self.owner_id, team=self.team, region=self.region
        )

    @classmethod
    def from_proto(cls, message: common_pb2.RecordScope) -> "RecordScope":
        # An unspecified scope grants nothing: a missing or garbled header must never widen access.
        kind = _SCOPE_FROM_PROTO.get(message.kind, ScopeKind.OWN)
        return cls(kind=kind, owner_id=message.owner_id, team=message.team, region=message.region)

    def allows(self, *, owner_id: str | None, team: str | None, region: str | None) -> bool:
        """The in-memory twin of `scope_clause`, for records already loaded."""
        match self.kind:
            case ScopeKind.ALL:
                return True
            case ScopeKind.OWN:
                return bool(self.owner_id) and owner_id == self.owner_id
            case ScopeKind.TEAM:
                return bool(self.team) and team == self.team
            case ScopeKind.REGION:
                return bool(self.region) and region == self.region


# Internal calls (jobs, consumers, service-to-service) act for the system with full scope.
SYSTEM = Principal(user_id="system", roles=("system",), kind="system")
ALL_RECORDS = RecordScope(ScopeKind.ALL)


@dataclass(slots=True)
class CallContext:
    principal: Principal = SYSTEM
    scope: RecordScope = ALL_RECORDS
    request_id: str = ""


_SYSTEM_CONTEXT = CallContext()
_call_context: ContextVar[CallContext | None] = ContextVar("crm_call_context", default=None)


def _current() -> CallContext:
    return _call_context.get() or _SYSTEM_CONTEXT


def current_principal() -> Principal:
    return _current().principal


def current_scope() -> RecordScope:
    return _current().scope


def current_request_id() -> str:
    return _current().request_id


@contextmanager
def acting_as(principal: Principal, scope: RecordScope, request_id: str = "") -> Iterator[None]:
    token = _call_context.set(CallContext(principal=principal, scope=scope, request_id=request_id))
    try:
        yield
    finally:
        _call_context.reset(token)


def outgoing_metadata(
    principal: Principal, scope: RecordScope, request_id: str = ""
) -> tuple[tuple[str, str | bytes], ...]:
    """Metadata the gateway (or a service calling another) attaches to a gRPC call: the caller, its
    record scope, the request id and the current trace context."""
    metadata: list[tuple[str, str | bytes]] = [
        (PRINCIPAL_KEY, principal.to_proto().SerializeToString()),
        (SCOPE_KEY, scope.to_proto().SerializeToString()),
    ]
    if request_id:
        metadata.append((REQUEST_ID_KEY, request_id))
    metadata.extend(trace_metadata())
    return tuple(metadata)


def resource_scope_key(resource: str) -> str:
    """The metadata key of the caller's record scope on another `resource` than the call's own: sent
    with a call to a service that writes that resource through its owner for the caller (a lead
    conversion's accounts, contacts and deals)."""
    return f"x-crm-scope-{resource}-bin"


def resource_scope_from_metadata(
    metadata: Sequence[tuple[str, str | bytes]] | None, resource: str
) -> RecordScope | None:
    """The caller's scope on `resource` as `resource_scope_key` carries it; None when not sent."""
    value = dict(metadata or ()).get(resource_scope_key(resource))
    if not isinstance(value, bytes):
        return None
    return RecordScope.from_proto(common_pb2.RecordScope.FromString(value))


def context_from_metadata(metadata: Sequence[tuple[str, str | bytes]] | None) -> CallContext:
    """Reads what `outgoing_metadata` wrote; a call without a principal runs as nobody in scope `own`."""
    values = dict(metadata or ())
    principal_bytes = values.get(PRINCIPAL_KEY)
    scope_bytes = values.get(SCOPE_KEY)
    request_id = values.get(REQUEST_ID_KEY, "")
    if isinstance(principal_bytes, bytes):
        principal = Principal.from_proto(common_pb2.Principal.FromString(principal_bytes))
    else:
        principal = Principal(user_id="", kind="anonymous")
    if isinstance(scope_bytes, bytes):
        scope = RecordScope.from_proto(common_pb2.RecordScope.FromString(scope_bytes))
    else:
        scope = RecordScope(ScopeKind.OWN, owner_id=principal.user_id)
    return CallContext(
        principal=principal,
        scope=scope,
        request_id=request_id if isinstance(request_id, str) else request_id.decode(),
    )


def scope_clause(table: Table, scope: RecordScope) -> ColumnElement[bool]:
    """A WHERE clause limiting `table` (columns owner_id, team, region) to the scope."""
    match scope.kind:
        case ScopeKind.ALL:
            return true()
        case ScopeKind.OWN:
            return table.c.owner_id == scope.owner_id if scope.owner_id else false()
        case ScopeKind.TEAM:
            return table.c.team == scope.team if scope.team else false()
        case ScopeKind.REGION:
            return and_(table.c.region == scope.region) if scope.region else false()
