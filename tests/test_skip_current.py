"""migrate_schemas_safe skips the tenants whose django_migrations shows nothing to do, only them."""

from __future__ import annotations

import io
import os
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.core.management.commands.migrate import Command as DjangoMigrate
from django.db import transaction
from django.db.migrations.executor import MigrationExecutor
from django.test import override_settings
from django_tenants.signals import schema_pre_migration

from tenantsafe import plan
from tenantsafe.progress import Progress
from tests.dbtools import (
    add_tenant,
    connect,
    connection,
    direct_url,
    has_table,
    last_output,
    migrate,
    recorded,
    sql,
    with_dbname,
)

pytestmark = pytest.mark.usefixtures("drop_tenant_schemas")

SHOP_LEAF = ("shop", "0003_product_sku")


def other_client() -> Any:
    return connect(with_dbname(direct_url(), connection.settings_dict["NAME"]))


@pytest.fixture
def migrated() -> Iterator[list[str]]:
    """Schemas in which migrate actually ran during the test, in order."""
    seen: list[str] = []

    def receiver(sender: Any, schema_name: str, **kwargs: Any) -> None:
        seen.append(schema_name)

    schema_pre_migration.connect(receiver, dispatch_uid="test_skip_current")
    yield seen
    schema_pre_migration.disconnect(dispatch_uid="test_skip_current")


def current_tenants(*names: str) -> None:
    for name in names:
        add_tenant(name)
    migrate(tenant=True, verbosity=0)


def test_current_tenants_are_skipped_and_counted(migrated):
    current_tenants("alpha", "beta", "gamma")
    migrated.clear()

    out, err = migrate(tenant=True)

    assert migrated == []
    assert "read django_migrations of 3 tenant(s): 3 already current (skipped), 0 to migrate" in out
    assert "3 tenant(s): 0 migrated, 3 already current, 0 failed" in out
    assert err == ""


def test_no_skip_runs_migrate_in_every_tenant(migrated):
    current_tenants("alpha", "beta")
    migrated.clear()

    out, _ = migrate(tenant=True, no_skip=True)

    assert migrated == ["alpha", "beta"]
    assert "read django_migrations" not in out
    assert "2 tenant(s): 0 migrated, 2 already current, 0 failed" in out


def test_one_migration_missing_in_one_tenant(migrated):
    current_tenants("alpha", "beta", "gamma")
    sql('DELETE FROM "beta".django_migrations WHERE app = %s AND name = %s', list(SHOP_LEAF))
    sql('ALTER TABLE "beta".shop_product DROP COLUMN sku')
    migrated.clear()

    out, _ = migrate(tenant=True)

    assert migrated == ["beta"]
    assert "3 tenant(s): 1 migrated, 2 already current, 0 failed" in out
    assert SHOP_LEAF in recorded("beta")
    assert sql(
        "SELECT 1 FROM information_schema.columns WHERE table_schema = 'beta' "
        "AND table_name = 'shop_product' AND column_name = 'sku'"
    )


def test_missing_table_or_schema_is_never_current(migrated):
    current_tenants("alpha")
    add_tenant("fresh")  # schema, no django_migrations
    add_tenant("gone", with_schema=False)
    migrated.clear()

    with pytest.raises(CommandError, match="1 of 3 schema"):
        migrate(tenant=True)
    out, err = last_output()

    assert migrated == ["fresh"]
    assert "3 tenant(s): 1 migrated, 1 already current, 1 failed" in out
    assert 'FAILED gone: Schema "gone" does not exist' in err
    assert has_table("fresh", "shop_product")


def test_half_created_tenant_is_migrated(migrated):
    """A tenant whose creation stopped mid-way: some rows recorded, the rest not."""
    current_tenants("alpha")
    add_tenant("half")
    migrate("contenttypes", tenant=True, verbosity=0)  # only contenttypes in every tenant
    assert recorded("half") == {
        ("contenttypes", "0001_initial"),
        ("contenttypes", "0002_remove_content_type_name"),
    }
    migrated.clear()

    out, _ = migrate(tenant=True)

    assert migrated == ["half"]
    assert "2 tenant(s): 1 migrated, 1 already current" in out
    assert SHOP_LEAF in recorded("half")


def test_tenant_added_during_a_run_is_migrated_by_the_next(migrated):
    current_tenants("alpha", "beta")
    sql('DELETE FROM "beta".django_migrations WHERE app = %s AND name = %s', list(SHOP_LEAF))
    sql('ALTER TABLE "beta".shop_product DROP COLUMN sku')

    def signup(sender: Any, schema_name: str, **kwargs: Any) -> None:
        # A sign-up in another process while the deploy runs: row and empty schema, its
        # migrations left to the deploy.
        if schema_name == "beta":
            with other_client() as conn:
                conn.execute(
                    "INSERT INTO customers_client (schema_name, name, created_on) "
                    "VALUES ('late', 'late', now())"
                )
                conn.execute('CREATE SCHEMA "late"')

    migrated.clear()
    schema_pre_migration.connect(signup, dispatch_uid="test_signup")
    try:
        out, _ = migrate(tenant=True)
    finally:
        schema_pre_migration.disconnect(dispatch_uid="test_signup")
    assert migrated == ["beta"]
    assert "2 tenant(s): 1 migrated, 1 already current" in out
    assert not has_table("late", "django_migrations")

    migrated.clear()
    out, _ = migrate(tenant=True)
    assert migrated == ["late"]
    assert "3 tenant(s): 1 migrated, 2 already current" in out
    assert has_table("late", "shop_product")


def test_app_label_target_skips_tenants_current_for_that_app(migrated):
    current_tenants("alpha", "beta")
    sql("DELETE FROM \"beta\".django_migrations WHERE app = 'notes' AND name = '0003_welcome_note'")
    sql('TRUNCATE "beta".notes_note, "beta".notes_tag CASCADE')
    migrated.clear()

    out, _ = migrate("shop", tenant=True)
    assert migrated == []
    assert "2 tenant(s): 0 migrated, 2 already current" in out

    out, _ = migrate("notes", tenant=True)
    assert migrated == ["beta"]
    assert "2 tenant(s): 1 migrated, 1 already current" in out
    assert sql('SELECT title FROM "beta".notes_note') == [("Welcome",)]

    # A target behind the schemas means unapplying: work in every tenant.
    migrated.clear()
    with pytest.raises(CommandError, match="2 schema\\(s\\) have unapplied migrations"):
        migrate("shop", "0002", tenant=True, check_unapplied=True, verbosity=2)
    out, _ = last_output()
    assert "PENDING alpha: unapplied migrations: shop: 0003_product_sku (unapply)" in out
    assert migrated == []


GONE = ["shop", "0099_gone"]


@pytest.mark.parametrize(
    ("option", "app"), [("run_syncdb", ()), ("prune", ("shop",))], ids=["run_syncdb", "prune"]
)
def test_options_that_write_with_nothing_to_apply_turn_the_skip_off(migrated, option, app):
    current_tenants("alpha", "beta")
    # A row of a migration no longer on disk: nothing to apply, so alpha reads as current;
    # only migrate --prune (run in alpha) deletes it.
    sql('INSERT INTO "alpha".django_migrations (app, name, applied) VALUES (%s, %s, now())', GONE)
    out, _ = migrate(*app, tenant=True)
    assert "2 tenant(s): 0 migrated, 2 already current" in out
    assert tuple(GONE) in recorded("alpha")
    migrated.clear()

    out, _ = migrate(*app, tenant=True, **{option: True})

    assert migrated == ["alpha", "beta"]
    assert "read django_migrations" not in out
    assert "2 tenant(s): 0 migrated, 2 already current, 0 failed" in out
    assert (tuple(GONE) in recorded("alpha")) is (option != "prune")


def test_unknown_app_label_is_reported_by_migrate_as_before():
    current_tenants("alpha")
    with pytest.raises(CommandError, match="1 of 1 schema"):
        migrate("nosuchapp", tenant=True)
    _, err = last_output()
    assert "No installed app with label 'nosuchapp'" in err


def plain_check(schema: str) -> bool:
    """Plain ``migrate --check`` in one schema: True when it reports unapplied migrations."""
    connection.set_schema(schema, include_public=False)
    try:
        # Django's own migrate: django-tenants replaces the "migrate" command name.
        call_command(DjangoMigrate(), check_unapplied=True, verbosity=0)
    except SystemExit as exc:
        return exc.code not in (0, None)
    finally:
        connection.set_schema_to_public()
    return False


def test_check_agrees_with_plain_migrate_check_per_tenant(migrated):
    current_tenants("alpha", "beta", "gamma")
    sql('DELETE FROM "beta".django_migrations WHERE app = %s AND name = %s', list(SHOP_LEAF))
    add_tenant("fresh")
    migrated.clear()

    with pytest.raises(CommandError, match="2 schema\\(s\\) have unapplied migrations"):
        migrate(tenant=True, check_unapplied=True, verbosity=2)
    out, _ = last_output()

    pending = {
        line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith("PENDING ")
    }
    assert pending == {s for s in ("alpha", "beta", "gamma", "fresh") if plain_check(s)}
    assert pending == {"beta", "fresh"}
    assert "PENDING beta: unapplied migrations: shop: 0003_product_sku" in out
    assert "4 tenant(s): 0 migrated, 2 already current, 2 with unapplied migrations" in out
    # Answered from the read: migrate ran nowhere and --check wrote nothing.
    assert migrated == []
    assert not has_table("fresh", "django_migrations")

    sql('DELETE FROM "beta".django_migrations')
    sql('DELETE FROM "gamma".django_migrations')
    with pytest.raises(CommandError, match="3 schema"):
        migrate(tenant=True, check_unapplied=True, verbosity=0)


def test_history_migrate_refuses_is_left_to_migrate(migrated):
    current_tenants("alpha", "beta")
    sql(
        'DELETE FROM "beta".django_migrations WHERE app = %s AND name = %s',
        ["shop", "0002_seed_categories"],
    )
    migrated.clear()

    for options in ({"check_unapplied": True}, {}):
        with pytest.raises(CommandError, match="1 of 2 schema"):
            migrate(tenant=True, **options)
        out, err = last_output()
        assert "2 tenant(s): 0 migrated, 1 already current" in out
        assert "FAILED beta: InconsistentMigrationHistory: Migration shop.0003_product_sku is " in (
            err
        )
    assert migrated == ["beta", "beta"]


def test_plan_shows_the_work_of_tenants_behind_only(capsys):
    current_tenants("alpha", "beta")
    sql('DELETE FROM "beta".django_migrations WHERE app = %s AND name = %s', list(SHOP_LEAF))
    sql('ALTER TABLE "beta".shop_product DROP COLUMN sku')

    out, _ = migrate(tenant=True, plan=True)

    shown = out + capsys.readouterr().out
    assert "Planned operations:" in shown
    assert shown.count("shop.0003_product_sku") == 1
    assert "[1/1 (100%) standard:beta]" in shown
    assert "standard:alpha" not in shown
    assert SHOP_LEAF not in recorded("beta")


def test_verbosity_zero_prints_nothing():
    current_tenants("alpha")
    add_tenant("beta")
    assert migrate(tenant=True, verbosity=0) == ("", "")


@pytest.fixture
def migrated_anywhere(tmp_path: Path) -> Iterator[Callable[[], list[tuple[str, int]]]]:
    """(schema, process) of each migrate run, in this process or in one it forked (the
    multiprocessing executor's workers), in order."""
    log = tmp_path / "migrated"
    log.touch()

    def receiver(sender: Any, schema_name: str, **kwargs: Any) -> None:
        with log.open("a") as file:
            file.write(f"{schema_name} {os.getpid()}\n")

    schema_pre_migration.connect(receiver, dispatch_uid="test_skip_current.anywhere")
    yield lambda: [(name, int(pid)) for name, pid in map(str.split, log.read_text().splitlines())]
    schema_pre_migration.disconnect(dispatch_uid="test_skip_current.anywhere")


def test_multiprocessing_executor_skips_too(migrated_anywhere):
    current_tenants("alpha", "beta")
    add_tenant("fresh1")
    add_tenant("fresh2")
    before = len(migrated_anywhere())

    out, _ = migrate(tenant=True, executor="multiprocessing")

    assert "read django_migrations of 4 tenant(s): 2 already current (skipped), 2 to migrate" in out
    assert "4 tenant(s): 2 migrated, 2 already current, 0 failed" in out
    # migrate ran for the two behind only, in the pool's worker processes.
    ran = migrated_anywhere()[before:]
    assert sorted(name for name, _ in ran) == ["fresh1", "fresh2"]
    assert os.getpid() not in {pid for _, pid in ran}
    assert has_table("fresh1", "shop_product")
    assert has_table("fresh2", "shop_product")


# --- the planner against Django's own executor, on recorded states alone -------------------


def synthetic(schema: str, rows: list[tuple[str, str]]) -> None:
    """A schema whose django_migrations holds ``rows`` (and no other table)."""
    sql(f'CREATE SCHEMA "{schema}"')
    sql(
        f'CREATE TABLE "{schema}".django_migrations (id serial PRIMARY KEY, app varchar(255), '
        "name varchar(255), applied timestamptz NOT NULL DEFAULT now())"
    )
    for app, name in rows:
        sql(f'INSERT INTO "{schema}".django_migrations (app, name) VALUES (%s, %s)', [app, name])


def django_answer(schema: str) -> tuple[list[tuple[str, str, bool]], list[tuple[str, str]]]:
    """What migrate would apply in ``schema``, and which rows its check_replacements() adds."""
    connection.set_schema(schema, include_public=False)
    try:
        executor = MigrationExecutor(connection)
        steps = [
            (m.app_label, m.name, b)
            for m, b in executor.migration_plan(executor.loader.graph.leaf_nodes())
        ]
        before = recorded(schema)
        with transaction.atomic():
            connection.set_schema(schema, include_public=False)
            executor.check_replacements()
            connection.set_schema(schema, include_public=False)
            added = sorted(recorded(schema) - before)
            transaction.set_rollback(True)
    finally:
        connection.set_schema_to_public()
    return steps, added


@pytest.fixture
def squashed_notes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The notes app's migrations plus 0001_squashed_0002_tag, which replaces 0001 and 0002."""
    package = f"squashed_notes_{uuid.uuid4().hex[:8]}"
    root = tmp_path / package
    root.mkdir()
    (root / "__init__.py").write_text("")
    for name in ("0001_initial", "0002_tag", "0003_welcome_note"):
        (root / f"{name}.py").write_text(
            textwrap.dedent(f"""\
            import importlib
            Migration = importlib.import_module("testproject.notes.migrations.{name}").Migration
            """)
        )
    (root / "0001_squashed_0002_tag.py").write_text(
        textwrap.dedent("""\
        import importlib
        from django.db import migrations
        first = importlib.import_module("testproject.notes.migrations.0001_initial").Migration
        second = importlib.import_module("testproject.notes.migrations.0002_tag").Migration

        class Migration(migrations.Migration):
            initial = True
            replaces = [("notes", "0001_initial"), ("notes", "0002_tag")]
            dependencies = []
            operations = [*first.operations, *second.operations]
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with override_settings(MIGRATION_MODULES={"notes": package}):
        yield package
    for name in [m for m in sys.modules if m.startswith(package)]:
        del sys.modules[name]


def everything() -> list[tuple[str, str]]:
    executor = MigrationExecutor(None)
    return sorted(executor.loader.disk_migrations)


NOTES = [("notes", "0001_initial"), ("notes", "0002_tag"), ("notes", "0003_welcome_note")]
SQUASH = ("notes", "0001_squashed_0002_tag")


@pytest.mark.parametrize(
    ("state", "current"),
    [
        ("all but the squash row", False),
        ("all with the squash row", True),
        ("only the squash row", True),
        ("squash partly applied", False),
        ("nothing of notes", False),
    ],
)
def test_planner_agrees_with_django_on_squashed_migrations(squashed_notes, state, current):
    others = [key for key in everything() if key[0] != "notes"]
    rows = {
        "all but the squash row": others + NOTES,
        "all with the squash row": [*others, *NOTES, SQUASH],
        "only the squash row": [*others, SQUASH, NOTES[2]],
        "squash partly applied": others + NOTES[:1],
        "nothing of notes": others,
    }[state]
    synthetic("synth", rows)

    (entry,) = plan.plan_schemas("default", [("synth", "")])
    steps, added = django_answer("synth")

    assert entry.current is current
    assert entry.plan is not None
    assert list(entry.plan.steps) == steps
    assert list(entry.plan.unrecorded) == added


def test_squash_row_written_by_migrate_then_skipped(squashed_notes, migrated):
    with override_settings(MIGRATION_MODULES={}):
        current_tenants("alpha", "beta")
    migrated.clear()

    # Everything the squash replaces is recorded, its own row is not: migrate writes it.
    out, _ = migrate(tenant=True)
    assert migrated == ["alpha", "beta"]
    assert SQUASH in recorded("alpha")
    assert SQUASH in recorded("beta")

    migrated.clear()
    out, _ = migrate(tenant=True)
    assert migrated == []
    assert "2 tenant(s): 0 migrated, 2 already current" in out


def test_inconsistent_history_is_left_to_migrate():
    rows = [key for key in everything() if key != ("shop", "0002_seed_categories")]
    synthetic("synth", rows)
    (entry,) = plan.plan_schemas("default", [("synth", "")])
    assert entry.plan is None
    assert not entry.current


def test_read_is_chunked_and_survives_an_unreadable_table():
    rows = everything()
    for name in ("s1", "s2", "s3", "s4", "s5"):
        synthetic(name, rows[: len(name) + 3])
    sql('CREATE SCHEMA "odd"')
    sql('CREATE TABLE "odd".django_migrations (id serial PRIMARY KEY)')
    names = ["s1", "odd", "s2", "s3", "nowhere", "s4", "s5"]

    whole = plan.read_applied("default", names)
    assert plan.read_applied("default", names, chunk=2) == whole
    assert whole["odd"] is None
    assert whole["nowhere"] is None
    assert whole["s3"] == frozenset(rows[:5])
    # Equal applied sets are one object: memory follows distinct sets, not tenants.
    assert whole["s1"] is whole["s2"]
    # Inside a transaction the unreadable table costs a savepoint, not the transaction.
    with transaction.atomic():
        assert plan.read_applied("default", names) == whole
        assert sql("SELECT count(*) FROM customers_client") == [(0,)]


# --- progress -----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_come_every_interval_when_not_a_terminal():
    clock, out = Clock(), io.StringIO()
    progress = Progress(4, stream=out, tty=False, interval=10, clock=clock)
    for n, schema in enumerate(["a", "b", "c", "d"]):
        clock.now = 100.0 + 6 * n
        progress.started(schema)
        progress.finished(schema)
    progress.close()
    assert out.getvalue().splitlines() == [
        "migrate_schemas_safe: tenant 3 of 4 (75%), 12s elapsed, about 12s left",
    ]


def test_progress_bar_on_a_terminal_makes_way_for_tenant_output():
    clock, out = Clock(), io.StringIO()
    progress = Progress(2, stream=out, tty=True, clock=clock)
    progress.started("a")
    out.write("[a] output\n")
    clock.now += 65
    progress.finished("a")
    progress.started("b")
    progress.close()
    assert out.getvalue() == (
        "[a] output\n\r\x1b[K[###############---------------] 1/2 a 1m05s\r\x1b[K"
    )
