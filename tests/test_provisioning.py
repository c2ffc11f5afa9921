"""tenantsafe.provisioning: new tenants' schemas by replay, through save() and provision()."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import socket
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import IntegrityError, transaction
from django.db.migrations.loader import MigrationLoader
from django.test.utils import override_settings
from django_tenants.signals import post_schema_sync, schema_needs_to_be_sync

from tenantsafe import locks, schemas, statements
from tenantsafe.errors import ProvisionError
from tenantsafe.provisioning import ensure_recording, provision
from tenantsafe.recording import RecordingStore
from tenantsafe.recording import state as recording_state
from testproject.customers.models import Client, Domain
from tests.dbtools import (
    ROOT,
    add_tenant,
    answer,
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
    signup_code,
    signups_at_once,
    sql,
    with_dbname,
)
from tests.faults import hold, runs, wait_for

pytestmark = pytest.mark.usefixtures("drop_tenant_schemas", "fresh_recordings")

replaying = override_settings(TENANTSAFE_PROVISIONING="replay")


def exists(schema: str) -> bool:
    return schemas.exists("default", schema)


def recordings() -> list[tuple[str, str, bool]]:
    """(state, problem, has statements) of every stored recording."""
    return [
        (state, problem, bool(body))
        for state, problem, body in sql(
            "SELECT state, problem, statements FROM public.tenantsafe_recording ORDER BY 1"
        )
    ]


@pytest.fixture
def synced() -> Iterator[list[tuple[str, str]]]:
    """(signal, schema) for django-tenants' post_schema_sync and schema_needs_to_be_sync."""
    seen: list[tuple[str, str]] = []

    def on_sync(sender: Any, tenant: Any, **kwargs: Any) -> None:
        seen.append(("post_schema_sync", tenant.schema_name))

    def on_needs(sender: Any, tenant: Any, **kwargs: Any) -> None:
        seen.append(("schema_needs_to_be_sync", tenant.schema_name))

    post_schema_sync.connect(on_sync)
    schema_needs_to_be_sync.connect(on_needs)
    yield seen
    post_schema_sync.disconnect(on_sync)
    schema_needs_to_be_sync.disconnect(on_needs)


@replaying
def test_save_replays_every_tenant_after_the_first(reference, migrations_run, synced):
    migrations_run.clear()
    for name in ("first", "second", "third"):
        Client(schema_name=name, name=name.title()).save()

    # The first one is migrated and recorded, the others replay it.
    assert migrations_run == ["first"]
    for name in ("first", "second", "third"):
        assert fingerprint(database_url(), name) == reference, name
    assert synced == [
        ("post_schema_sync", "first"),
        ("post_schema_sync", "second"),
        ("post_schema_sync", "third"),
    ]
    assert [problem for _, problem, _ in recordings()] == [""]


def test_without_the_setting_save_migrates_every_tenant(migrations_run):
    migrations_run.clear()
    Client(schema_name="first", name="First").save(verbosity=0)
    Client(schema_name="second", name="Second").save(verbosity=0)

    assert migrations_run == ["first", "second"]


def test_provision_says_how_and_works_without_the_setting(reference, migrations_run, synced):
    migrations_run.clear()
    synced.clear()
    assert provision(Client(schema_name="first", name="First")) == "migrated"
    assert provision(Client(schema_name="second", name="Second")) == "replayed"
    # A saved tenant without a schema gets one.
    saved = Client(schema_name="third", name="Third")
    saved.auto_create_schema = False
    saved.save()
    assert not exists("third")
    assert provision(saved) == "replayed"

    assert migrations_run == ["first"]
    assert synced == [
        ("post_schema_sync", "first"),
        ("post_schema_sync", "second"),
        ("schema_needs_to_be_sync", "third"),
        ("post_schema_sync", "third"),
    ]
    for name in ("first", "second", "third"):
        assert fingerprint(database_url(), name) == reference, name
    with pytest.raises(ValueError, match='schema "third" exists already'):
        provision(saved)
    sql('CREATE SCHEMA "fourth"')
    with pytest.raises(ValueError, match='schema "fourth" exists already; nothing was saved'):
        provision(Client(schema_name="fourth", name="Fourth"))
    assert not Client.objects.filter(schema_name="fourth").exists()


def test_another_process_replays_the_stored_recording(reference):
    assert provision(Client(schema_name="first", name="First")) == "migrated"

    result = manage(database_url(), "shell", "-c", signup_code("other"))

    assert result.returncode == 0, result.stderr
    assert answer(result.stdout) == {"how": "replayed", "migrated": []}
    assert fingerprint(database_url(), "other") == reference


def claims() -> list[str]:
    """Who holds a claim to record a migration state (a lease on a name no schema has)."""
    return [
        holder
        for (holder,) in sql(
            "SELECT holder FROM public.tenantsafe_lease WHERE schema_name LIKE 'recording:%%'"
        )
    ]


@pytest.mark.slow
def test_concurrent_first_signups_of_a_new_state_migrate_once(reference):
    # The tables exist (empty), so that the gate below can lock the recordings'.
    RecordingStore("default").ensure_schema()
    locks.ensure_table("default")
    names = ["one", "two", "three"]

    # Each signup's first look for a recording waits on the lock: all three find none at once.
    results = signups_at_once(
        database_url(), names, gate="public.tenantsafe_recording", mode="ACCESS EXCLUSIVE"
    )

    assert sorted(r["how"] for r in results) == ["migrated", "replayed", "replayed"]
    # One migration through django-tenants between the three processes: the recorder's.
    (recorder,) = (name for name, r in zip(names, results, strict=True) if r["how"] == "migrated")
    assert [schema for r in results for schema in r["migrated"]] == [recorder]
    for name in names:
        assert fingerprint(database_url(), name) == reference, name
    assert [(problem, has_statements) for _, problem, has_statements in recordings()] == [
        ("", True)
    ]
    assert claims() == []


@pytest.mark.slow
@pytest.mark.parametrize("where", ["this host", "another host"])
def test_a_killed_recorders_claim_does_not_block_the_next_signup(where, reference):
    with runs() as start, hold("post_migrate", "first") as held:
        # A short lease: a claim whose holder cannot be looked for expires 2 s after the
        # holder's last renewal.
        recorder = start(
            database_url(),
            "shell",
            "-c",
            signup_code("first"),
            env={**held.env, "TESTPROJECT_LOCK_LEASE_SECONDS": "2"},
        )
        held.wait(recorder)
        assert claims() == [f"record (pid {recorder.pid} on {socket.gethostname()})"]
        recorder.kill()
        if where == "another host":
            # Its process cannot be looked for from here: only the claim's expiry frees it.
            sql("UPDATE public.tenantsafe_lease SET host = 'elsewhere'")

        started = time.monotonic()
        with override_settings(TENANTSAFE_RECORDING_WAIT_SECONDS=300):
            how = provision(Client(schema_name="second", name="Second"))
        took = time.monotonic() - started

    # It took the dead recorder's claim (at once, or once it expired), not the 300 s bound.
    assert how == "migrated"
    assert took < 60
    assert claims() == []
    assert provision(Client(schema_name="third", name="Third")) == "replayed"
    for name in ("second", "third"):
        assert fingerprint(database_url(), name) == reference, name


FAILING_SIGNUP = """
import time
from tenantsafe.errors import ProvisionError
from tenantsafe.provisioning import provision
from testproject.customers.models import Client
try:
    provision(Client(schema_name="first", name="First"))
except ProvisionError as exc:
    print("failed:", exc.error, flush=True)
time.sleep(300)
"""


@pytest.mark.slow
def test_a_recorder_whose_migration_fails_hands_its_claim_to_a_waiting_signup(
    reference, monkeypatch, caplog
):
    # The next signup's looks for the claim, seen from here: set once it found it taken.
    refused = threading.Event()
    try_lease = locks.try_lease

    def looked(alias: str, name: str, *, purpose: str) -> locks.Lease | None:
        lease = try_lease(alias, name, purpose=purpose)
        if lease is None and name.startswith("recording:"):
            refused.set()
        return lease

    monkeypatch.setattr(locks, "try_lease", looked)
    with runs() as start, hold("seed", "first") as held:
        # A web worker: its signup fails, and it lives on (its claim cannot be taken over as
        # a dead holder's).
        recorder = start(
            database_url(),
            "shell",
            "-c",
            FAILING_SIGNUP,
            env={**held.env, "TESTPROJECT_FAIL_SEED": "first"},
        )
        held.wait(recorder)
        assert claims() == [f"record (pid {recorder.pid} on {socket.gethostname()})"]

        # The recorder's migration fails once the second signup waits for its claim.
        def release_once_refused() -> None:
            refused.wait(120)
            held.release()

        releaser = threading.Thread(target=release_once_refused)
        releaser.start()
        with override_settings(TENANTSAFE_RECORDING_WAIT_SECONDS=120):
            how = provision(Client(schema_name="second", name="Second"))
        releaser.join()
        assert refused.is_set()
        assert recorder.running()
        assert "failed: RuntimeError: seeding failed on purpose in first" in recorder.stdout

    # The claim went to the waiter, which migrated and recorded its tenant at once: not after
    # waiting out the bound.
    assert how == "migrated"
    assert "waited" not in caplog.text
    assert claims() == []
    assert [(problem, has_statements) for _, problem, has_statements in recordings()] == [
        ("", True)
    ]
    assert not exists("first")
    assert not Client.objects.filter(schema_name="first").exists()
    assert provision(Client(schema_name="third", name="Third")) == "replayed"
    for name in ("second", "third"):
        assert fingerprint(database_url(), name) == reference, name


@pytest.mark.slow
def test_a_signup_waits_for_a_live_recorder_only_up_to_the_bound(reference):
    with runs() as start, hold("post_migrate", "first") as held:
        recorder = start(database_url(), "shell", "-c", signup_code("first"), env=held.env)
        held.wait(recorder)

        started = time.monotonic()
        with override_settings(TENANTSAFE_RECORDING_WAIT_SECONDS=1):
            how = provision(Client(schema_name="second", name="Second"))
        took = time.monotonic() - started
        # The recorder is still at it, its claim held.
        assert len(claims()) == 1

        held.release()
        assert recorder.wait() == 0, recorder.stderr
        recorded = answer(recorder.stdout)

    # It waited the full second for the recorder, then migrated itself, as without a claim.
    assert how == "migrated"
    assert took >= 1
    assert recorded == {"how": "migrated", "migrated": ["first"]}
    assert claims() == []
    assert provision(Client(schema_name="third", name="Third")) == "replayed"
    for name in ("first", "second", "third"):
        assert fingerprint(database_url(), name) == reference, name


@pytest.fixture
def nested_notes_migrations(tmp_path, monkeypatch) -> Iterator[Path]:
    """The notes app's migrations, copied into ``<package>.migrations`` (a package in a
    package, as an app's are) and used through MIGRATION_MODULES; yields its directory."""
    package = f"tsapp_{uuid.uuid4().hex[:8]}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    shutil.copytree(
        ROOT / "testproject" / "notes" / "migrations",
        tmp_path / package / "migrations",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with override_settings(MIGRATION_MODULES={"notes": f"{package}.migrations"}):
        yield tmp_path / package / "migrations"


def settled(migrations: Path, window: float) -> None:
    """Until nothing the test wrote around ``migrations`` changed in the last ``window``
    seconds (by its own timestamps, which the state key reads)."""
    paths = [migrations.parent.parent, *migrations.parent.parent.rglob("*")]

    def newest() -> float:
        return max(max(path.stat().st_mtime, path.stat().st_ctime) for path in paths)

    wait_for(
        "the migration files to be older than the window",
        lambda: time.time() - newest() > window,
        timeout=30,
        interval=0.01,
    )


def test_the_state_key_follows_every_migration_file(nested_notes_migrations, monkeypatch):
    builds: list[None] = []

    class Counted(MigrationLoader):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            builds.append(None)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(recording_state, "MigrationLoader", Counted)
    # Files written just now are not trusted: the key is computed every time.
    first = recording_state.state_key("default")
    assert recording_state.state_key("default") == first
    assert len(builds) == 2
    # Once they are older than the window (made short here), it is kept.
    monkeypatch.setattr(recording_state, "_RACY", 0.05)
    settled(nested_notes_migrations, 0.05)
    builds.clear()
    assert recording_state.state_key("default") == first
    assert recording_state.state_key("default") == first
    assert len(builds) == 1

    # An edit that keeps the file's size.
    edited = nested_notes_migrations / "0003_welcome_note.py"
    source = edited.read_text()
    assert source.count("Your workspace is ready.") == 1
    edited.write_text(source.replace("Your workspace is ready.", "Your workspace is READY."))
    assert len(edited.read_text()) == len(source)
    after_edit = recording_state.state_key("default")
    assert after_edit != first
    # A migration added, then removed again.
    added = nested_notes_migrations / "0004_extra.py"
    added.write_text(
        "from django.db import migrations\n\n\n"
        "class Migration(migrations.Migration):\n"
        '    dependencies = [("notes", "0003_welcome_note")]\n'
        "    operations = []\n"
    )
    importlib.invalidate_caches()
    with_added = recording_state.state_key("default")
    assert with_added not in (first, after_edit)
    added.unlink()
    importlib.invalidate_caches()
    assert recording_state.state_key("default") == after_edit
    # A file the kept key was computed from disappears.
    settled(nested_notes_migrations, 0.05)
    builds.clear()
    assert recording_state.state_key("default") == after_edit
    assert recording_state.state_key("default") == after_edit
    assert len(builds) == 1
    edited.unlink()
    importlib.invalidate_caches()
    assert recording_state.state_key("default") not in (first, after_edit, with_added)
    # Another MIGRATION_MODULES (or INSTALLED_APPS, TENANT_APPS, sys.path...) is another key.
    with override_settings(MIGRATION_MODULES={}):
        assert recording_state.state_key("default") != after_edit


def test_a_recording_of_an_older_migration_state_is_not_used(extra_migration, migrations_run):
    provision(Client(schema_name="old", name="Old"))
    (before,) = recordings()

    with override_settings(MIGRATION_MODULES={"notes": extra_migration}):
        migrations_run.clear()
        assert provision(Client(schema_name="new1", name="New one")) == "migrated"
        assert provision(Client(schema_name="new2", name="New two")) == "replayed"

    assert migrations_run == ["new1"]
    for schema in ("new1", "new2"):
        assert sql(f"SELECT label FROM {schema}.notes_extra") == [("added",)]
    # The old state's recording is gone, the new one kept.
    (after,) = recordings()
    assert after[0] != before[0]
    assert after[1:] == ("", True)


CORRUPT = (
    "UPDATE public.tenantsafe_recording SET statements = statements || "
    "E'\\n;\\nCREATE TABLE public.ts_leftover (id integer)\\n;\\nSELECT 1 / 0'"
)


@replaying
def test_a_failing_replay_keeps_nothing_and_the_tenant_is_migrated(reference, migrations_run):
    Client(schema_name="first", name="First").save()
    sql(CORRUPT)
    migrations_run.clear()

    Client(schema_name="second", name="Second").save()

    assert migrations_run == ["second"]
    assert fingerprint(database_url(), "second") == reference
    assert scalar("SELECT to_regclass('public.ts_leftover')") is None
    # The recording is not tried again for this state.
    [(_, problem, has_statements)] = recordings()
    assert "replaying it into second failed" in problem
    assert not has_statements
    migrations_run.clear()
    assert provision(Client(schema_name="third", name="Third")) == "migrated"
    assert migrations_run == ["third"]


@replaying
def test_when_replaying_and_then_migrating_fail_nothing_is_left(monkeypatch):
    Client(schema_name="first", name="First").save()
    sql(CORRUPT)
    monkeypatch.setenv("TESTPROJECT_FAIL_SEED", "failing")

    with pytest.raises(ProvisionError, match="seeding failed on purpose in failing"):
        Client(schema_name="failing", name="Failing").save()

    assert not Client.objects.filter(schema_name="failing").exists()
    assert not Domain.objects.filter(tenant__schema_name="failing").exists()
    assert not exists("failing")
    assert scalar("SELECT to_regclass('public.ts_leftover')") is None


def test_a_schema_unlike_the_recorded_one_is_migrated_instead(reference, migrations_run):
    provision(Client(schema_name="first", name="First"))
    sql("UPDATE public.tenantsafe_recording SET fingerprint = 'tampered'")
    migrations_run.clear()

    assert provision(Client(schema_name="second", name="Second")) == "migrated"

    assert migrations_run == ["second"]
    assert fingerprint(database_url(), "second") == reference
    [(_, problem, _)] = recordings()
    assert problem == "replaying it into second left a schema unlike the recorded one"


def constraint_triggers(schema: str) -> int:
    # The triggers that enforce foreign keys (tenantsafe's fingerprints do not cover them).
    return int(
        scalar(
            "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND t.tgconstraint <> 0",
            [schema],
        )
    )


def test_the_recording_adds_constraints_with_their_tables(reference, migrations_run):
    assert provision(Client(schema_name="first", name="First")) == "migrated"
    assert provision(Client(schema_name="second", name="Second")) == "replayed"

    # Django adds shop_product's foreign key after creating the table; the recording adds it
    # in the CREATE TABLE, where PostgreSQL need not check it against existing rows.
    [statements] = sql("SELECT statements FROM public.tenantsafe_recording")[0]
    [create] = [s for s in statements.split("\n;\n") if s.startswith('CREATE TABLE "shop_product"')]
    assert 'FOREIGN KEY ("category_id") REFERENCES "shop_category" ("id")' in create
    assert 'ALTER TABLE "shop_product" ADD CONSTRAINT' not in statements
    assert fingerprint(database_url(), "second") == reference
    assert constraint_triggers("second") == constraint_triggers("first") > 0
    # And it is enforced, at commit as Django declared it.
    with pytest.raises(IntegrityError, match="shop_product_category_id"), transaction.atomic():
        sql(
            "INSERT INTO second.shop_product (name, sku, category_id, price_cents) "
            "VALUES ('x', 'x', 999, 0)"
        )
    assert scalar("SELECT count(*) FROM second.shop_product") == 0


def test_constraints_stay_after_the_table_when_rows_are_written_in_between(
    new_migrations, migrations_run
):
    # Rows that break the constraint exist until just before it is added: added with the
    # table, it would refuse them.
    package = new_migrations(
        "notes",
        {
            "0004_codes": """
            from django.db import migrations, models


            class Migration(migrations.Migration):
                dependencies = [("notes", "0003_welcome_note")]

                operations = [
                    migrations.CreateModel(
                        name="Code",
                        fields=[
                            ("id", models.AutoField(primary_key=True)),
                            ("code", models.CharField(max_length=10)),
                        ],
                    ),
                    migrations.RunSQL(
                        "INSERT INTO notes_code (code) VALUES ('a'), ('a'), ('b');"
                        "DELETE FROM notes_code WHERE id = 2"
                    ),
                    migrations.AddConstraint(
                        "code", models.UniqueConstraint(fields=["code"], name="notes_code_once")
                    ),
                ]
            """
        },
    )
    with override_settings(MIGRATION_MODULES={"notes": package}):
        assert provision(Client(schema_name="first", name="First")) == "migrated"
        assert provision(Client(schema_name="second", name="Second")) == "replayed"

    [statements] = sql("SELECT statements FROM public.tenantsafe_recording")[0]
    assert 'ALTER TABLE "notes_code" ADD CONSTRAINT "notes_code_once" UNIQUE' in statements
    assert fingerprint(database_url(), "second") == fingerprint(database_url(), "first")
    assert sql("SELECT code FROM second.notes_code ORDER BY id") == [("a",), ("b",)]


def test_folded_constraints_that_leave_another_schema_are_not_used(
    reference, migrations_run, monkeypatch
):
    fold = statements.fold_constraints
    lost = re.compile(
        r', CONSTRAINT "[^"]+" FOREIGN KEY \("category_id"\) REFERENCES "[^"]+" \("id"\)'
        r"(?: DEFERRABLE INITIALLY DEFERRED)?"
    )

    def losing_a_foreign_key(parts: list[str]) -> list[str]:
        # As a mistake in the folding would: the product's foreign key is moved into its
        # CREATE TABLE and lost on the way.
        return [lost.sub("", p) for p in fold(parts)]

    monkeypatch.setattr(statements, "fold_constraints", losing_a_foreign_key)
    assert provision(Client(schema_name="first", name="First")) == "migrated"
    assert provision(Client(schema_name="second", name="Second")) == "replayed"

    # The recording is kept as Django sent it, and replays to the migrated schema.
    [statements_] = sql("SELECT statements FROM public.tenantsafe_recording")[0]
    assert 'ALTER TABLE "shop_product" ADD CONSTRAINT' in statements_
    assert fingerprint(database_url(), "second") == reference


def test_a_recording_that_names_its_tenant_is_never_replayed(monkeypatch, migrations_run):
    monkeypatch.setenv("TESTPROJECT_NOTE_TENANT_PK", "1")
    migrations_run.clear()

    first, second = (
        Client(schema_name="first", name="First"),
        Client(schema_name="second", name="Second"),
    )
    assert provision(first) == "migrated"
    assert provision(second) == "migrated"

    assert migrations_run == ["first", "second"]
    with connect(database_url()) as conn:
        bodies = [
            conn.execute(f"SELECT body FROM {schema}.notes_note").fetchone()[0]
            for schema in ("first", "second")
        ]
    assert bodies == [f"tenant {first.pk}", f"tenant {second.pk}"]
    [(_, problem, _)] = recordings()
    assert "reads the tenant's own row" in problem


@replaying
def test_inside_a_transaction_the_replayed_schema_commits_with_the_row(reference):
    Client(schema_name="first", name="First").save()

    with transaction.atomic():
        Client(schema_name="kept", name="Kept").save()
    with transaction.atomic():
        Client(schema_name="dropped", name="Dropped").save()
        assert exists("dropped")
        transaction.set_rollback(True)

    assert fingerprint(database_url(), "kept") == reference
    assert not exists("dropped")
    assert not Client.objects.filter(schema_name="dropped").exists()


def scratch_schemas() -> list[tuple[Any, ...]]:
    return sql("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'tenantsafe\\_scratch%%'")


def leases() -> int:
    return int(scalar("SELECT count(*) FROM public.tenantsafe_lease"))


def test_ensure_recording_makes_the_first_signup_a_replay(reference, migrations_run):
    migrations_run.clear()

    assert ensure_recording() is True
    assert ensure_recording() is True

    # One scratch schema was migrated, and dropped.
    assert len(migrations_run) == 1
    assert migrations_run[0].startswith("tenantsafe_scratch_")
    assert scratch_schemas() == []
    assert leases() == 0
    assert provision(Client(schema_name="first", name="First")) == "replayed"
    assert len(migrations_run) == 1
    assert fingerprint(database_url(), "first") == reference


def test_ensure_recording_leaves_nothing_when_a_migration_needs_its_tenant(
    monkeypatch, migrations_run
):
    monkeypatch.setenv("TESTPROJECT_NOTE_TENANT_PK", "1")

    assert ensure_recording() is False

    assert scratch_schemas() == []
    assert leases() == 0
    assert recordings() == []
    migrations_run.clear()
    first = Client(schema_name="first", name="First")
    assert provision(first) == "migrated"
    assert sql("SELECT body FROM first.notes_note") == [(f"tenant {first.pk}",)]


POOLED = textwrap.dedent("""
    import json
    from django_tenants.signals import schema_pre_migration
    from tenantsafe.provisioning import provision
    from testproject.customers.models import Client
    seen = []
    schema_pre_migration.connect(
        lambda sender, schema_name, **kw: seen.append(schema_name), weak=False
    )
    hows = [provision(Client(schema_name=f"t{n}", name=f"T {n}")) for n in range(3)]
    print(json.dumps({"hows": hows, "migrated": seen}))
""")


@pytest.mark.slow
@pytest.mark.pooler
def test_through_pgbouncer_with_other_clients_on_the_pool():
    # The project without its non-atomic migration, as a pooled deploy must.
    env = {"TESTPROJECT_POOLER_SAFE": "1"}
    with fresh_database("tsprov") as name:
        target = with_dbname(direct_url(), name)
        pooled = with_dbname(pooled_url(), name)
        migrated = manage(target, "migrate_schemas_safe", "--shared", "-v", "0", env=env)
        assert migrated.returncode == 0, migrated.stderr
        with connect(target) as conn:
            conn.execute("CREATE SCHEMA decoy")
        with pool_load(pooled, ["decoy"]):
            result = manage(pooled, "shell", "-c", POOLED, env=env)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout.strip().splitlines()[-1]) == {
            "hows": ["migrated", "replayed", "replayed"],
            "migrated": ["t0"],
        }
        with connect(target) as conn:
            assert conn.execute(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'decoy'"
            ).fetchone() == (0,)
            # t0's migration was recorded through the pooler, once; t1 and t2 replayed it.
            assert conn.execute(
                "SELECT problem, length(statements) > 0 FROM public.tenantsafe_recording"
            ).fetchall() == [("", True)]
        expected = reference_fingerprint(target, env=env)
        for schema in ("t0", "t1", "t2"):
            assert fingerprint(target, schema) == expected, schema


@pytest.mark.slow
@pytest.mark.pooler
def test_concurrent_first_signups_through_pgbouncer_migrate_once():
    env = {"TESTPROJECT_POOLER_SAFE": "1"}
    names = ["one", "two", "three"]
    with fresh_database("tsprov") as name:
        target = with_dbname(direct_url(), name)
        pooled = with_dbname(pooled_url(), name)
        migrated = manage(target, "migrate_schemas_safe", "--shared", "-v", "0", env=env)
        assert migrated.returncode == 0, migrated.stderr
        # The tables exist (empty), so that the gate can lock the recordings'.
        made = manage(target, "shell", "-c", ENSURE_TABLES, env=env)
        assert made.returncode == 0, made.stderr
        with connect(target) as conn:
            conn.execute("CREATE SCHEMA decoy")
        with pool_load(pooled, ["decoy"]):
            results = signups_at_once(
                pooled, names, gate="public.tenantsafe_recording", mode="ACCESS EXCLUSIVE", env=env
            )

        # The claim holds through the pooler: one of the three migrates and records, the
        # others wait for its recording and replay it.
        assert sorted(r["how"] for r in results) == ["migrated", "replayed", "replayed"]
        assert sorted(schema for r in results for schema in r["migrated"]) == [
            n for n, r in zip(names, results, strict=True) if r["how"] == "migrated"
        ]
        with connect(target) as conn:
            assert conn.execute(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'decoy'"
            ).fetchone() == (0,)
            assert conn.execute(
                "SELECT count(*) FROM public.tenantsafe_lease WHERE schema_name LIKE 'recording:%'"
            ).fetchone() == (0,)
        expected = reference_fingerprint(target, env=env)
        for schema in names:
            assert fingerprint(target, schema) == expected, schema


ENSURE_TABLES = (
    "from tenantsafe import locks, recording; "
    "recording.RecordingStore('default').ensure_schema(); locks.ensure_table('default')"
)


def test_migrate_schemas_safe_records_the_new_state_for_the_first_signup(migrations_run):
    add_tenant("existing")
    with replaying:
        out, _ = migrate(tenant=True)
    assert "migrate_schemas_safe: new tenants are provisioned by replay" in out
    usable = [state for state, problem, has_statements in recordings() if has_statements]
    assert len(usable) == 1
    # The tenant and the scratch schema it recorded on.
    assert len(migrations_run) == 2
    assert migrations_run[0] == "existing"

    migrations_run.clear()
    with replaying:
        Client(schema_name="signup", name="Signup").save()
    assert migrations_run == []
    assert exists("signup")


def test_without_the_setting_migrate_schemas_safe_records_nothing(migrations_run):
    add_tenant("existing")
    out, _ = migrate(tenant=True)
    assert "replay" not in out
    # Migrated in its own schema only: no scratch schema, and nothing stored to replay.
    assert migrations_run == ["existing"]
    assert scratch_schemas() == []
    if scalar("SELECT to_regclass('public.tenantsafe_recording') IS NOT NULL"):
        assert recordings() == []
