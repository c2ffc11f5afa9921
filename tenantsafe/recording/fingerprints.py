"""Catalog and row fingerprints: what a schema holds, as one digest per schema.

A replay commits only if the new schema's fingerprint is the recorded one; a deploy groups
tenants by their catalogs and keyed rows, and checks each replay by them; spares are checked
by them when claimed. The schema's own name is factored out (the prefix PostgreSQL prints where
the schema is not first on the path), so two schemas with the same objects have the same digest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

from tenantsafe import schemas

# The catalog of each schema of %(schemas)s as lines: ``lines(nspname, line)``, one line per
# relation, column, constraint, index and sequence (with its value when %(values)s), the
# schema's own name factored out. Anything that needs the catalog object by object selects
# from ``lines`` after this; :data:`CATALOG` digests them.
CATALOG_LINES = r"""
WITH ns AS (
  SELECT oid, nspname, quote_ident(nspname) || '.' AS own
    FROM pg_namespace WHERE nspname = ANY(%(schemas)s)),
-- The schema's relations through pg_depend, whose index finds them (pg_class has none on
-- relnamespace, and a scan of it grows with every tenant); indexes come through pg_index.
rel AS (
  SELECT c.oid, c.relname, c.relkind, c.relpersistence, ns.nspname, ns.own
    FROM ns JOIN pg_depend d ON d.refclassid = 'pg_namespace'::regclass
         AND d.refobjid = ns.oid AND d.classid = 'pg_class'::regclass AND d.objsubid = 0
    JOIN pg_class c ON c.oid = d.objid AND c.relnamespace = ns.oid),
lines AS (
  SELECT r.nspname, concat_ws(E'\t', 'relation', r.relname, r.relkind, r.relpersistence) AS line
    FROM rel r WHERE r.relkind NOT IN ('i', 'I')
  UNION ALL
  SELECT r.nspname, concat_ws(E'\t', 'column', r.relname, a.attname, a.attnum, a.attcollation,
         replace(format_type(a.atttypid, a.atttypmod), r.own, ''),
         a.attnotnull, a.attidentity, a.attgenerated,
         replace(coalesce(pg_get_expr(d.adbin, d.adrelid), ''), r.own, ''))
    FROM rel r JOIN pg_attribute a ON a.attrelid = r.oid
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE a.attnum > 0 AND NOT a.attisdropped AND r.relkind NOT IN ('i', 'I', 'S')
  UNION ALL
  -- By its catalog columns too: deparsing every constraint cost a third of the query. Only
  -- CHECK and exclusion constraints, whose expressions these columns do not show, are.
  SELECT r.nspname, concat_ws(E'\t', 'constraint', r.relname, con.conname, con.contype,
         con.condeferrable, con.condeferred, con.convalidated, con.conkey, con.confkey,
         replace(NULLIF(con.confrelid, 0)::regclass::text, r.own, ''),
         con.confupdtype, con.confdeltype, con.confmatchtype,
         CASE WHEN con.contype IN ('c', 'x')
              THEN replace(pg_get_constraintdef(con.oid), r.own, '') END)
    FROM rel r JOIN pg_constraint con ON con.conrelid = r.oid
  UNION ALL
  -- By its catalog columns (column numbers are in the column lines): deparsing every index
  -- would cost most of the query. Expressions and predicates are deparsed.
  SELECT r.nspname, concat_ws(E'\t', 'index', r.relname, c.relname, c.relam, c.reltablespace,
         c.reloptions, i.indisunique, i.indisprimary, i.indnullsnotdistinct, i.indimmediate,
         i.indkey, i.indclass, i.indcollation, i.indoption,
         CASE WHEN i.indexprs IS NOT NULL OR i.indpred IS NOT NULL
              THEN replace(pg_get_indexdef(i.indexrelid), r.own, '') END)
    FROM rel r JOIN pg_index i ON i.indrelid = r.oid JOIN pg_class c ON c.oid = i.indexrelid
  UNION ALL
  SELECT r.nspname, concat_ws(E'\t', 'sequence', r.relname, format_type(s.seqtypid, NULL),
         s.seqstart, s.seqincrement, s.seqmin, s.seqmax, s.seqcycle,
         CASE WHEN %(values)s THEN coalesce(pg_sequence_last_value(r.oid)::text, '') END)
    FROM rel r JOIN pg_sequence s ON s.seqrelid = r.oid
)
"""

_DIGESTS = r"""
SELECT ns.nspname, encode(sha256(convert_to(
         coalesce(string_agg(l.line, E'\n' ORDER BY l.line COLLATE "C"), ''),
         'UTF8')), 'hex')
  FROM ns LEFT JOIN lines l ON l.nspname = ns.nspname GROUP BY ns.nspname
"""
# One digest per schema of %(schemas)s (a schema without objects too): of its lines, sorted.
CATALOG = CATALOG_LINES + _DIGESTS


def catalogs(cursor: Any, names: Sequence[str], *, sequence_values: bool = False) -> dict[str, str]:
    """A digest per schema of ``names`` (missing ones are left out): its tables, columns with
    types, defaults and nullability, constraints, indexes and sequences (their values too with
    ``sequence_values``). Independent of the search path, except for how objects in schemas
    other than the digested one print."""
    cursor.execute(CATALOG, {"schemas": list(names), "values": sequence_values})
    return dict(cursor.fetchall())


_LINES = CATALOG_LINES + "SELECT l.nspname, l.line FROM lines l"  # noqa: S608


def catalog_lines(cursor: Any, names: Sequence[str]) -> dict[str, list[str]]:
    """The lines :func:`catalogs` digests (without sequence values), sorted, per schema of
    ``names`` that has any: one per relation, column, constraint, index and sequence,
    tab-separated, the kind of object first (see :mod:`tenantsafe.catalog_lines`)."""
    cursor.execute(_LINES, {"schemas": list(names), "values": False})
    found: dict[str, list[str]] = {}
    for schema, line in cursor.fetchall():
        found.setdefault(schema, []).append(line)
    # The digest's order: by code point, as COLLATE "C" sorts.
    return {schema: sorted(lines) for schema, lines in found.items()}


def fingerprint(cursor: Any, schema: str) -> str:
    """The digest of a new schema, with its sequences' values (see :func:`catalogs`)."""
    return catalogs(cursor, [schema], sequence_values=True).get(schema, "")


# The rows a recording may depend on (those it read, and those it inserted and was given ids
# for): small tables, digested whole, with the values of their sequences.
ROW_LIMIT = 1000
# Tables per rows query: PostgreSQL plans a UNION ALL of scalar subqueries in time that grows
# with the square of their number (200 cost four times as much a table as 50).
_BATCH = 50


# Content types and permissions without their ids: which models and permissions a schema
# has, whatever order they were created in. (row, what the row needs joined.)
_WITHOUT_IDS = {
    "django_content_type": ("(t.app_label, t.model)::text", ""),
    "auth_permission": (
        "(c.app_label, c.model, t.codename, t.name)::text",
        'LEFT JOIN {schema}."django_content_type" c ON c.id = t.content_type_id',
    ),
}
WITHOUT_IDS = frozenset(_WITHOUT_IDS)


def rows_digests(
    cursor: Any,
    names: Sequence[str],
    tables: Iterable[str],
    *,
    present: Iterable[str] | None = None,
    unlimited: Iterable[str] = (),
    without_ids: Iterable[str] = (),
) -> dict[str, str | None]:
    """A digest per schema of ``names`` of the rows of those of ``tables`` it has, and of
    their sequences' values; None where one of them holds more than ``ROW_LIMIT`` rows.
    ``django_migrations`` counts by app and name only (when and in which order is not part
    of the state). ``present``: the tables each schema is known to have (one query less; a
    missing one fails). ``unlimited``: tables read whatever their size. ``without_ids``
    (of ``WITHOUT_IDS``): tables digested without their ids and sequence values."""
    wanted = sorted(set(tables))
    if present is None:
        cursor.execute(
            "SELECT n.nspname, c.relname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = ANY(%s) AND c.relname = ANY(%s) AND c.relkind IN ('r', 'p')",
            [list(names), wanted],
        )
        pairs = sorted(cursor.fetchall())
    else:
        pairs = [(schema, name) for schema in names for name in sorted(set(present) & set(wanted))]
    whole, idless = set(unlimited), set(without_ids)
    lines: dict[str, list[str]] = {name: [] for name in names}
    for start in range(0, len(pairs), _BATCH):
        batch = pairs[start : start + _BATCH]
        cursor.execute(
            " UNION ALL ".join(
                rows_query(i, schema, name, limited=name not in whole, ids=name not in idless)
                for i, (schema, name) in enumerate(batch)
            )
        )
        for i, digest, sequences in cursor.fetchall():
            schema, name = batch[i]
            lines[schema].append(f"{name}\t{digest}\t{sequences or ''}" if digest else "")
    result: dict[str, str | None] = {}
    for schema, found in lines.items():
        if "" in found:
            result[schema] = None
        else:
            result[schema] = hashlib.sha256("\n".join(sorted(found)).encode()).hexdigest()
    return result


def rows_query(number: int, schema: str, name: str, *, limited: bool, ids: bool) -> str:
    """The query for one table of :func:`rows_digests`: ``(number, the digest of its rows or
    NULL when ``limited`` and it holds more than ROW_LIMIT, its sequences' values)``; without
    ``ids`` (a table of WITHOUT_IDS), the rows without their ids and no sequences."""
    relation = f"{schemas.quote(schema)}.{schemas.ident(name)}"
    row, join = "(t.app, t.name)::text" if name == "django_migrations" else "t::text", ""
    if not ids:
        row, join = _WITHOUT_IDS[name]
        join = join.format(schema=schemas.quote(schema))
    limit = ROW_LIMIT if limited else None
    at_most = f"LIMIT {limit + 1}" if limit else ""
    sequences = (
        "NULL"
        if not ids
        else "(SELECT string_agg(s.relname || '=' || "  # noqa: S608
        "coalesce(pg_sequence_last_value(s.oid)::text, ''), ' ' ORDER BY s.relname) "
        "FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S' "
        "WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass "
        f"AND d.refobjid = {schemas.literal(relation)}::regclass "
        "AND d.deptype IN ('a', 'i'))"
    )
    return (
        f"SELECT {number}, (SELECT CASE WHEN count(*) > {limit or 'NULL'} THEN NULL ELSE "  # noqa: S608
        "encode(sha256(convert_to(coalesce(string_agg(r, E'\\n' ORDER BY r COLLATE "
        f"\"C\"), ''), 'UTF8')), 'hex') END FROM (SELECT {row} AS r FROM {relation} t "
        f"{join} {at_most}) x), {sequences}"
    )
