"""Fixtures every test suite in the repository may use (PostgreSQL, broker, topics)."""

import pytest

pytest_plugins = ["crm_platform.testing.fixtures"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Groups for `make test`'s workers (`--dist loadgroup`): a file's tests run in one worker, so its
    module fixtures start once; every e2e test runs in one worker, so the session's stack starts
    once, and no two stacks hold more PostgreSQL connections at once than a default server allows."""
    for item in items:
        group = "e2e" if item.get_closest_marker("e2e") else item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(group))
