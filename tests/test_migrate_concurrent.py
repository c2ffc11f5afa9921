"""Two deploys at once, directly connected, with a non-atomic CREATE INDEX CONCURRENTLY."""

from __future__ import annotations

import re

import pytest

from tests.dbtools import (
    connect,
    direct_url,
    fresh_database,
    manage,
    manage_at_once,
    register_tenants,
    with_dbname,
)

pytestmark = pytest.mark.slow

TENANTS = ["c1", "c2", "c3", "c4"]


def test_concurrent_runs_with_a_concurrent_index_migrate_each_tenant_once():
    # A waiter blocked in pg_advisory_xact_lock would hold a snapshot that the holder's
    # CREATE INDEX CONCURRENTLY waits for: the two runs would wait for each other forever.
    with fresh_database("cc") as name:
        url = with_dbname(direct_url(), name)
        assert manage(url, "migrate_schemas_safe", "--shared", "-v0").returncode == 0
        register_tenants(url, TENANTS)
        runs = manage_at_once(url, "migrate_schemas_safe", "--tenant", timeout=240)

        assert [status for status, _, _ in runs] == [0, 0], [err[-2000:] for _, _, err in runs]
        both = "".join(out for _, out, _ in runs)
        for schema in TENANTS:
            applied = re.findall(
                rf"standard:{schema}\] +Applying search\.0002_term_index_concurrently", both
            )
            assert len(applied) == 1, schema
        with connect(url) as conn:
            rows = conn.execute(
                "SELECT schemaname FROM pg_indexes WHERE indexname = 'search_term_idx' ORDER BY 1"
            ).fetchall()
        assert [row[0] for row in rows] == TENANTS
