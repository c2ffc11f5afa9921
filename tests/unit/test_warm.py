"""Warm migrations' shared states and RunPython markers, without a database
(tenantsafe.migrate.states, tenantsafe.migrate.witness)."""

from __future__ import annotations

import pytest
from django.db.migrations.loader import MigrationLoader

from tenantsafe.migrate.groups import pythons, refusal
from tenantsafe.migrate.states import Python, WarmPlan
from tenantsafe.migrate.witness import _parts, writes_no_rows
from tenantsafe.migrate.witness import pythons as marked
from tenantsafe.plan import Planner
from tenantsafe.recording import SEPARATOR


@pytest.fixture(scope="module")
def planner() -> Planner:
    return Planner()


def warm_plan(planner: Planner, applied: set[tuple[str, str]]) -> WarmPlan:
    found = planner.executor_plan(frozenset(applied))
    assert found is not None
    return WarmPlan(found.loader, found.applied, found.targets, found.plan)


def test_the_shared_states_are_what_django_computes_for_each_migration(planner):
    # Applied: everything but shop's last two; planned: those two.
    loader = MigrationLoader(None)
    applied = set(loader.graph.nodes) - {
        ("shop", "0002_seed_categories"),
        ("shop", "0003_product_sku"),
    }
    warm = warm_plan(planner, applied)
    assert [(m.app_label, m.name) for m, _ in warm.plan] == [
        ("shop", "0002_seed_categories"),
        ("shop", "0003_product_sku"),
    ]

    warm.prepare()

    for migration, _ in warm.plan:
        expected = loader.project_state((migration.app_label, migration.name), at_end=True)
        steps = warm.steps(migration, None)  # type: ignore[arg-type]  # made by prepare()
        # Django's state of the migration's own ancestry; the shared one holds every app.
        after = steps[-1].after.models
        assert {key: after[key] for key in expected.models} == expected.models, migration.name
    # Each RunPython's state before it is settled: rendered, and not reloaded per tenant.
    seed = warm.step(Python("shop", "0002_seed_categories", 0))
    assert not seed.before.is_delayed
    assert "apps" in seed.before.__dict__
    assert seed.before.apps.get_model("shop", "Category")._meta.db_table == "shop_category"


def test_a_marker_names_its_runpython_and_only_a_marker_does():
    python = Python("shop", "0002_seed_categories", 0)

    assert Python.at(python.marker) == python
    assert Python.at("-- tenantsafe: something else") is None
    assert Python.at('ALTER TABLE "shop_product" ADD COLUMN "x" integer') is None


def test_a_recording_splits_into_runs_of_statements_and_its_runpython_operations():
    first, second = Python("shop", "0004_a", 1), Python("shop", "0004_a", 3)
    sql = SEPARATOR.join(
        [
            "ALTER TABLE a ADD COLUMN x int",
            first.marker,
            second.marker,
            "CREATE INDEX i ON a (x)",
            "INSERT INTO b VALUES (1)",
        ]
    )

    assert _parts(sql) == [
        "ALTER TABLE a ADD COLUMN x int",
        first,
        second,
        f"CREATE INDEX i ON a (x){SEPARATOR}INSERT INTO b VALUES (1)",
    ]
    assert marked(sql) == 2
    assert _parts("SELECT 1") == ["SELECT 1"]


def test_a_marker_writes_no_row_of_the_witness():
    marker = Python("shop", "0004_a", 1).marker
    schema = 'ALTER TABLE "shop_product" ADD COLUMN "x" integer DEFAULT 0 NOT NULL'

    assert writes_no_rows(SEPARATOR.join([schema, marker]))
    assert not writes_no_rows(SEPARATOR.join([schema, marker, "INSERT INTO b VALUES (1)"]))


def test_runpython_is_replayed_only_where_it_can_run_in_each_replay(planner):
    loader = planner.loader
    steps = [("shop", "0002_seed_categories", False), ("shop", "0003_product_sku", False)]

    assert (
        refusal(steps, loader) == "holds shop.0002_seed_categories, which runs Python (RunPython)"
    )
    assert refusal(steps, loader, python=True) == ""
    assert pythons(steps, loader) == 1
