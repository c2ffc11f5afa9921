"""Applying a deploy's pending migrations by replay to tenants that are alike.

Migrating a tenant through Django costs Python (the graph, model states, post_migrate
handlers); the SQL it sends is a few milliseconds. Tenants that are alike get the same SQL, so
``migrate_schemas_safe`` migrates a couple of them through Django while recording, and replays
that recording into the others. The rule that decides when that is the same as migrating:

1. **Groups.** Tenants are alike when they have the same tenant type and applied migrations
   (hence the same plan), the same catalog (:func:`tenantsafe.replay.catalogs`) and the same
   content types and permissions, the small tables post_migrate reads, compared without
   their ids (tenants created at different times often number them differently). Plans that
   unapply, hold a ``RunPython`` or a non-atomic migration are never replayed, nor are groups
   of fewer than ``MIN_GROUP`` tenants.
2. **Witnesses.** The first two tenants of a group are migrated through Django, recorded.
   Replay is used only when both recordings are the same text, name neither witness (schema,
   domain, field values), read the same tables, and leave the same catalog and rows. When the
   recording writes any row but its ``django_migrations`` ones, an id could be in it: then
   only tenants whose content types and permissions are the witness's, ids and sequence
   values too, are replayed to (the others form groups of their own). Any other table the
   recording read (or inserted into and got ids back from) is digested in the second witness
   and in every other tenant before the second witness migrates; a tenant whose rows differ
   is migrated through Django.
3. **Replay.** Every other tenant gets the recording in one transaction under its lease, with
   the path pinned; it commits only if the tenant's catalog and those rows are then the same as
   the witnesses'. Otherwise it rolls back and the tenant is migrated through Django.

This module finds the groups and replays; :mod:`tenantsafe.migrate` drives the witnesses.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from django.db import connections
from django.db.migrations.loader import MigrationLoader
from django.db.migrations.operations import RunPython, SeparateDatabaseAndState
from django_tenants.utils import get_tenant_model

from tenantsafe import drift, guard, locks, plan, replay, schemas, statements
from tenantsafe.errors import ReplayMismatch
from tenantsafe.results import TenantRef

logger = logging.getLogger("tenantsafe.deploy")

WITNESSES = 2
MIN_GROUP = WITNESSES + 1
# The tables whose rows (without ids) every group key holds: post_migrate reads them in
# every tenant.
KEYED = frozenset({"django_content_type", "auth_permission"})
# Where the recording's applied set is checked after a replay.
CHECKED = KEYED | {"django_migrations"}
# Schemas per catalog query.
CHUNK = 100


@dataclass(frozen=True)
class Group:
    tenant_type: str
    tenants: tuple[TenantRef, ...]
    # Each tenant's content types and permissions with their ids (KEYED, exactly): a
    # recording that writes rows is replayed only where they are the witness's.
    exact: tuple[str | None, ...] = ()

    def exactly_like(self, tenant: TenantRef, others: Sequence[TenantRef]) -> list[TenantRef]:
        """Those of ``others`` whose KEYED rows are ``tenant``'s, ids included."""
        by_schema = dict(zip((t.schema for t in self.tenants), self.exact, strict=True))
        mine = by_schema[tenant.schema]
        return [t for t in others if mine is not None and by_schema[t.schema] == mine]

    def split_exactly(self, tenants: Sequence[TenantRef]) -> list[Group]:
        """``tenants`` (of this group) split by their exact KEYED rows."""
        by_schema = dict(zip((t.schema for t in self.tenants), self.exact, strict=True))
        split: dict[str | None, list[TenantRef]] = {}
        for tenant in tenants:
            split.setdefault(by_schema[tenant.schema], []).append(tenant)
        return [
            Group(self.tenant_type, tuple(refs), tuple(by_schema[t.schema] for t in refs))
            for refs in split.values()
        ]


@dataclass(frozen=True)
class Witness:
    """A witness's recording and what it left, compared with the other witness's."""

    schema: str
    sql: str
    # Why the recording cannot be replayed; empty when it can.
    problem: str
    # The schema's tables the recording depends on the rows of (beyond KEYED).
    tables: frozenset[str]
    # Those and CHECKED, as far as the witness has them: a replay checks their rows.
    checked: frozenset[str]
    catalog: str
    rows: str | None
    # Those of KEYED compared without ids (all of them when the recording writes no row but
    # django_migrations', else none).
    without_ids: frozenset[str] = frozenset()

    def agrees_with(self, other: Witness) -> str:
        """Why ``other``'s recording may not stand for this one's; empty when it may."""
        if self.problem or other.problem:
            return self.problem or other.problem
        if self.sql != other.sql:
            return f"the recordings of {self.schema} and {other.schema} differ"
        if (
            self.tables != other.tables
            or self.checked != other.checked
            or self.without_ids != other.without_ids
        ):
            return f"{self.schema} and {other.schema} read different tables"
        if self.catalog != other.catalog or self.rows != other.rows or self.rows is None:
            return f"{self.schema} and {other.schema} differ after migrating"
        return ""


def refusal(steps: Sequence[plan.Step], loader: MigrationLoader) -> str:
    """Why a plan is never replayed; empty when it may be."""
    for app, name, backwards in steps:
        if backwards:
            return f"unapplies {app}.{name}"
        migration = loader.graph.nodes[(app, name)]
        if not migration.atomic:
            return f"holds {app}.{name}, which is not atomic"
        if any(isinstance(op, RunPython) for op in _database_operations(migration.operations)):
            return f"holds {app}.{name}, which runs Python (RunPython)"
    return ""


def _database_operations(operations: Sequence[Any]) -> list[Any]:
    found: list[Any] = []
    for operation in operations:
        found.append(operation)
        if isinstance(operation, SeparateDatabaseAndState):
            found += _database_operations(operation.database_operations)
    return found


def grouped(
    alias: str, entries: Sequence[plan.SchemaPlan], loader: MigrationLoader
) -> tuple[list[Group], list[TenantRef], dict[str, int], list[drift.Drift]]:
    """(groups to replay in, the tenants to migrate through Django, how many tenants' plans
    were refused and why, the tenants whose catalog is not what most at their plan have)."""
    rest: list[TenantRef] = []
    drifted: list[drift.Drift] = []
    by_plan: dict[tuple[Any, ...], list[plan.SchemaPlan]] = {}
    refused: dict[str, int] = {}
    for entry in entries:
        steps = entry.plan.steps if entry.plan is not None else ()
        why = refusal(steps, loader) if steps else "no plan"
        if why or entry.applied is None or entry.unfinished or not schemas.is_valid(entry.schema):
            rest.append(TenantRef(entry.schema, entry.tenant_type))
            if why and steps:
                refused[why] = refused.get(why, 0) + 1
            continue
        key = (entry.tenant_type, entry.applied, entry.plan)
        by_plan.setdefault(key, []).append(entry)
    groups: list[Group] = []
    for (tenant_type, _, _), members in by_plan.items():
        if len(members) < MIN_GROUP:
            rest += [TenantRef(m.schema, m.tenant_type) for m in members]
            continue
        splits, catalogs = _alike(alias, [m.schema for m in members])
        drifted += drift.apart(alias, catalogs)
        for alike in splits:
            refs = tuple(TenantRef(name, tenant_type) for name, _ in alike)
            if len(refs) < MIN_GROUP:
                rest += refs
            else:
                groups.append(Group(tenant_type, refs, tuple(exact for _, exact in alike)))
    return groups, rest, refused, drifted


def _alike(
    alias: str, names: list[str]
) -> tuple[list[list[tuple[str, str | None]]], dict[str, str]]:
    """``names`` split by catalog and keyed rows without ids, in their order; each with its
    keyed rows' exact digest. And each one's catalog digest."""
    keys: dict[str, tuple[str, str | None]] = {}
    exact: dict[str, str | None] = {}
    for start in range(0, len(names), CHUNK):
        batch = names[start : start + CHUNK]
        with _pinned(alias) as cursor:
            catalogs = replay.catalogs(cursor, batch)
            loose = replay.rows_digests(cursor, batch, KEYED, unlimited=CHECKED, without_ids=KEYED)
            exact.update(replay.rows_digests(cursor, batch, KEYED, unlimited=CHECKED))
        for name in batch:
            keys[name] = (catalogs.get(name, ""), loose.get(name))
    split: dict[tuple[str, str | None], list[tuple[str, str | None]]] = {}
    for name in names:
        if keys[name][0] and keys[name][1] is not None:
            split.setdefault(keys[name], []).append((name, exact.get(name)))
        else:
            split.setdefault(("", name), []).append((name, exact.get(name)))
    return list(split.values()), {name: keys[name][0] for name in names if keys[name][0]}


@contextlib.contextmanager
def _pinned(alias: str, own: TenantRef | None = None) -> Iterator[Any]:
    """A raw cursor in a transaction with public's path pinned; for ``own``, with the path its
    replay pins."""
    connection: Any = connections[alias]
    if own is not None:
        path = replay.pinned_path(alias, own.schema, own.tenant_type)
    else:
        connection.set_schema_to_public()
        path = guard.search_path(connection)
    with guard.pinned_transaction(alias, path) as cursor:
        yield cursor


def digests(
    alias: str,
    names: Sequence[str],
    tables: frozenset[str],
    *,
    own: TenantRef | None = None,
    without_ids: frozenset[str] = frozenset(),
) -> tuple[dict[str, str], dict[str, str | None]]:
    """Catalog and row digests of ``names`` (``without_ids``: see replay.rows_digests), read
    in one transaction with public's path; for ``own`` (then ``names`` is its schema only),
    with the path its replay pins."""
    with _pinned(alias, own) as cursor:
        return replay.catalogs(cursor, names), replay.rows_digests(
            cursor, names, tables, unlimited=CHECKED, without_ids=without_ids & tables
        )


def rows_of(alias: str, names: Sequence[str], tables: frozenset[str]) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for start in range(0, len(names), CHUNK):
        with _pinned(alias) as cursor:
            found.update(
                replay.rows_digests(cursor, names[start : start + CHUNK], tables, unlimited=CHECKED)
            )
    return found


# What a recording depends on the rows of: the tables it reads, and those it inserts into
# and is given values back from.
_TABLE = r'(?:"(?:[^"]|"")+"|\w+)'
_READS = re.compile(rf"\b(?:FROM|JOIN)\s+(?:ONLY\s+)?({_TABLE})(?:\s*\.\s*({_TABLE}))?", re.I)
_RETURNING = re.compile(
    rf"^\s*INSERT\s+INTO\s+({_TABLE})(?:\s*\.\s*({_TABLE}))?.*\bRETURNING\b", re.I | re.S
)


def depends_on(recorder: replay.Recorder, tables: set[str]) -> frozenset[str]:
    """The tables of ``tables`` (the schema's) whose rows the recorded statements depend on."""
    named: set[str] = set()

    def add(first: str, second: str | None) -> None:
        parts = [p.strip('"').replace('""', '"') for p in (first, second) if p]
        if len(parts) == 1 or parts[0] == recorder.schema:
            named.add(parts[-1])

    for sql in recorder.reads:
        for match in _READS.finditer(sql):
            add(match.group(1), match.group(2))
    for statement in recorder.statements:
        if isinstance(statement.sql, str):
            inserted = _RETURNING.match(statement.sql)
            if inserted:
                add(inserted.group(1), inserted.group(2))
    return frozenset((named & tables) - {"django_migrations"})


def witnessed(alias: str, recorder: replay.Recorder, tenant: TenantRef) -> Witness:
    """The witness ``recorder`` was around, after its migration finished."""
    schema = recorder.schema
    row = get_tenant_model()._default_manager.db_manager(alias).filter(schema_name=schema).first()
    identifying = replay.identifying(row, alias) if row is not None else [schema]
    sql, problem = replay.taken(alias, recorder, identifying)
    connection: Any = connections[alias]
    connection.set_schema_to_public()
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind IN ('r', 'p')",
            [schema],
        )
        present = {row[0] for row in cursor.fetchall()}
    tables = depends_on(recorder, present) - KEYED
    checked = frozenset((CHECKED | tables) & present)
    without_ids = KEYED if not problem and writes_no_rows(sql) else frozenset()
    catalogs, rows = digests(alias, [schema], checked, own=tenant, without_ids=without_ids)
    return Witness(
        schema,
        sql,
        problem,
        tables,
        checked,
        catalogs.get(schema, ""),
        rows.get(schema),
        without_ids,
    )


def writes_no_rows(sql: str) -> bool:
    """Whether the recording ``sql`` writes no row but its django_migrations ones (so that
    no id of a content type or permission can be in what it writes)."""
    return all(
        statements.is_schema_change(part)
        or (statements.RECORD_APPLIED.match(part) and ";" not in part)
        for part in sql.split("\n;\n")
        if part.strip()
    )


def replay_into(
    alias: str,
    tenant: TenantRef,
    witness: Witness,
    lease: locks.Lease,
    *,
    lock_timeout_ms: int | None = None,
) -> None:
    """Apply ``witness``'s recording to ``tenant`` in one transaction; raises ReplayMismatch (and
    rolls back) when the tenant is not then like the witness, or DatabaseError."""
    path = replay.pinned_path(alias, tenant.schema, tenant.tenant_type)
    terms = guard.Terms(lease.fence, lock_timeout_ms)
    with guard.pinned_transaction(alias, path, terms=terms) as cursor:
        cursor.execute(witness.sql)
        catalog = replay.catalogs(cursor, [tenant.schema]).get(tenant.schema)
        rows = replay.rows_digests(
            cursor,
            [tenant.schema],
            witness.checked,
            present=witness.checked,
            unlimited=CHECKED,
            without_ids=witness.without_ids,
        ).get(tenant.schema)
        if catalog != witness.catalog or rows != witness.rows:
            raise ReplayMismatch(
                f"after the replay {tenant.schema} differs from {witness.schema} "
                f"({'catalog' if catalog != witness.catalog else 'rows'})",
                schema=tenant.schema,
            )
