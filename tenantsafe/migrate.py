"""What ``migrate_schemas_safe`` does: django-tenants' executors, guarded and fault-isolated."""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

from django.conf import settings
from django.core.management.base import CommandError, OutputWrapper
from django.core.management.color import Style
from django.db import connections
from django.db.models.signals import post_migrate
from django_tenants.migration_executors import base as upstream
from django_tenants.migration_executors.multiproc import get_pool
from django_tenants.utils import get_public_schema_name

from tenantsafe import guard, locks, plan, progress, schemas
from tenantsafe.errors import SchemaNameError, SearchPathError
from tenantsafe.options import RunOptions
from tenantsafe.results import (
    CURRENT,
    FAILED,
    MIGRATED,
    PENDING,
    PLANNED,
    Summary,
    TenantRef,
    TenantResult,
)

logger = logging.getLogger("tenantsafe.migrate")


@contextlib.contextmanager
def _planned() -> Iterator[list[int]]:
    """How many migrations ``migrate`` applied, from the plan its post_migrate signal carries.

    --plan and --check return before sending it: they applied nothing.
    """
    seen: list[int] = []

    def receiver(plan: list[Any] | None = None, **kwargs: Any) -> None:
        if plan is not None and not seen:
            seen.append(len(plan))

    post_migrate.connect(receiver, dispatch_uid="tenantsafe.migrate.planned")
    try:
        yield seen
    finally:
        post_migrate.disconnect(dispatch_uid="tenantsafe.migrate.planned")


def _log_path(alias: str, schema: str, when: str) -> None:
    if not logger.isEnabledFor(logging.DEBUG):
        return
    current, path = guard.read_path(connections[alias])
    logger.debug(
        "tenant %s %s migrations: current_schema() = %s, search_path = %s",
        schema,
        when,
        current,
        path,
    )


def _reset(alias: str) -> None:
    connection: Any = connections[alias]
    with contextlib.suppress(Exception):
        connection.close()
    connection.set_schema_to_public()


def migrate_tenant(
    opts: RunOptions,
    tenant: TenantRef,
    *,
    allow_atomic: bool = True,
    idx: int | None = None,
    count: int | None = None,
) -> TenantResult:
    """Migrate one schema through django-tenants' ``run_migrations``, under the guard and lock.

    Never raises for a failure of this tenant: the caller goes on with the next one.
    """
    alias = opts.database
    schema, tenant_type = tenant
    try:
        schemas.validate(schema)
        with guard.guarding(alias), locks.for_process(alias).hold(locks.MIGRATE, schema):
            if not schemas.exists(alias, schema):
                if not opts.create_missing:
                    raise schemas.SchemaMissingError(schema)
                schemas.create(alias, schema)
            connection: Any = connections[alias]
            connection.set_schema(schema, tenant_type=tenant_type, include_public=False)
            _log_path(alias, schema, "before")
            connection.set_schema_to_public()
            with _planned() as applied:
                upstream.run_migrations(
                    opts.args,
                    dict(opts.migrate),
                    opts.executor,
                    schema,
                    tenant_type=tenant_type,
                    allow_atomic=allow_atomic,
                    idx=idx,
                    count=count,
                )
            connection.set_schema(schema, tenant_type=tenant_type, include_public=False)
            _log_path(alias, schema, "after")
            _reset(alias)
    except SystemExit as exc:
        # migrate --check exits 1 when something is unapplied.
        _reset(alias)
        if opts.check and exc.code not in (0, None):
            return TenantResult(schema, PENDING, "unapplied migrations")
        return TenantResult(schema, FAILED, f"exited with status {exc.code}")
    except Exception as exc:
        _reset(alias)
        return TenantResult(schema, FAILED, _one_line(exc), traceback.format_exc())
    if opts.plan:
        # migrate --plan printed the plan and returned before post_migrate.
        return TenantResult(schema, PLANNED)
    return TenantResult(schema, MIGRATED if applied and applied[0] else CURRENT)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (SearchPathError, SchemaNameError)):
        return text
    return f"{type(exc).__name__}: {text}"


def _job(opts: RunOptions, count: int, item: tuple[int, TenantRef]) -> TenantResult:
    idx, tenant = item
    return migrate_tenant(opts, tenant, allow_atomic=False, idx=idx, count=count)


class Executor:
    """Runs tenants one after another (``standard``) or in a fork pool (``multiprocessing``)."""

    codenames = ("standard", "multiprocessing")

    def __init__(self, opts: RunOptions) -> None:
        if opts.executor not in self.codenames:
            raise CommandError(
                f"migrate_schemas_safe cannot guard the {opts.executor!r} executor: it runs "
                "plain migrate_schemas in processes tenantsafe does not control. Use "
                "--executor=standard or --executor=multiprocessing."
            )
        self.opts = opts

    def run(self, tenants: Sequence[TenantRef]) -> list[TenantResult]:
        if not tenants:
            return []
        if self.opts.executor == "multiprocessing" and len(tenants) > 1:
            return self._run_pool(tenants)
        return [
            migrate_tenant(self.opts, tenant, idx=idx, count=len(tenants))
            for idx, tenant in enumerate(tenants)
        ]

    def _run_pool(self, tenants: Sequence[TenantRef]) -> list[TenantResult]:
        # Workers are forked: close what they would otherwise share with this process.
        connections[self.opts.database].close()
        locks.close_process_locks()
        # Streams do not pickle, and the workers report through signals anyway.
        job = functools.partial(_job, replace(self.opts, stdout=None), len(tenants))
        chunks = getattr(settings, "TENANT_MULTIPROCESSING_CHUNKS", 2)
        pool = get_pool()
        try:
            results: list[TenantResult] = pool.map(job, enumerate(tenants), chunks)
        finally:
            pool.close()
            pool.join()
        return results


def run(opts: RunOptions, *, public: bool, tenants: Sequence[TenantRef]) -> Summary:
    executor = Executor(opts)
    alias = opts.database
    results: list[TenantResult] = []
    problems: list[str] = []
    started = time.monotonic()
    try:
        if public:
            result = executor.run([TenantRef(get_public_schema_name())])[0]
            results.append(result)
            if result.status == FAILED:
                # Tenants depend on shared tables: stop rather than migrate on a broken base.
                return Summary(tuple(results), elapsed=time.monotonic() - started)
        public_before = schemas.public_tables(alias) if tenants else set()
        todo, answered = _answer_from_read(opts, tenants)
        results.extend(answered)
        with progress.reporting(
            stream=opts.stdout,
            verbosity=opts.verbosity,
            check=opts.check,
            todo=todo,
            answered=answered,
        ):
            results.extend(executor.run(todo))
        if tenants:
            gained = schemas.public_tables(alias) - public_before
            if gained:
                problems.append(
                    "public gained tables while tenants were migrated: " + ", ".join(sorted(gained))
                )
    finally:
        locks.close_process_locks()
    return Summary(tuple(results), tuple(problems), time.monotonic() - started)


def _answer_from_read(
    opts: RunOptions, tenants: Sequence[TenantRef]
) -> tuple[list[TenantRef], list[TenantResult]]:
    """(tenants to run migrate in, results for the others), from one batched read.

    The others are the current tenants (CURRENT) and, under ``--check``, the tenants whose
    unapplied migrations the read already shows (PENDING). Skipping only saves time: whatever
    stops the read, every tenant takes the guarded path.
    """
    if not tenants or not opts.skip_current:
        return list(tenants), []
    alias = opts.database
    started = time.monotonic()
    try:
        planner = plan.Planner(opts.app_label, opts.migration_name)
        entries = plan.plan_schemas(alias, tenants, planner=planner)
        # Under --check a schema without django_migrations has everything unapplied; a missing
        # schema still goes to the executor, which names it (or creates it).
        bare = [e.schema for e in entries if not e.has_table and schemas.is_valid(e.schema)]
        without_table = (
            schemas.existing(alias, bare)
            if opts.check and bare and not opts.create_missing
            else set()
        )
    except plan.PlanError:
        return list(tenants), []  # migrate reports the bad target, tenant by tenant, as before
    except Exception:
        logger.warning("cannot tell which tenants are current; migrating all", exc_info=True)
        return list(tenants), []
    todo: list[TenantRef] = []
    done: list[TenantResult] = []
    for entry in entries:
        if entry.current:
            done.append(TenantResult(entry.schema, CURRENT))
        elif opts.check and entry.plan is not None:
            # migrate --check looks at the plan only (not at squash rows it would write).
            if entry.plan.steps:
                done.append(TenantResult(entry.schema, PENDING, _describe(entry)))
            else:
                done.append(TenantResult(entry.schema, CURRENT))
        elif entry.schema in without_table:
            done.append(
                TenantResult(entry.schema, PENDING, "unapplied migrations: no django_migrations")
            )
        else:
            todo.append(TenantRef(entry.schema, entry.tenant_type))
    logger.debug(
        "read %d schema(s) in %.2fs: %d to run migrate in, %d answered from the read",
        len(tenants),
        time.monotonic() - started,
        len(todo),
        len(done),
    )
    return todo, done


def _describe(entry: plan.SchemaPlan) -> str:
    parts = [f"{app}: {', '.join(names)}" for app, names in entry.missing_by_app().items()]
    return "unapplied migrations: " + "; ".join(parts)


def report(
    summary: Summary,
    *,
    stdout: OutputWrapper,
    stderr: OutputWrapper,
    style: Style,
    verbosity: int,
    show_traceback: bool,
) -> None:
    public = get_public_schema_name()
    tenant_results = [r for r in summary.results if r.schema != public]
    counts = collections.Counter(r.status for r in tenant_results)
    parts = [f"{counts[MIGRATED]} migrated", f"{counts[CURRENT]} already current"]
    if counts[PLANNED]:
        parts.append(f"{counts[PLANNED]} with a plan shown")
    if counts[PENDING]:
        parts.append(f"{counts[PENDING]} with unapplied migrations")
    parts.append(f"{counts[FAILED]} failed")
    if verbosity >= 1:
        shared = [f"public {r.status}; " for r in summary.results if r.schema == public]
        stdout.write(
            f"migrate_schemas_safe: {''.join(shared)}{len(tenant_results)} tenant(s): "
            + ", ".join(parts)
            + f" in {summary.elapsed:.1f}s"
        )
    for result in summary.failed:
        if show_traceback and result.traceback:
            stderr.write(result.traceback)
        stderr.write(style.ERROR(f"FAILED {result.schema}: {result.error}"))
    for problem in summary.public_problems:
        stderr.write(style.ERROR(f"FAILED public: {problem}"))
    if verbosity >= 2:
        for result in summary.results:
            if result.status == PENDING:
                stdout.write(f"PENDING {result.schema}: {result.error}")
