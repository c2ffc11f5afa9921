"""Groups of alike tenants and the plans never replayed, without a database
(tenantsafe.migrate.groups)."""

from __future__ import annotations

from typing import ClassVar

import pytest
from django.db import migrations
from django.db.migrations.loader import MigrationLoader
from django.db.migrations.operations.base import Operation

from tenantsafe.migrate.groups import Group, refusal
from tenantsafe.results import TenantRef

A, B, C, D, E = (TenantRef(name) for name in ("a", "b", "c", "d", "e"))


def test_exactly_like_keeps_those_numbering_ids_as_the_tenant_does():
    group = Group("", (A, B, C, D, E), ("x", "x", "y", None, None))

    assert group.exactly_like(A, [B, C, D, E]) == [B]
    assert group.exactly_like(C, [A, B, D, E]) == []
    # Rows that could not be digested are like nothing, not even each other.
    assert group.exactly_like(D, [A, B, C, E]) == []


def test_split_exactly_groups_by_ids_in_order_and_keeps_each_tenants_digest():
    group = Group("premium", (A, B, C, D, E), ("x", "y", "x", None, "y"))

    split = group.split_exactly([B, C, D, E, A])

    assert split == [
        Group("premium", (B, E), ("y", "y")),
        Group("premium", (C, A), ("x", "x")),
        Group("premium", (D,), (None,)),
    ]


def test_split_exactly_of_nobody_is_no_group():
    assert Group("", (A, B, C), ("x", "x", "x")).split_exactly([]) == []


@pytest.fixture(scope="module")
def loader() -> MigrationLoader:
    """The test project's migrations from disk (no connection)."""
    return MigrationLoader(None)


@pytest.mark.parametrize(
    ("steps", "why"),
    [
        ([], ""),
        ([("shop", "0003_product_sku", False), ("notes", "0002_tag", False)], ""),
        (
            [("shop", "0003_product_sku", False), ("shop", "0002_seed_categories", True)],
            "unapplies shop.0002_seed_categories",
        ),
        (
            [("notes", "0002_tag", False), ("notes", "0003_welcome_note", False)],
            "holds notes.0003_welcome_note, which runs Python (RunPython)",
        ),
        (
            [("search", "0002_term_index_concurrently", False), ("shop", "0003_product_sku", True)],
            "holds search.0002_term_index_concurrently, which is not atomic",
        ),
    ],
)
def test_refusal_of_plans_from_the_test_project(loader, steps, why):
    assert refusal(steps, loader) == why


def test_a_run_python_inside_separate_database_and_state_is_refused_too():
    loader = MigrationLoader(None)

    class Hidden(migrations.Migration):
        operations: ClassVar[list[Operation]] = [
            migrations.SeparateDatabaseAndState(
                database_operations=[migrations.RunPython(migrations.RunPython.noop)],
            )
        ]

    class OnlyState(migrations.Migration):
        operations: ClassVar[list[Operation]] = [
            migrations.SeparateDatabaseAndState(
                state_operations=[migrations.RunPython(migrations.RunPython.noop)],
            )
        ]

    hidden = Hidden("0099_hidden", "shop")
    only_state = OnlyState("0098_state", "shop")
    loader.graph.add_node(("shop", "0099_hidden"), hidden)
    loader.graph.add_node(("shop", "0098_state"), only_state)

    # Even when top-level RunPython is replayed: the witness marks only top-level operations.
    for python in (False, True):
        assert refusal([("shop", "0099_hidden", False)], loader, python=python) == (
            "holds shop.0099_hidden, which runs Python inside SeparateDatabaseAndState"
        )
    # Operations that only change the state send no SQL.
    assert refusal([("shop", "0098_state", False)], loader) == ""
