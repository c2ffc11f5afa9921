"""tenantsafe.recording.fingerprints: the SQL that digests a schema's catalog and rows."""

from __future__ import annotations

import pytest

from tenantsafe.recording.fingerprints import (
    CATALOG,
    CATALOG_LINES,
    ROW_LIMIT,
    WITHOUT_IDS,
    rows_query,
)


def test_the_catalog_digest_is_built_on_the_reusable_lines():
    assert CATALOG.startswith(CATALOG_LINES)
    # What a caller selects from: one line per object, with its schema.
    assert "lines AS (" in CATALOG_LINES
    assert ") AS line\n" in CATALOG_LINES
    assert "string_agg(l.line, E'\\n' ORDER BY l.line COLLATE \"C\")" in CATALOG


def test_a_small_tables_rows_are_digested_up_to_the_limit():
    query = rows_query(3, "alpha", "notes_note", limited=True, ids=True)

    assert query.startswith("SELECT 3, ")
    assert f"count(*) > {ROW_LIMIT} THEN NULL" in query
    assert f'FROM "alpha"."notes_note" t  LIMIT {ROW_LIMIT + 1}' in query
    # With its sequences' values.
    assert "pg_sequence_last_value" in query
    assert 'd.refobjid = \'"alpha"."notes_note"\'::regclass' in query


def test_an_unlimited_table_is_read_whole():
    query = rows_query(0, "alpha", "django_migrations", limited=False, ids=True)

    assert "count(*) > NULL" in query
    assert "LIMIT" not in query
    # Which migrations, not when or in which order they were applied.
    assert "SELECT (t.app, t.name)::text AS r" in query


@pytest.mark.parametrize("table", sorted(WITHOUT_IDS))
def test_keyed_tables_without_ids_have_no_ids_nor_sequences(table):
    query = rows_query(1, "alpha", table, limited=False, ids=False)

    assert "t::text" not in query
    assert "t.id" not in query.replace("t.content_type_id", "")
    assert query.endswith("x), NULL")


def test_a_tables_name_is_quoted_in_identifiers_and_literals():
    # Schema names are validated (no quotes); a table's name may hold both kinds.
    query = rows_query(0, "alpha", "we\"ird's", limited=True, ids=True)

    assert 'FROM "alpha"."we""ird\'s" t' in query
    assert 'd.refobjid = \'"alpha"."we""ird\'\'s"\'::regclass' in query


def test_permissions_are_named_by_their_content_types_in_the_same_schema():
    query = rows_query(0, "alpha", "auth_permission", limited=False, ids=False)

    assert 'LEFT JOIN "alpha"."django_content_type" c ON c.id = t.content_type_id' in query
