"""Helpers of the ``citus`` tests: a database on the Citus cluster, where its schemas live."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from typing import Any

import pytest

from testproject import citus_cluster
from testproject.dbtools import connect, manage, register_tenants, with_dbname

# Every Citus test: in one xdist process (``--dist loadgroup``, pyproject's addopts), one after
# the other. Some stop a worker node of the cluster they all share, which would fail whatever
# another process ran on it meanwhile.
CITUS = [pytest.mark.citus, pytest.mark.slow, pytest.mark.xdist_group("citus")]

# The deploy these tests model goes through pgbouncer: no CREATE INDEX CONCURRENTLY migration.
POOLER_SAFE = {"TESTPROJECT_POOLER_SAFE": "1"}
# tenantsafe's own tables, emptied between tests.
OWN_TABLES = ("tenantsafe_lease", "tenantsafe_spare", "tenantsafe_recording")


@dataclass
class CitusDatabase:
    name: str
    # The coordinator, directly and through pgbouncer (transaction pooling).
    url: str
    pooled: str
    env: dict[str, str]
    # The schemas it had before any tenant: never dropped between tests.
    baseline: set[str] = field(default_factory=set)

    @classmethod
    def create(cls, env: dict[str, str], name: str, *, sharding: bool = True) -> CitusDatabase:
        citus_cluster.drop_database(env, name)
        url = citus_cluster.create_database(env, name, sharding=sharding)
        return cls(name, url, with_dbname(env["CITUS_PGBOUNCER_URL"], name), env)

    @property
    def worker_ports(self) -> list[int]:
        return [int(url.rsplit(":", 1)[1].split("/")[0]) for url in self.worker_urls]

    @property
    def worker_urls(self) -> list[str]:
        return [with_dbname(url, self.name) for url in self.env["CITUS_WORKER_URLS"].split()]

    def migrate_public(self) -> None:
        result = self.manage("migrate_schemas", "--shared", "-v0", pooled=False)
        assert result.returncode == 0, result.stderr
        self.baseline = {row[0] for row in self.sql("SELECT nspname FROM pg_namespace")}

    def manage(
        self, *args: str, pooled: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``manage.py`` in a subprocess, through pgbouncer unless ``pooled=False``."""
        url = self.pooled if pooled else self.url
        result: subprocess.CompletedProcess[str] = manage(
            url, *args, env={**POOLER_SAFE, **(env or {})}
        )
        return result

    def connection(self) -> Any:
        """A direct autocommit connection to the coordinator (close it: ``with``)."""
        return connect(self.url)

    def sql(self, statement: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        with connect(self.url) as conn:
            cursor = conn.execute(statement, params)
            return cursor.fetchall() if cursor.description else []

    def nodes(self) -> dict[str, int | None]:
        """The worker port each distributed schema lives on (None: no table yet)."""
        return dict(
            self.sql(
                "SELECT s.schema_name::text, min(h.nodeport) FROM citus_schemas s "
                "LEFT JOIN citus_shards h ON h.colocation_id = s.colocation_id GROUP BY 1"
            )
        )


def clean(database: CitusDatabase) -> None:
    """Drop every schema a test made, and empty the tenant and tenantsafe tables."""
    with connect(database.url) as conn:
        names = [row[0] for row in conn.execute("SELECT nspname FROM pg_namespace").fetchall()]
        for name in sorted(set(names) - database.baseline):
            conn.execute('DROP SCHEMA "%s" CASCADE' % name.replace('"', '""'))
        conn.execute("DELETE FROM public.customers_domain")
        conn.execute("DELETE FROM public.customers_client")
        for table in OWN_TABLES:
            if conn.execute("SELECT to_regclass(%s)", [f"public.{table}"]).fetchone()[0]:
                conn.execute(f"DELETE FROM public.{table}")


def tenants(database: CitusDatabase, names: list[str]) -> None:
    """Tenant rows and schemas, migrated (through pgbouncer)."""
    register_tenants(database.url, names)
    result = database.manage("migrate_schemas_safe", "--tenant", "-v0")
    assert result.returncode == 0, result.stderr[-3000:]
