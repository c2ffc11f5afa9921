"""Groups of alike tenants: same plan, catalog, content types and permissions (see
:mod:`tenantsafe.migrate.deploy` for the rule), and the plans that are never replayed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from django.db import connections
from django.db.migrations.loader import MigrationLoader
from django.db.migrations.operations import RunPython, SeparateDatabaseAndState

from tenantsafe import drift, guard, plan, recording, schemas
from tenantsafe.meanwhile import in_halves
from tenantsafe.results import TenantRef

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
    # The migrations the tenants have applied (the same in all of them).
    applied: frozenset[plan.Key] = frozenset()
    # How many RunPython operations the plan holds: a witness's recording marks each.
    pythons: int = 0

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
            Group(
                self.tenant_type,
                tuple(refs),
                tuple(by_schema[t.schema] for t in refs),
                self.applied,
                self.pythons,
            )
            for refs in split.values()
        ]


def refusal(steps: Sequence[plan.Step], loader: MigrationLoader, *, python: bool = False) -> str:
    """Why a plan is never replayed; empty when it may be. ``python``: whether a RunPython
    can run in each replay (the witnesses migrate warm, which marks where it runs)."""
    for app, name, backwards in steps:
        if backwards:
            return f"unapplies {app}.{name}"
        migration = loader.graph.nodes[(app, name)]
        if not migration.atomic:
            return f"holds {app}.{name}, which is not atomic"
        nested = _database_operations(migration.operations)[len(migration.operations) :]
        if any(isinstance(op, RunPython) for op in nested):
            return f"holds {app}.{name}, which runs Python inside SeparateDatabaseAndState"
        if not python and any(isinstance(op, RunPython) for op in migration.operations):
            return f"holds {app}.{name}, which runs Python (RunPython)"
    return ""


def pythons(steps: Sequence[plan.Step], loader: MigrationLoader) -> int:
    """How many RunPython operations the (forwards) plan ``steps`` holds."""
    return sum(
        isinstance(op, RunPython)
        for app, name, _ in steps
        for op in loader.graph.nodes[(app, name)].operations
    )


def _database_operations(operations: Sequence[Any]) -> list[Any]:
    # The operations, then those nested in them (SeparateDatabaseAndState's).
    found = list(operations)
    for operation in operations:
        if isinstance(operation, SeparateDatabaseAndState):
            found += _database_operations(operation.database_operations)
    return found


@dataclass(frozen=True)
class Grouping:
    # The groups to replay in.
    groups: tuple[Group, ...]
    # The tenants to migrate through Django.
    rest: tuple[TenantRef, ...]
    # How many tenants' plans were refused, by why.
    refused: dict[str, int]
    # The tenants whose catalog is not the one most tenants with their plan have.
    drifted: tuple[drift.Drift, ...] = ()


def grouped(
    alias: str,
    entries: Sequence[plan.SchemaPlan],
    loader: MigrationLoader,
    *,
    python: bool = False,
) -> Grouping:
    """The tenants of ``entries`` in groups of alike tenants, and the others (``python``: see
    :func:`refusal`)."""
    rest: list[TenantRef] = []
    drifted: list[drift.Drift] = []
    by_plan: dict[tuple[Any, ...], list[plan.SchemaPlan]] = {}
    refused: dict[str, int] = {}
    for entry in entries:
        steps = entry.plan.steps if entry.plan is not None else ()
        why = refusal(steps, loader, python=python) if steps else "no plan"
        if why or entry.applied is None or entry.unfinished or not schemas.is_valid(entry.schema):
            rest.append(TenantRef(entry.schema, entry.tenant_type))
            if why and steps:
                refused[why] = refused.get(why, 0) + 1
            continue
        key = (entry.tenant_type, entry.applied, entry.plan)
        by_plan.setdefault(key, []).append(entry)
    groups: list[Group] = []
    for (tenant_type, applied, planned), members in by_plan.items():
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
                exact = tuple(digest for _, digest in alike)
                count = pythons(planned.steps, loader)
                groups.append(Group(tenant_type, refs, exact, applied, count))
    return Grouping(tuple(groups), tuple(rest), refused, tuple(drifted))


def _alike(
    alias: str, names: list[str]
) -> tuple[list[list[tuple[str, str | None]]], dict[str, str]]:
    """``names`` split by catalog and keyed rows without ids, in their order; each with its
    keyed rows' exact digest. And each one's catalog digest."""
    # About 4 ms of PostgreSQL's time a tenant: on two connections when it is more than a few
    # queries, so that the server uses two cores.
    keys: dict[str, tuple[str, str | None]] = {}
    exact: dict[str, str | None] = {}
    for part_keys, part_exact in in_halves(
        alias, lambda part: _digests(alias, part), names, above=4 * CHUNK
    ):
        keys.update(part_keys)
        exact.update(part_exact)
    split: dict[tuple[str, str | None], list[tuple[str, str | None]]] = {}
    for name in names:
        if keys[name][0] and keys[name][1] is not None:
            split.setdefault(keys[name], []).append((name, exact.get(name)))
        else:
            split.setdefault(("", name), []).append((name, exact.get(name)))
    return list(split.values()), {name: keys[name][0] for name in names if keys[name][0]}


def _digests(
    alias: str, names: Sequence[str]
) -> tuple[dict[str, tuple[str, str | None]], dict[str, str | None]]:
    """Each of ``names``' catalog digest and keyed rows' digest without ids; and with them."""
    keys: dict[str, tuple[str, str | None]] = {}
    exact: dict[str, str | None] = {}
    for start in range(0, len(names), CHUNK):
        batch = names[start : start + CHUNK]
        with pinned(alias) as cursor:
            catalogs = recording.catalogs(cursor, batch)
            loose = recording.rows_digests(
                cursor, batch, KEYED, unlimited=CHECKED, without_ids=KEYED
            )
            exact.update(recording.rows_digests(cursor, batch, KEYED, unlimited=CHECKED))
        for name in batch:
            keys[name] = (catalogs.get(name, ""), loose.get(name))
    return keys, exact


@contextlib.contextmanager
def pinned(alias: str, own: TenantRef | None = None) -> Iterator[Any]:
    """A raw cursor in a transaction with public's path pinned; for ``own``, with the path its
    replay pins."""
    connection: Any = connections[alias]
    if own is not None:
        path = recording.pinned_path(alias, own.schema, own.tenant_type)
    else:
        connection.set_schema_to_public()
        path = guard.search_path(connection)
    with guard.pinned_transaction(alias, path) as cursor:
        yield cursor


def rows_of(alias: str, names: Sequence[str], tables: frozenset[str]) -> dict[str, str | None]:
    """The digest of ``tables``' rows in each schema of ``names`` (None: too many rows)."""
    found: dict[str, str | None] = {}
    for start in range(0, len(names), CHUNK):
        with pinned(alias) as cursor:
            found.update(
                recording.rows_digests(
                    cursor, names[start : start + CHUNK], tables, unlimited=CHECKED
                )
            )
    return found
