"""The pytest plugin, run through pytester in subprocesses with pytest-xdist."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.dbtools import (
    ROOT,
    connect,
    direct_url,
    fingerprint,
    fresh_database,
    manage,
    schemas_named,
    with_dbname,
)

pytestmark = pytest.mark.slow

TENANTS = ["alpha", "beta"]

CONFTEST = """
import pytest


@pytest.fixture(scope="session")
def tenantsafe_tenant_fields():
    return lambda schema: {"name": schema.title()}
"""

SHARED_DATABASE = """

@pytest.fixture(scope="session")
def django_db_setup():
    # pytest-django's pattern for an existing database that every worker shares.
    pass
"""

TEST_FUNCTIONS = """
import pytest
from django.db import connection

from testproject.customers.models import Client
from testproject.shop.models import Product


@pytest.mark.parametrize("n", range(4))
def test_each_test_starts_clean(tenant, n):
    assert connection.schema_name == "alpha"
    assert Product.objects.count() == 0
    Product.objects.create(name=f"product {n}")
    assert Product.objects.count() == 1


def test_the_client_reaches_the_tenant_through_its_domain(tenant, tenant_client):
    Product.objects.create(name="lamp")

    response = tenant_client.get("/products/")

    assert response.status_code == 200
    assert response.json() == {"schema": "alpha", "products": ["lamp"]}


def test_the_session_tenants(tenants, db):
    assert list(tenants) == ["alpha", "beta"]
    assert all(t._skip_auto_migrate for t in tenants.values())
    assert sorted(Client.objects.values_list("schema_name", flat=True))[:2] == ["alpha", "beta"]
    assert tenants["beta"].get_primary_domain().domain == "beta.localhost"


def test_the_connection_is_back_on_public(db):
    # Runs after the tests above (same file, --dist loadfile).
    assert connection.schema_name == "public"


@pytest.mark.tenant("gamma")
def test_the_marker_picks_another_tenant(tenant, tenant_client):
    assert connection.schema_name == "gamma"
    assert tenant.name == "Gamma"
    assert tenant_client.get("/products/").json() == {"schema": "gamma", "products": []}


def test_the_factory_creates_committed_tenants(tenant_factory, db):
    delta = tenant_factory("delta")
    assert (delta.name, tenant_factory("delta").pk) == ("Delta", delta.pk)
"""

TEST_UNITTEST = """
import pytest
from django.db import connection

from tenantsafe.testing import TenantTestCase
from testproject.shop.models import Category


@pytest.mark.usefixtures("tenants")
class CatalogTests(TenantTestCase):
    tenant_schema_name = "beta"
    tenant_fields = {"name": "Beta"}

    @classmethod
    def setUpTestData(cls):
        cls.tools = Category.objects.create(name="tools")

    def test_set_up_test_data_ran_in_the_tenant(self):
        assert connection.schema_name == "beta"
        assert Category.objects.get(name="tools") == self.tools
        Category.objects.create(name="garden")

    def test_each_test_is_rolled_back(self):
        assert not Category.objects.filter(name="garden").exists()
        Category.objects.create(name="garden")

    def test_the_client_reaches_the_tenant(self):
        response = self.tenant_client.get("/products/")
        assert response.json() == {"schema": "beta", "products": []}
"""

OUTCOMES = {"passed": 12}
# What pytest-django warns when it cannot drop a test database (another session is on it).
TEARDOWN_WARNING = "Error when trying to teardown test databases"


def project(pytester: pytest.Pytester, *, shared: bool = False) -> None:
    pytester.makeini(
        "[pytest]\n"
        "DJANGO_SETTINGS_MODULE = testproject.settings\n"
        f"pythonpath = {ROOT}\n"
        f"tenantsafe_tenants = {' '.join(TENANTS)}\n"
        "filterwarnings = ignore::DeprecationWarning:django_tenants.*\n"
    )
    pytester.makeconftest(CONFTEST + (SHARED_DATABASE if shared else ""))
    pytester.makepyfile(test_functions=TEST_FUNCTIONS, test_unittest=TEST_UNITTEST)


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        "-n",
        "2",
        "--dist",
        "loadfile",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:benchmark",
        *args,
        timeout=300,
    )


@pytest.fixture
def base_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A database name of its own, so the runs' test databases are theirs alone."""
    name = f"tsplug_{uuid.uuid4().hex[:8]}"
    url = with_dbname(direct_url(), name)
    monkeypatch.setenv("DATABASE_URL", url)
    yield name
    with connect(with_dbname(direct_url(), "postgres")) as conn:
        for worker in ("gw0", "gw1"):
            conn.execute(f'DROP DATABASE IF EXISTS "test_{name}_{worker}" WITH (FORCE)')


def tenant_rows(url: str) -> dict[str, Any]:
    with connect(url) as conn:
        rows = conn.execute(
            "SELECT c.schema_name, c.id, count(d.id), "
            "(SELECT count(*) FROM pg_namespace WHERE nspname = c.schema_name) "
            "FROM customers_client c LEFT JOIN customers_domain d ON d.tenant_id = c.id "
            "GROUP BY c.id ORDER BY 1"
        ).fetchall()
    return {schema: (pk, domains, schemas) for schema, pk, domains, schemas in rows}


def applied(url: str, schema: str) -> Any:
    with connect(url) as conn:
        return conn.execute(f'SELECT max(applied) FROM "{schema}".django_migrations').fetchone()


def test_each_xdist_worker_gets_its_tenants_and_connections_are_closed(pytester, base_url):
    project(pytester)

    # An unclosed connection of ours would make dropping the test databases fail.
    result = run(pytester, "-W", f"error:{TEARDOWN_WARNING}:pytest.PytestWarning")

    result.assert_outcomes(**OUTCOMES)
    with connect(with_dbname(direct_url(), "postgres")) as conn:
        left = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", [f"test_{base_url}%"]
        ).fetchall()
    assert left == []


def test_reuse_db_keeps_and_reuses_each_workers_tenants(pytester, base_url):
    project(pytester)

    run(pytester, "--reuse-db").assert_outcomes(**OUTCOMES)
    urls = [with_dbname(direct_url(), f"test_{base_url}_{w}") for w in ("gw0", "gw1")]
    first = [tenant_rows(url) for url in urls]
    stamps = [applied(url, "alpha") for url in urls]
    for rows in first:
        # One row, one domain and one schema per tenant, in each worker's database.
        assert {name: rows[name][1:] for name in TENANTS} == {name: (1, 1) for name in TENANTS}

    run(pytester, "--reuse-db").assert_outcomes(**OUTCOMES)

    # The same session tenants (same pks), and alpha's migrations were not run again. (The
    # marker's and the factory's tenants land in whichever database ran that file.)
    def session_rows(rows: dict[str, Any]) -> dict[str, Any]:
        return {name: rows[name] for name in TENANTS}

    assert [session_rows(tenant_rows(url)) for url in urls] == [session_rows(r) for r in first]
    assert [applied(url, "alpha") for url in urls] == stamps


def test_workers_sharing_one_existing_database(pytester, monkeypatch):
    with fresh_database("tsshared") as name:
        url = with_dbname(direct_url(), name)
        migrated = manage(url, "migrate_schemas_safe", "--shared", "-v", "0")
        assert migrated.returncode == 0, migrated.stderr
        monkeypatch.setenv("DATABASE_URL", url)
        project(pytester, shared=True)

        run(pytester).assert_outcomes(**OUTCOMES)

        rows = tenant_rows(url)
        assert {name: rows[name][1:] for name in rows} == {
            name: (1, 1) for name in ["alpha", "beta", "delta", "gamma"]
        }
        # Nothing a test wrote is left: every test ran in a transaction that was rolled back.
        with connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM alpha.shop_product").fetchone() == (0,)
            assert conn.execute(
                "SELECT count(*) FROM beta.shop_category WHERE name IN ('tools', 'garden')"
            ).fetchone() == (0,)
        # The same schema whichever worker provisioned it (sequences aside: the rolled back
        # inserts of the tests moved them on).
        alpha, beta = fingerprint(url, "alpha"), fingerprint(url, "beta")
        alpha.pop("sequences")
        beta.pop("sequences")
        assert alpha == beta


def test_the_plugin_imports_without_django_configured():
    # pytest loads it for every session, Django project or not.
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    probe = "import sys, tenantsafe.plugin; print(sorted(m for m in sys.modules if 'django' in m))"
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=False
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# create_tenant's recordings, shared by the workers of an xdist session through a file, each
# worker on a test database of its own.
COUNT_MIGRATIONS = """

def pytest_sessionstart(session):
    import os
    from django_tenants.signals import schema_pre_migration

    def count(sender, schema_name, **kwargs):
        if schema_name != "public":
            with open(os.environ["TS_MIGRATIONS_LOG"], "a") as log:
                log.write(os.environ.get("PYTEST_XDIST_WORKER", "-") + " " + schema_name + "\\n")

    schema_pre_migration.connect(count, weak=False)
"""


@pytest.mark.usefixtures("drop_tenant_schemas", "fresh_recordings")
def test_the_workers_of_a_session_record_once_in_total(pytester, base_url, tmp_path, monkeypatch):
    log = tmp_path / "migrations.log"
    log.touch()
    monkeypatch.setenv("TS_MIGRATIONS_LOG", str(log))
    project(pytester)
    pytester.makeconftest(CONFTEST + COUNT_MIGRATIONS)

    # --reuse-db keeps the workers' databases for a look (base_url drops them).
    run(pytester, "--reuse-db").assert_outcomes(**OUTCOMES)

    # Two workers, two session tenants each, and one migration: the others replayed it.
    lines = log.read_text().splitlines()
    assert len(lines) == 1, lines
    for worker in ("gw0", "gw1"):
        target = with_dbname(direct_url(), f"test_{base_url}_{worker}")
        assert {"alpha", "beta"} <= set(schemas_named(target, ["alpha", "beta"]))
        # (The tests' rolled-back inserts moved sequences on: compare what they leave alone.)
        for schema in ("alpha", "beta"):
            assert ("shop", "0003_product_sku") in fingerprint(target, schema)["migrations"]
