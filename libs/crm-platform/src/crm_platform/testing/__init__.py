"""Test infrastructure shared by every service: real PostgreSQL databases and a real broker.

Where they come from, in order (ARCHITECTURE.md §8): URLs given in the environment
(`CRM_TEST_POSTGRES_URL`, `CRM_TEST_KAFKA_BOOTSTRAP`); testcontainers when a Docker engine is
reachable; the local PostgreSQL on 127.0.0.1:5432 and a tansu broker started here; SQLite as the
last fallback for the database. With `CI=true` a missing PostgreSQL or broker fails the test.
"""
