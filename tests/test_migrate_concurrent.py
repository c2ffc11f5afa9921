"""Two deploys at once, directly connected, with a non-atomic CREATE INDEX CONCURRENTLY."""

from __future__ import annotations

import re

import pytest

from tests import faults
from tests.dbtools import (
    connect,
    direct_url,
    fresh_database,
    manage,
    register_tenants,
    with_dbname,
)

pytestmark = pytest.mark.slow

TENANTS = ["c1", "c2", "c3", "c4"]


def test_concurrent_runs_with_a_concurrent_index_migrate_each_tenant_once():
    # A waiter blocked in pg_advisory_xact_lock would hold a snapshot that the holder's
    # CREATE INDEX CONCURRENTLY waits for: the two runs would wait for each other forever.
    # Forced here: B waits for c1 from before A's first migration of it to after its last.
    with (
        fresh_database("cc") as name,
        faults.runs() as start,
        faults.hold("pre_migrate", "c1") as held,
    ):
        url = with_dbname(direct_url(), name)
        assert manage(url, "migrate_schemas_safe", "--shared", "-v0").returncode == 0
        register_tenants(url, TENANTS)
        a = start(url, "migrate_schemas_safe", "--tenant", env=held.env)
        held.wait(a)
        with faults.lease_gate(url, "c1") as gate:
            b = start(url, "migrate_schemas_safe", "--tenant")
            gate.wait_for_taker(b)
        held.release()
        codes = [a.wait(240), b.wait(240)]

        assert codes == [0, 0], [run.stderr[-2000:] for run in (a, b)]
        outputs = [a.stdout, b.stdout]
        for schema in TENANTS:
            applied = [
                len(
                    re.findall(
                        rf"standard:{schema}\] +Applying search\.0002_term_index_concurrently",
                        out,
                    )
                )
                for out in outputs
            ]
            assert sum(applied) == 1, (schema, applied)
            if schema == "c1":
                assert applied == [1, 0]
        with connect(url) as conn:
            rows = conn.execute(
                "SELECT schemaname FROM pg_indexes WHERE indexname = 'search_term_idx' ORDER BY 1"
            ).fetchall()
        assert [row[0] for row in rows] == TENANTS
