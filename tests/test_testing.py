"""tenantsafe.testing.create_tenant: its contract, on the test database (direct connection)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import nullcontext
from typing import Any

import pytest
from django.test.utils import CaptureQueriesContext, override_settings
from django_tenants.signals import post_schema_sync

from tenantsafe import schemas
from tenantsafe.errors import MissingTenantFields, SchemaNameError
from tenantsafe.testing import create_tenant, default_domain
from testproject.customers.models import Client, Domain
from tests.dbtools import (
    ROOT,
    connect,
    connection,
    database_url,
    direct_url,
    fingerprint,
    fresh_database,
    manage,
    pool_load,
    pooled_url,
    reference_fingerprint,
    sql,
    with_dbname,
)

pytestmark = pytest.mark.usefixtures("drop_tenant_schemas", "fresh_recordings")


def exists(schema: str) -> bool:
    return schemas.exists("default", schema)


def test_returns_the_tenant_with_its_primary_domain_and_the_flag_set():
    tenant = create_tenant("alpha", name="Alpha Inc")

    assert isinstance(tenant, Client)
    row = Client.objects.get(schema_name="alpha")
    assert (tenant.pk, tenant.name) == (row.pk, "Alpha Inc")
    assert tenant._skip_auto_migrate is True
    assert list(Domain.objects.filter(tenant=row).values_list("domain", "is_primary")) == [
        ("alpha.localhost", True)
    ]
    assert tenant.get_primary_domain().domain == "alpha.localhost"
    assert ("shop", "0003_product_sku") in fingerprint(database_url(), "alpha")["migrations"]


def test_a_given_domain_is_the_primary_one_and_default_domains_are_hostnames():
    tenant = create_tenant("Beta_Shop", domain="shop.example.com", name="Beta")

    assert tenant.get_primary_domain().domain == "shop.example.com"
    assert default_domain("Beta_Shop") == "beta-shop.localhost"
    # Asking again with another domain adds it, the primary one stays.
    create_tenant("Beta_Shop", domain="beta.example.com")
    assert sorted(Domain.objects.filter(tenant=tenant).values_list("domain", "is_primary")) == [
        ("beta.example.com", False),
        ("shop.example.com", True),
    ]


def test_a_second_call_returns_the_same_row_and_migrates_nothing(migrations_run):
    first = create_tenant("alpha", name="Alpha")
    migrations_run.clear()
    synced: list[str] = []
    post_schema_sync.connect(
        lambda sender, tenant, **kw: synced.append(tenant.schema_name),
        weak=False,
        dispatch_uid="test-synced",
    )
    try:
        second = create_tenant("alpha", name="Another name")
    finally:
        post_schema_sync.disconnect(dispatch_uid="test-synced")

    assert second.pk == first.pk
    assert second.name == "Alpha"  # fields only apply when the row is created
    assert second._skip_auto_migrate is True
    assert migrations_run == []
    assert synced == []
    assert Client.objects.filter(schema_name="alpha").count() == 1
    assert Domain.objects.filter(tenant_id=first.pk).count() == 1


def test_saving_the_returned_tenant_never_creates_or_migrates_its_schema(migrations_run):
    tenant = create_tenant("alpha", name="Alpha")
    sql('DROP SCHEMA "alpha" CASCADE')
    migrations_run.clear()

    tenant.name = "Renamed"
    with CaptureQueriesContext(connection) as queries:
        tenant.save()

    assert Client.objects.get(pk=tenant.pk).name == "Renamed"
    assert not exists("alpha")
    assert migrations_run == []
    statements = [q["sql"].split()[0] for q in queries.captured_queries]
    assert [s for s in statements if s != "SET"] == ["UPDATE"]

    # Cleared, the instance is django-tenants' again: its save() puts the schema back.
    tenant._skip_auto_migrate = False
    tenant.save(verbosity=0)
    assert exists("alpha")
    assert migrations_run == ["alpha"]


def test_the_flag_works_on_any_instance_of_the_tenant_model():
    tenant = Client(schema_name="unmigrated", name="Unmigrated")
    tenant._skip_auto_migrate = True
    tenant.save()

    assert Client.objects.filter(schema_name="unmigrated").exists()
    assert not exists("unmigrated")
    # An instance-level auto_create_schema the user set is left as it was.
    other = Client(schema_name="other", name="Other")
    other.auto_create_schema = False
    other._skip_auto_migrate = True
    other.save()
    other._skip_auto_migrate = False
    other.save()
    assert other.auto_create_schema is False
    assert not exists("other")


def test_schemas_are_identical_to_migrated_ones(reference, migrations_run):
    names = ["first", "second", "third"]
    for name in names:
        create_tenant(name, name=name.title())

    # At most the first is migrated (and recorded); the others are provisioned from it.
    assert migrations_run in ([], ["first"])
    for name in names:
        assert fingerprint(database_url(), name) == reference, name
    with connect(database_url()) as conn:
        rows = conn.execute("SELECT name FROM third.shop_category ORDER BY id").fetchall()
    assert [r[0] for r in rows] == ["books", "games", "music"]


def test_a_missing_schema_is_repaired(reference):
    tenant = create_tenant("gamma", name="Gamma")
    sql('DROP SCHEMA "gamma" CASCADE')

    again = create_tenant("gamma")

    assert again.pk == tenant.pk
    assert fingerprint(database_url(), "gamma") == reference


def test_a_schema_behind_its_migrations_is_migrated(reference):
    create_tenant("delta", name="Delta")
    sql("ALTER TABLE delta.shop_product DROP COLUMN sku")
    sql("DELETE FROM delta.django_migrations WHERE app = 'shop' AND name = '0003_product_sku'")

    create_tenant("delta")

    repaired = fingerprint(database_url(), "delta")
    # Re-recording 0003 moved django_migrations' sequence on; everything else is as fresh.
    assert {k: v for k, v in repaired.items() if k != "sequences"} == {
        k: v for k, v in reference.items() if k != "sequences"
    }


def test_a_row_without_a_domain_gets_one():
    tenant = create_tenant("epsilon", name="Epsilon")
    Domain.objects.filter(tenant=tenant).delete()

    assert create_tenant("epsilon").get_primary_domain().domain == "epsilon.localhost"


@pytest.mark.parametrize("name", ["pg_catalog2", 'bad"name', "semi;colon", "", "x" * 64, "public"])
def test_invalid_schema_names_are_refused_by_name(name):
    with pytest.raises(SchemaNameError) as excinfo:
        create_tenant(name, name="Bad")

    assert repr(name) in str(excinfo.value)
    assert "create_tenant" in str(excinfo.value)
    assert not Client.objects.exists()


def test_a_failing_migration_keeps_neither_row_nor_schema():
    # A process of its own: one with a template for this migration state would replay it.
    script = (
        "from tenantsafe.testing import create_tenant\ncreate_tenant('failing', name='Failing')\n"
    )
    result = manage(database_url(), "shell", "-c", script, env={"TESTPROJECT_FAIL_SEED": "failing"})

    assert result.returncode != 0
    assert (
        "TenantProvisionError: create_tenant('failing'): migrating schema \"failing\" failed: "
        "RuntimeError: seeding failed on purpose in failing"
    ) in result.stderr
    assert not Client.objects.filter(schema_name="failing").exists()
    assert not Domain.objects.exists()
    assert not exists("failing")


def test_missing_required_fields_are_named():
    with pytest.raises(MissingTenantFields) as excinfo:
        create_tenant("zeta")

    assert str(excinfo.value) == (
        "create_tenant('zeta'): Client requires name, which was not given; pass it: "
        "create_tenant('zeta', name=...)."
    )
    assert excinfo.value.fields == ["name"]
    assert not Client.objects.filter(schema_name="zeta").exists()
    assert not exists("zeta")


def test_a_domain_of_another_tenant_is_refused_and_nothing_is_kept():
    create_tenant("eta", name="Eta")

    with pytest.raises(ValueError, match=r"'eta\.localhost' already belongs to tenant 'eta'"):
        create_tenant("theta", domain="eta.localhost", name="Theta")

    assert not Client.objects.filter(schema_name="theta").exists()
    assert not exists("theta")


def test_works_inside_a_transaction_and_commits_on_its_own():
    from django.db import transaction

    kappa = create_tenant("kappa", name="Kappa")
    with transaction.atomic():
        connection.set_tenant(kappa)
        tenant = create_tenant("iota", name="Iota")
        assert connection.schema_name == "kappa"
        transaction.set_rollback(True)

    # The caller's rollback does not take the tenant with it.
    assert Client.objects.filter(pk=tenant.pk).exists()
    assert exists("iota")


def test_the_callers_tenant_stays_active():
    kappa = create_tenant("kappa", name="Kappa")
    connection.set_tenant(kappa)

    create_tenant("lambda", name="Lambda")
    create_tenant("lambda")

    assert connection.schema_name == "kappa"
    assert connection.tenant == kappa
    connection.set_schema_to_public()


def extra_rows(schema: str) -> list[str]:
    with connect(database_url()) as conn:
        found = conn.execute(
            "SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = 'notes_extra'",
            [schema],
        ).fetchone()
        if not found:
            return []
        return [r[0] for r in conn.execute(f'SELECT label FROM "{schema}".notes_extra')]


def test_a_new_migration_invalidates_the_template(extra_migration, migrations_run):
    before = create_tenant("old", name="Old")
    create_tenant("older", name="Older")  # provisioned from the template, if not already
    assert extra_rows("older") == []

    with override_settings(MIGRATION_MODULES={"notes": extra_migration}):
        migrations_run.clear()
        create_tenant("new1", name="New one")
        create_tenant("new2", name="New two")
        # The existing tenant is behind now: asking for it migrates it.
        again = create_tenant("old")

    assert extra_rows("new1") == ["added"]
    assert extra_rows("new2") == ["added"]
    assert extra_rows("old") == ["added"]
    assert again.pk == before.pk
    # new1 was migrated for the new state (nothing recorded for it yet), new2 came from it.
    assert migrations_run == ["new1", "old"]
    assert fingerprint(database_url(), "new2") == fingerprint(database_url(), "new1")


CONCURRENT = """
import json, os, sys, time
import django
django.setup()
from tenantsafe.testing import create_tenant
go, ready = sys.argv[1], sys.argv[2]
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.005)
tenant = create_tenant("shared", name="Shared")
print(json.dumps({"pk": tenant.pk, "flag": tenant._skip_auto_migrate}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("through", ["direct", pytest.param("pgbouncer", marks=pytest.mark.pooler)])
def test_four_processes_creating_the_same_tenant_at_once(tmp_path, through):
    # Through pgbouncer the project leaves out its non-atomic migration, as a pooled deploy must.
    extra = {"TESTPROJECT_POOLER_SAFE": "1"} if through == "pgbouncer" else {}
    with fresh_database("tscreate") as name:
        target = with_dbname(direct_url(), name)
        client_url = with_dbname(pooled_url(), name) if through == "pgbouncer" else target
        migrated = manage(target, "migrate_schemas_safe", "--shared", "-v", "0", env=extra)
        assert migrated.returncode == 0, migrated.stderr
        with connect(target) as conn:
            conn.execute("CREATE SCHEMA decoy")
        env = {
            **os.environ,
            **extra,
            "DATABASE_URL": client_url,
            "PYTHONPATH": str(ROOT),
            "DJANGO_SETTINGS_MODULE": "testproject.settings",
        }
        go = tmp_path / "go"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", CONCURRENT, str(go), str(tmp_path / f"ready{n}")],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for n in range(4)
        ]
        # Behind the pooler, other clients leave their search_path on the server connections.
        load = pool_load(client_url, ["decoy"]) if through == "pgbouncer" else nullcontext()
        try:
            with load:
                _wait_for(lambda: all((tmp_path / f"ready{n}").exists() for n in range(4)), procs)
                go.touch()
                results = [proc.communicate(timeout=240) for proc in procs]
        finally:
            for proc in procs:
                proc.kill()
        assert [proc.returncode for proc in procs] == [0, 0, 0, 0], [r[1] for r in results]
        answers = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
        assert {a["pk"] for a in answers} == {answers[0]["pk"]}
        assert all(a["flag"] is True for a in answers)
        with connect(target) as conn:
            assert conn.execute(
                "SELECT count(*) FROM customers_client WHERE schema_name = 'shared'"
            ).fetchone() == (1,)
            assert conn.execute("SELECT count(*) FROM customers_domain").fetchone() == (1,)
            assert conn.execute(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'decoy'"
            ).fetchone() == (0,)
        expected = reference_fingerprint(target, env=extra)
        assert fingerprint(target, "shared") == expected


def _wait_for(condition: Any, procs: list[subprocess.Popen[str]], timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        failed = [p for p in procs if p.poll() not in (None, 0)]
        if failed:
            raise AssertionError(failed[0].communicate()[1])
        if time.monotonic() > deadline:
            raise AssertionError("the processes did not start")
        time.sleep(0.02)


def test_a_migration_that_reads_the_tenant_row_is_never_replayed(monkeypatch, migrations_run):
    monkeypatch.setenv("TESTPROJECT_NOTE_TENANT_PK", "1")
    first = create_tenant("first", name="First")
    second = create_tenant("second", name="Second")

    assert migrations_run == ["first", "second"]
    with connect(database_url()) as conn:
        bodies = [
            conn.execute(f"SELECT body FROM {schema}.notes_note").fetchone()[0]
            for schema in ("first", "second")
        ]
    assert bodies == [f"tenant {first.pk}", f"tenant {second.pk}"]


def test_a_recording_file_others_may_write_is_ignored(tmp_path):
    from tenantsafe import recording
    from tenantsafe.recording.files import SharedFiles

    state = recording.state_key("default")
    planted = SharedFiles().path(state, "")
    planted.parent.mkdir()
    planted.parent.chmod(0o777)
    planted.write_text(
        json.dumps({"state": state, "tenant_type": "", "sql": "SELECT 1", "fingerprint": "planted"})
    )

    create_tenant("alpha", name="Alpha")

    # Migrated and recorded; the planted file was never tried (it would have been refused).
    assert sql("SELECT problem, statements <> '' FROM public.tenantsafe_recording") == [("", True)]
