"""One tenant's migration through Django: django-tenants' ``run_migrations``, guarded, under the
tenant's lease, an atomic migration that hit the lock timeout tried again with backoff."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from django.db import connections
from django.db.models.signals import post_migrate
from django_tenants.migration_executors import base as upstream

from tenantsafe import guard, locks, schemas, statements
from tenantsafe.errors import SchemaMissingError
from tenantsafe.migrate import failures
from tenantsafe.migrate.output import LineTracker
from tenantsafe.options import RunOptions
from tenantsafe.results import (
    CURRENT,
    FAILED,
    MIGRATED,
    PENDING,
    PLANNED,
    TenantRef,
    TenantResult,
)

logger = logging.getLogger("tenantsafe.migrate")


@dataclass(frozen=True)
class Place:
    """Where a tenant is in its run: migrate's ``[idx/count]`` progress, and whether its
    migrations may run atomic (django-tenants' multiprocessing executor says they may not)."""

    idx: int | None = None
    count: int | None = None
    allow_atomic: bool = True


def migrate_tenant(
    opts: RunOptions,
    tenant: TenantRef,
    *,
    allow_atomic: bool = True,
    idx: int | None = None,
    count: int | None = None,
    lease: locks.Lease | None = None,
) -> TenantResult:
    """Migrate one schema through django-tenants' ``run_migrations``, under the guard and lease.

    Never raises for a failure of this tenant: the caller goes on with the next one. ``lease``
    is one the caller holds already (create_tenant); otherwise the tenant's own is taken.
    """
    alias = opts.database
    place = Place(idx, count, allow_atomic)
    try:
        schemas.validate(tenant.schema)
        with guard.guarding(alias), holding(opts, tenant.schema, lease) as held:
            result = _TenantMigration(opts, tenant, place, held).retrying()
            if held is not None and result.status in (MIGRATED, CURRENT):
                held.complete()
            return result
    except Exception as exc:
        failures.reset(alias)
        return TenantResult(tenant.schema, FAILED, failures.one_line(exc), traceback.format_exc())


@contextlib.contextmanager
def holding(opts: RunOptions, schema: str, lease: locks.Lease | None) -> Iterator[Any]:
    """``lease`` when the caller holds one, else the schema's own (None for --plan/--check)."""
    if lease is not None:
        yield lease
    elif opts.plan or opts.check:
        # They change nothing: no lock, and a tenant whose run did not finish stays so.
        yield None
    else:
        with locks.leased(opts.database, schema) as own:
            yield own


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


class _TenantMigration:
    """``migrate`` in one schema: its options, its place in the run and the lease it holds
    (None for --plan and --check)."""

    def __init__(
        self, opts: RunOptions, tenant: TenantRef, place: Place, lease: locks.Lease | None
    ) -> None:
        self.opts = opts
        self.tenant = tenant
        self.place = place
        self.lease = lease

    def retrying(self) -> TenantResult:
        """The result of migrate, tried again while an atomic migration hits the lock timeout."""
        opts, schema = self.opts, self.tenant.schema
        for attempt in range(1, opts.lock_retries + 2):
            waits = failures.LockWaits()
            try:
                return self.once(waits)
            except SystemExit as exc:
                # migrate --check exits 1 when something is unapplied.
                failures.reset(opts.database)
                if opts.check and exc.code not in (0, None):
                    return TenantResult(schema, PENDING, "unapplied migrations")
                return TenantResult(schema, FAILED, f"exited with status {exc.code}")
            except Exception as exc:
                failures.reset(opts.database)
                retry = (
                    failures.is_lock_timeout(exc) and waits.atomic and attempt <= opts.lock_retries
                )
                if not retry:
                    error = failures.failure(exc, opts, schema, waits, attempt)
                    return TenantResult(schema, FAILED, error, traceback.format_exc())
                self._pause(attempt, waits)
        raise AssertionError("unreachable")  # pragma: no cover

    def _pause(self, attempt: int, waits: failures.LockWaits) -> None:
        # The atomic migration was rolled back whole: wait a little, then try it again.
        pause = min(0.5 * 2 ** (attempt - 1), 10.0)
        logger.info(
            "schema %s: lock timeout on %s; trying again in %.1fs (%d of %d)",
            self.tenant.schema,
            statements.short(waits.sql, 120),
            pause,
            attempt,
            self.opts.lock_retries,
        )
        time.sleep(pause)

    def once(self, waits: failures.LockWaits) -> TenantResult:
        """One run of migrate in the schema (created first with --create-missing)."""
        alias, schema = self.opts.database, self.tenant.schema
        if not schemas.exists(alias, schema):
            if not self.opts.create_missing:
                raise SchemaMissingError(schema)
            schemas.create(alias, schema)
        self._log_path("before")
        applied = self._run_migrations(waits)
        self._log_path("after")
        failures.reset(alias)
        if self.opts.plan:
            # migrate --plan printed the plan and returned before post_migrate.
            return TenantResult(schema, PLANNED)
        return TenantResult(schema, MIGRATED if applied else CURRENT)

    def _run_migrations(self, waits: failures.LockWaits) -> int:
        """django-tenants' run_migrations under the lease's terms; how many it applied."""
        opts, (schema, tenant_type), place = self.opts, self.tenant, self.place
        connection: Any = connections[opts.database]
        connection.set_schema_to_public()
        terms = guard.Terms(
            fence=self.lease.fence if self.lease is not None else None,
            lock_timeout_ms=opts.lock_timeout_ms or None,
        )
        lines = LineTracker(sys.stdout)
        migrate_options = dict(opts.migrate)
        # call_command(stdout=...) hands migrate a stream of its own.
        given = LineTracker(migrate_options["stdout"]) if migrate_options.get("stdout") else None
        if given is not None:
            migrate_options["stdout"] = given
        connection.execute_wrappers.insert(0, waits)
        try:
            with (
                guard.with_terms(connection, terms),
                _planned() as applied,
                contextlib.redirect_stdout(lines),
            ):
                upstream.run_migrations(
                    opts.args,
                    migrate_options,
                    opts.executor,
                    schema,
                    tenant_type=tenant_type,
                    allow_atomic=place.allow_atomic,
                    idx=place.idx,
                    count=place.count,
                )
        finally:
            connection.execute_wrappers.remove(waits)
            for stream in (lines, given):
                if stream is not None:
                    stream.close_line()
        return applied[0] if applied else 0

    def _log_path(self, when: str) -> None:
        if not logger.isEnabledFor(logging.DEBUG):
            return
        alias, (schema, tenant_type) = self.opts.database, self.tenant
        connection: Any = connections[alias]
        connection.set_schema(schema, tenant_type=tenant_type, include_public=False)
        current, path = guard.read_path(connection)
        logger.debug(
            "tenant %s %s migrations: current_schema() = %s, search_path = %s",
            schema,
            when,
            current,
            path,
        )
