"""Spare schemas: filled by tenantsafe_spares and migrate_schemas_safe, claimed by provision()."""

from __future__ import annotations

import io
import json
import re
import textwrap

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import transaction
from django.test.utils import override_settings

from tenantsafe import doctor, spares
from tenantsafe.provisioning import ensure_recording, provision
from testproject.customers.models import Client
from tests.dbtools import (
    add_tenant,
    at_the_gate,
    connect,
    database_url,
    direct_url,
    fingerprint,
    fresh_database,
    manage,
    migrate,
    pool_load,
    pooled_url,
    reference_fingerprint,
    scalar,
    signups_at_once,
    sql,
    start_manage,
    with_dbname,
)

pytestmark = pytest.mark.usefixtures("drop_tenant_schemas", "fresh_recordings")


def spares_command(*args: str) -> tuple[str, str, int]:
    """``call_command("tenantsafe_spares", ...)``: (stdout, stderr, exit status)."""
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("tenantsafe_spares", *args, stdout=out, stderr=err)
    except CommandError as exc:
        err.write(str(exc))
        return out.getvalue(), err.getvalue(), exc.returncode
    return out.getvalue(), err.getvalue(), 0


def spare_rows() -> list[str]:
    return [name for (name,) in sql("SELECT schema_name FROM public.tenantsafe_spare ORDER BY 1")]


def spare_schemas() -> list[str]:
    return [
        name
        for (name,) in sql(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'tenantsafe\\_spare\\_%%' "
            "ORDER BY 1"
        )
    ]


def test_the_command_fills_spares_and_a_second_run_makes_none(reference, migrations_run):
    migrations_run.clear()

    out, err, status = spares_command("--count", "2")

    assert (status, err) == (0, "")
    assert out == "tenantsafe_spares: 2 of 2 spare schema(s) ready (2 made).\n"
    assert len(spare_schemas()) == 2
    assert spare_rows() == spare_schemas()
    # One scratch schema was migrated to record the state; the spares are replays of it.
    assert len(migrations_run) == 1
    for name in spare_schemas():
        assert fingerprint(database_url(), name) == reference, name

    before = spare_schemas()
    with override_settings(TENANTSAFE_SPARE_SCHEMAS=2):
        out, _, status = spares_command()
    assert (out, status) == ("tenantsafe_spares: 2 of 2 spare schema(s) ready (0 made).\n", 0)
    assert spare_schemas() == before
    assert len(migrations_run) == 1


def test_without_the_setting_the_command_makes_nothing():
    out, _, status = spares_command()

    assert (out, status) == ("tenantsafe_spares: 0 of 0 spare schema(s) ready (0 made).\n", 0)
    assert spare_schemas() == []


def test_a_state_that_cannot_be_replayed_is_a_command_error(monkeypatch):
    # The test project's data migration then reads its tenant's row: never replayed.
    monkeypatch.setenv("TESTPROJECT_NOTE_TENANT_PK", "1")
    provision(Client(schema_name="first", name="First"))

    out, err, status = spares_command("--count", "1")

    assert status == 1
    assert "0 of 1 spare schema(s) ready" in out
    assert "the current migration state cannot be replayed" in err
    assert "reads the tenant's own row" in err
    assert spare_schemas() == []


def test_a_signup_claims_a_spare_that_works_like_a_migrated_schema(reference, migrations_run):
    spares_command("--count", "1")
    (spare,) = spare_schemas()
    migrations_run.clear()

    assert provision(Client(schema_name="acme", name="Acme")) == "spare"

    assert migrations_run == []
    assert spare_schemas() == []
    assert spare_rows() == []
    assert fingerprint(database_url(), "acme") == reference
    assert scalar("SELECT count(*) FROM pg_namespace WHERE nspname = %s", [spare]) == 0
    # Serial and identity defaults point at the renamed schema's own sequences.
    before = scalar("SELECT max(id) FROM acme.notes_note")
    sql("INSERT INTO acme.notes_note (title, body, pinned) VALUES ('after', 'claim', false)")
    assert scalar("SELECT id FROM acme.notes_note WHERE title = 'after'") == before + 1
    sql("INSERT INTO acme.notes_tag (label) VALUES ('claimed')")
    assert scalar("SELECT count(*) FROM acme.notes_tag WHERE label = 'claimed'") == 1
    # Without spares left, the next signup replays.
    assert provision(Client(schema_name="next", name="Next")) == "replayed"
    assert fingerprint(database_url(), "next") == reference


def test_save_with_the_setting_claims_a_spare(reference):
    spares_command("--count", "1")

    with override_settings(TENANTSAFE_PROVISIONING="replay"):
        Client(schema_name="acme", name="Acme").save()

    assert spare_schemas() == []
    assert fingerprint(database_url(), "acme") == reference


@override_settings(TENANTSAFE_PROVISIONING="replay")
def test_a_claim_inside_a_rolled_back_transaction_leaves_the_spare(reference):
    spares_command("--count", "1")
    (spare,) = spare_schemas()

    with transaction.atomic():
        Client(schema_name="dropped", name="Dropped").save()
        assert spare_schemas() == []
        transaction.set_rollback(True)

    assert spare_schemas() == [spare]
    assert spare_rows() == [spare]
    assert scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'dropped'") == 0
    assert not Client.objects.filter(schema_name="dropped").exists()
    with transaction.atomic():
        Client(schema_name="kept", name="Kept").save()
    assert spare_schemas() == []
    assert fingerprint(database_url(), "kept") == reference


def test_four_concurrent_signups_share_two_spares(reference):
    spares_command("--count", "2")
    names = ["one", "two", "three", "four"]

    # Every claim waits on the lock, so the four claims run at the same moment.
    results = signups_at_once(
        database_url(), names, gate="public.tenantsafe_spare", mode="EXCLUSIVE"
    )

    assert sorted(r["how"] for r in results) == ["replayed", "replayed", "spare", "spare"]
    assert spare_schemas() == []
    for name in names:
        assert fingerprint(database_url(), name) == reference, name


def test_a_spare_of_an_older_migration_state_is_never_handed_out(extra_migration):
    spares_command("--count", "2")
    old = spare_schemas()

    with override_settings(MIGRATION_MODULES={"notes": extra_migration}):
        # The new state is recorded (as migrate_schemas_safe does after a deploy): only the
        # spares' state stops new1 from getting one.
        assert ensure_recording() is True
        assert provision(Client(schema_name="new1", name="New one")) == "replayed"
        assert sql("SELECT label FROM new1.notes_extra") == [("added",)]
        # The old spares are still there, unclaimed, until the next fill drops them.
        assert spare_schemas() == old

        out, _, status = spares_command("--count", "1")
        assert status == 0
        assert out.splitlines()[0] == (
            "tenantsafe_spares: dropped 2 spare schema(s) of an older migration state."
        )
        (new,) = spare_schemas()
        assert new not in old
        assert provision(Client(schema_name="new2", name="New two")) == "spare"
        assert sql("SELECT label FROM new2.notes_extra") == [("added",)]
        # A serial column's sequence is the renamed schema's own.
        sql("INSERT INTO new2.notes_extra (label) VALUES ('claimed')")
        assert sql("SELECT id, label FROM new2.notes_extra ORDER BY id") == [
            (1, "added"),
            (2, "claimed"),
        ]


def test_count_0_only_drops_the_spares_of_an_older_state():
    spares_command("--count", "2")
    stale, kept = spare_schemas()
    sql(
        "UPDATE public.tenantsafe_spare SET state = 'an older state' WHERE schema_name = %s",
        [stale],
    )

    out, err, status = spares_command("--count", "0")

    assert (status, err) == (0, "")
    assert out.splitlines() == [
        "tenantsafe_spares: dropped 1 spare schema(s) of an older migration state.",
        "tenantsafe_spares: 1 of 0 spare schema(s) ready (0 made).",
    ]
    # The current one is kept: 0 asks for none to be made, not for any to be dropped.
    assert spare_schemas() == spare_rows() == [kept]


FILL = ["tenantsafe_spares", "--count", "2"]


@pytest.mark.slow
def test_concurrent_fills_make_no_more_than_asked_between_them(reference):
    assert ensure_recording() is True
    spares.ensure_table("default")  # to lock it
    url = database_url()

    # Both wait on the spares' table, so they count and make spares at the same moment.
    procs = at_the_gate(
        url,
        "public.tenantsafe_spare",
        "EXCLUSIVE",
        lambda: [start_manage(url, *FILL) for _ in range(2)],
    )
    outputs = [proc.communicate(timeout=300) for proc in procs]

    assert [proc.returncode for proc in procs] == [0, 0], [err for _, err in outputs]
    lines = [
        re.fullmatch(r"tenantsafe_spares: 2 of 2 spare schema\(s\) ready \((\d) made\)\.\n", out)
        for out, _ in outputs
    ]
    assert all(lines), outputs
    made = [int(line[1]) for line in lines if line]
    assert sum(made) == 2
    assert len(spare_schemas()) == 2
    assert spare_rows() == spare_schemas()
    for name in spare_schemas():
        assert fingerprint(url, name) == reference, name


def test_a_tampered_spare_is_dropped_and_the_tenant_replayed(reference):
    spares_command("--count", "1")
    (spare,) = spare_schemas()
    # An index no constraint needs (a foreign key's, say).
    index = scalar(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND NOT EXISTS "
        "(SELECT 1 FROM pg_constraint WHERE conindid = i.indexrelid) ORDER BY 1 LIMIT 1",
        [spare],
    )
    sql(f'DROP INDEX "{spare}"."{index}"')

    assert provision(Client(schema_name="acme", name="Acme")) == "replayed"

    assert fingerprint(database_url(), "acme") == reference
    assert spare_schemas() == []
    assert spare_rows() == []
    # The recording is still trusted: the spare was wrong, not the recording.
    assert provision(Client(schema_name="next", name="Next")) == "replayed"


def test_the_doctor_does_not_report_spares_as_schemas_without_tenant():
    spares_command("--count", "1")
    sql('CREATE SCHEMA "orphan"')
    sql('CREATE TABLE "orphan".django_migrations (id serial)')

    report = doctor.diagnose("default")

    orphans = [f.schema for f in report.findings if f.kind == "schema-without-tenant"]
    assert orphans == ["orphan"]


@override_settings(TENANTSAFE_PROVISIONING="replay", TENANTSAFE_SPARE_SCHEMAS=2)
def test_migrate_schemas_safe_fills_spares(reference):
    add_tenant("existing")

    out, err = migrate(tenant=True)

    assert "migrate_schemas_safe: 2 spare schema(s) ready for new tenants (2 made" in out, err
    assert len(spare_schemas()) == 2
    # Spares are no tenants: a second run migrates only the tenant, and keeps them.
    before = spare_schemas()
    out, _ = migrate(tenant=True, verbosity=2)
    assert not any(name in out for name in before)
    assert "2 spare schema(s) ready for new tenants (0 made" in out
    assert spare_schemas() == before
    assert provision(Client(schema_name="acme", name="Acme")) == "spare"
    assert fingerprint(database_url(), "acme") == reference


def test_without_the_spare_setting_migrate_schemas_safe_makes_none():
    add_tenant("existing")

    with override_settings(TENANTSAFE_PROVISIONING="replay"):
        out, _ = migrate(tenant=True)

    assert "spare" not in out
    assert spare_schemas() == []


POOLED = textwrap.dedent("""
    import json
    from django.core.management import call_command
    from tenantsafe.provisioning import provision
    from testproject.customers.models import Client
    call_command("tenantsafe_spares", "--count", "2", verbosity=0)
    hows = [provision(Client(schema_name=f"t{n}", name=f"T {n}")) for n in range(3)]
    print(json.dumps(hows))
""")


@pytest.mark.slow
@pytest.mark.pooler
def test_spares_through_pgbouncer_with_other_clients_on_the_pool():
    # The project without its non-atomic migration, as a pooled deploy must.
    env = {"TESTPROJECT_POOLER_SAFE": "1"}
    with fresh_database("tsspare") as name:
        target = with_dbname(direct_url(), name)
        pooled = with_dbname(pooled_url(), name)
        migrated = manage(target, "migrate_schemas_safe", "--shared", "-v", "0", env=env)
        assert migrated.returncode == 0, migrated.stderr
        with connect(target) as conn:
            conn.execute("CREATE SCHEMA decoy")
        with pool_load(pooled, ["decoy"]):
            result = manage(pooled, "shell", "-c", POOLED, env=env)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout.strip().splitlines()[-1]) == ["spare", "spare", "replayed"]
        with connect(target) as conn:
            assert conn.execute(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'decoy'"
            ).fetchone() == (0,)
        expected = reference_fingerprint(target, env=env)
        for schema in ("t0", "t1", "t2"):
            assert fingerprint(target, schema) == expected, schema
