"""tenantsafe_doctor: each finding from a database put in that state."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test.utils import CaptureQueriesContext

from tenantsafe import doctor
from testproject.notes.models import Note
from tests.dbtools import (
    add_tenant,
    connection,
    direct_url,
    doctor_json,
    fresh_database,
    manage,
    other_connections_queries,
    pool_load,
    pooled_url,
    reads,
    register_tenants,
    sql,
    with_dbname,
)

pytestmark = pytest.mark.usefixtures("drop_tenant_schemas")


def migrated(*names: str) -> None:
    for name in names:
        add_tenant(name)
    call_command("migrate_schemas_safe", tenant=True, verbosity=0)


def findings(report: dict[str, Any], level: str | None = None) -> list[tuple[str, str | None]]:
    return [
        (f["kind"], f["schema"])
        for f in report["findings"]
        if f["kind"] != "pooler" and (level is None or f["level"] == level)
    ]


def test_healthy_project_passes_with_exit_0():
    migrated("alpha", "beta")

    out = io.StringIO()
    call_command("tenantsafe_doctor", stdout=out)
    text = out.getvalue()

    assert text.startswith('tenantsafe doctor: database "default", 2 tenant(s), 2 current, read in')
    assert text.rstrip().endswith("No problems found.")
    assert 'INFO   -       Database "default" connects directly to PostgreSQL (detected: ' in text
    report, status = doctor_json()
    assert status == 0
    assert findings(report) == []
    assert report["counts"] == {"error": 0, "warning": 0, "info": 1}
    assert (report["tenants"], report["current"]) == (2, 2)
    assert report["pooler"]["pooled"] is False


def test_tenant_row_without_schema_is_an_error():
    migrated("alpha")
    add_tenant("gone", with_schema=False)

    report, status = doctor_json()

    assert status == 1
    assert findings(report) == [("missing-schema", "gone")]
    assert report["findings"][0] == {
        "level": "error",
        "kind": "missing-schema",
        "schema": "gone",
        "message": 'The tenant row for "gone" has no schema. Create and migrate it with '
        "migrate_schemas_safe --create-missing, or delete the row.",
        "details": {},
    }


def test_schema_without_row_is_a_warning_that_fails_on_warning():
    migrated("alpha", "beta")
    sql("DELETE FROM customers_client WHERE schema_name = 'beta'")
    sql("CREATE SCHEMA unrelated")  # no django_migrations: not a tenant's schema

    report, status = doctor_json()
    assert status == 0
    assert findings(report) == [("schema-without-tenant", "beta")]
    assert report["findings"][0]["message"] == (
        'Schema "beta" holds a django_migrations table, but no tenant row names it. Drop it if '
        "its tenant is gone, or add the tenant row back."
    )
    _, status = doctor_json("--fail-on", "warning")
    assert status == 1


def test_tenants_behind_on_migrations_with_what_each_misses():
    migrated("alpha", "beta", "gamma")
    sql("DELETE FROM \"beta\".django_migrations WHERE app = 'shop' AND name = '0003_product_sku'")
    sql("DELETE FROM \"beta\".django_migrations WHERE app = 'notes' AND name <> '0001_initial'")
    add_tenant("fresh")

    report, status = doctor_json()

    assert status == 0
    assert findings(report, "warning") == [("behind", "beta"), ("behind", "fresh")]
    beta, fresh = (f for f in report["findings"] if f["kind"] == "behind")
    assert beta["details"] == {
        "missing": {"notes": ["0002_tag", "0003_welcome_note"], "shop": ["0003_product_sku"]}
    }
    assert beta["message"] == (
        'Tenant "beta" is behind on migrations (notes: 0002_tag, 0003_welcome_note; shop: '
        "0003_product_sku). Run migrate_schemas_safe."
    )
    assert fresh["details"] == {"missing": "all"}
    assert (report["tenants"], report["current"]) == (4, 2)

    out = io.StringIO()
    call_command("tenantsafe_doctor", stdout=out)
    assert 'WARNING  "beta"   Tenant "beta" is behind on migrations (notes: 0002_tag' in (
        out.getvalue()
    )
    assert out.getvalue().rstrip().endswith("0 error(s), 2 warning(s).")


def test_tenant_app_tables_in_public_are_an_error():
    migrated("alpha")
    # What a tenant migration run with public's search_path leaves behind.
    connection.set_schema_to_public()
    with connection.schema_editor() as editor:
        editor.create_model(Note)
    try:
        report, status = doctor_json()
    finally:
        # Flushing does not drop tables: leave public as the other tests expect it.
        connection.set_schema_to_public()
        with connection.schema_editor() as editor:
            editor.delete_model(Note)

    assert status == 1
    (leak,) = [f for f in report["findings"] if f["kind"] == "tenant-tables-in-public"]
    assert leak["schema"] == "public"
    assert leak["details"] == {"tables": ["notes_note"], "apps": ["notes"]}
    assert leak["message"].startswith(
        "The public schema holds 1 table(s) of tenant-only apps (notes_note): "
    )


def test_invalid_schema_names_are_reported_as_json_strings():
    bad = 'evil"; DROP SCHEMA public; --\n'
    add_tenant(bad, with_schema=False)

    report, status = doctor_json()
    raw = io.StringIO()
    with pytest.raises(CommandError):
        call_command("tenantsafe_doctor", "--json", stdout=raw)

    assert status == 1
    assert findings(report) == [("invalid-schema-name", bad)]
    assert '"schema": "evil\\"; DROP SCHEMA public; --\\n"' in raw.getvalue()
    table = io.StringIO()
    with pytest.raises(CommandError):
        call_command("tenantsafe_doctor", stdout=table)
    assert '"evil\\"; DROP SCHEMA public; --\\n"' in table.getvalue()


def test_a_few_queries_whatever_the_number_of_tenants():
    migrated("t1", "t2")
    with CaptureQueriesContext(connection) as few, other_connections_queries() as few_others:
        doctor.diagnose("default")
    migrated("t3", "t4", "t5", "t6")
    with CaptureQueriesContext(connection) as more, other_connections_queries() as others:
        report = doctor.diagnose("default")
    assert report.current == 6
    statements = reads(more.captured_queries)
    assert len(more.captured_queries) == len(few.captured_queries)
    # Tenant rows, schemas, django_migrations tables, their rows, the lease rows (runs that
    # did not finish), whether there is a recording (tenantsafe.drift), a tenant's relations
    # and the backends (tenantsafe.memory), public's tables, the port.
    assert len(statements) <= 12
    # On connections of their own: content types and permissions, catalog digests.
    assert [len(reads(q)) for q in (few_others, others)] == [2, 2]


@pytest.mark.pooler
@pytest.mark.slow
def test_pooler_detected_and_exit_status_of_the_command():
    pooled = pooled_url()
    with fresh_database("doctor") as name:
        url = with_dbname(direct_url(), name)
        env = {"TESTPROJECT_POOLER_SAFE": "1"}
        assert manage(url, "migrate_schemas_safe", "--shared", "-v0", env=env).returncode == 0
        register_tenants(url, ["alpha"], create_schemas=False)

        with pool_load(with_dbname(pooled, name), ['"alpha", public', "public"]):
            result = manage(with_dbname(pooled, name), "tenantsafe_doctor", "--json", env=env)

        assert result.returncode == 1
        report = json.loads(result.stdout)
        assert report["pooler"]["pooled"] is True
        assert report["pooler"]["source"] == "detected"
        assert report["pooler"]["server_port"] != report["pooler"]["configured_port"]
        assert findings(report) == [("check", None), ("missing-schema", "alpha")]
        assert report["findings"][0]["details"] == {"id": "tenantsafe.W003"}
        assert "tenantsafe_doctor: 1 error(s), 1 warning(s) (--fail-on error)." in result.stderr

        result = manage(url, "tenantsafe_doctor", env=env)
        assert result.returncode == 1
        assert "connects directly to PostgreSQL" in result.stdout


def test_tenants_whose_post_migrate_did_not_finish():
    migrated("whole", "cut", "doubled", "left")
    # What a run killed during post_migrate leaves: migrations recorded, content types and
    # permissions not (yet) created.
    sql('DELETE FROM "cut".auth_permission')
    sql('DELETE FROM "cut".django_content_type')
    sql(
        'INSERT INTO "doubled".django_migrations (app, name, applied) '
        "SELECT app, name, now() FROM \"doubled\".django_migrations WHERE app = 'shop'"
    )
    sql(
        "INSERT INTO tenantsafe_lease (schema_name, token, holder, host, pid, acquired_at, "
        "expires_at) VALUES ('left', gen_random_uuid(), 'migrate_schemas_safe (pid 1 on h)', "
        "'h', 1, now(), now())"
    )

    report, status = doctor_json("--fail-on", "warning")

    assert status == 1
    assert sorted(findings(report)) == [
        ("contenttypes-behind", "cut"),
        ("duplicate-migrations", "doubled"),
        ("incomplete", "left"),
        ("permissions-behind", "cut"),
    ]
    by_kind = {f["kind"]: f for f in report["findings"]}
    expected_types = by_kind["contenttypes-behind"]["details"]["expected"]
    assert by_kind["contenttypes-behind"]["details"] == {"found": 0, "expected": expected_types}
    assert by_kind["contenttypes-behind"]["message"].startswith(
        f'Tenant "cut" has 0 of the {expected_types} content types the installed apps define'
    )
    assert "shop.0001_initial" in by_kind["duplicate-migrations"]["details"]["migrations"]
    assert "did not finish" in by_kind["incomplete"]["message"]
    # The run that completes them: content types back, the lease row gone, "left" current.
    call_command("migrate_schemas_safe", tenant=True, verbosity=0, no_skip=True)
    sql(
        'DELETE FROM "doubled".django_migrations WHERE id NOT IN '
        '(SELECT min(id) FROM "doubled".django_migrations GROUP BY app, name)'
    )
    report, status = doctor_json("--fail-on", "warning")
    assert findings(report) == []
    assert status == 0


def test_rows_too_long_or_colliding_after_truncation():
    long_a, long_b = "é" * 32 + "a", "é" * 32 + "b"
    for name in (long_a, long_b):
        sql(
            "INSERT INTO customers_client (schema_name, name, created_on) VALUES (%s, %s, now())",
            [name, "x"],
        )

    report, status = doctor_json()

    assert status == 1
    assert sorted(findings(report, "error")) == [
        ("invalid-schema-name", long_a),
        ("invalid-schema-name", long_b),
        ("schema-name-collision", "é" * 31),
    ]
    invalid = next(f for f in report["findings"] if f["kind"] == "invalid-schema-name")
    assert "it is 65 bytes in UTF-8 (33 characters)" in invalid["message"]
