"""What plan.Planner decides for an applied set, without a database: the migrations from disk,
as ``migrate`` would plan them in a schema whose django_migrations holds that set."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from django.db.migrations.loader import MigrationLoader
from django.test import override_settings

from tenantsafe.errors import PlanError
from tenantsafe.plan import Plan, Planner

Key = tuple[str, str]
SHOP = [("shop", "0001_initial"), ("shop", "0002_seed_categories"), ("shop", "0003_product_sku")]
NOTES = [("notes", "0001_initial"), ("notes", "0002_tag"), ("notes", "0003_welcome_note")]
SQUASH = ("notes", "0001_squashed_0002_tag")


def everything() -> frozenset[Key]:
    return frozenset(MigrationLoader(None).disk_migrations)


def forwards(*keys: Key) -> tuple[tuple[str, str, bool], ...]:
    return tuple((app, name, False) for app, name in keys)


def backwards(*keys: Key) -> tuple[tuple[str, str, bool], ...]:
    return tuple((app, name, True) for app, name in keys)


def test_nothing_to_do_when_everything_is_applied():
    plan = Planner().plan(everything())
    assert plan == Plan(())
    assert plan is not None
    assert plan.empty


def test_the_missing_migrations_in_dependency_order():
    applied = everything() - {SHOP[1], SHOP[2], NOTES[2]}

    plan = Planner().plan(applied)

    assert plan is not None
    assert sorted(plan.steps) == sorted(forwards(SHOP[1], SHOP[2], NOTES[2]))
    assert plan.steps.index(forwards(SHOP[1])[0]) < plan.steps.index(forwards(SHOP[2])[0])


def test_an_unknown_applied_set_has_no_plan():
    assert Planner().plan(None) is None


def test_an_inconsistent_history_is_left_to_migrate():
    # 0003 recorded without 0002, which it depends on: migrate raises; the planner does not guess.
    assert Planner().plan(everything() - {SHOP[1]}) is None


def test_plans_are_made_once_per_applied_set():
    planner = Planner()
    applied = everything() - {SHOP[2]}
    assert planner.plan(applied) is planner.plan(frozenset(applied))


@pytest.mark.parametrize(
    ("target", "missing", "steps"),
    [
        # An app: only its migrations, even where others are missing too.
        (("shop", None), {SHOP[2], NOTES[2]}, forwards(SHOP[2])),
        (("notes", None), {SHOP[2]}, ()),
        # A migration by prefix: forwards to it, or back to it.
        (("shop", "0002"), {SHOP[1], SHOP[2]}, forwards(SHOP[1])),
        (("shop", "0001"), set(), backwards(SHOP[2], SHOP[1])),
        (("shop", "0003_product_sku"), set(), ()),
        # zero: every migration of the app, unapplied last first.
        (("notes", "zero"), set(), backwards(NOTES[2], NOTES[1], NOTES[0])),
    ],
)
def test_targets(target, missing, steps):
    plan = Planner(*target).plan(everything() - missing)
    assert plan is not None
    assert plan.steps == steps


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (("nosuchapp", None), "app 'nosuchapp' has no migrations"),
        (("shop", "9999"), "There is no migration for 'shop' with the prefix '9999'"),
        (("shop", "000"), "There is more than one migration for 'shop' with the prefix '000'"),
    ],
)
def test_a_bad_target_fails_once_as_migrate_would(target, message):
    with pytest.raises(PlanError) as raised:
        Planner(*target)
    assert message in str(raised.value)


@pytest.fixture
def squashed(new_migrations: Callable[..., str]) -> Iterator[None]:
    """The notes app's migrations plus 0001_squashed_0002_tag, which replaces 0001 and 0002."""
    package = new_migrations(
        "notes",
        {
            "0001_squashed_0002_tag": """
            import importlib
            from django.db import migrations

            here = __name__.rsplit(".", 1)[0]
            first = importlib.import_module(f"{here}.0001_initial").Migration
            second = importlib.import_module(f"{here}.0002_tag").Migration


            class Migration(migrations.Migration):
                initial = True
                replaces = [("notes", "0001_initial"), ("notes", "0002_tag")]
                dependencies = []
                operations = [*first.operations, *second.operations]
            """
        },
    )
    with override_settings(MIGRATION_MODULES={"notes": package}):
        yield


@pytest.mark.parametrize(
    ("notes", "plan"),
    [
        # What the squash replaces is recorded, its own row is not: migrate writes that row.
        (NOTES, Plan((), (SQUASH,))),
        ([*NOTES, SQUASH], Plan(())),
        ([SQUASH, NOTES[2]], Plan(())),
        # Partly applied: the replaced migrations are used, not the squash.
        (NOTES[:1], Plan(forwards(NOTES[1], NOTES[2]))),
        ([SQUASH, NOTES[0]], Plan(forwards(NOTES[1], NOTES[2]))),
        ([], Plan(forwards(SQUASH, NOTES[2]))),
    ],
)
def test_squashed_migrations(squashed, notes, plan):
    others = {key for key in MigrationLoader(None).disk_migrations if key[0] != "notes"}
    assert Planner().plan(frozenset(others | set(notes))) == plan
