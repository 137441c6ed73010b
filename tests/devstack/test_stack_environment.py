"""`make run`'s environment: every setting can be overridden, and addresses follow the overrides."""

from pathlib import Path

import pytest
from crm_devstack.components import stack_environment

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
