"""Deploys that hold data migrations: each tenant migrated by migrate_schemas_safe (warm, or by
replay with its RunPython run in it) ends as the same tenant migrated by plain django-tenants.

Every case makes twins: tenants ``a1..aN`` and ``b1..bN`` made alike, tenant ``k`` of each with
``k`` products. Plain ``migrate_schemas`` migrates the ``a`` twins one schema at a time;
``migrate_schemas_safe`` migrates the ``b`` twins in one run. Then each ``b`` twin must hold
what its ``a`` twin holds: catalog, ``django_migrations``, content types, permissions and the
rows of the tables the migrations touched.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.core.management import call_command
from django.db.models.signals import post_migrate
from django.test import override_settings

from tenantsafe.testing import create_tenant
from tests.dbtools import (
    connect,
    database_url,
    direct_url,
    fingerprint,
    fresh_database,
    manage,
    migrate,
    pool_load,
    pooled_url,
    register_tenants,
    sql,
    summary,
    with_dbname,
)

pytestmark = pytest.mark.usefixtures("drop_tenant_schemas", "fresh_recordings")

TWINS = 5

RANK = """
    from django.db import migrations, models


    def rank(apps, schema_editor):
        Product = apps.get_model("shop", "Product")
        db = schema_editor.connection.alias
        count = Product.objects.using(db).count()
        Product.objects.using(db).update(deploy_rank=count)


    class Migration(migrations.Migration):
        dependencies = [("shop", "0003_product_sku")]

        operations = [
            migrations.AddField(
                model_name="product", name="deploy_rank", field=models.IntegerField(default=0)
            ),
            migrations.RunPython(rank, migrations.RunPython.noop),
            migrations.AddIndex(
                model_name="product",
                index=models.Index(fields=["deploy_rank"], name="shop_product_rank_idx"),
            ),
        ]
"""


def product_rows(schema: str) -> list[tuple[Any, ...]]:
    return sql(f'SELECT row_to_json(p)::text FROM "{schema}".shop_product p ORDER BY id')


def twins(count: int = TWINS, *, name: str = "") -> list[tuple[str, str]]:
    """``count`` pairs of alike tenants; tenant ``k`` of each pair has ``k`` products. Their
    ``name`` field is ``name``, else their schema's name in capitals."""
    pairs = []
    for k in range(1, count + 1):
        pair = (f"a{k}", f"b{k}")
        for schema in pair:
            create_tenant(schema, name=name or schema.upper())
            sql(
                f'INSERT INTO "{schema}".shop_product (name, sku, price_cents) '
                "SELECT 'p' || g, '', g FROM generate_series(1, %s) g",
                [k],
            )
        pairs.append(pair)
    return pairs


def plain(schema: str, *args: str) -> str:
    """django-tenants' own migrate_schemas for one schema; its output."""
    out = io.StringIO()
    call_command("migrate_schemas", *args, schema_name=schema, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def assert_alike(pairs: list[tuple[str, str]]) -> None:
    url = database_url()
    for a, b in pairs:
        assert fingerprint(url, b) == fingerprint(url, a), b
        assert product_rows(b) == product_rows(a), b


@pytest.fixture
def deploy(new_migrations: Callable[..., str]) -> Callable[..., Any]:
    """``deploy(files)``: shop's migrations plus ``files``; returns ``run(*args)``, which
    migrates the ``a`` twins with plain migrate_schemas and the others with
    migrate_schemas_safe (its stdout)."""

    def make(files: dict[str, str]) -> Callable[..., str]:
        package = new_migrations("shop", files)

        def run(pairs: list[tuple[str, str]], *args: str) -> str:
            with override_settings(MIGRATION_MODULES={"shop": package}):
                for a, _ in pairs:
                    plain(a, *args)
                out, _ = migrate(*args, tenant=True)
            return out

        run.package = package  # type: ignore[attr-defined]
        return run

    return make


@pytest.fixture
def migrate_signals() -> Iterator[list[tuple[str, str, bool, list[str]]]]:
    """(schema, signal, whether its apps have Product.deploy_rank, the plan's migrations) for
    every post_migrate sent for the shop app."""
    from tests.dbtools import connection

    seen: list[tuple[str, str, bool, list[str]]] = []

    def receiver(sender: Any, app_config: Any, apps: Any, plan: Any, **kwargs: Any) -> None:
        if app_config.label != "shop":
            return
        product = apps.get_model("shop", "Product")
        fields = {f.name for f in product._meta.get_fields()}
        seen.append(
            (
                connection.schema_name,
                "post_migrate",
                "deploy_rank" in fields,
                [f"{m.app_label}.{m.name}" for m, _ in plan or []],
            )
        )

    post_migrate.connect(receiver, dispatch_uid="test_data_deploys")
    yield seen
    post_migrate.disconnect(dispatch_uid="test_data_deploys")


def test_a_runpython_deploy_gives_each_tenant_its_own_value(deploy, migrate_signals):
    pairs = twins()

    out = deploy({"0004_rank": RANK})(pairs)

    # b1 and b2 witness; the others get the recorded schema statements, with the RunPython
    # run in each of them.
    assert summary(out) == {**summary(out), "migrated": 2, "replayed": 3, "failed": 0}
    assert_alike(pairs)
    for k, (_, b) in enumerate(pairs, start=1):
        assert sql(f'SELECT DISTINCT deploy_rank FROM "{b}".shop_product') == [(k,)]
    # The witnesses (migrated warm) got post_migrate with the apps and plan Django gives;
    # replayed tenants get none (what it did in the witnesses is in the recording).
    by_schema = {schema: rest for schema, *rest in migrate_signals}
    for a, _ in pairs:
        assert by_schema[a] == ["post_migrate", True, ["shop.0004_rank"]]
    assert by_schema["b1"] == by_schema["b2"] == by_schema["a1"]
    assert not {"b3", "b4", "b5"} & set(by_schema)


def test_one_migration_graph_serves_the_whole_run(deploy, monkeypatch):
    from django.db.migrations.loader import MigrationLoader

    pairs = twins(4)
    built: list[int] = []
    build_graph = MigrationLoader.build_graph

    def counted(self: MigrationLoader) -> None:
        built.append(1)
        build_graph(self)

    monkeypatch.setattr(MigrationLoader, "build_graph", counted)
    package = deploy({"0004_rank": RANK}).package
    with override_settings(MIGRATION_MODULES={"shop": package}, TENANTSAFE_REPLAY_MIGRATIONS=False):
        for a, _ in pairs:
            plain(a)
        plain_graphs = len(built)
        out, _ = migrate(tenant=True)

    # Django's migrate loads the graph in every tenant; migrate_schemas_safe once for the
    # read of what is applied and once for the tenants it migrates.
    assert plain_graphs >= len(pairs)
    assert len(built) - plain_graphs <= 2
    assert summary(out) == {**summary(out), "migrated": 4, "failed": 0}
    assert_alike(pairs)


ADDED_THEN_READ = {
    "0004_stock": """
    from django.db import migrations, models


    class Migration(migrations.Migration):
        dependencies = [("shop", "0003_product_sku")]

        operations = [
            migrations.CreateModel(
                name="Stock",
                fields=[
                    ("id", models.BigAutoField(primary_key=True)),
                    ("product", models.ForeignKey("shop.Product", on_delete=models.CASCADE)),
                    ("quantity", models.IntegerField()),
                ],
            ),
        ]
    """,
    "0005_fill_stock": """
    from django.db import migrations


    def fill(apps, schema_editor):
        db = schema_editor.connection.alias
        Product = apps.get_model("shop", "Product")
        Stock = apps.get_model("shop", "Stock")
        Stock.objects.using(db).bulk_create(
            Stock(product=p, quantity=p.price_cents * 10) for p in Product.objects.using(db)
        )


    class Migration(migrations.Migration):
        dependencies = [("shop", "0004_stock")]

        operations = [migrations.RunPython(fill, migrations.RunPython.noop)]
    """,
}

RENAMED_THEN_READ = """
    from django.db import migrations


    def price_in_name(apps, schema_editor):
        db = schema_editor.connection.alias
        Product = apps.get_model("shop", "Product")
        for product in Product.objects.using(db):
            product.name = f"{product.name} at {product.price}"
            product.save(update_fields=["name"])


    class Migration(migrations.Migration):
        dependencies = [("shop", "0003_product_sku")]

        operations = [
            migrations.RenameField("product", "price_cents", "price"),
            migrations.RunPython(price_in_name, migrations.RunPython.noop),
        ]
"""


def stock_rows(schema: str) -> list[tuple[Any, ...]]:
    return sql(f'SELECT product_id, quantity FROM "{schema}".shop_stock ORDER BY 1')


def test_runpython_reads_a_model_added_earlier_in_the_plan(deploy):
    pairs = twins()

    out = deploy(ADDED_THEN_READ)(pairs)

    assert summary(out)["failed"] == 0
    assert_alike(pairs)
    for k, (a, b) in enumerate(pairs, start=1):
        assert len(stock_rows(b)) == k
        assert stock_rows(b) == stock_rows(a)


def test_runpython_reads_a_field_renamed_earlier_in_its_migration(deploy):
    pairs = twins()

    out = deploy({"0004_price": RENAMED_THEN_READ})(pairs)

    assert summary(out)["failed"] == 0
    assert_alike(pairs)
    assert sql('SELECT name FROM "b2".shop_product ORDER BY id') == [("p1 at 1",), ("p2 at 2",)]


FAILS_AT_THREE = """
    from django.db import migrations, models


    def check(apps, schema_editor):
        db = schema_editor.connection.alias
        Product = apps.get_model("shop", "Product")
        Product.objects.using(db).update(deploy_rank=7)
        if Product.objects.using(db).count() == 3:
            raise ValueError("three products are not allowed here")


    class Migration(migrations.Migration):
        dependencies = [("shop", "0003_product_sku")]

        operations = [
            migrations.AddField(
                model_name="product", name="deploy_rank", field=models.IntegerField(default=0)
            ),
            migrations.RunPython(check, migrations.RunPython.noop),
        ]
"""


def test_a_runpython_that_fails_in_one_tenant_rolls_that_tenant_back(deploy):
    from django.core.management.base import CommandError

    pairs = twins()
    run = deploy({"0004_check": FAILS_AT_THREE})

    with pytest.raises(ValueError, match="three products are not allowed here"):
        run(pairs[2:3])
    # a3 failed under django-tenants and is still to migrate: b3 and it fail alike.
    with pytest.raises(CommandError, match=r"2 of 10 schema\(s\) failed"):
        run([p for p in pairs if p[0] != "a3"])

    from tests.dbtools import last_output

    out, err = last_output()
    # b1 and b2 witness; the replays into a3 and b3 roll back, and Django fails them too.
    assert summary(out) == {**summary(out), "migrated": 2, "replayed": 2, "failed": 2}
    assert "FAILED 2 tenants (a3, b3): ValueError: three products are not allowed here" in err
    assert_alike(pairs)
    assert ("shop", "0004_check") not in fingerprint(database_url(), "b3")["migrations"]
    assert sql('SELECT DISTINCT deploy_rank FROM "b4".shop_product') == [(7,)]


DATABASE_AND_STATE = """
    from django.db import migrations, models


    class Migration(migrations.Migration):
        dependencies = [("shop", "0003_product_sku")]

        operations = [
            migrations.SeparateDatabaseAndState(
                state_operations=[
                    migrations.AddField(
                        model_name="product",
                        name="note",
                        field=models.TextField(default=""),
                    ),
                ],
                database_operations=[
                    migrations.RunSQL(
                        "ALTER TABLE shop_product ADD COLUMN note text NOT NULL DEFAULT 'n/a'",
                        "ALTER TABLE shop_product DROP COLUMN note",
                    ),
                ],
            ),
            migrations.RunSQL(
                [("UPDATE shop_product SET sku = %s WHERE price_cents > %s", ["big", 2])],
                migrations.RunSQL.noop,
                state_operations=[
                    migrations.AlterField(
                        model_name="product",
                        name="sku",
                        field=models.CharField(max_length=32, default="-"),
                    ),
                ],
            ),
        ]
"""


def test_separate_database_and_state_and_runsql_with_parameters(deploy):
    pairs = twins()

    out = deploy({"0004_note": DATABASE_AND_STATE})(pairs)

    assert summary(out)["failed"] == 0
    assert_alike(pairs)
    assert sql('SELECT sku, note FROM "b4".shop_product WHERE price_cents > 2') == [
        ("big", "n/a"),
        ("big", "n/a"),
    ]


NOT_ATOMIC = """
    from django.db import migrations, models


    def rank(apps, schema_editor):
        Product = apps.get_model("shop", "Product")
        db = schema_editor.connection.alias
        for product in Product.objects.using(db):
            product.deploy_rank = product.price_cents * 2
            product.save(update_fields=["deploy_rank"])


    class Migration(migrations.Migration):
        atomic = False
        dependencies = [("shop", "0003_product_sku")]

        operations = [
            migrations.AddField(
                model_name="product", name="deploy_rank", field=models.IntegerField(default=0)
            ),
            migrations.RunPython(rank, migrations.RunPython.noop, atomic=True),
        ]
"""


def test_a_non_atomic_migration(deploy):
    pairs = twins()

    out = deploy({"0004_rank": NOT_ATOMIC})(pairs)

    assert summary(out)["failed"] == 0
    assert_alike(pairs)
    assert sql('SELECT deploy_rank FROM "b3".shop_product ORDER BY id') == [(2,), (4,), (6,)]


@pytest.fixture
def notes_on_migrate() -> Iterator[None]:
    """A user's post_migrate handler: a note in the tenant naming how many products it has
    and which migrations the plan applied."""

    def write(sender: Any, app_config: Any, apps: Any, plan: Any, using: str, **kw: Any) -> None:
        # Only for the deploy (create_tenant's full migration sends it too).
        if app_config.label != "notes" or not plan or len(plan) > 3:
            return
        Note = apps.get_model("notes", "Note")
        Product = apps.get_model("shop", "Product")
        applied = ",".join(f"{m.app_label}.{m.name}" for m, _ in plan)
        count = Product.objects.using(using).count()
        Note.objects.using(using).create(title=f"{count} products after {applied}", body="")

    post_migrate.connect(write, dispatch_uid="test_notes_on_migrate")
    yield
    post_migrate.disconnect(dispatch_uid="test_notes_on_migrate")


def test_a_post_migrate_handler_that_writes_rows_in_each_tenant(deploy, notes_on_migrate):
    pairs = twins()

    out = deploy({"0004_rank": RANK})(pairs)

    assert summary(out)["failed"] == 0
    assert_alike(pairs)
    assert sql('SELECT title FROM "b4".notes_note ORDER BY id')[-1] == (
        "4 products after shop.0004_rank",
    )


def test_a_plan_that_unapplies(deploy):
    pairs = twins()
    run = deploy({"0004_rank": RANK})
    run(pairs)

    out = run(pairs, "shop", "0003_product_sku")

    assert summary(out)["failed"] == 0
    assert_alike(pairs)
    assert ("shop", "0004_rank") not in fingerprint(database_url(), "b1")["migrations"]


def test_fake(deploy):
    pairs = twins()

    out = deploy({"0004_rank": RANK})(pairs, "--fake")

    assert summary(out)["failed"] == 0
    assert_alike(pairs)
    assert ("shop", "0004_rank") in fingerprint(database_url(), "b1")["migrations"]
    assert "deploy_rank" not in str(fingerprint(database_url(), "b1")["columns"])


@pytest.mark.pooler
def test_a_runpython_deploy_through_pgbouncer_with_other_clients_on_the_pool(new_migrations):
    """The twins in their own database: the ``a`` twins migrated by plain migrate_schemas
    directly, the ``b`` twins by migrate_schemas_safe through pgbouncer while other clients
    keep switching the pool's server connections between the tenants' paths."""
    pooled = pooled_url()
    package = new_migrations("shop", {"0004_rank": RANK})
    env = {"TESTPROJECT_POOLER_SAFE": "1"}
    deploy_env = {**env, "TESTPROJECT_MIGRATION_MODULES": f'{{"shop": "{package}"}}'}
    pairs = [(f"a{k}", f"b{k}") for k in range(1, 7)]
    with fresh_database("data") as database:
        direct = with_dbname(direct_url(), database)
        assert manage(direct, "migrate_schemas", "--shared", "-v0", env=env).returncode == 0
        register_tenants(direct, [name for pair in pairs for name in pair])
        result = manage(direct, "migrate_schemas_safe", "--tenant", "-v0", env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        with connect(direct) as conn:
            for k, pair in enumerate(pairs, start=1):
                for name in pair:
                    conn.execute(
                        f'INSERT INTO "{name}".shop_product (name, sku, price_cents) '
                        "SELECT 'p' || g, '', g FROM generate_series(1, %s) g",
                        [k],
                    )
        for a, _ in pairs:
            result = manage(direct, "migrate_schemas", "--tenant", "-s", a, "-v0", env=deploy_env)
            assert result.returncode == 0, result.stderr[-3000:]

        paths = [f'"{name}", public' for pair in pairs for name in pair]
        with pool_load(with_dbname(pooled, database), paths):
            result = manage(
                with_dbname(pooled, database),
                "migrate_schemas_safe",
                "--tenant",
                env=deploy_env,
            )

        assert result.returncode == 0, result.stderr[-3000:]
        assert summary(result.stdout) == {
            **summary(result.stdout),
            "total": 12,
            "migrated": 2,
            "replayed": 4,
            "failed": 0,
        }
        with connect(direct) as conn:
            ranks = {
                b: conn.execute(f'SELECT DISTINCT deploy_rank FROM "{b}".shop_product').fetchall()
                for _, b in pairs
            }
        assert ranks == {b: [(k,)] for k, (_, b) in enumerate(pairs, start=1)}
        for a, b in pairs:
            assert fingerprint(direct, b) == fingerprint(direct, a), b


def multi_type_settings() -> dict[str, Any]:
    """Two tenant types: ``retail`` tenants have every tenant app, ``journal`` tenants all
    but shop. The test project's tenant model has no type field of its own; ``name`` serves
    as one (its values must not be words the recordings hold, such as app labels: a recording
    that names its tenant is never replayed)."""
    from django.conf import settings

    tenant_apps = list(settings.TENANT_APPS)
    return {
        "HAS_MULTI_TYPE_TENANTS": True,
        "MULTI_TYPE_DATABASE_FIELD": "name",
        "TENANT_TYPES": {
            "public": {"APPS": list(settings.SHARED_APPS), "URLCONF": "testproject.urls_public"},
            "retail": {"APPS": tenant_apps, "URLCONF": "testproject.urls"},
            "journal": {
                "APPS": [app for app in tenant_apps if app != "testproject.shop"],
                "URLCONF": "testproject.urls",
            },
        },
    }


def test_multi_type_tenants(deploy):
    """Each tenant type is its own group: the retail tenants get the column and their own
    counts, the journal tenants (whose router skips shop) only the django_migrations row."""
    with override_settings(**multi_type_settings()):
        shops = twins(4, name="retail")
        notes = [(f"na{k}", f"nb{k}") for k in range(1, 5)]
        for pair in notes:
            for schema in pair:
                create_tenant(schema, name="journal")

        out = deploy({"0004_rank": RANK})(shops + notes)

    assert summary(out) == {**summary(out), "failed": 0, "migrated": 4, "replayed": 4}
    assert_alike(shops)
    url = database_url()
    for a, b in notes:
        assert fingerprint(url, b) == fingerprint(url, a), b
        assert "shop_product" not in str(fingerprint(url, b)["columns"])
        assert ("shop", "0004_rank") in fingerprint(url, b)["migrations"]
    assert sql('SELECT DISTINCT deploy_rank FROM "b3".shop_product') == [(3,)]
