"""A deploy's new migration, applied by replay to the tenants that are alike
(tenantsafe.migrate.deploy)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from django.core.management.base import CommandError
from django.db import connections, transaction
from django.db.models.signals import post_migrate
from django.test import override_settings

from tenantsafe.migrate import groups
from tenantsafe.testing import create_tenant
from tests.dbtools import (
    database_url,
    direct_url,
    fingerprint,
    fresh_database,
    last_output,
    manage,
    migrate,
    pool_load,
    pooled_url,
    public_tables,
    recorded,
    register_tenants,
    restore_as,
    sql,
    summary,
    with_dbname,
)

pytestmark = pytest.mark.usefixtures("drop_tenant_schemas", "fresh_recordings")

COLOUR = """
    from django.db import migrations, models


    class Migration(migrations.Migration):
        dependencies = [("shop", "0003_product_sku")]

        operations = [
            migrations.AddField(
                model_name="product",
                name="colour",
                field=models.CharField(default="", max_length=20),
            ),
            migrations.AddIndex(
                model_name="product",
                index=models.Index(fields=["colour"], name="shop_product_colour_idx"),
            ),
        ]
"""
# A new model: post_migrate adds its content type and permissions, which name the content
# type's id.
COUPON = """
    from django.db import migrations, models


    class Migration(migrations.Migration):
        dependencies = [("shop", "0004_colour")]

        operations = [
            migrations.CreateModel(
                name="Coupon",
                fields=[
                    ("id", models.BigAutoField(primary_key=True)),
                    ("code", models.CharField(max_length=20, unique=True)),
                ],
            ),
        ]
"""
NEW = {("shop", "0004_colour"), ("shop", "0005_coupon")}
POOLER_SAFE = {"TESTPROJECT_POOLER_SAFE": "1"}


@pytest.fixture
def deploy(new_migrations: Callable[..., str]) -> Callable[..., tuple[str, str]]:
    """``run(*args)``: migrate_schemas_safe --tenant with shop's two new migrations."""
    package = new_migrations("shop", {"0004_colour": COLOUR, "0005_coupon": COUPON})

    def run(*args: str, **options: Any) -> tuple[str, str]:
        with override_settings(MIGRATION_MODULES={"shop": package}):
            return migrate(*args, tenant=True, **options)

    return run


def tenants(*names: str) -> None:
    for name in names:
        create_tenant(name, name=name.upper())


def coupon_permissions(schema: str) -> list[tuple[str, str]]:
    """The coupon permissions, with the model of the content type each one points to."""
    return sql(
        f'SELECT p.codename, ct.model FROM "{schema}".auth_permission p '
        f'JOIN "{schema}".django_content_type ct ON ct.id = p.content_type_id '
        "WHERE p.codename LIKE %s ORDER BY 1",
        ["%coupon"],
    )


WANTED = [
    ("add_coupon", "coupon"),
    ("change_coupon", "coupon"),
    ("delete_coupon", "coupon"),
    ("view_coupon", "coupon"),
]


@pytest.mark.parametrize("executor", ["standard", "multiprocessing"])
def test_replayed_tenants_are_identical_to_migrated_ones(deploy, executor):
    tenants("t1", "t2", "t3", "t4", "t5")

    out, err = deploy(f"--executor={executor}")

    assert summary(out) == {**summary(out), "total": 5, "migrated": 2, "replayed": 3, "failed": 0}
    url = database_url()
    # t1 and t2 are the witnesses, migrated through Django.
    witness = fingerprint(url, "t1")
    assert ("shop", "0005_coupon") in witness["migrations"]
    assert ["shop_product_colour_idx" in str(i) for i in witness["indexes"]].count(True) == 1
    for name in ("t2", "t3", "t4", "t5"):
        assert fingerprint(url, name) == witness, name
        assert recorded(name) >= NEW
        assert coupon_permissions(name) == WANTED
        # Each tenant has its own time of applying, not the witness's.
        assert sql(
            f"SELECT count(*) FROM \"{name}\".django_migrations WHERE name = '0005_coupon' "
            "AND applied > now() - interval '10 minutes'"
        ) == [(1,)]
    # Django applied the migrations in the two witnesses only; the other three got them in
    # the recorded SQL (whose output is the summary's count).
    assert out.count("Applying shop.0004_colour... OK") == 2
    assert out.count("Applying shop.0005_coupon... OK") == 2
    assert err == ""


# With chunks of two, the catalogs are read on two connections (as beyond 400 tenants).
@pytest.mark.parametrize("chunk", [groups.CHUNK, 2], ids=["one-connection", "two-connections"])
def test_drifted_tenants_are_migrated_through_django_and_end_correct(deploy, chunk, monkeypatch):
    monkeypatch.setattr(groups, "CHUNK", chunk)
    tenants("a1", "a2", "a3", "a4", "extra_index", "redefined", "renamed", "own_default")
    sql('CREATE INDEX shop_product_name_extra ON "extra_index".shop_product (name)')
    # The same index name on another column.
    (index,) = sql(
        "SELECT indexname FROM pg_indexes WHERE schemaname = 'redefined' "
        "AND tablename = 'shop_product' AND indexdef LIKE '%%(category_id)'"
    )[0]
    sql(f'DROP INDEX "redefined"."{index}"')
    sql(f'CREATE INDEX "{index}" ON "redefined".shop_product (name)')
    (constraint,) = sql(
        "SELECT conname FROM pg_constraint WHERE conrelid = 'renamed.shop_product'::regclass "
        "AND contype = 'f'"
    )[0]
    sql(f'ALTER TABLE "renamed".shop_product RENAME CONSTRAINT "{constraint}" TO shop_fk_renamed')
    # Django keeps no column defaults in the database: a column default is drift.
    sql("ALTER TABLE \"own_default\".notes_note ALTER COLUMN body SET DEFAULT 'x'")
    # Alike, but its columns are numbered without the gap a dropped column left in a1's.
    restore_as("a1", "restored")

    out, _ = deploy()

    # Each difference named, as the doctor names it.
    apart = "differs from the 4 alike tenant(s) at the same migration state, so it is grouped apart"
    for line in (
        f'"extra_index" {apart}: index shop_product_name_extra extra.',
        f'"redefined" {apart}: definition of index {index} differs.',
        f'"renamed" {apart}: constraint {constraint} renamed to shop_fk_renamed.',
        f'"own_default" {apart}: default of notes_note.body differs.',
        f'"restored" {apart}: only the numbers of the columns of some table differ (where '
        "columns were dropped, a schema restored from a dump or cloned numbers them anew).",
    ):
        assert f"migrate_schemas_safe: {line}\n" in out
    # a1 and a2 witnessed for a3 and a4; each drifted tenant is a group of its own.
    assert summary(out) == {**summary(out), "total": 9, "migrated": 7, "replayed": 2, "failed": 0}
    url = database_url()
    witness = fingerprint(url, "a1")
    assert fingerprint(url, "a3") == fingerprint(url, "a4") == witness
    for name in ("extra_index", "redefined", "renamed", "own_default", "restored"):
        assert recorded(name) >= NEW
        assert coupon_permissions(name) == WANTED
        assert sql(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = %s "
            "AND indexname = 'shop_product_colour_idx'",
            [name],
        ) == [(1,)]
    # The drift itself is left as it was.
    assert sql("SELECT count(*) FROM pg_indexes WHERE indexname = 'shop_product_name_extra'") == [
        (1,)
    ]
    assert sql("SELECT count(*) FROM pg_constraint WHERE conname = 'shop_fk_renamed'") == [(1,)]
    assert sql(
        "SELECT column_default FROM information_schema.columns WHERE table_schema = "
        "'own_default' AND table_name = 'notes_note' AND column_name = 'body'"
    ) == [("'x'::text",)]


@pytest.mark.parametrize("renumbered", [False, True], ids=["next-id", "renumbered"])
def test_tenants_whose_content_type_ids_differ_get_correct_permissions(deploy, renumbered):
    tenants("low1", "low2", "low3", "high1", "high2", "high3")
    for name in ("high1", "high2", "high3"):
        with transaction.atomic():
            if renumbered:
                sql(f'UPDATE "{name}".django_content_type SET id = id + 500')
                sql(f'UPDATE "{name}".auth_permission SET content_type_id = content_type_id + 500')
            next_id = 600 if renumbered else 500
            sql(f"SELECT setval('\"{name}\".django_content_type_id_seq', {next_id})")

    out, _ = deploy()

    # The recording writes the coupon's content type and permissions (ids in them): the
    # tenants that number them otherwise get witnesses of their own.
    assert "3 tenant(s) like low1 number their content types or permissions otherwise" in out
    assert summary(out) == {**summary(out), "total": 6, "migrated": 4, "replayed": 2, "failed": 0}
    for name, low in (("low1", True), ("low3", True), ("high1", False), ("high3", False)):
        assert coupon_permissions(name) == WANTED
        (coupon,) = sql(f"SELECT id FROM \"{name}\".django_content_type WHERE model = 'coupon'")
        assert (coupon[0] < 500) is low
    # No permission points to a content type of another tenant or to none.
    for name in ("low3", "high3"):
        assert sql(
            f'SELECT count(*) FROM "{name}".auth_permission p LEFT JOIN "{name}".'
            "django_content_type ct ON ct.id = p.content_type_id WHERE ct.id IS NULL"
        ) == [(0,)]


def test_a_schema_only_deploy_replays_whatever_the_content_type_ids(new_migrations):
    package = new_migrations("shop", {"0004_colour": COLOUR})
    tenants("old1", "old2", "old3", "new1", "new2", "new3")
    # Tenants created at other times number their content types otherwise.
    for name in ("new1", "new2", "new3"):
        with transaction.atomic():
            sql(f'UPDATE "{name}".django_content_type SET id = id + 500')
            sql(f'UPDATE "{name}".auth_permission SET content_type_id = content_type_id + 500')
    ids = {name: content_type_ids(name) for name in ("old1", "new1")}

    with override_settings(MIGRATION_MODULES={"shop": package}):
        out, _ = migrate(tenant=True)

    # One group: the recording writes no row but django_migrations', so no id is in it.
    assert "6 of 6 tenant(s) to migrate are in 1 group(s) of alike tenants" in out
    assert summary(out) == {**summary(out), "total": 6, "migrated": 2, "replayed": 4, "failed": 0}
    for name in ("old1", "old2", "old3", "new1", "new2", "new3"):
        assert sql(
            "SELECT count(*) FROM information_schema.columns WHERE table_schema = %s "
            "AND table_name = 'shop_product' AND column_name = 'colour'",
            [name],
        ) == [(1,)], name
        assert ("shop", "0004_colour") in recorded(name)
    # Each keeps its own numbering.
    assert {name: content_type_ids(name) for name in ("old1", "new1")} == ids
    assert content_type_ids("new3") == ids["new1"] != ids["old1"]


def content_type_ids(schema: str) -> list[tuple[int, str, str]]:
    return sql(f'SELECT id, app_label, model FROM "{schema}".django_content_type ORDER BY id')


COUNT_NOTES = """
    from django.db import migrations


    def count(apps, schema_editor):
        Note = apps.get_model("notes", "Note")
        Tally = apps.get_model("notes", "Tally")
        Tally.objects.create(notes=Note.objects.count())


    class Migration(migrations.Migration):
        dependencies = [("notes", "0003_welcome_note")]

        operations = [
            migrations.CreateModel(
                name="Tally",
                fields=[
                    ("id", models.BigAutoField(primary_key=True)),
                    ("notes", models.IntegerField()),
                ],
            ),
            migrations.RunPython(count, migrations.RunPython.noop),
        ]
""".replace("from django.db import migrations", "from django.db import migrations, models", 1)


def test_a_plan_with_runpython_gives_every_tenant_its_own_value(new_migrations):
    package = new_migrations("notes", {"0004_tally": COUNT_NOTES})
    names = ["n1", "n2", "n3", "n4"]
    tenants(*names)
    for extra, name in enumerate(names):
        for i in range(extra):
            sql(
                f'INSERT INTO "{name}".notes_note (title, body, pinned) VALUES (%s, %s, false)',
                [f"x{i}", ""],
            )
    before = {name: sql(f'SELECT count(*) FROM "{name}".notes_note')[0][0] for name in names}

    with override_settings(MIGRATION_MODULES={"notes": package}):
        out, _ = migrate(tenant=True)

    # Two witnesses; the others replayed, the RunPython run in each of them.
    assert summary(out) == {**summary(out), "total": 4, "migrated": 2, "replayed": 2}
    for name in names:
        assert sql(f'SELECT notes FROM "{name}".notes_tally') == [(before[name],)]
    assert len(set(before.values())) == 4


UNIQUE_TITLE = """
    from django.db import migrations, models


    class Migration(migrations.Migration):
        dependencies = [("notes", "0003_welcome_note")]

        operations = [
            migrations.AddField(
                model_name="note", name="rank", field=models.IntegerField(default=0)
            ),
            migrations.AlterField(
                model_name="note", name="title", field=models.CharField(max_length=100, unique=True)
            ),
        ]
"""


@pytest.mark.parametrize("executor", ["standard", "multiprocessing"])
def test_a_replay_that_fails_rolls_back_and_the_tenant_goes_through_django(
    new_migrations, executor
):
    package = new_migrations("notes", {"0004_unique_title": UNIQUE_TITLE})
    tenants("u1", "u2", "u3", "dupes", "u4")
    # A title twice (notes are no part of a group's key): adding the unique constraint fails
    # there, by replay and through Django alike.
    sql(
        'INSERT INTO "dupes".notes_note (title, body, pinned) '
        'SELECT title, body, pinned FROM "dupes".notes_note'
    )

    with override_settings(MIGRATION_MODULES={"notes": package}), pytest.raises(CommandError):
        migrate(f"--executor={executor}", tenant=True)

    out, err = last_output()
    assert summary(out) == {**summary(out), "total": 5, "migrated": 2, "replayed": 2, "failed": 1}
    assert "FAILED dupes: IntegrityError" in err
    assert "could not create unique index" in err
    # Nothing of the migration is left in the failed tenant; the others have it whole.
    assert ("notes", "0004_unique_title") not in recorded("dupes")
    assert sql(
        "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'dupes' "
        "AND table_name = 'notes_note' AND column_name = 'rank'"
    ) == [(0,)]
    for name in ("u1", "u2", "u3", "u4"):
        assert ("notes", "0004_unique_title") in recorded(name)


def test_no_replay_migrates_every_tenant_through_django(deploy, migrations_run):
    tenants("r1", "r2", "r3", "r4")
    migrations_run.clear()

    out, _ = deploy("--no-replay")

    assert summary(out) == {**summary(out), "total": 4, "migrated": 4, "replayed": 0}
    assert sorted(migrations_run) == ["r1", "r2", "r3", "r4"]
    assert out.count("Applying shop.0005_coupon") == 4


@override_settings(TENANTSAFE_REPLAY_MIGRATIONS=False)
def test_the_setting_turns_replay_off(deploy, migrations_run):
    tenants("s1", "s2", "s3")
    migrations_run.clear()

    out, _ = deploy()

    assert summary(out) == {**summary(out), "total": 3, "migrated": 3, "replayed": 0}
    # No groups, no witnesses: Django applied the migrations in every tenant.
    assert "group(s) of alike tenants" not in out
    assert sorted(migrations_run) == ["s1", "s2", "s3"]
    assert out.count("Applying shop.0005_coupon... OK") == 3
    for name in ("s1", "s2", "s3"):
        assert recorded(name) >= NEW
        assert coupon_permissions(name) == WANTED


@pytest.mark.parametrize("option", ["fake", "fake_initial"])
def test_fake_runs_are_never_replayed(deploy, migrations_run, option):
    tenants("k1", "k2", "k3")
    migrations_run.clear()

    out, _ = deploy(**{option: True})

    # No groups, no witnesses: Django ran in every tenant, as asked.
    assert summary(out) == {**summary(out), "total": 3, "migrated": 3, "replayed": 0}
    assert "group(s) of alike tenants" not in out
    assert sorted(migrations_run) == ["k1", "k2", "k3"]
    for name in ("k1", "k2", "k3"):
        assert recorded(name) >= NEW
        colour = sql(
            "SELECT count(*) FROM information_schema.columns WHERE table_schema = %s "
            "AND table_name = 'shop_product' AND column_name = 'colour'",
            [name],
        )
        # --fake records without applying; --fake-initial fakes only initial migrations.
        assert colour == [(0 if option == "fake" else 1,)], name
    marked = "FAKED" if option == "fake" else "OK"
    assert out.count(f"Applying shop.0004_colour... {marked}") == 3


def test_replayed_tenants_get_the_django_tenants_signals_once(deploy, migrations_run):
    from django_tenants.signals import schema_migrated

    done: list[str] = []

    def receiver(sender: Any, schema_name: str, **kwargs: Any) -> None:
        done.append(schema_name)

    tenants("g1", "g2", "g3", "g4")
    migrations_run.clear()
    schema_migrated.connect(receiver)
    try:
        out, _ = deploy()
    finally:
        schema_migrated.disconnect(receiver)

    assert summary(out)["replayed"] == 2
    assert sorted(migrations_run) == sorted(done) == ["g1", "g2", "g3", "g4"]


@pytest.mark.pooler
def test_replay_through_pgbouncer_with_other_clients_on_the_pool(new_migrations):
    pooled = pooled_url()
    package = new_migrations("shop", {"0004_colour": COLOUR, "0005_coupon": COUPON})
    names = [f"p{n}" for n in range(8)]
    with fresh_database("deploy") as database:
        direct = with_dbname(direct_url(), database)
        result = manage(direct, "migrate_schemas", "--shared", "-v0", env=POOLER_SAFE)
        assert result.returncode == 0, result.stderr
        register_tenants(direct, names)
        result = manage(direct, "migrate_schemas_safe", "--tenant", "-v0", env=POOLER_SAFE)
        assert result.returncode == 0, result.stderr
        public_before = public_tables(direct)

        with pool_load(with_dbname(pooled, database), [f'"{n}", public' for n in names]):
            result = manage(
                with_dbname(pooled, database),
                "migrate_schemas_safe",
                "--tenant",
                env={**POOLER_SAFE, "TESTPROJECT_MIGRATION_MODULES": f'{{"shop": "{package}"}}'},
            )

        assert result.returncode == 0, result.stderr[-3000:]
        assert summary(result.stdout) == {
            **summary(result.stdout),
            "total": 8,
            "migrated": 2,
            "replayed": 6,
            "failed": 0,
        }
        witness = fingerprint(direct, "p0")
        assert ("shop", "0005_coupon") in witness["migrations"]
        assert [n for n in names if fingerprint(direct, n) != witness] == []
        assert public_tables(direct) == public_before


def test_plan_names_the_groups_and_their_witnesses(deploy):
    tenants("w1", "w2", "w3", "w4")

    out, _ = deploy("--plan")

    assert (
        "migrate_schemas_safe: 4 of 4 tenant(s) to migrate are in 1 group(s) of alike tenants"
        in out
    )
    assert "migrate_schemas_safe: witnesses w1, w2 for 2 more\n" in out
    assert summary(out) == {**summary(out), "total": 4, "planned": 4, "migrated": 0}
    assert ("shop", "0004_colour") not in recorded("w1")


def test_witnesses_that_disagree_send_their_group_through_django(deploy):
    """A post_migrate handler that writes a value of its own making: the two witnesses'
    recordings differ, so nobody gets either of them."""
    tenants("d1", "d2", "d3", "d4")

    def handler(sender: Any, using: str, **kwargs: Any) -> None:
        connection: Any = connections[using]
        if sender.label == "notes" and connection.schema_name != "public":
            with connection.cursor() as cursor:
                cursor.execute("INSERT INTO notes_tag (label) VALUES (%s)", [uuid.uuid4().hex[:20]])

    post_migrate.connect(handler, dispatch_uid="test_deploy.handler")
    try:
        out, _ = deploy()
    finally:
        post_migrate.disconnect(dispatch_uid="test_deploy.handler")

    assert (
        "migrate_schemas_safe: not replaying to 2 tenant(s) like d1: the recordings of d1 and "
        "d2 differ; migrating them through Django." in out
    )
    assert summary(out) == {**summary(out), "total": 4, "migrated": 4, "replayed": 0}
    labels = [
        sql(f"SELECT label FROM \"{name}\".notes_tag WHERE label <> 'start'")
        for name in ("d1", "d2", "d3", "d4")
    ]
    assert all(len(found) == 1 for found in labels)
    assert len({found[0] for found in labels}) == 4


def test_rows_a_recording_read_must_be_the_same_in_a_replayed_tenant(deploy):
    """A post_migrate handler writing what it read: tenants whose rows differ from the
    witnesses' are migrated through Django, and each ends with its own value."""
    tenants("e1", "e2", "e3", "e4", "more")
    sql("INSERT INTO \"more\".notes_note (title, body, pinned) VALUES ('Two', '', false)")

    def handler(sender: Any, using: str, **kwargs: Any) -> None:
        connection: Any = connections[using]
        if sender.label == "notes" and connection.schema_name != "public":
            with connection.cursor() as cursor:
                cursor.execute("SELECT count(*) FROM notes_note")
                (count,) = cursor.fetchone()
                cursor.execute("INSERT INTO notes_tag (label) VALUES (%s)", [f"notes:{count}"])

    post_migrate.connect(handler, dispatch_uid="test_deploy.reads")
    try:
        out, _ = deploy()
    finally:
        post_migrate.disconnect(dispatch_uid="test_deploy.reads")

    assert summary(out) == {**summary(out), "total": 5, "migrated": 3, "replayed": 2}
    for name, count in (("e1", 1), ("e3", 1), ("e4", 1), ("more", 2)):
        assert sql(f"SELECT label FROM \"{name}\".notes_tag WHERE label LIKE 'notes:%%'") == [
            (f"notes:{count}",)
        ]
