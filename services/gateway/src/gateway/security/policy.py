"""The access policy as data: roles, their grants per resource (actions, record scope, field rules).

The YAML file is validated when the gateway starts; a bad file stops it with a message naming the
line. `Policy.decide` is the one decision function: every route, export and composed view asks it.

File shape (see default_policy.yaml):

    version: 1
    resources:
      leads:
        actions: [read, create, update, delete, export, assign]
        fields:
          name: {}
          phone: {type: phone, pii: true}
          id: {readonly: true}
          discount_total: {type: money, default: hidden}   # rule for roles that do not name it
    roles:
      sales_rep:
        grants:
          leads: {actions: [read, create, update], scope: own, fields: {owner_id: read}}
          "*": {...}   # every resource the role does not name (admin)

Field rules: `hidden`, `masked`, `read`, `write`, and `create`: set when the record is created,
read afterwards (a ticket's region an agent files it in, but may not move it out of later).
Field rule of a role for a field, first match wins: the grant's rule for the field (or its nearest
parent path, `line_items` for `line_items.discount_percent`), the grant's `"*"` rule, the
resource's `default` for the field, then `write` when the grant can create or update, else `read`.
`readonly` fields are never writable.

With several roles, only the grants that allow the action in question count, and a role's field
rules apply only where its scope reaches: a record is shown with the most permissive rules among
the read grants whose scope covers it, a rule not tied to one record (filters, derived values) is
that of the widest-scope read grants, and a write is checked against the scope of the grants that
may set every field written. A role that reads the phones of its own leads does not unmask the
phones of all the leads another role lets the caller list.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from crm_platform.principal import Principal, RecordScope, ScopeKind
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_POLICY_PATH = Path(__file__).with_name("default_policy.yaml")
# libyaml's loader when present: the pure-Python one takes about a second for the default file.
_BASE_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _LOADER(_BASE_LOADER):  # type: ignore[valid-type,misc]
    """Refuses duplicate keys: YAML would silently keep the last one, hiding a policy mistake."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_LOADER.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)

# The action vocabulary. Routes map their verbs onto it: state transitions (stage, win, sign,
# submit, ...) are `update`, ownership changes (assign, claim, release, transfer) are `assign`,
# approve/reject decisions are `approve`, bulk import is `create`.
ACTIONS: tuple[str, ...] = ("read", "create", "update", "delete", "export", "assign", "approve")
WRITE_ACTIONS = frozenset({"create", "update"})

FieldType = Literal[
    "text",
    "phone",
    "email",
    "money",
    "number",
    "decimal",
    "percent",
    "date",
    "datetime",
    "bool",
    "url",
    "list",
    "object",
    "id",
]
RuleName = Literal["hidden", "masked", "read", "write", "create"]


class FieldRule(IntEnum):
    """Ordered from least to most permissive, so `max` picks the most permissive."""

    HIDDEN = 0
    MASKED = 1
    READ = 2
    WRITE = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: str) -> "FieldRule":
        return cls[value.upper()]


_SCOPE_ORDER = {ScopeKind.OWN: 0, ScopeKind.TEAM: 1, ScopeKind.REGION: 2, ScopeKind.ALL: 3}


class PolicyError(ValueError):
    """The policy file is invalid; the message names the file and line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FieldSpec(_Strict):
    type: FieldType = "text"
    pii: bool = False
    sensitive: bool = False
    readonly: bool = False
    # A key that lets whoever holds it act (a ticket's CSAT survey key): shown where its routes show
    # it, never an export column.
    credential: bool = False
    default: RuleName | None = None


class ResourceSpec(_Strict):
    description: str = ""
    actions: tuple[str, ...]
    fields: dict[str, FieldSpec | None] = Field(default_factory=dict)

    @field_validator("actions")
    @classmethod
    def _known_actions(cls, actions: tuple[str, ...]) -> tuple[str, ...]:
        for action in actions:
            if action not in ACTIONS:
                raise ValueError(f"unknown action {action!r}; known: {', '.join(ACTIONS)}")
        return actions

    def field(self, name: str) -> FieldSpec:
        return self.fields.get(name) or FieldSpec()


class Grant(_Strict):
    actions: tuple[str, ...]
    scope: ScopeKind = ScopeKind.OWN
    fields: dict[str, RuleName] = Field(default_factory=dict)

    @field_validator("actions")
    @classmethod
    def _known_actions(cls, actions: tuple[str, ...]) -> tuple[str, ...]:
        for action in actions:
            if action not in ACTIONS:
                raise ValueError(f"unknown action {action!r}; known: {', '.join(ACTIONS)}")
        return actions


class RoleSpec(_Strict):
    description: str = ""
    grants: dict[str, Grant] = Field(default_factory=dict)


class PolicyDocument(_Strict):
    version: Literal[1]
    resources: dict[str, ResourceSpec]
    roles: dict[str, RoleSpec]

    @model_validator(mode="after")
    def _references(self) -> "PolicyDocument":
        for role_name, role in self.roles.items():
            for resource_name, grant in role.grants.items():
                if resource_name == "*":
                    continue
                resource = self.resources.get(resource_name)
                if resource is None:
                    raise ValueError(f"roles.{role_name}.grants.{resource_name}: unknown resource {resource_name!r}")
                for action in grant.actions:
                    if action not in resource.actions:
                        raise ValueError(
                            f"roles.{role_name}.grants.{resource_name}: action {action!r} "
                            f"is not an action of {resource_name} ({', '.join(resource.actions)})"
                        )
                for field_name in grant.fields:
                    if field_name != "*" and field_name not in resource.fields:
                        raise ValueError(
                            f"roles.{role_name}.grants.{resource_name}.fields.{field_name}: "
                            f"unknown field {field_name!r} of {resource_name}"
                        )
        return self


# Positions in `Decision.readers`: the read grants a field rule is taken over.
GrantSet = tuple[int, ...]
# Read rules by (path, grant set), shared by the decisions with the same read grants.
ReadRules = dict[tuple[str, GrantSet], FieldRule]
# What the memos shared between requests are keyed by: (resource, the decision's reader roles).
ReaderKey = tuple[str, tuple[str, ...]]
# Bounds each such memo: more distinct role combinations than this in one process is unusual; the
# memo then starts over.
MAX_READER_ROLE_SETS = 1024
Memo = TypeVar("Memo")


def reader_memo(memos: dict[ReaderKey, Memo], key: ReaderKey, new: Callable[[], Memo]) -> Memo:
    """The memo of one (resource, reader roles), made on first use, in a table of bounded size."""
    memo = memos.get(key)
    if memo is None:
        if len(memos) >= MAX_READER_ROLE_SETS:
            memos.clear()
        memo = memos[key] = new()
    return memo


@dataclass(slots=True)
class Decision:
    """What one principal may do with one resource for one action, and with which fields."""

    allowed: bool
    resource: str
    action: str
    scope: RecordScope | None
    principal: Principal
    policy: "Policy"
    reason: str = ""
    # The caller's grants that allow reading, and those that allow this action.
    readers: tuple[Grant, ...] = ()
    acting: tuple[Grant, ...] = ()
    # The roles `readers` come from, in order: decisions with the same ones read fields alike.
    reader_roles: tuple[str, ...] = ()
    _reader_scopes: tuple[RecordScope, ...] = field(init=False)
    _widest_readers: GrantSet = field(init=False)
    # The read rules worked out so far: `Policy.decide` shares them between decisions with the
    # same `reader_roles` (rules depend on the grants only, never on the principal).
    read_rules: ReadRules = field(default_factory=dict, repr=False)
    _write_cache: dict[str, FieldRule] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._reader_scopes = tuple(scope_for(self.principal, grant.scope) for grant in self.readers)
        widest = max((_SCOPE_ORDER[grant.scope] for grant in self.readers), default=0)
        self._widest_readers = tuple(i for i, grant in enumerate(self.readers) if _SCOPE_ORDER[grant.scope] == widest)

    def record_grants(self, record: Mapping[str, Any]) -> GrantSet:
        """The read grants whose scope covers the record; the widest-scope ones when none does
        (a derived record without owner fields)."""
        covering = tuple(i for i, scope in enumerate(self._reader_scopes) if covers(scope, record))
        return covering or self._widest_readers

    def read_rule(self, path: str, grants: GrantSet | None = None) -> FieldRule:
        """How the caller sees the field (hidden, masked or read; write reads as read) on a record
        read under `grants` (`record_grants`). Without `grants`: on every record the caller may
        list, that is under the widest-scope read grants (filters, derived values)."""
        key = (path, self._widest_readers if grants is None else grants)
        rule = self.read_rules.get(key)
        if rule is None:
            rules = [self.policy.field_rule(self.readers[i], self.resource, path) for i in key[1]]
            rule = _cap_read(max(rules, default=FieldRule.HIDDEN))
            self.read_rules[key] = rule
        return rule

    def best_read_rule(self, path: str) -> FieldRule:
        """How the caller sees the field on the records where they see it best (`GET /me`, the
        columns of an export)."""
        return self.read_rule(path, tuple(range(len(self.readers))))

    def write_rule(self, path: str) -> FieldRule:
        """`write` when some grant allowing this action lets the caller set the field."""
        rule = self._write_cache.get(path)
        if rule is None:
            rules = [self.policy.field_rule(grant, self.resource, path, self.action) for grant in self.acting]
            rule = max(rules, default=FieldRule.HIDDEN)
            self._write_cache[path] = rule
        return rule

    def narrow_to_writers(self, paths: Sequence[str]) -> str | None:
        """Keeps only the acting grants that may set every path, and the widest scope among them:
        the owning service then checks the record against the grants that allow this very write.
        Returns the path to refuse instead: the first one no grant may set, or, when no single grant
        may set them all, the first one the widest grant setting some of them may not set."""
        for path in paths:
            if self.write_rule(path) is not FieldRule.WRITE:
                return path

        def writes(grant: Grant, path: str) -> bool:
            return self.policy.field_rule(grant, self.resource, path, self.action) is FieldRule.WRITE

        writers = tuple(grant for grant in self.acting if all(writes(grant, path) for path in paths))
        if not writers:
            partial = [grant for grant in self.acting if any(writes(grant, path) for path in paths)]
            widest = max(partial, key=lambda grant: _SCOPE_ORDER[grant.scope])
            return next(path for path in paths if not writes(widest, path))
        self.acting = writers
        self.scope = scope_for(self.principal, _widest_scope(writers))
        self._write_cache.clear()
        return None


class Policy:
    def __init__(self, document: PolicyDocument, source: str = "<policy>") -> None:
        self.document = document
        self.source = source
        # A loaded policy never changes: what follows from it alone is worked out once.
        self._grants: dict[tuple[str, str], Grant | None] = {}
        self._read_rules: dict[ReaderKey, ReadRules] = {}

    # --- structure -------------------------------------------------------------------------
    @property
    def resources(self) -> Mapping[str, ResourceSpec]:
        return self.document.resources

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.document.roles)

    def resource(self, name: str) -> ResourceSpec:
        try:
            return self.document.resources[name]
        except KeyError:
            raise KeyError(f"unknown resource {name!r} in policy {self.source}") from None

    def grant(self, role: str, resource: str) -> Grant | None:
        key = (role, resource)
        if key in self._grants:
            return self._grants[key]
        role_spec = self.document.roles.get(role)
        if role_spec is None:
            return None  # not remembered: a token may name any role
        grant = role_spec.grants.get(resource) or role_spec.grants.get("*")
        if grant is not None:
            allowed = tuple(action for action in grant.actions if action in self.resource(resource).actions)
            grant = grant if allowed == grant.actions else grant.model_copy(update={"actions": allowed})
        self._grants[key] = grant
        return grant

    # --- field rules -----------------------------------------------------------------------
    def field_rule(self, grant: Grant, resource: str, path: str, action: str = "read") -> FieldRule:
        """The grant's rule for the field when doing `action` (`create` reads as `write` only when
        creating)."""
        spec = self.resource(resource)
        rule = self._explicit_rule(grant, spec, path, action)
        if rule is None:
            rule = FieldRule.WRITE if WRITE_ACTIONS & set(grant.actions) else FieldRule.READ
        readonly = any(spec.field(candidate).readonly for candidate in _path_and_parents(path))
        if rule is FieldRule.WRITE and (readonly or not WRITE_ACTIONS & set(grant.actions)):
            rule = FieldRule.READ
        return rule

    @staticmethod
    def _explicit_rule(grant: Grant, spec: ResourceSpec, path: str, action: str) -> FieldRule | None:
        candidates = _path_and_parents(path)
        named: RuleName | None = None
        for candidate in candidates:
            if candidate in grant.fields:
                named = grant.fields[candidate]
                break
        else:
            named = grant.fields.get("*") or next(
                (default for candidate in candidates if (default := spec.field(candidate).default) is not None), None
            )
        if named == "create":
            return FieldRule.WRITE if action == "create" else FieldRule.READ
        return None if named is None else FieldRule.parse(named)

    # --- the decision ----------------------------------------------------------------------
    def decide(self, principal: Principal, resource: str, action: str) -> Decision:
        """May `principal` do `action` on `resource`, within which records, with which field rules?"""
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        self.resource(resource)  # unknown resource: KeyError naming it
        granted = [(role, g) for role in principal.roles if (g := self.grant(role, resource)) is not None]
        acting = tuple(g for _, g in granted if action in g.actions)
        named_readers = [(role, g) for role, g in granted if "read" in g.actions] or [
            (role, g) for role, g in granted if action in g.actions
        ]
        readers = tuple(g for _, g in named_readers)
        reader_roles = tuple(role for role, _ in named_readers)
        read_rules = self._shared_read_rules(resource, reader_roles)
        if not acting:
            return Decision(
                allowed=False,
                resource=resource,
                action=action,
                scope=None,
                principal=principal,
                policy=self,
                reason=f"no role of the caller may {action} {resource}",
                readers=readers,
                reader_roles=reader_roles,
                read_rules=read_rules,
            )
        return Decision(
            allowed=True,
            resource=resource,
            action=action,
            scope=scope_for(principal, _widest_scope(acting)),
            principal=principal,
            policy=self,
            readers=readers,
            acting=acting,
            reader_roles=reader_roles,
            read_rules=read_rules,
        )

    def _shared_read_rules(self, resource: str, reader_roles: tuple[str, ...]) -> ReadRules:
        return reader_memo(self._read_rules, (resource, reader_roles), dict)

    def effective(self, principal: Principal) -> dict[str, dict[str, Any]]:
        """Per resource: allowed actions, scope per action and field rules (for `GET /me`)."""
        result: dict[str, dict[str, Any]] = {}
        for resource in self.resources:
            decisions = {action: self.decide(principal, resource, action) for action in self.resource(resource).actions}
            allowed = {action: d for action, d in decisions.items() if d.allowed}
            if not allowed:
                continue
            fields: dict[str, str] = {}
            for name in self.resource(resource).fields:
                read = max((d.best_read_rule(name) for d in allowed.values()), default=FieldRule.HIDDEN)
                writable_on = {
                    a for a, d in allowed.items() if a in WRITE_ACTIONS and d.write_rule(name) is FieldRule.WRITE
                }
                if not writable_on or read < FieldRule.READ:
                    fields[name] = read.label
                elif "update" in allowed and writable_on == {"create"}:
                    fields[name] = "create"  # set when creating, read afterwards
                else:
                    fields[name] = FieldRule.WRITE.label
            result[resource] = {
                "actions": sorted(allowed, key=ACTIONS.index),
                "scopes": {action: d.scope.kind.value for action, d in allowed.items() if d.scope is not None},
                "fields": fields,
            }
        return result


def _path_and_parents(path: str) -> list[str]:
    """`line_items.discount_percent` -> [`line_items.discount_percent`, `line_items`]."""
    parts = path.split(".")
    return [".".join(parts[:end]) for end in range(len(parts), 0, -1)]


def _cap_read(rule: FieldRule) -> FieldRule:
    """For presentation `write` means the same as `read`."""
    return min(rule, FieldRule.READ)


def scope_for(principal: Principal, kind: ScopeKind) -> RecordScope:
    return RecordScope(kind=kind, owner_id=principal.user_id, team=principal.team, region=principal.region)


def covers(scope: RecordScope, record: Mapping[str, Any]) -> bool:
    """Is a record the gateway holds within the scope? Its owner (or assignee), team and region decide."""
    owner = record.get("owner_id", record.get("assignee_id"))
    return scope.allows(owner_id=owner, team=record.get("team"), region=record.get("region"))


def reaches(wide: ScopeKind, narrow: ScopeKind) -> bool:
    """Does a scope of kind `wide` hold every record one of kind `narrow` holds (for one caller)?"""
    return _SCOPE_ORDER[wide] >= _SCOPE_ORDER[narrow]


def _widest_scope(grants: Iterable[Grant]) -> ScopeKind:
    return max((grant.scope for grant in grants), key=_SCOPE_ORDER.__getitem__)


# --- loading -------------------------------------------------------------------------------


def load_policy(path: str | Path | None = None) -> Policy:
    """Reads and validates a policy file; `PolicyError` names the file and line of the first problem."""
    file = Path(path) if path else DEFAULT_POLICY_PATH
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        raise PolicyError(f"policy file {file}: cannot read: {error.strerror}") from error
    return parse_policy(text, source=str(file))


def parse_policy(text: str, *, source: str = "<policy>") -> Policy:
    try:
        data = yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "unknown line"
        raise PolicyError(f"policy file {source}, {where}: invalid YAML: {error}") from error
    if not isinstance(data, dict):
        raise PolicyError(f"policy file {source}, line 1: expected a mapping with version, resources and roles")
    try:
        document = PolicyDocument.model_validate(data)
    except ValidationError as error:
        # Line numbers are needed only to report an error: compose the node tree now.
        lines = _line_index(yaml.compose(text, Loader=_LOADER))
        first = error.errors()[0]
        loc = tuple(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        if hint := _loc_from_message(message):
            # Cross-reference errors name their own path: more precise than the model's location.
            loc = hint
            message = message.split(": ", 1)[1]
        line = _nearest_line(lines, loc)
        where = ".".join(loc) or "(document)"
        raise PolicyError(f"policy file {source}, line {line}: {where}: {message}") from error
    return Policy(document, source=source)


def _line_index(node: yaml.Node | None) -> dict[tuple[str, ...], int]:
    """Maps each key path in the YAML to its 1-based line number."""
    index: dict[tuple[str, ...], int] = {}

    def walk(current: yaml.Node, path: tuple[str, ...]) -> None:
        index.setdefault(path, current.start_mark.line + 1)
        if isinstance(current, yaml.MappingNode):
            for key_node, value_node in current.value:
                child = (*path, str(key_node.value))
                index[child] = key_node.start_mark.line + 1
                walk(value_node, child)
        elif isinstance(current, yaml.SequenceNode):
            for position, item in enumerate(current.value):
                walk(item, (*path, str(position)))

    if node is not None:
        walk(node, ())
    return index


def _nearest_line(lines: Mapping[tuple[str, ...], int], loc: tuple[str, ...]) -> int:
    for end in range(len(loc), -1, -1):
        line = lines.get(loc[:end])
        if line is not None:
            return line
    return 1


def _loc_from_message(message: str) -> tuple[str, ...] | None:
    """Cross-reference errors carry their path in the message ("roles.x.grants.y: ...")."""
    head, sep, _ = message.partition(": ")
    parts = tuple(head.split("."))
    return parts if sep and len(parts) > 1 and " " not in head else None


def roles_known(policy: Policy, roles: Iterable[str]) -> tuple[str, ...]:
    """The roles the policy defines; unknown role names grant nothing and are dropped."""
    return tuple(role for role in roles if role in policy.document.roles)
