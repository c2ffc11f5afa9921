"""Witnesses: what a tenant migrated through Django recorded and left, compared with another's;
and the replay of a witness's recording into a tenant like it (see tenantsafe.migrate.deploy)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from django.db import connections
from django_tenants.utils import get_tenant_model

from tenantsafe import guard, locks, recording, statements
from tenantsafe.errors import ReplayMismatch
from tenantsafe.migrate.groups import CHECKED, KEYED, pinned
from tenantsafe.migrate.states import Python, WarmPlan
from tenantsafe.results import TenantRef


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


# What a recording depends on the rows of: the tables it reads, and those it inserts into
# and is given values back from.
_TABLE = r'(?:"(?:[^"]|"")+"|\w+)'
_READS = re.compile(rf"\b(?:FROM|JOIN)\s+(?:ONLY\s+)?({_TABLE})(?:\s*\.\s*({_TABLE}))?", re.I)
_RETURNING = re.compile(
    rf"^\s*INSERT\s+INTO\s+({_TABLE})(?:\s*\.\s*({_TABLE}))?.*\bRETURNING\b", re.I | re.S
)


def depends_on(
    schema: str, reads: Iterable[str], written: Iterable[str], tables: set[str]
) -> frozenset[str]:
    """The tables of ``tables`` (``schema``'s) whose rows the statements it ``reads`` and the
    ones it wrote (``written``) depend on."""
    named: set[str] = set()

    def add(first: str, second: str | None) -> None:
        parts = [p.strip('"').replace('""', '"') for p in (first, second) if p]
        if len(parts) == 1 or parts[0] == schema:
            named.add(parts[-1])

    for sql in reads:
        for match in _READS.finditer(sql):
            add(match.group(1), match.group(2))
    for sql in written:
        inserted = _RETURNING.match(sql)
        if inserted:
            add(inserted.group(1), inserted.group(2))
    return frozenset((named & tables) - {"django_migrations"})


def writes_no_rows(sql: str) -> bool:
    """Whether the recording ``sql`` writes no row but its django_migrations ones (so that
    no id of a content type or permission can be in what it writes)."""
    return all(
        statements.is_schema_change(part)
        or (statements.RECORD_APPLIED.match(part) and ";" not in part)
        # A RunPython writes in each tenant itself: nothing of the witness's is replayed.
        or Python.at(part) is not None
        for part in sql.split(recording.SEPARATOR)
        if part.strip()
    )


def pythons(sql: str) -> int:
    """How many RunPython operations the recording ``sql`` marks."""
    return sum(Python.at(part) is not None for part in sql.split(recording.SEPARATOR))


def witnessed(alias: str, recorder: recording.Recorder, tenant: TenantRef) -> Witness:
    """The witness ``recorder`` was around, after its migration finished."""
    schema = recorder.schema
    row = get_tenant_model()._default_manager.db_manager(alias).filter(schema_name=schema).first()
    identifying = recording.identifying(row, alias) if row is not None else [schema]
    sql, problem = recording.taken(alias, recorder, identifying)
    connection: Any = connections[alias]
    connection.set_schema_to_public()
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind IN ('r', 'p')",
            [schema],
        )
        present = {row[0] for row in cursor.fetchall()}
    written = [s.sql for s in recorder.statements if isinstance(s.sql, str)]
    tables = depends_on(schema, recorder.reads, written, present) - KEYED
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


def digests(
    alias: str,
    names: Sequence[str],
    tables: frozenset[str],
    *,
    own: TenantRef | None = None,
    without_ids: frozenset[str] = frozenset(),
) -> tuple[dict[str, str], dict[str, str | None]]:
    """Catalog and row digests of ``names`` (``without_ids``: see recording.rows_digests), read
    in one transaction with public's path; for ``own`` (then ``names`` is its schema only),
    with the path its replay pins."""
    with pinned(alias, own) as cursor:
        return recording.catalogs(cursor, names), recording.rows_digests(
            cursor, names, tables, unlimited=CHECKED, without_ids=without_ids & tables
        )


def replay_into(
    alias: str,
    tenant: TenantRef,
    witness: Witness,
    lease: locks.Lease,
    *,
    lock_timeout_ms: int | None = None,
    warm_plan: WarmPlan | None = None,
) -> None:
    """Apply ``witness``'s recording to ``tenant`` in one transaction; raises ReplayMismatch (and
    rolls back) when the tenant is not then like the witness, or DatabaseError (or whatever a
    RunPython raises). Each RunPython it marks runs there, with the historical models of its
    place in the plan (``warm_plan``'s)."""
    path = recording.pinned_path(alias, tenant.schema, tenant.tenant_type)
    terms = guard.Terms(lease.fence, lock_timeout_ms)
    with guard.pinned_transaction(alias, path, terms=terms) as cursor:
        for part in _parts(witness.sql):
            if isinstance(part, str):
                cursor.execute(part)
            else:
                _run_python(alias, tenant, part, warm_plan)
        catalog = recording.catalogs(cursor, [tenant.schema]).get(tenant.schema)
        rows = recording.rows_digests(
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


def _parts(sql: str) -> list[str | Python]:
    """``sql`` in runs of statements (one multi-statement string each: one round trip) and the
    RunPython operations between them."""
    parts: list[str | Python] = []
    run: list[str] = []
    for part in sql.split(recording.SEPARATOR):
        python = Python.at(part)
        if python is None:
            run.append(part)
            continue
        if any(p.strip() for p in run):
            parts.append(recording.SEPARATOR.join(run))
        parts += [python]
        run = []
    if any(p.strip() for p in run):
        parts.append(recording.SEPARATOR.join(run))
    return parts


def _run_python(alias: str, tenant: TenantRef, python: Python, warm_plan: WarmPlan | None) -> None:
    """The RunPython ``python`` in ``tenant``, inside the replay's transaction (an atomic
    migration's), as Django's executor runs it: through the operation's own
    ``database_forwards()``, which asks the routers, with the states of its place."""
    if warm_plan is None:
        raise ReplayMismatch(
            f"no historical models for {python.app}.{python.name}", schema=tenant.schema
        )
    step = warm_plan.step(python)
    connection: Any = connections[alias]
    # The tenant's path for the code's queries: the one the replay pinned.
    connection.set_schema(tenant.schema, tenant_type=tenant.tenant_type or None)
    try:
        with connection.schema_editor(atomic=False) as editor:
            step.operation.database_forwards(python.app, editor, step.before, step.after)
    finally:
        connection.set_schema_to_public()
