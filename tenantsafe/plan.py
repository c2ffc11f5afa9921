"""Which tenant schemas have migrations to run, from a few queries for all of them.

Every tenant costs a full ``migrate`` run (checks, loader, signals: about 70 ms) even when it
has nothing to apply. Reading every schema's ``django_migrations`` in batched ``UNION ALL``
statements and planning with Django's loader and graph once per distinct applied set lets
``migrate_schemas_safe`` skip tenants with no work, and lets ``--check`` and the doctor answer
without running ``migrate`` at all.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from django.apps import apps
from django.db import DatabaseError, connections, router, transaction
from django.db.migrations.exceptions import AmbiguityError, NodeNotFoundError
from django.db.migrations.executor import MigrationExecutor
from django.db.migrations.loader import MigrationLoader

from tenantsafe import locks, schemas
from tenantsafe.errors import PlanError
from tenantsafe.results import TenantRef

logger = logging.getLogger("tenantsafe.plan")

Key = tuple[str, str]
Step = tuple[str, str, bool]  # app label, migration name, backwards

# Schemas per UNION ALL statement: keeps statements far below PostgreSQL's limits (and the
# planner's time per statement small) at thousands of tenants.
CHUNK = 500


def with_migrations_table(alias: str, names: Sequence[str] | None = None) -> set[str]:
    """The schemas (of ``names``, default all) that hold a ``django_migrations`` table."""
    sql = (
        "SELECT n.nspname FROM pg_catalog.pg_class c "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relname = 'django_migrations' AND c.relkind IN ('r', 'p')"
    )
    params: list[Any] = []
    if names is not None:
        sql += " AND n.nspname = ANY(%s)"
        params.append(list(names))
    with connections[alias].cursor() as cursor:
        cursor.execute(sql, params)
        return {row[0] for row in cursor.fetchall()}


def read_applied(
    alias: str,
    names: Sequence[str],
    *,
    chunk: int = CHUNK,
    duplicates: dict[str, list[Key]] | None = None,
) -> dict[str, frozenset[Key] | None]:
    """Every schema's recorded migrations; None where the schema or its table is missing.

    ``duplicates`` gets the migrations recorded more than once, per schema (two runs that
    applied the same migration).
    """
    valid = [name for name in dict.fromkeys(names) if schemas.is_valid(name)]
    with_table = with_migrations_table(alias, valid)
    readable = [name for name in valid if name in with_table]
    result: dict[str, frozenset[Key] | None] = dict.fromkeys(names)
    # Thousands of tenants mostly share one applied set: intern keys and sets so memory grows
    # with the distinct sets, not with tenants x migrations.
    keys: dict[Key, Key] = {}
    sets: dict[frozenset[Key], frozenset[Key]] = {}
    for start in range(0, len(readable), chunk):
        batch = readable[start : start + chunk]
        for name, rows in _read_batch(alias, batch).items():
            if rows is None:
                continue
            applied = frozenset(keys.setdefault(key, key) for key in rows)
            result[name] = sets.setdefault(applied, applied)
            if duplicates is not None and len(applied) < len(rows):
                counted = collections.Counter(rows)
                duplicates[name] = sorted(k for k, n in counted.items() if n > 1)
    return result


def _read_batch(alias: str, batch: list[str]) -> dict[str, list[Key] | None]:
    rows: dict[str, list[Key] | None] = {name: [] for name in batch}
    # Fully qualified names: the statement does not depend on the connection's search_path.
    # The names are validated and quoted by schemas.quote.
    sql = " UNION ALL ".join(
        f"SELECT {i}, app, name FROM {schemas.quote(name)}.django_migrations"  # noqa: S608
        for i, name in enumerate(batch)
    )
    try:
        # A savepoint when called inside a transaction, so a failed read does not abort it.
        with transaction.atomic(using=alias), connections[alias].cursor() as cursor:
            cursor.execute(sql)
            fetched = cursor.fetchall()
    except DatabaseError:
        if len(batch) == 1:
            # A table named django_migrations without app/name columns, or dropped since the
            # catalog read: this schema is not known to be current.
            logger.debug("cannot read %s.django_migrations", batch[0], exc_info=True)
            return {batch[0]: None}
        # One unreadable schema must not cost the whole batch its skip.
        middle = len(batch) // 2
        return {**_read_batch(alias, batch[:middle]), **_read_batch(alias, batch[middle:])}
    for i, app, name in fetched:
        listed = rows[batch[i]]
        assert listed is not None
        listed.append((app, name))
    return rows


@dataclass(frozen=True)
class Plan:
    # What migrate would apply (or unapply, for a target behind the schema).
    steps: tuple[Step, ...]
    # Replacing (squashed) migrations whose replaced ones are all recorded but which are not
    # recorded themselves: migrate's check_replacements() writes their rows.
    unrecorded: tuple[Key, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.steps and not self.unrecorded


@dataclass(frozen=True)
class ExecutorPlan:
    """A plan as Django's executor holds it: the loader (its graph), the applied migrations
    as the loader counts them, the targets and the (migration, backwards) steps."""

    loader: MigrationLoader
    applied: dict[Key, Any]
    targets: list[tuple[str, str | None]]
    plan: list[tuple[Any, bool]]


@dataclass
class Planner:
    """Plans ``migrate [app_label [migration_name]]`` for a schema from its applied set."""

    app_label: str | None = None
    migration_name: str | None = None
    _executor: MigrationExecutor = field(init=False, repr=False)
    _loaders: dict[frozenset[Key], MigrationLoader] = field(init=False, repr=False)
    _plans: dict[frozenset[Key], Plan | None] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # No connection: the graph from disk, each replacement used in place of what it
        # replaces (as when all or none of those are applied).
        self._executor = MigrationExecutor(None)
        self._loaders = {frozenset(): self._executor.loader}
        self._plans = {}
        # A bad target fails here once, as migrate would fail for every tenant.
        self._targets(self._executor.loader)

    @property
    def loader(self) -> MigrationLoader:
        return self._loaders[frozenset()]

    def plan(self, applied: frozenset[Key] | None) -> Plan | None:
        """What ``migrate`` would do; None when the applied set does not tell."""
        if applied is None:
            return None
        if applied not in self._plans:
            self._plans[applied] = self._plan(applied)
        return self._plans[applied]

    def _plan(self, recorded: frozenset[Key]) -> Plan | None:
        found = self.executor_plan(recorded)
        if found is None:
            return None
        return Plan(
            tuple((m.app_label, m.name, backwards) for m, backwards in found.plan),
            tuple(sorted(set(found.applied) - recorded)),
        )

    def executor_plan(self, recorded: frozenset[Key]) -> ExecutorPlan | None:
        """What ``migrate`` would do for a schema that recorded ``recorded``, as its executor
        sees it; None when that is not known here."""
        replacements = self._executor.loader.replacements
        partial = frozenset(
            key
            for key, migration in replacements.items()
            if any(t in recorded for t in migration.replaces)
            and not all(t in recorded for t in migration.replaces)
        )
        try:
            loader = self._loader(partial)
            targets = self._targets(loader)
        except (NodeNotFoundError, PlanError):
            return None
        # As MigrationLoader.build_graph: a replacing migration counts as applied exactly when
        # all the migrations it replaces are recorded, whether or not its own row is.
        applied: dict[Key, Any] = dict.fromkeys(recorded)
        for key, migration in loader.replacements.items():
            if all(t in recorded for t in migration.replaces):
                applied[key] = migration
            else:
                applied.pop(key, None)
        if not _consistent(loader, recorded):
            return None  # migrate raises InconsistentMigrationHistory; let it say so
        if any(t[1] is not None and t not in loader.graph.nodes for t in targets):
            return None  # a replaced target: migrate rebuilds its graph; do not guess
        loader.applied_migrations = applied
        self._executor.loader = loader
        try:
            steps = self._executor.migration_plan(targets)
        finally:
            self._executor.loader = self._loaders[frozenset()]
        return ExecutorPlan(loader, applied, targets, steps)

    def _loader(self, partial: frozenset[Key]) -> MigrationLoader:
        loader = self._loaders.get(partial)
        if loader is None:
            # Some replacement is partly applied (rare). As build_graph does, that one keeps
            # the migrations it replaces and the others stand in for theirs, through the
            # graph's own helpers.
            loader = MigrationLoader(None, replace_migrations=False)
            for key, migration in loader.replacements.items():
                if key in partial:
                    loader.graph.remove_replacement_node(key, migration.replaces)
                else:
                    loader.graph.remove_replaced_nodes(key, migration.replaces)
            loader.replace_migrations = True  # type: ignore[attr-defined]  # missing in stubs
            loader.graph.validate_consistency()
            loader.graph.ensure_not_cyclic()
            self._loaders[partial] = loader
        return loader

    def _targets(self, loader: MigrationLoader) -> list[tuple[str, str | None]]:
        # The targets migrate derives from its app_label / migration_name arguments.
        label, name = self.app_label, self.migration_name
        if not label:
            return list(loader.graph.leaf_nodes())
        if label not in loader.migrated_apps:
            raise PlanError(f"app {label!r} has no migrations")
        if not name:
            return [key for key in loader.graph.leaf_nodes() if key[0] == label]
        if name == "zero":
            return [(label, None)]
        try:
            migration = loader.get_migration_by_prefix(label, name)
        except (AmbiguityError, KeyError) as exc:
            raise PlanError(str(exc)) from exc
        return [(label, migration.name)]


def _consistent(loader: MigrationLoader, recorded: frozenset[Key]) -> bool:
    # What MigrationLoader.check_consistent_history() accepts: every recorded migration's
    # parents are recorded, a squash counting when all it replaces is recorded.
    nodes, replacements = loader.graph.node_map, loader.replacements
    for key in recorded:
        for parent in nodes[key].parents if key in nodes else ():
            if parent.key in recorded:
                continue
            squash = replacements.get(parent.key)
            if squash is None or not all(t in recorded for t in squash.replaces):
                return False
    return True


@dataclass(frozen=True)
class SchemaPlan:
    schema: str
    tenant_type: str
    has_table: bool
    # None when the schema or its django_migrations table is missing, or the plan is unknown.
    plan: Plan | None
    # Who holds the schema's lease: a run is migrating it, or one did not finish it (its
    # post_migrate handlers, say). Empty when none does.
    unfinished: str = ""
    # Migrations recorded more than once.
    duplicates: tuple[Key, ...] = ()
    # The migrations django_migrations records (None where it cannot be read).
    applied: frozenset[Key] | None = None

    @property
    def current(self) -> bool:
        return self.plan is not None and self.plan.empty and not self.unfinished

    def missing_by_app(self) -> dict[str, list[str]]:
        by_app: dict[str, list[str]] = {}
        if self.plan is not None:
            for app, name in self.plan.unrecorded:
                by_app.setdefault(app, []).append(f"{name} (row only)")
            for app, name, backwards in self.plan.steps:
                by_app.setdefault(app, []).append(f"{name} (unapply)" if backwards else name)
        return by_app


def plan_schemas(
    alias: str,
    tenants: Sequence[TenantRef] | Sequence[tuple[str, str]],
    *,
    planner: Planner | None = None,
    lease: locks.Lease | None = None,
) -> list[SchemaPlan]:
    planner = planner or Planner()
    names = [schema for schema, _ in tenants]
    twice: dict[str, list[Key]] = {}
    applied = read_applied(alias, names, duplicates=twice)
    leased = locks.unfinished(alias, names, mine=lease)
    return [
        SchemaPlan(
            schema,
            tenant_type,
            applied.get(schema) is not None,
            planner.plan(applied.get(schema)),
            leased.get(schema, ""),
            tuple(twice.get(schema, ())),
            applied.get(schema),
        )
        for schema, tenant_type in tenants
    ]


def routed_apps(alias: str, schema: str, tenant_type: str = "") -> set[str]:
    """The app labels the routers let migrate change in ``schema`` (of ``tenant_type``)."""
    connection: Any = connections[alias]
    previous = (connection.tenant, connection.include_public_schema)
    # TenantSyncRouter decides from the connection's schema and tenant type; no query runs.
    connection.set_schema(schema, tenant_type=tenant_type or None, include_public=False)
    try:
        return {
            config.label
            for config in apps.get_app_configs()
            if router.allow_migrate(alias, config.label)
        }
    finally:
        connection.set_tenant(*previous)


def is_current(
    alias: str, schema: str, tenant_type: str = "", *, lease: locks.Lease | None = None
) -> bool:
    """Whether ``schema`` has every migration applied, as ``migrate --check`` decides, and its
    last run finished (``lease``: the caller's own, which does not count against it)."""
    (entry,) = plan_schemas(alias, [TenantRef(schema, tenant_type)], lease=lease)
    return entry.current
