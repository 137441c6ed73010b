"""Fixtures every test suite in the repository may use (PostgreSQL, broker, topics)."""

pytest_plugins = ["crm_platform.testing.fixtures"]
