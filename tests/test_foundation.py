"""The ground the rest stands on: the database, the pooler, the test project, runtests.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import connections
from django_tenants.postgresql_backend.base import DatabaseWrapper

from testproject.customers.models import Client, Domain
from testproject.shop.models import Product
from tests.dbtools import (
    ROOT,
    connect,
    connection,
    direct_url,
    fresh_database,
    pool_load,
    pooled_url,
    with_dbname,
)


@pytest.mark.django_db
def test_database_is_postgresql_through_django_tenants():
    assert isinstance(connections["default"], DatabaseWrapper)
    with connection.cursor() as cursor:
        cursor.execute("SELECT version()")
        assert cursor.fetchone()[0].startswith("PostgreSQL ")
    assert connection.schema_name == "public"


@pytest.mark.usefixtures("drop_tenant_schemas")
def test_shared_and_tenant_migrations_apply_and_a_tenant_is_queried_in_its_schema():
    tenant = Client(schema_name="acme", name="Acme")
    tenant.save(verbosity=0)  # django-tenants' own path: creates and migrates the schema
    Domain.objects.create(tenant=tenant, domain="acme.localhost", is_primary=True)

    with tenant:
        Product.objects.create(name="anvil")
        assert list(Product.objects.values_list("name", flat=True)) == ["anvil"]

    with connection.cursor() as cursor:
        cursor.execute('SELECT name FROM "acme".shop_product')
        assert cursor.fetchall() == [("anvil",)]
        cursor.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' "
            "AND tablename = 'shop_product'"
        )
        assert cursor.fetchone()[0] == 0
        cursor.execute('SELECT count(*) FROM "acme".shop_category')
        assert cursor.fetchone()[0] == 3  # the data migration ran in the tenant


@pytest.mark.pooler
def test_pooled_endpoint_is_transaction_pooling():
    pooled = pooled_url()
    with connect(with_dbname(pooled, "pgbouncer")) as admin:
        admin.prepare_threshold = None
        cursor = admin.cursor()
        cursor.execute("SHOW CONFIG")
        config = {row[0]: row[1] for row in cursor.fetchall()}
    assert config["pool_mode"] == "transaction"

    # Under concurrent load consecutive autocommit statements of one client reach different
    # server connections: the very thing that separates django-tenants' SET from its query.
    with pool_load(pooled, ["public"], clients=3), connect(pooled) as conn:
        pids = {conn.execute("SELECT pg_backend_pid()").fetchone()[0] for _ in range(300)}
    assert len(pids) > 1


@pytest.fixture
def cluster_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ts-runtests-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def runtests(args: list[str], cluster_dir: Path, **kwargs):
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "PGBOUNCER_URL"}}
    env["TENANTSAFE_CLUSTER_TMPDIR"] = str(cluster_dir)
    return subprocess.Popen(
        [sys.executable, "runtests.py", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def our_processes(cluster_dir: Path) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if str(cluster_dir) in line]


@pytest.mark.slow
def test_runtests_passes_arguments_through(cluster_dir):
    proc = runtests(
        ["--collect-only", "-q", "tests/test_foundation.py", "-k", "postgresql_through"],
        cluster_dir,
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "tests/test_foundation.py::test_database_is_postgresql_through_django_tenants" in out
    assert "test_runtests_passes_arguments_through" not in out
    assert "1 test collected" in out or "1/" in out


@pytest.mark.slow
def test_runtests_leaves_nothing_running_after_a_failing_run(cluster_dir, tmp_path):
    failing = tmp_path / "test_fails.py"
    failing.write_text("def test_fails():\n    assert 1 == 2\n")
    proc = runtests([str(failing), "--rootdir", str(tmp_path)], cluster_dir)
    out, _ = proc.communicate(timeout=120)

    assert proc.returncode == 1, out
    assert "1 failed" in out
    assert "throwaway PostgreSQL" in out
    assert our_processes(cluster_dir) == []
    assert list(cluster_dir.iterdir()) == []


@pytest.mark.slow
def test_runtests_cleans_up_on_ctrl_c(cluster_dir, tmp_path):
    slow = tmp_path / "test_slow.py"
    started = tmp_path / "started"
    slow.write_text(
        "import pathlib, time\n\ndef test_slow():\n"
        f"    pathlib.Path({str(started)!r}).touch()\n    time.sleep(120)\n"
    )
    proc = runtests([str(slow), "--rootdir", str(tmp_path), "-s"], cluster_dir)
    # Interrupted in the middle of a test, with the cluster running.
    deadline = time.monotonic() + 90
    while not started.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the test never started"
        time.sleep(0.05)
    assert any(cluster_dir.glob("*/data/postmaster.pid"))

    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)

    assert proc.returncode != 0
    assert our_processes(cluster_dir) == []
    assert list(cluster_dir.iterdir()) == []


@pytest.mark.slow
def test_runtests_without_server_or_binaries_says_how_to_install(cluster_dir):
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "PGBOUNCER_URL"}}
    env["TENANTSAFE_PG_BINDIR"] = str(cluster_dir / "no-postgres-here")
    result = subprocess.run(
        # Tests named: the database-free layer does not run first (it needs no server).
        [sys.executable, "runtests.py", "tests/test_foundation.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "tenantsafe: no PostgreSQL server binaries (initdb, pg_ctl) found and DATABASE_URL is "
        "not set; install them (Debian/Ubuntu: apt-get install postgresql) or set DATABASE_URL "
        "to a server, e.g. postgres://user:pass@localhost:5432/tenantsafe"
    ]


@pytest.mark.slow
def test_the_demo_migrates_its_tenants():
    with fresh_database("demo") as name:
        env = {**os.environ, "DATABASE_URL": with_dbname(direct_url(), name)}
        result = subprocess.run(
            [sys.executable, "runtests.py", "--demo"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "migrate_schemas_safe: 3 tenant(s): 3 migrated, 0 already current, 0 failed" in (
            result.stdout
        )
        with connect(with_dbname(direct_url(), name)) as conn:
            counts = [
                conn.execute(f'SELECT count(*) FROM "demo{n}".shop_category').fetchone()[0]
                for n in (1, 2, 3)
            ]
        assert counts == [3, 3, 3]
