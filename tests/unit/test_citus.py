"""What tenantsafe sends differently to Citus, without a database: which statements the guard
may merge its check into, how a recording is cut into statements, which node an error names."""

from __future__ import annotations

import psycopg
import pytest

from tenantsafe.citus import split, unreachable_node
from tenantsafe.guard.citus import deparsed

CASES = [
    # A ';' inside a quoted string, an E'' string with a backslash-escaped quote, a doubled
    # quote, a dollar-quoted body (with a $$ inside a tagged one), a comment, a quoted name.
    (
        "CREATE TABLE a (x text DEFAULT ';')\n;\nSELECT 1",
        ["CREATE TABLE a (x text DEFAULT ';')", "SELECT 1"],
    ),
    (
        "INSERT INTO a VALUES (E'it\\'s; ok')\n;\nSELECT 2",
        ["INSERT INTO a VALUES (E'it\\'s; ok')", "SELECT 2"],
    ),
    ("INSERT INTO a VALUES ('a''b;c')", ["INSERT INTO a VALUES ('a''b;c')"]),
    ("SELECT $$ ; $$, $fn$ $$ ; $fn$;SELECT 3", ["SELECT $$ ; $$, $fn$ $$ ; $fn$", "SELECT 3"]),
    ("SELECT 1 -- no; end\n;\n/* ; */ SELECT 4", ["SELECT 1 -- no; end", "/* ; */ SELECT 4"]),
    ('SELECT 1 AS "a;b"', ['SELECT 1 AS "a;b"']),
    # Empty statements and those holding only a comment are left out.
    ("SELECT 5;\n;\n  ;\n-- only a comment\n", ["SELECT 5"]),
    # A typed literal's backslash is not an escape (only E'' has them).
    ("SELECT date'x\\';SELECT 6", ["SELECT date'x\\'", "SELECT 6"]),
]


@pytest.mark.parametrize(("sql", "expected"), CASES)
def test_split_cuts_at_the_semicolons_that_end_statements(sql, expected):
    assert [part.strip() for part in split(sql)] == expected


DEPARSED = [
    ('SELECT "shop_product"."id" FROM "shop_product"', True),
    ('INSERT INTO "notes_note" ("title") VALUES (\'a\') RETURNING "notes_note"."id"', True),
    ("  update shop_product SET name = 'x'", True),
    ("DELETE FROM notes_note", True),
    ("WITH x AS (SELECT 1) SELECT * FROM x", True),
    ("(SELECT 1) UNION (SELECT 2)", True),
    # Citus sends these to the workers as the query string they came in.
    ('CREATE INDEX "shop_product_colour_idx" ON "shop_product" ("colour")', False),
    ('ALTER TABLE "shop_product" ADD CONSTRAINT "x" CHECK ("price_cents" >= 0)', False),
    ('ALTER TABLE "shop_product" RENAME TO "shop_item"', False),
    ('CREATE TABLE "shop_coupon" ("id" bigint NOT NULL PRIMARY KEY)', False),
    ("SET LOCAL lock_timeout = '5s'", False),
    ("TRUNCATE notes_note", False),
]


@pytest.mark.parametrize(("sql", "merges"), DEPARSED)
def test_only_queries_and_dml_may_share_a_query_string_on_citus(sql, merges):
    assert deparsed(sql) is merges


UNREACHABLE = [
    (
        "connection to the remote node postgres@10.0.0.3:5432 failed with the following "
        "error: Connection refused\n\tIs the server running on that host?",
        "10.0.0.3:5432 (Connection refused)",
    ),
    ("failure on connection marked as essential: 10.0.0.2:6432", "10.0.0.2:6432"),
    ('connection to server at "127.0.0.1", port 5432 failed: Connection refused', ""),
    ('relation "shop_product" does not exist', ""),
]


@pytest.mark.parametrize(("message", "node"), UNREACHABLE)
def test_an_unreachable_node_is_read_from_the_error_and_its_causes(message, node):
    wrapped = RuntimeError("wrapped, as Django wraps the driver's error")
    wrapped.__cause__ = OSError(message)

    assert unreachable_node(wrapped) == node


def test_a_tenant_failed_by_an_unreachable_worker_is_not_reported_as_a_lost_connection():
    from django.db import utils as db

    from tenantsafe.migrate import failures
    from tenantsafe.options import RunOptions

    # What Citus raises (SQLSTATE 08006), as Django wraps it.
    error = db.OperationalError("connection to the remote node ... failed")
    error.__cause__ = psycopg.errors.ConnectionFailure(
        "connection to the remote node postgres@10.0.0.3:5432 failed with the following error: "
        "Connection refused\n\tIs the server running on that host and accepting TCP/IP "
        "connections?"
    )
    opts = RunOptions(database="default", migrate={})

    assert failures.is_connection_lost(error)
    assert failures.failure(error, opts, "acme", failures.LockWaits(), 1) == (
        "Citus node 10.0.0.3:5432 (Connection refused) is unreachable. Run again once it is "
        "back: schema changes need every node, data changes the node of the tenant."
    )
