"""Recycling connections after N schemas (tenantsafe.recycling): directly, and through
pgbouncer with other clients on the pool."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest
from django.db import transaction
from django.test import SimpleTestCase, override_settings

from tenantsafe import memory, recycling
from tenantsafe.checks import check_recycling
from tenantsafe.testing import create_tenant
from tests.dbtools import (
    ROOT,
    connect,
    connection,
    database_url,
    direct_url,
    doctor_json,
    fresh_database,
    manage,
    pool_load,
    pooled_url,
    register_tenants,
    scalar,
    sql,
    with_dbname,
)

TENANT_DB = pytest.mark.usefixtures("drop_tenant_schemas")


def backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


def visit(tenant) -> int:
    """A query in ``tenant``'s schema; the backend that ran it."""
    connection.set_tenant(tenant)
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*), pg_backend_pid() FROM shop_product")
        return int(cursor.fetchone()[1])


@TENANT_DB
@override_settings(TENANTSAFE_RECYCLE_AFTER_SCHEMAS=2)
def test_a_direct_connection_is_closed_after_n_schemas_and_reopened(caplog):
    a, b, c = (create_tenant(name, name=name) for name in ("ra", "rb", "rc"))
    connection.close()
    caplog.set_level(logging.INFO, logger="tenantsafe.recycling")

    first = visit(a)
    assert recycling.recycle_if_due() == []
    # The same schema again and public (every request's) do not count.
    assert visit(a) == first
    connection.set_schema_to_public()
    assert backend_pid() == first
    assert recycling.recycle_if_due() == []
    assert visit(b) == first
    assert recycling.recycle_if_due() == ["default"]

    second = visit(c)
    assert second != first
    assert recycling.touched(connection) == 1
    assert caplog.messages == ["recycled connection 'default' after 2 schemas"]
    # The first backend ended with the connection that Django closed.
    assert not scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [first])


@TENANT_DB
@override_settings(TENANTSAFE_RECYCLE_AFTER_SCHEMAS=2)
def test_never_inside_a_transaction():
    a, b = (create_tenant(name, name=name) for name in ("ta", "tb"))
    connection.close()
    with transaction.atomic():
        pid = visit(a)
        visit(b)
        assert recycling.recycle_if_due() == []
        connection.set_tenant(b)
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO notes_note (title, body, pinned) VALUES ('kept', '', false)"
            )
        assert backend_pid() == pid
    assert sql("SELECT count(*) FROM tb.notes_note WHERE title = 'kept'") == [(1,)]
    assert recycling.recycle_if_due() == ["default"]


@TENANT_DB
@override_settings(TENANTSAFE_RECYCLE_AFTER_SCHEMAS=None)
def test_off_by_default_counts_nothing():
    a = create_tenant("oa", name="oa")
    connection.close()
    visit(a)
    assert recycling.touched(connection) == 0
    assert recycling.recycle_if_due() == []


@pytest.mark.parametrize(
    ("value", "errors"),
    [(None, 0), (1, 0), (1000, 0), (0, 1), (-5, 1), ("500", 1), (True, 1), (2.5, 1)],
)
def test_the_setting_is_checked(value, errors):
    with override_settings(TENANTSAFE_RECYCLE_AFTER_SCHEMAS=value):
        found = check_recycling()
    assert [m.id for m in found] == ["tenantsafe.E010"] * errors
    if errors:
        assert found[0].msg.startswith(f"TENANTSAFE_RECYCLE_AFTER_SCHEMAS = {value!r} is not")


# Through pgbouncer: a process serving requests (Django's test client: the whole request
# cycle, through django-tenants' middleware) ends a server backend every 3 schemas.
SERVE = textwrap.dedent(
    """
    import json, sys, django
    django.setup()
    from django.conf import settings
    from django.db import connection, transaction
    from django.test import Client
    from tenantsafe import memory, recycling
    from testproject.notes.models import Note
    settings.TENANTSAFE_RUNTIME_GUARD = True
    settings.TENANTSAFE_RECYCLE_AFTER_SCHEMAS = 3
    client = Client()
    served = []
    for schema in sys.argv[1:10]:
        body = client.get("/products/", HTTP_HOST=schema + ".localhost").json()
        served.append([schema, body["schema"], body["products"]])
    # Three more schemas inside one transaction: not recycled in it, and all of it commits.
    from testproject.customers.models import Client as Tenant
    inside = []
    with transaction.atomic():
        for schema in sys.argv[10:]:
            connection.set_tenant(Tenant.objects.get(schema_name=schema))
            Note.objects.create(title="in one transaction")
        inside.append(recycling.recycle_if_due())
    inside.append(recycling.recycle_if_due())
    print(json.dumps({"served": served, "inside": inside}))
    """
)


POOLER_SAFE = {"TESTPROJECT_POOLER_SAFE": "1"}
NAMES = [f"p{n}" for n in range(12)]


@pytest.mark.pooler
@pytest.mark.slow
def test_through_pgbouncer_a_server_backend_ends_every_n_schemas():
    pooled = pooled_url()
    with fresh_database("recycle") as database:
        direct = with_dbname(direct_url(), database)
        assert (
            manage(direct, "migrate_schemas_safe", "--shared", "-v0", env=POOLER_SAFE).returncode
            == 0
        )
        register_tenants(direct, NAMES)
        assert (
            manage(direct, "migrate_schemas_safe", "--tenant", "-v0", env=POOLER_SAFE).returncode
            == 0
        )
        with connect(direct) as conn:
            for name in NAMES:
                conn.execute(
                    f'INSERT INTO "{name}".shop_product (name, sku, price_cents) '
                    "VALUES (%s, '', 0)",
                    [f"{name}-x"],
                )
        result = serve(with_dbname(pooled, database))
        answer = json.loads(result.stdout.strip().splitlines()[-1])
        # Every request answered from its own tenant, across the recycling.
        assert answer["served"] == [[n, n, [f"{n}-x"]] for n in NAMES[:9]]
        assert answer["inside"] == [[], ["default"]]
        with connect(direct) as conn:
            for name in NAMES[9:]:
                assert conn.execute(
                    f'SELECT count(*) FROM "{name}".notes_note WHERE title = %s',
                    ["in one transaction"],
                ).fetchone() == (1,)
            # Three after three requests each, one after the transaction (four schemas: the
            # first query in it ran in the last request's).
            ended = [
                int(pid)
                for pid in re.findall(
                    r"recycled connection 'default' after \d schemas \(ended server backend "
                    r"(\d+)\)",
                    result.stderr,
                )
            ]
            assert len(set(ended)) == len(ended) == 4, result.stderr[-3000:]
            deadline = time.monotonic() + 30
            while conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", [ended]
            ).fetchone() != (0,):
                assert time.monotonic() < deadline, "the ended backends are still there"
                time.sleep(0.1)


def serve(url: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        **POOLER_SAFE,
        "DATABASE_URL": url,
        "DJANGO_SETTINGS_MODULE": "testproject.settings",
        "TENANTSAFE_LOG_LEVEL": "INFO",
    }
    busy = [f'"{name}", public' for name in NAMES] + ["public"]
    with pool_load(url, busy, clients=3):
        result = subprocess.run(
            [sys.executable, "-c", SERVE, *NAMES],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# The doctor's estimate (tenantsafe.memory).


@TENANT_DB
def test_the_doctor_reports_what_a_connection_caches():
    for name in ("ma", "mb"):
        create_tenant(name, name=name)
    relations = scalar("SELECT count(*) FROM pg_class WHERE relnamespace = 'ma'::regnamespace")
    # Another backend of the database, whose memory the doctor reads (the server runs here).
    with connect(database_url()) as other:
        pid = other.execute("SELECT pg_backend_pid()").fetchone()[0]
        report, _ = doctor_json()
    cost = report["catalog_memory"]
    assert (cost["tenants"], cost["relations_per_tenant"]) == (2, relations)
    assert cost["estimated_bytes_per_connection"] == 2 * relations * memory.BYTES_PER_RELATION
    assert cost["advice"] == ""
    (seen,) = [b for b in cost["backends"] if b["pid"] == pid]
    assert seen["rss_anon"] > 0
    assert "catalog-memory" not in {f["kind"] for f in report["findings"]}


@TENANT_DB
def test_a_role_that_may_not_read_the_data_directory_gets_the_estimate_without_backends():
    create_tenant("mc", name="mc")
    sql(
        "DO $$ BEGIN CREATE ROLE tenantsafe_unprivileged; "
        "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
    )
    try:
        with transaction.atomic():
            # A role without pg_read_all_settings, for whom data_directory is refused.
            sql("SET LOCAL ROLE tenantsafe_unprivileged")
            cost = memory.estimate("default", 1, "mc")
            # Nothing was refused: the transaction the doctor reads in is still usable.
            assert scalar("SELECT current_user") == "tenantsafe_unprivileged"
            transaction.set_rollback(True)
    finally:
        sql("DROP ROLE tenantsafe_unprivileged")
    relations = scalar("SELECT count(*) FROM pg_class WHERE relnamespace = 'mc'::regnamespace")
    assert (cost.tenants, cost.relations_per_tenant, cost.backends) == (1, relations, ())


class EstimateTests(SimpleTestCase):
    def estimate(self, tenants: int, relations: int, limit: int = 0) -> memory.Estimate:
        served = min(tenants, limit) if limit else tenants
        return memory.Estimate(
            tenants,
            relations,
            limit,
            served * relations * memory.BYTES_PER_RELATION,
            (),
            memory._advice(tenants, relations, limit, pooled=True),
        )

    def test_the_recommendation_keeps_a_connection_near_the_budget(self):
        assert memory.recommended(67) == 1900
        assert memory.recommended(1120) == 110
        assert memory.recommended(10**9) == 1

    def test_ten_thousand_tenants_are_a_warning_with_the_settings_to_use(self):
        found = self.estimate(10_000, 67).finding()
        assert found is not None
        assert (found.level, found.kind) == ("warning", "catalog-memory")
        assert found.message == (
            "10000 tenant(s) of 67 relations each: a server connection that serves every "
            "tenant caches about 654 MB of catalog entries until it ends. Set "
            "TENANTSAFE_RECYCLE_AFTER_SCHEMAS = 1900 (about 124 MB a connection), and "
            "pgbouncer's server_lifetime to a few minutes for the server connections other "
            "clients keep (see Catalog memory in tenantsafe's docs)."
        )

    def test_recycled_often_enough_is_no_finding(self):
        assert self.estimate(10_000, 67, limit=2000).finding() is None
        assert self.estimate(1000, 67).finding() is None

    def test_recycled_too_rarely_is_still_reported(self):
        found = self.estimate(10_000, 67, limit=8000).finding()
        assert found is not None
        assert found.level == "warning"
        assert "a server connection that serves 8000 caches about 523 MB" in found.message
