"""migrate_schemas_safe through pgbouncer in transaction pooling, with other clients on the pool.

A lone client often gets its own server connection back and hides the bug, so every run here
shares the pool with clients that keep setting other tenants' search paths, as the app servers
of a production deploy do.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests import faults
from tests.dbtools import (
    direct_url,
    fingerprint,
    fresh_database,
    manage,
    pool_load,
    pooled_url,
    public_tables,
    register_tenants,
    summary,
    with_dbname,
)

pytestmark = [pytest.mark.pooler, pytest.mark.slow]

POOLER_SAFE = {"TESTPROJECT_POOLER_SAFE": "1"}
TENANTS = [f"t{n:02d}" for n in range(12)]


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    """A tenant migrated directly by plain django-tenants: what every tenant must look like."""
    pooled_url()
    with fresh_database("ref") as name:
        url = with_dbname(direct_url(), name)
        assert manage(url, "migrate_schemas", "--shared", "-v0", env=POOLER_SAFE).returncode == 0
        register_tenants(url, ["ref"])
        result = manage(url, "migrate_schemas", "--tenant", "-v0", env=POOLER_SAFE)
        assert result.returncode == 0, result.stderr
        return fingerprint(url, "ref")


@pytest.fixture
def pending_tenants() -> Iterator[tuple[str, str]]:
    """A database with public migrated and 12 tenants whose schemas exist, all pending."""
    pooled = pooled_url()
    with fresh_database("pool") as name:
        direct = with_dbname(direct_url(), name)
        result = manage(direct, "migrate_schemas", "--shared", "-v0", env=POOLER_SAFE)
        assert result.returncode == 0, result.stderr
        register_tenants(direct, TENANTS)
        yield direct, with_dbname(pooled, name)


def busy_pool(pooled: str) -> Any:
    return pool_load(pooled, [f'"{name}", public' for name in TENANTS])


@pytest.mark.parametrize("executor", ["standard", "multiprocessing"])
def test_guarded_migration_through_pgbouncer_matches_a_direct_one(
    pending_tenants, reference, executor
):
    direct, pooled = pending_tenants
    public_before = public_tables(direct)

    with busy_pool(pooled):
        result = manage(
            pooled, "migrate_schemas_safe", "--tenant", f"--executor={executor}", env=POOLER_SAFE
        )

    assert result.returncode == 0, result.stderr[-3000:]
    counts = summary(result.stdout)
    assert counts["total"] == counts["migrated"] == 12
    assert counts["current"] == counts["failed"] == 0
    differing = [name for name in TENANTS if fingerprint(direct, name) != reference]
    assert differing == []
    # Only tenantsafe's own lease table is new in public: nothing of any tenant's.
    assert public_tables(direct) - public_before == {"tenantsafe_lease"}
    assert public_before <= public_tables(direct)


def test_plain_migrate_schemas_through_pgbouncer_does_not(pending_tenants, reference):
    """Documents the bug the guard exists for: keep this scenario proven."""
    direct, pooled = pending_tenants

    with busy_pool(pooled):
        result = manage(pooled, "migrate_schemas", "--tenant", env=POOLER_SAFE)

    differing = [name for name in TENANTS if fingerprint(direct, name) != reference]
    assert result.returncode != 0 or differing, "plain migrate_schemas survived the pooler"


def test_two_concurrent_runs_migrate_each_tenant_once(pending_tenants, reference):
    direct, pooled = pending_tenants
    with (
        busy_pool(pooled),
        faults.runs() as start,
        faults.hold("pre_migrate", "t00") as held,
    ):
        # A holds t00 and has migrated nothing of it; B tries to take it meanwhile.
        a = start(pooled, "migrate_schemas_safe", "--tenant", env={**POOLER_SAFE, **held.env})
        held.wait(a)
        with faults.lease_gate(direct, "t00") as gate:
            b = start(pooled, "migrate_schemas_safe", "--tenant", env=POOLER_SAFE)
            gate.wait_for_taker(b)
        held.release()
        runs = [a, b]
        codes = [run.wait(180) for run in runs]
        outputs = [run.stdout for run in runs]
        assert codes == [0, 0], [run.stderr[-3000:] for run in runs]

    counts = [summary(out) for out in outputs]
    assert sum(c["migrated"] for c in counts) == 12
    assert all(c["failed"] == 0 and c["migrated"] + c["current"] == 12 for c in counts)
    # Each tenant's migrations were applied by exactly one of the runs; t00 by A, which held
    # it while B waited.
    applied = [
        [
            len(re.findall(rf"standard:{name}\] +Applying shop\.0001_initial", out))
            for out in outputs
        ]
        for name in TENANTS
    ]
    assert [sum(both) for both in applied] == [1] * 12
    assert applied[0] == [1, 0]
    assert [name for name in TENANTS if fingerprint(direct, name) != reference] == []


def test_non_atomic_migration_is_refused_through_the_pooler_and_runs_directly():
    pooled = pooled_url()
    with fresh_database("conc") as name:
        direct = with_dbname(direct_url(), name)
        via_pool = with_dbname(pooled, name)
        assert manage(direct, "migrate_schemas_safe", "--shared", "-v0").returncode == 0
        register_tenants(direct, ["one", "two"])

        with pool_load(via_pool, ['"one", public', '"two", public']):
            refused = manage(via_pool, "migrate_schemas_safe", "--tenant")

        assert refused.returncode == 1
        assert summary(refused.stdout)["failed"] == 2
        # Both tenants failed the same way: one line names them both.
        (line,) = [row for row in refused.stderr.splitlines() if row.startswith("FAILED ")]
        assert line.startswith("FAILED 2 tenants (one, two): ")
        assert "CREATE INDEX CONCURRENTLY" in line
        assert "cannot run inside a transaction block" in line
        assert "direct (non-pooled) connection" in line
        assert "--database" in line
        assert "Traceback" not in refused.stderr
        # Nothing of it anywhere: no index in any schema, not recorded.
        assert _indexes(direct, "search_term_idx") == []
        assert _recorded(direct, "one", "search") == ["0001_initial"]

        # What the error advises: the same command, its migrations over a direct connection.
        with pool_load(via_pool, ['"one", public', '"two", public']):
            directly = manage(
                via_pool,
                "migrate_schemas_safe",
                "--tenant",
                "--database=direct",
                env={"DATABASE_DIRECT_URL": direct},
            )

        assert directly.returncode == 0, directly.stderr[-3000:]
        assert sorted(_indexes(direct, "search_term_idx")) == ["one", "two"]
        assert _recorded(direct, "two", "search") == [
            "0001_initial",
            "0002_term_index_concurrently",
        ]


def _indexes(url: str, name: str) -> list[str]:
    from tests.dbtools import connect

    with connect(url) as conn:
        rows = conn.execute(
            "SELECT schemaname FROM pg_indexes WHERE indexname = %s", [name]
        ).fetchall()
    return [row[0] for row in rows]


def _recorded(url: str, schema: str, app: str) -> list[str]:
    from tests.dbtools import connect

    with connect(url) as conn:
        rows = conn.execute(
            f'SELECT name FROM "{schema}".django_migrations WHERE app = %s ORDER BY name', [app]
        ).fetchall()
    return [row[0] for row in rows]
