"""When one witness's recording may stand for another's, and what a recording depends on,
without a database (tenantsafe.migrate.witness)."""

from __future__ import annotations

import dataclasses

import pytest

from tenantsafe.migrate.witness import Witness, depends_on, writes_no_rows

ONE = Witness(
    schema="t1",
    sql='ALTER TABLE "shop_product" ADD COLUMN "colour" varchar(20)',
    problem="",
    tables=frozenset(),
    checked=frozenset({"django_migrations", "django_content_type", "auth_permission"}),
    catalog="catalog-digest",
    rows="rows-digest",
    without_ids=frozenset({"django_content_type", "auth_permission"}),
)


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({}, ""),
        ({"schema": "t2"}, ""),
        ({"problem": "names the witness (its schema t2)"}, "names the witness (its schema t2)"),
        ({"sql": ONE.sql + " NOT NULL"}, "the recordings of t1 and t2 differ"),
        ({"tables": frozenset({"shop_category"})}, "t1 and t2 read different tables"),
        ({"checked": frozenset({"django_migrations"})}, "t1 and t2 read different tables"),
        ({"without_ids": frozenset()}, "t1 and t2 read different tables"),
        ({"catalog": "another"}, "t1 and t2 differ after migrating"),
        ({"rows": "another"}, "t1 and t2 differ after migrating"),
        # Rows that could not be digested never agree, not even with the same None.
        ({"rows": None}, "t1 and t2 differ after migrating"),
    ],
)
def test_agreement_of_two_witnesses(changes, why):
    two = dataclasses.replace(ONE, **{"schema": "t2", **changes})
    one = dataclasses.replace(ONE, rows=None) if changes.get("rows", "") is None else ONE

    assert one.agrees_with(two) == why
    assert two.agrees_with(one) == why.replace("t1 and t2", "t2 and t1")


def test_the_first_witness_problem_is_said_first():
    one = dataclasses.replace(ONE, problem="read the tenant's row")
    two = dataclasses.replace(ONE, schema="t2", problem="names the witness")
    assert one.agrees_with(two) == "read the tenant's row"


APPLIED = (
    'INSERT INTO "django_migrations" ("app", "name", "applied") VALUES '
    "('shop', '0004_colour', '2026-01-01T00:00:00+00:00'::timestamptz) RETURNING "
    '"django_migrations"."id"'
)


@pytest.mark.parametrize(
    ("sql", "no_rows"),
    [
        ("", True),
        ('ALTER TABLE "shop_product" ADD COLUMN "colour" varchar(20) DEFAULT \'\' NOT NULL', True),
        (
            'ALTER TABLE "shop_product" ADD COLUMN "colour" varchar(20)\n;\n'
            'CREATE INDEX "shop_product_colour_idx" ON "shop_product" ("colour")\n;\n' + APPLIED,
            True,
        ),
        (
            'CREATE TABLE "shop_coupon" ("id" bigint NOT NULL PRIMARY KEY)\n;\n'
            'INSERT INTO "django_content_type" ("app_label", "model") VALUES '
            "('shop', 'coupon') RETURNING \"django_content_type\".\"id\"\n;\n" + APPLIED,
            False,
        ),
        ('UPDATE "shop_product" SET "colour" = \'red\'', False),
        # Two statements in one part: the applied row is not alone.
        (APPLIED + '; DELETE FROM "shop_product"', False),
        ('CREATE TABLE "shop_copy" AS SELECT * FROM "shop_product"', False),
    ],
)
def test_writes_no_rows(sql, no_rows):
    assert writes_no_rows(sql) is no_rows


TABLES = {"shop_product", "shop_category", "django_migrations", 'we"ird'}


@pytest.mark.parametrize(
    ("reads", "written", "depends"),
    [
        ([], [], set()),
        (['SELECT 1 FROM "we""ird"'], [], {'we"ird'}),
        (['SELECT "id" FROM "shop_category" WHERE "name" = %s'], [], {"shop_category"}),
        (
            [
                'SELECT * FROM "shop_product" INNER JOIN "shop_category" ON (true)',
                "SELECT * FROM ONLY shop_product",
            ],
            [],
            {"shop_product", "shop_category"},
        ),
        # Qualified by the witness's own schema: its table; by another schema: not.
        (
            ['SELECT 1 FROM "t1"."shop_category"', 'SELECT 1 FROM "public"."shop_product"'],
            [],
            {"shop_category"},
        ),
        # Not a table of the schema, or django_migrations (the replay writes its own rows).
        (['SELECT 1 FROM "customers_client"', 'SELECT * FROM "django_migrations"'], [], set()),
        (
            [],
            [
                'INSERT INTO "shop_category" ("name") VALUES (%s) RETURNING "shop_category"."id"',
                'INSERT INTO "shop_product" ("name") VALUES (%s)',
            ],
            {"shop_category"},
        ),
    ],
)
def test_depends_on_the_tables_read_and_those_inserted_into_for_ids(reads, written, depends):
    assert depends_on("t1", reads, written, TABLES) == frozenset(depends)
