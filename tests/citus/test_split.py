"""How a recording is cut into statements for Citus (no database)."""

from __future__ import annotations

import pytest

from tenantsafe.citus import split

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
