"""What ``migrate_schemas_safe`` does: django-tenants' executors, guarded and fault-isolated."""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
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

logger = logging.getLogger("tenantsafe.migrate")

MIGRATED = "migrated"
CURRENT = "current"
PENDING = "pending"
PLANNED = "planned"
FAILED = "failed"


@dataclass(frozen=True)
class TenantResult:
    schema: str
    status: str
    error: str = ""
    traceback: str = ""


@dataclass
class Summary:
    results: list[TenantResult] = field(default_factory=list)
    public_problems: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)

    @property
    def failed(self) -> list[TenantResult]:
        return [r for r in self.results if r.status == FAILED]


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
    args: Sequence[Any],
    options: dict[str, Any],
    codename: str,
    schema: str,
    tenant_type: str = "",
    *,
    allow_atomic: bool = True,
    idx: int | None = None,
    count: int | None = None,
) -> TenantResult:
    """Migrate one schema through django-tenants' ``run_migrations``, under the guard and lock.

    Never raises for a failure of this tenant: the caller goes on with the next one.
    """
    alias = options["database"]
    try:
        schemas.validate(schema)
        with guard.guarding(alias), locks.for_process(alias).hold(locks.MIGRATE, schema):
            if not schemas.exists(alias, schema):
                if not options.get("create_missing"):
                    raise schemas.SchemaMissingError(schema)
                schemas.create(alias, schema)
            connection: Any = connections[alias]
            connection.set_schema(schema, tenant_type=tenant_type, include_public=False)
            _log_path(alias, schema, "before")
            connection.set_schema_to_public()
            with _planned() as applied:
                upstream.run_migrations(
                    args,
                    options,
                    codename,
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
        if options.get("check_unapplied") and exc.code not in (0, None):
            return TenantResult(schema, PENDING, "unapplied migrations")
        return TenantResult(schema, FAILED, f"exited with status {exc.code}")
    except Exception as exc:
        _reset(alias)
        return TenantResult(schema, FAILED, _one_line(exc), traceback.format_exc())
    if options.get("plan"):
        # migrate --plan printed the plan and returned before post_migrate.
        return TenantResult(schema, PLANNED)
    return TenantResult(schema, MIGRATED if applied and applied[0] else CURRENT)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (SearchPathError, SchemaNameError)):
        return text
    return f"{type(exc).__name__}: {text}"


def _job(
    args: Sequence[Any],
    options: dict[str, Any],
    codename: str,
    count: int,
    item: tuple[int, tuple[str, str]],
) -> TenantResult:
    idx, (schema, tenant_type) = item
    return migrate_tenant(
        args, options, codename, schema, tenant_type, allow_atomic=False, idx=idx, count=count
    )


class Executor:
    """Runs tenants one after another (``standard``) or in a fork pool (``multiprocessing``)."""

    codenames = ("standard", "multiprocessing")

    def __init__(self, codename: str, args: Sequence[Any], options: dict[str, Any]) -> None:
        if codename not in self.codenames:
            raise CommandError(
                f"migrate_schemas_safe cannot guard the {codename!r} executor: it runs plain "
                "migrate_schemas in processes tenantsafe does not control. Use "
                "--executor=standard or --executor=multiprocessing."
            )
        self.codename = codename
        self.args = args
        self.options = options

    def run(self, tenants: list[tuple[str, str]]) -> list[TenantResult]:
        if not tenants:
            return []
        if self.codename == "multiprocessing" and len(tenants) > 1:
            return self._run_pool(tenants)
        return [
            migrate_tenant(
                self.args,
                self.options,
                self.codename,
                schema,
                tenant_type,
                idx=idx,
                count=len(tenants),
            )
            for idx, (schema, tenant_type) in enumerate(tenants)
        ]

    def _run_pool(self, tenants: list[tuple[str, str]]) -> list[TenantResult]:
        # Workers are forked: close what they would otherwise share with this process.
        connections[self.options["database"]].close()
        locks.close_process_locks()
        job = functools.partial(_job, self.args, self.options, self.codename, len(tenants))
        chunks = getattr(settings, "TENANT_MULTIPROCESSING_CHUNKS", 2)
        pool = get_pool()
        try:
            results: list[TenantResult] = pool.map(job, enumerate(tenants), chunks)
        finally:
            pool.close()
            pool.join()
        return results


def run(*, executor: Executor, public: bool, tenants: list[tuple[str, str]]) -> Summary:
    alias = executor.options["database"]
    summary = Summary()
    started = time.monotonic()
    try:
        if public:
            result = executor.run([(get_public_schema_name(), "")])[0]
            summary.results.append(result)
            if result.status == FAILED:
                # Tenants depend on shared tables: stop rather than migrate on a broken base.
                return summary
        public_before = schemas.public_tables(alias) if tenants else set()
        # Tenants whose django_migrations shows nothing to do are answered from one batched
        # read (tenantsafe.plan); --no-skip turns that off.
        todo, answered = plan.split(executor.options, tenants)
        summary.results.extend(answered)
        with progress.reporting(executor.options, todo, answered):
            summary.results.extend(executor.run(todo))
        if tenants:
            gained = schemas.public_tables(alias) - public_before
            if gained:
                summary.public_problems.append(
                    "public gained tables while tenants were migrated: " + ", ".join(sorted(gained))
                )
    finally:
        locks.close_process_locks()
        summary.elapsed = time.monotonic() - started
    return summary


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
