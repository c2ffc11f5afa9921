"""Two deploys at once, directly connected, with a non-atomic CREATE INDEX CONCURRENTLY."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.dbtools import (
    ROOT,
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
    with fresh_database("cc") as name:
        url = with_dbname(direct_url(), name)
        assert manage(url, "migrate_schemas_safe", "--shared", "-v0").returncode == 0
        register_tenants(url, TENANTS)
        command = [sys.executable, "-m", "testproject.manage", "migrate_schemas_safe", "--tenant"]
        env = {**os.environ, "DATABASE_URL": url}
        runs = [
            subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        outputs = [run.communicate(timeout=240) for run in runs]

        assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
        both = "".join(out for out, _ in outputs)
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
