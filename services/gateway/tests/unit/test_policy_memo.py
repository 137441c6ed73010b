"""What `Policy` works out once and shares between decisions (the grants of a role, the read rules
of a set of read grants) must be what the policy gives when worked out afresh, for every caller."""

from itertools import permutations

import pytest
from crm_platform.principal import Principal
from gateway.security.policy import FieldRule, load_policy

pytestmark = pytest.mark.unit

# One policy for every case: each case also sees what the cases before it left shared.
POLICY = load_policy()
ROLE_SETS = [(role,) for role in POLICY.roles] + [
    pair for pair in permutations(("sales_rep", "analyst", "marketing", "sales_manager"), 2)
]
CALLERS = [
    Principal(user_id="u-1", team="team-a", region="north"),
    Principal(user_id="u-2", team="team-b", region="south"),
]


def test_grants_are_those_of_a_fresh_policy() -> None:
    policy, fresh = load_policy(), load_policy()
    for _ in range(2):
        for role in [*policy.roles, "no-such-role"]:
            for resource in policy.resources:
                assert policy.grant(role, resource) == fresh.grant(role, resource), (role, resource)


@pytest.mark.parametrize("roles", ROLE_SETS, ids="+".join)
def test_shared_read_rules_are_those_the_grants_give(roles: tuple[str, ...]) -> None:
    policy = POLICY
    for resource, spec in policy.resources.items():
        for caller in CALLERS:
            principal = Principal(user_id=caller.user_id, roles=roles, team=caller.team, region=caller.region)
            for action in spec.actions:
                decision = policy.decide(principal, resource, action)
                subsets = [None, *((i,) for i in range(len(decision.readers))), tuple(range(len(decision.readers)))]
                for path in spec.fields:
                    for grants in subsets:
                        chosen = decision._widest_readers if grants is None else grants
                        rules = [policy.field_rule(decision.readers[i], resource, path) for i in chosen]
                        expected = min(max(rules, default=FieldRule.HIDDEN), FieldRule.READ)
                        assert decision.read_rule(path, grants) is expected, (roles, resource, action, path, grants)
