"""A deploy's pending migrations: by replay to tenants that are alike, the rest through Django.

Migrating a tenant through Django costs Python (the graph, model states, post_migrate
handlers); the SQL it sends is a few milliseconds. Tenants that are alike get the same SQL, so
``migrate_schemas_safe`` migrates a couple of them through Django while recording, and replays
that recording into the others. The rule that decides when that is the same as migrating:

1. **Groups** (:mod:`tenantsafe.migrate.groups`). Tenants are alike when they have the same
   tenant type and applied migrations (hence the same plan), the same catalog
   (:func:`tenantsafe.recording.catalogs`) and the same content types and permissions, the small
   tables post_migrate reads, compared without their ids (tenants created at different times
   often number them differently). Plans that unapply or hold a non-atomic migration are
   never replayed, nor are groups of fewer than ``MIN_GROUP`` tenants. A plan that holds
   ``RunPython`` is, when the witnesses migrate warm: their recordings mark where each
   RunPython ran, and each replay runs it in the tenant (:func:`witness.replay_into`).
2. **Witnesses** (:mod:`tenantsafe.migrate.witness`). The first two tenants of a group are
   migrated through Django, recorded. Replay is used only when both recordings are the same
   text, name neither witness (schema, domain, field values), read the same tables, and leave
   the same catalog and rows. When the recording writes any row but its ``django_migrations``
   ones, an id could be in it: then only tenants whose content types and permissions are the
   witness's, ids and sequence values too, are replayed to (the others form groups of their
   own). Any other table the recording read (or inserted into and got ids back from) is
   digested in the second witness and in every other tenant before the second witness
   migrates; a tenant whose rows differ is migrated through Django.
3. **Replay.** Every other tenant gets the recording in one transaction under its lease, with
   the path pinned; it commits only if the tenant's catalog and those rows are then the same as
   the witnesses'. Otherwise it rolls back and the tenant is migrated through Django.

:class:`DeployRun` carries the deploy (options, executor, stop, the read's plans) and collects
its results as they come (a second signal may end it anywhere). Where a tenant goes is decided
in two places: :meth:`DeployRun.run` (a group to witness and replay, or the rest) and
:meth:`DeployRun._after_the_first` (within a group: replay, or not); every tenant that replay
does not take goes through :meth:`DeployRun._without_replay`. Another way of migrating a
tenant (say, a warm migration from a project state computed once per applied set) is a
:data:`~tenantsafe.migrate.executor.TenantPath`, a callable ``(tenant, place) -> result``:
:meth:`~tenantsafe.migrate.executor.Executor.run` runs it in order or on the forked workers,
which inherit it with whatever it holds (nothing of it is pickled), under the run's stop rules;
``_without_replay`` is where it would stand in for the path through Django. Replays run on the
executor's connections (:meth:`~tenantsafe.migrate.executor.Executor.on_connections`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any

from django.db import DatabaseError, connections
from django_tenants.migration_executors import base as upstream
from django_tenants.signals import schema_migrated, schema_pre_migration

from tenantsafe import drift, guard, locks, recording
from tenantsafe.migrate import failures, warm
from tenantsafe.migrate.executor import Executor
from tenantsafe.migrate.groups import MIN_GROUP, WITNESSES, Group, Grouping, grouped, rows_of
from tenantsafe.migrate.output import say
from tenantsafe.migrate.skipping import Planned
from tenantsafe.migrate.states import WarmPlan, watching_python
from tenantsafe.migrate.witness import Witness, pythons, replay_into, witnessed
from tenantsafe.options import RunOptions
from tenantsafe.results import MIGRATED, NOT_ATTEMPTED, REPLAYED, TenantRef, TenantResult

logger = logging.getLogger("tenantsafe.migrate")


def replays(opts: RunOptions) -> bool:
    """Whether this run may replay (it changes schemas as migrate alone would)."""
    migrate_options = opts.migrate
    return (
        opts.replay
        and not (opts.plan or opts.check)
        and not any(migrate_options.get(o) for o in ("fake", "fake_initial", "run_syncdb", "prune"))
    )


class DeployRun:
    """The tenants of one run with migrations to apply (``planned``), on ``executor``."""

    def __init__(self, opts: RunOptions, executor: Executor, planned: Planned) -> None:
        self.opts = opts
        self.executor = executor
        self.stop = executor.stop
        self.planned = planned
        self.alias = opts.database
        self.results: list[TenantResult] = []

    def run(self) -> None:
        """Every planned tenant: each group witnessed and replayed, the others without."""
        grouping = self._grouping()
        if grouping is None:
            self._without_replay([TenantRef(e.schema, e.tenant_type) for e in self.planned.entries])
            return
        for group in grouping.groups:
            self._group(group)
        self._without_replay(grouping.rest)

    def show_groups(self) -> None:
        """For --plan: the groups, and which tenants of each would be the witnesses."""
        grouping = self._grouping()
        for group in grouping.groups if grouping is not None else ():
            names = ", ".join(t.schema for t in group.tenants[:WITNESSES])
            say(self.opts, f"witnesses {names} for {len(group.tenants) - WITNESSES} more")

    def _grouping(self) -> Grouping | None:
        """The groups of alike tenants and the others, said on stdout; None if unknown."""
        try:
            grouping = grouped(
                self.alias,
                self.planned.entries,
                self.planned.loader,
                python=warm.current(self.alias) is not None,
            )
        except Exception:
            logger.warning("cannot group tenants for replay; migrating all", exc_info=True)
            failures.reset(self.alias)
            return None
        alike = sum(len(group.tenants) for group in grouping.groups)
        if grouping.groups:
            say(
                self.opts,
                f"{alike} of {alike + len(grouping.rest)} tenant(s) to migrate are in "
                f"{len(grouping.groups)} group(s) of alike tenants: {WITNESSES} of each are "
                "migrated through Django, and the others get their recorded SQL if the two "
                "recordings agree.",
            )
        for why, count in grouping.refused.items():
            say(self.opts, f"{count} tenant(s) are migrated through Django: their plan {why}.")
        for sentence in drift.grouped_apart(grouping.drifted):
            say(self.opts, sentence)
        return grouping

    def _group(self, group: Group) -> None:
        """One group: its first witness, then the rest (or those numbering ids alike)."""
        first, *rest = group.tenants
        one = self._witness(first, group)
        apart: list[TenantRef] = []
        if one is not None and not one.problem and not one.without_ids and group.exact:
            # The recording writes rows, which may hold content type or permission ids: only
            # tenants whose ids are the first witness's may get it; the others are grouped apart.
            same = group.exactly_like(first, rest)
            taken = set(same)
            apart = [t for t in rest if t not in taken]
            rest = same
            if apart:
                say(
                    self.opts,
                    f"{len(apart)} tenant(s) like {first.schema} number their content types "
                    "or permissions otherwise, and its recording writes rows: they are grouped "
                    "apart.",
                )
        if rest:
            self._after_the_first(group, one, rest)
        for other in group.split_exactly(apart):
            # Each of these is alike to the ids, so its first witness splits it no further.
            if len(other.tenants) >= MIN_GROUP and other.exact[0] is not None:
                self._group(other)
            else:
                self._without_replay(other.tenants)

    def _after_the_first(
        self, group: Group, one: Witness | None, rest: Sequence[TenantRef]
    ) -> None:
        """The second witness and the replays, after the first witness (``one``, None when it
        failed) of ``group``."""
        second, *others = rest
        before = self._rows_before(one, rest)
        if one is None:
            why = "the first witness failed"
        elif before is None:
            why = "the rows the recording depends on cannot be read"
        elif one.problem:
            why = one.problem
        elif one.tables and before.get(second.schema) is None:
            why = (
                f"{second.schema} has more than {recording.ROW_LIMIT} rows in a table the "
                "recording read"
            )
        else:
            why = ""
        if one is None or before is None or why:
            self._not_replaying(group, (second, *others), why)
            return
        two = self._witness(second, group)
        why = one.agrees_with(two) if two is not None else "the second witness failed"
        if why or two is None:
            self._not_replaying(group, others, why)
            return
        alike = [
            t for t in others if not one.tables or before.get(t.schema) == before[second.schema]
        ]
        self._replay_all(alike, two, self._warm_plan(group))
        replayed = set(alike)
        self._without_replay([t for t in others if t not in replayed])

    def _rows_before(
        self, one: Witness | None, tenants: Sequence[TenantRef]
    ) -> dict[str, str | None] | None:
        """Rows the recording depends on beyond the group's key, before the second witness
        changes them (none to read: empty); None when they cannot be read."""
        if one is None or one.problem or not one.tables:
            return {}
        try:
            return rows_of(self.alias, [t.schema for t in tenants], one.tables)
        except DatabaseError:
            logger.warning("cannot read the rows %s depends on", one.schema, exc_info=True)
            failures.reset(self.alias)
            return None

    def _witness(self, tenant: TenantRef, group: Group) -> Witness | None:
        """Migrate ``tenant`` through Django, recording what it sent (each RunPython's own
        statements set aside, where it ran marked); None when it cannot stand for others."""
        connection: Any = connections[self.alias]
        recorder = recording.Recorder(tenant.schema)
        connection.execute_wrappers.insert(0, recorder)
        try:
            with watching_python(lambda python: recorder.aside(python.marker)):
                result = self.executor.attempt(tenant)
        finally:
            connection.execute_wrappers.remove(recorder)
        self.results.append(result)
        if result.status != MIGRATED:
            return None
        try:
            with guard.guarding(self.alias):
                found = witnessed(self.alias, recorder, tenant)
        except Exception:
            logger.warning("cannot use %s as a witness", tenant.schema, exc_info=True)
            failures.reset(self.alias)
            return None
        if not found.problem and pythons(found.sql) != group.pythons:
            # Its migration did not run warm (so its RunPython's statements are in the
            # recording as if they were the schema's): never replayed.
            return dataclasses.replace(found, problem="its RunPython operations were not marked")
        return found

    def _not_replaying(self, group: Group, tenants: Sequence[TenantRef], why: str) -> None:
        if tenants:
            say(
                self.opts,
                f"not replaying to {len(tenants)} tenant(s) like {group.tenants[0].schema}: "
                f"{why}; migrating them through Django.",
            )
        self._without_replay(tenants)

    def _without_replay(self, tenants: Sequence[TenantRef]) -> None:
        """The tenants replay does not take: through Django, on the executor."""
        self.results += self.executor.run(tenants)

    def _warm_plan(self, group: Group) -> WarmPlan | None:
        """Where a group's RunPython operations find their historical models."""
        run = warm.current(self.alias)
        return run.plan_for(group.applied) if run is not None and group.pythons else None

    def _replay_all(
        self, tenants: Sequence[TenantRef], witness: Witness, warm_plan: WarmPlan | None
    ) -> None:
        """Replay ``witness``'s recording into ``tenants``, on the executor's connections;
        those it rolls back for go through Django. Signals, and migrations through Django,
        stay in this thread."""
        failed: list[TenantRef] = []
        work = functools.partial(self._replay_one, witness=witness, warm_plan=warm_plan)
        for tenant, result in self.executor.on_connections(tenants, work):
            if result is None:
                failed.append(tenant)
                continue
            if result.status == REPLAYED:
                # As for a migrated tenant (pre_migrate and post_migrate are not sent: what
                # their handlers did in the witnesses is part of the recording).
                schema_pre_migration.send(upstream.run_migrations, schema_name=tenant.schema)
                schema_migrated.send(upstream.run_migrations, schema_name=tenant.schema)
            self.results.append(result)
        for tenant in failed:
            self.results.append(self.executor.attempt(tenant))

    def _replay_one(
        self, tenant: TenantRef, witness: Witness, warm_plan: WarmPlan | None
    ) -> TenantResult | None:
        """Replay ``witness``'s recording into ``tenant``; None when it rolled back."""
        if self.stop.requested():
            return TenantResult(tenant.schema, NOT_ATTEMPTED)
        alias = self.alias
        try:
            with guard.guarding(alias), locks.leased(alias, tenant.schema) as lease:
                timeout = self.opts.lock_timeout_ms or None
                replay_into(
                    alias, tenant, witness, lease, lock_timeout_ms=timeout, warm_plan=warm_plan
                )
                lease.complete()
        except Exception as exc:
            # A difference, a database error, or a RunPython that raised in this tenant: all
            # of it rolled back, and Django's migrate says what it says.
            logger.warning(
                "schema %s: the replay of %s's migration rolled back (%s); migrating it "
                "through Django",
                tenant.schema,
                witness.schema,
                failures.one_line(exc),
            )
            failures.reset(alias)
            return None
        finally:
            failures.to_public(alias)
        return TenantResult(tenant.schema, REPLAYED)
