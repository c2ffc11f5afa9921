"""migrate_schemas_safe through call_command on the test database (direct connection)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest
from django.core.management.base import CommandError
from django.test import override_settings

from testproject.customers.models import Client
from tests.dbtools import add_tenant, last_output, migrate, recorded, scalar, sql, summary, tables

pytestmark = pytest.mark.usefixtures("drop_tenant_schemas")


def test_migrates_every_tenant_and_summarises():
    for name in ("alpha", "beta"):
        add_tenant(name)

    out, err = migrate(tenant=True)

    assert "migrate_schemas_safe: 2 tenant(s): 2 migrated, 0 already current, 0 failed" in out
    assert err == ""
    for name in ("alpha", "beta"):
        assert {"shop_product", "notes_note", "django_content_type"} <= tables(name)
        assert scalar(f'SELECT count(*) FROM "{name}".shop_category') == 3
        assert ("search", "0002_term_index_concurrently") in recorded(name)
    # Nothing of the tenants' apps landed in public.
    assert not {"shop_product", "notes_note", "search_searchentry"} & tables("public")

    out, _ = migrate(tenant=True)
    assert "2 tenant(s): 0 migrated, 2 already current, 0 failed" in out


@pytest.mark.parametrize("executor", ["standard", "multiprocessing"])
def test_missing_schema_fails_alone_and_names_the_fix(executor):
    add_tenant("first")
    add_tenant("gone", with_schema=False)
    add_tenant("last")

    with pytest.raises(CommandError, match="1 of 3 schema"):
        migrate(tenant=True, executor=executor)
    out, err = last_output()

    assert "3 tenant(s): 2 migrated, 0 already current, 1 failed" in out
    assert (
        'FAILED gone: Schema "gone" does not exist: run migrate_schemas_safe --create-missing '
        "to create and migrate it, or delete the tenant row that names it." in err
    )
    assert "Traceback" not in err
    assert "shop_product" in tables("first")
    assert "shop_product" in tables("last")
    assert scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'gone'") == 0

    out, err = migrate(tenant=True, create_missing=True, executor=executor)
    assert "3 tenant(s): 1 migrated, 2 already current, 0 failed" in out
    assert scalar('SELECT count(*) FROM "gone".shop_category') == 3


def test_traceback_option_shows_the_traceback():
    add_tenant("gone", with_schema=False)
    with pytest.raises(CommandError):
        migrate(tenant=True, traceback=True)
    _, err = last_output()
    assert "Traceback (most recent call last)" in err
    assert "SchemaMissingError" in err


def test_failing_data_migration_leaves_nothing_half_applied(monkeypatch):
    monkeypatch.setenv("TESTPROJECT_FAIL_SEED", "broken")
    for name in ("before", "broken", "after"):
        add_tenant(name)

    with pytest.raises(CommandError):
        migrate(tenant=True)
    out, err = last_output()

    assert "3 tenant(s): 2 migrated, 0 already current, 1 failed" in out
    assert "FAILED broken: RuntimeError: seeding failed on purpose in broken" in err
    for name in ("before", "after"):
        assert scalar(f'SELECT count(*) FROM "{name}".shop_category') == 3
        assert ("shop", "0003_product_sku") in recorded(name)
    # The atomic data migration rolled back whole: table from 0001, no rows, not recorded.
    assert "shop_category" in tables("broken")
    assert scalar('SELECT count(*) FROM "broken".shop_category') == 0
    assert ("shop", "0001_initial") in recorded("broken")
    assert ("shop", "0002_seed_categories") not in recorded("broken")


def test_debug_log_names_each_tenant_in_current_schema_and_search_path(caplog):
    for name in ("alpha", "beta"):
        add_tenant(name)
    with caplog.at_level(logging.DEBUG, logger="tenantsafe"):
        migrate(tenant=True, verbosity=0)

    messages = [r.getMessage() for r in caplog.records if r.name.startswith("tenantsafe")]
    for name in ("alpha", "beta"):
        for when in ("before", "after"):
            assert (
                f"tenant {name} {when} migrations: current_schema() = {name}, "
                f'search_path = "{name}"' in messages
            )
        assert any(
            m.startswith(f"schema {name}: search_path set to ")
            and m.endswith(f"current_schema() = {name}")
            for m in messages
        )


@pytest.mark.parametrize(
    "bad",
    ['evil"; DROP SCHEMA public CASCADE; --', "pg_catalog2", "semi;colon", "back\\slash"],
)
def test_malicious_schema_names_in_rows_never_reach_sql(bad):
    add_tenant("good")
    add_tenant(bad, with_schema=False)

    with pytest.raises(CommandError):
        migrate(tenant=True)
    out, err = last_output()

    assert "2 tenant(s): 1 migrated, 0 already current, 1 failed" in out
    assert f"FAILED {bad}: {bad!r} is not a valid schema name" in err
    assert "shop_product" in tables("good")
    assert "customers_client" in tables("public")
    assert scalar("SELECT count(*) FROM pg_namespace WHERE nspname = %s", [bad]) == 0


def test_malicious_schema_option_is_refused_before_anything_runs():
    add_tenant("good")
    with pytest.raises(CommandError, match=r"'a;b' \(--schema\) is not a valid schema name"):
        migrate(schema_name="a;b")
    assert "shop_product" not in tables("good")


def test_tenant_run_reports_tables_that_appear_in_public(monkeypatch):
    monkeypatch.setenv("TESTPROJECT_LEAK_PUBLIC", "leaky")
    add_tenant("leaky")
    try:
        with pytest.raises(CommandError, match=r"1 of 1 schema\(s\) failed"):
            migrate(tenant=True)
        out, err = last_output()
        # The tenant itself migrated; the run fails for what appeared in public, and says so.
        assert "1 tenant(s): 1 migrated, 0 already current, 0 failed" in out
        assert err.splitlines() == [
            "FAILED public: public gained tables while tenants were migrated: shop_leaked"
        ]
        assert "shop_leaked" in tables("public")
        assert scalar('SELECT count(*) FROM "leaky".shop_category') == 3
    finally:
        sql("DROP TABLE IF EXISTS public.shop_leaked")


def test_check_and_plan_change_nothing():
    add_tenant("alpha")

    with pytest.raises(CommandError, match="1 schema\\(s\\) have unapplied migrations"):
        migrate(tenant=True, check_unapplied=True)
    out, _ = migrate(tenant=True, plan=True)
    assert "1 tenant(s): 0 migrated, 0 already current, 1 with a plan shown, 0 failed" in out
    assert "Planned operations:" in out
    assert "shop.0001_initial" in out
    assert tables("alpha") <= {"django_migrations"}

    migrate(tenant=True, verbosity=0)
    out, _ = migrate(tenant=True, check_unapplied=True)
    assert "1 tenant(s): 0 migrated, 1 already current, 0 failed" in out


def test_fake_records_without_creating_tables():
    add_tenant("alpha")
    out, _ = migrate(tenant=True, fake=True)
    assert "1 migrated" in out
    assert ("shop", "0003_product_sku") in recorded("alpha")
    assert "shop_product" not in tables("alpha")


def test_app_label_and_migration_name_target():
    add_tenant("alpha")
    migrate("shop", "0001", tenant=True, verbosity=0)
    assert recorded("alpha") >= {("shop", "0001_initial")}
    assert ("shop", "0002_seed_categories") not in recorded("alpha")
    assert "notes_note" not in tables("alpha")


def test_schema_option_migrates_only_that_tenant():
    add_tenant("alpha")
    add_tenant("beta")
    out, _ = migrate(schema_name="beta")
    assert "1 tenant(s): 1 migrated" in out
    assert "shop_product" in tables("beta")
    assert "shop_product" not in tables("alpha")


def test_schema_option_for_a_missing_schema_names_the_fix():
    with pytest.raises(CommandError):
        migrate(schema_name="nowhere")
    _, err = last_output()
    assert (
        'FAILED nowhere: Schema "nowhere" does not exist: run migrate_schemas_safe '
        "--create-missing" in err
    )


def test_unguardable_executor_is_refused():
    add_tenant("alpha")
    with pytest.raises(CommandError, match="cannot guard the 'celery' executor"):
        migrate(tenant=True, executor="celery")
    assert "shop_product" not in tables("alpha")


def test_the_subprocess_executor_runs_on_parallel_forked_workers(capfd):
    add_tenant("alpha")
    add_tenant("beta")
    add_tenant("gamma")

    out, _ = migrate(tenant=True, executor="subprocess", parallel=2, no_replay=True)

    assert summary(out) == {**summary(out), "migrated": 3, "failed": 0}
    # migrate's own lines, written by the forked workers.
    printed = capfd.readouterr().out
    assert "multiprocessing:alpha] === Starting migration" in printed
    for name in ("alpha", "beta", "gamma"):
        assert "shop_product" in tables(name)


def test_verbosity_zero_prints_nothing_on_success():
    add_tenant("alpha")
    out, err = migrate(tenant=True, verbosity=0)
    assert (out, err) == ("", "")
    assert "shop_product" in tables("alpha")


@pytest.fixture
def shared_migration(
    new_migrations: Callable[..., str], drop_tenant_schemas: None
) -> Iterator[None]:
    """A new migration of the shared customers app (a table), in force for the test; public
    is put back afterwards."""
    package = new_migrations(
        "customers",
        {
            "0002_visit": """
            from django.db import migrations, models


            class Migration(migrations.Migration):
                dependencies = [("customers", "0001_initial")]

                operations = [
                    migrations.CreateModel(
                        name="Visit",
                        fields=[("id", models.BigAutoField(primary_key=True))],
                    ),
                ]
            """
        },
    )
    try:
        with override_settings(MIGRATION_MODULES={"customers": package}):
            yield
    finally:
        sql("DROP TABLE IF EXISTS public.customers_visit")
        sql("DELETE FROM public.django_migrations WHERE app = %s AND name = %s", list(VISIT))


VISIT = ("customers", "0002_visit")


@pytest.mark.usefixtures("shared_migration")
def test_shared_migrates_public_only():
    add_tenant("alpha")
    out, _ = migrate(shared=True)
    assert "migrate_schemas_safe: public migrated; 0 tenant(s): 0 migrated" in out
    assert "customers_visit" in tables("public")
    assert VISIT in recorded("public")
    assert tables("alpha") == set()

    out, _ = migrate(shared=True)
    assert "migrate_schemas_safe: public current; 0 tenant(s)" in out


def test_tenant_model_rows_are_untouched():
    add_tenant("alpha")
    migrate(tenant=True, verbosity=0)
    assert list(Client.objects.values_list("schema_name", flat=True)) == ["alpha"]


def test_create_missing_never_invents_a_tenant_schema():
    with pytest.raises(CommandError, match='No tenant row has schema "typo"'):
        migrate(schema_name="typo", create_missing=True)
    assert scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'typo'") == 0


@pytest.mark.usefixtures("shared_migration")
def test_a_full_run_reports_public_apart_from_the_tenants():
    add_tenant("alpha")
    add_tenant("beta")
    out, _ = migrate()
    assert "migrate_schemas_safe: public migrated; 2 tenant(s): 2 migrated, 0 already current" in (
        out
    )
    # Public first, then the tenants, each in its own schema.
    assert VISIT in recorded("public")
    assert "customers_visit" in tables("public")
    for name in ("alpha", "beta"):
        assert "shop_product" in tables(name)
        assert "customers_visit" not in tables(name)
    assert not {"shop_product", "notes_note"} & tables("public")

    out, _ = migrate()
    assert "migrate_schemas_safe: public current; 2 tenant(s): 0 migrated, 2 already current" in (
        out
    )


SEES_LOCK_TIMEOUT = """
    from django.db import migrations


    class Migration(migrations.Migration):
        dependencies = [("notes", "0003_welcome_note")]

        operations = [
            migrations.RunSQL(
                "CREATE TABLE notes_seen (lock_timeout text);"
                "INSERT INTO notes_seen SELECT current_setting('lock_timeout')",
                "DROP TABLE notes_seen",
            )
        ]
"""


@pytest.mark.parametrize(
    ("option", "seen"),
    [(None, "5s"), ("0", "0"), ("2min", "2min")],
    ids=["default", "0", "2min"],
)
def test_the_lock_timeout_a_migration_runs_under(new_migrations, option, seen):
    # The default is 5 s; 0 leaves PostgreSQL's own (0: no timeout) in force.
    package = new_migrations("notes", {"0004_seen": SEES_LOCK_TIMEOUT})
    add_tenant("alpha")
    with override_settings(MIGRATION_MODULES={"notes": package}):
        migrate(tenant=True, verbosity=0, **({} if option is None else {"lock_timeout": option}))
    assert scalar('SELECT lock_timeout FROM "alpha".notes_seen') == seen
    assert scalar("SHOW lock_timeout") == "0"
