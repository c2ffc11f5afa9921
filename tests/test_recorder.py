"""During a run, Django's "does this schema have django_migrations?" is asked by name (an index
lookup at any number of tenants), with the answer Django's own listing of tables gives."""

from __future__ import annotations

import pytest
from django.db.migrations.recorder import MigrationRecorder
from django.test.utils import CaptureQueriesContext

from tenantsafe.migrate import recorder
from tenantsafe.testing import create_tenant
from tests.dbtools import add_tenant, connection, migrate, recorded, sql

pytestmark = pytest.mark.usefixtures("drop_tenant_schemas")

# What Django's get_table_list sends (it lists every table on the path).
LISTING = "pg_table_is_visible"


def test_asked_by_name_the_answer_is_djangos():
    migrate()
    add_tenant("bare")
    add_tenant("viewed")
    sql('CREATE VIEW "viewed".django_migrations AS SELECT 1 AS id')
    add_tenant("sequenced")
    sql('CREATE SEQUENCE "sequenced".django_migrations')
    add_tenant("partitioned")
    sql('CREATE TABLE "partitioned".django_migrations (id int) PARTITION BY RANGE (id)')
    # The table in another schema on the path does not count: django-tenants lists the
    # connection's schema alone.
    # Views and sequences are not tables to Django's listing; a partitioned table is.
    cases = {
        "public": True,
        "bare": False,
        "viewed": False,
        "sequenced": False,
        "partitioned": True,
    }
    for schema, expected in cases.items():
        connection.set_schema(schema, include_public=True)
        django = MigrationRecorder(connection).has_table()
        with recorder.by_name(), CaptureQueriesContext(connection) as asked:
            by_name = MigrationRecorder(connection).has_table()
        assert (schema, by_name) == (schema, django) == (schema, expected)
        (query,) = [q["sql"] for q in asked.captured_queries if "django_migrations" in q["sql"]]
        assert LISTING not in query
    connection.set_schema_to_public()
    # Restored afterwards: Django's own method lists the tables again.
    with CaptureQueriesContext(connection) as listed:
        assert MigrationRecorder(connection).has_table()
    assert any(LISTING in q["sql"] for q in listed.captured_queries)


def test_a_run_never_lists_every_table_to_find_django_migrations():
    migrate()
    add_tenant("fresh")
    with CaptureQueriesContext(connection) as run:
        migrate("--schema", "fresh", "--no-replay")
    assert ("shop", "0003_product_sku") in recorded("fresh")
    # Django migrated the tenant (its recorder created and filled django_migrations) and
    # public, asking about the table only by name.
    assert not [q["sql"] for q in run.captured_queries if LISTING in q["sql"]]
    assert MigrationRecorder.has_table.__name__ == "has_table"


@pytest.mark.usefixtures("drop_tenant_schemas", "fresh_recordings")
def test_provisioning_by_migrating_never_lists_every_table():
    migrate()
    with CaptureQueriesContext(connection) as made:
        # No recording yet: the first tenant is migrated through Django, and recorded.
        create_tenant("first", name="first")
    assert ("shop", "0003_product_sku") in recorded("first")
    assert any("django_migrations" in q["sql"] for q in made.captured_queries)
    assert not [q["sql"] for q in made.captured_queries if LISTING in q["sql"]]
