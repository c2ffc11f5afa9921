"""Which tenants need ``migrate`` at all, answered from one batched read (see tenantsafe.plan).

Skipping only saves time: whatever stops the read, every tenant takes the guarded path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from django.db.migrations.loader import MigrationLoader

from tenantsafe import plan, schemas
from tenantsafe.errors import PlanError
from tenantsafe.options import RunOptions
from tenantsafe.results import CURRENT, PENDING, TenantRef, TenantResult

logger = logging.getLogger("tenantsafe.migrate")


@dataclass(frozen=True)
class Planned:
    """What the read says of the tenants that go to migrate: their plans, and the loader
    (migrations from disk) they were planned with."""

    entries: tuple[plan.SchemaPlan, ...]
    loader: MigrationLoader


@dataclass(frozen=True)
class Answer:
    # The tenants to run migrate in.
    todo: tuple[TenantRef, ...]
    # Results for the others: current, or (--check) with unapplied migrations.
    answered: tuple[TenantResult, ...]
    # What the read says of ``todo``; None when there was no read.
    planned: Planned | None


def answer_from_read(opts: RunOptions, tenants: Sequence[TenantRef]) -> Answer:
    """Which tenants to run migrate in, and results for the others, from one batched read.

    The others are the current tenants (CURRENT) and, under ``--check``, the tenants whose
    unapplied migrations the read already shows (PENDING).
    """
    everyone = Answer(tuple(tenants), (), None)
    if not tenants or not opts.skip_current:
        return everyone
    started = time.monotonic()
    try:
        planner = plan.Planner(opts.app_label, opts.migration_name)
        entries = plan.plan_schemas(opts.database, tenants, planner=planner)
        without_table = _without_table(opts, entries)
    except PlanError:
        # migrate reports the bad target, tenant by tenant, as before
        return everyone
    except Exception:
        logger.warning("cannot tell which tenants are current; migrating all", exc_info=True)
        return everyone
    answer = _sorted(opts, entries, without_table, planner.loader)
    logger.debug(
        "read %d schema(s) in %.2fs: %d to run migrate in, %d answered from the read",
        len(tenants),
        time.monotonic() - started,
        len(answer.todo),
        len(answer.answered),
    )
    return answer


def _without_table(opts: RunOptions, entries: Sequence[plan.SchemaPlan]) -> set[str]:
    # Under --check a schema without django_migrations has everything unapplied; a missing
    # schema still goes to the executor, which names it (or creates it).
    if not opts.check or opts.create_missing:
        return set()
    bare = [e.schema for e in entries if not e.has_table and schemas.is_valid(e.schema)]
    return schemas.existing(opts.database, bare) if bare else set()


def _sorted(
    opts: RunOptions,
    entries: Sequence[plan.SchemaPlan],
    without_table: set[str],
    loader: MigrationLoader,
) -> Answer:
    todo: list[TenantRef] = []
    done: list[TenantResult] = []
    planned: list[plan.SchemaPlan] = []
    for entry in entries:
        answered = _answered(opts, entry, entry.schema in without_table)
        if answered is not None:
            done.append(answered)
        else:
            todo.append(TenantRef(entry.schema, entry.tenant_type))
            planned.append(entry)
    return Answer(tuple(todo), tuple(done), Planned(tuple(planned), loader))


def _answered(opts: RunOptions, entry: plan.SchemaPlan, without_table: bool) -> TenantResult | None:
    """The result the read gives ``entry``; None when migrate must run in it."""
    if entry.current:
        return TenantResult(entry.schema, CURRENT)
    if opts.check and entry.unfinished:
        return TenantResult(
            entry.schema,
            PENDING,
            f"unfinished: a run did not complete it (lock left by {entry.unfinished})",
        )
    if opts.check and entry.plan is not None:
        # migrate --check looks at the plan only (not at squash rows it would write).
        if entry.plan.steps:
            return TenantResult(entry.schema, PENDING, _describe(entry))
        return TenantResult(entry.schema, CURRENT)
    if without_table:
        return TenantResult(entry.schema, PENDING, "unapplied migrations: no django_migrations")
    return None


def _describe(entry: plan.SchemaPlan) -> str:
    parts = [f"{app}: {', '.join(names)}" for app, names in entry.missing_by_app().items()]
    return "unapplied migrations: " + "; ".join(parts)
