"""`make run`'s environment: every setting can be overridden, and addresses follow the overrides."""

from pathlib import Path

import pytest
from crm_devstack.__main__ import _ports
from crm_devstack.components import installed_services, stack_environment

pytestmark = pytest.mark.unit


def test_a_moved_service_port_moves_the_addresses_that_point_at_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRM_ACCOUNTS_GRPC_PORT", "6002")
    env = stack_environment(data_dir=tmp_path, bootstrap="127.0.0.1:9092", gateway_port=8080)
    assert env["CRM_ACCOUNTS_GRPC_PORT"] == "6002"
    assert env["CRM_GATEWAY_ACCOUNTS_TARGET"] == "127.0.0.1:6002"
    assert env["CRM_LEADS_ACCOUNTS_TARGET"] == "127.0.0.1:6002"
    assert env["CRM_GATEWAY_SALES_TARGET"] == env["CRM_LEADS_SALES_TARGET"] == "127.0.0.1:50053"


def test_an_explicit_target_wins_over_the_derived_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRM_GATEWAY_SALES_TARGET", "sales.example:443")
    env = stack_environment(data_dir=tmp_path, bootstrap="127.0.0.1:9092", gateway_port=8080)
    assert env["CRM_GATEWAY_SALES_TARGET"] == "sales.example:443"


def test_the_stacks_processes_sign_their_calls_to_each_other(tmp_path: Path) -> None:
    env = stack_environment(data_dir=tmp_path, bootstrap="127.0.0.1:9092", gateway_port=8080)

    assert len(env["CRM_INTERNAL_CALL_SECRET"]) >= 32


def test_the_ports_checked_before_start_are_every_port_the_stack_listens_on(tmp_path: Path) -> None:
    """A busy metrics port, too, is said before start, not met by a service that crashes."""
    env = stack_environment(data_dir=tmp_path, bootstrap="127.0.0.1:9092", gateway_port=8080)

    checked = set(_ports(env, "127.0.0.1:9092", 8080))

    listening = {8080, 9092, int(env["CRM_GATEWAY_METRICS_PORT"])}
    for service in installed_services():
        listening |= {int(env[f"{service.env_prefix}GRPC_PORT"]), int(env[f"{service.env_prefix}METRICS_PORT"])}
    assert checked == listening and len(listening) == 3 + 2 * len(installed_services())
