"""Where a run's tenants are migrated: one after another, or on forked worker processes.

A *path* is one way of migrating one tenant (``TenantPath``): through Django
(:meth:`Executor.through_django`, the default), or any other a deploy adds. The executor runs
a path for many tenants (:meth:`Executor.run`), in the order given with ``standard`` or on
``TENANT_MULTIPROCESSING_MAX_PROCESSES`` forked workers with ``multiprocessing`` (see
:mod:`tenantsafe.migrate.pool`: the path and the run's :class:`~tenantsafe.stopping.Stop`
reach the workers through the fork, never pickled), and applies the run's stop rules around
every tenant (:meth:`Executor.attempt`): none starts once the run is stopping, and a failure
counts against ``--max-failures`` or, when the database is gone, stops the run.
:meth:`Executor.on_connections` runs work that needs no process of its own (a replay: SQL
only) on as many threads, each with its own connection.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from django.core.management.base import CommandError
from django.db import connections

from tenantsafe import stopping
from tenantsafe.migrate import failures, pool
from tenantsafe.migrate.tenant import Place, migrate_tenant
from tenantsafe.options import RunOptions
from tenantsafe.results import FAILED, NOT_ATTEMPTED, TenantRef, TenantResult

# One way of migrating one tenant; it never raises for a failure of that tenant.
TenantPath = Callable[[TenantRef, Place], TenantResult]
T = TypeVar("T")


class Executor:
    """Runs tenants one after another (``standard``) or on forked workers (``multiprocessing``)."""

    codenames = ("standard", "multiprocessing")

    def __init__(self, opts: RunOptions, stop: stopping.Stop) -> None:
        if opts.executor not in self.codenames:
            raise CommandError(
                f"migrate_schemas_safe cannot guard the {opts.executor!r} executor: it runs "
                "plain migrate_schemas in processes tenantsafe does not control. Use "
                "--executor=standard or --executor=multiprocessing."
            )
        self.opts = opts
        self.stop = stop

    @property
    def forks(self) -> bool:
        return self.opts.executor == "multiprocessing"

    def through_django(self, tenant: TenantRef, place: Place | None = None) -> TenantResult:
        """The path through Django: migrate in the tenant's schema (see migrate.tenant)."""
        place = place or Place()
        return migrate_tenant(
            self.opts,
            tenant,
            allow_atomic=place.allow_atomic,
            idx=place.idx,
            count=place.count,
        )

    def attempt(
        self, tenant: TenantRef, path: TenantPath | None = None, place: Place | None = None
    ) -> TenantResult:
        """``path`` (through Django by default) for one tenant, unless the run is stopping; a
        failure may stop it."""
        if self.stop.requested():
            return TenantResult(tenant.schema, NOT_ATTEMPTED)
        try:
            result = (path or self.through_django)(tenant, place or Place())
        except KeyboardInterrupt:
            # A second signal: the tenant in flight was rolled back (its connection is closed).
            failures.reset(self.opts.database)
            return TenantResult(tenant.schema, FAILED, "interrupted; its transaction rolled back")
        if result.status == FAILED:
            self.stop.failed()
            if result.error.startswith(failures.CONNECTION_LOST):
                # One tenant's lost connection fails that tenant; an outage stops the run.
                error = failures.reachable(self.opts.database)
                if error:
                    self.stop.request(stopping.UNREACHABLE, error)
        return result

    def run(
        self, tenants: Sequence[TenantRef], path: TenantPath | None = None
    ) -> list[TenantResult]:
        """``path`` (through Django by default) for every tenant; the results in order."""
        if not tenants:
            return []
        count = len(tenants)
        if self.forks and count > 1:
            work = functools.partial(self._in_worker, path, count)
            return pool.run_forked(work, tenants, self.opts.database, wanted=self.opts.processes)
        return [self.attempt(tenant, path, Place(idx, count)) for idx, tenant in enumerate(tenants)]

    def _in_worker(
        self, path: TenantPath | None, count: int, idx: int, tenant: TenantRef
    ) -> TenantResult:
        # As django-tenants' multiprocessing executor: no atomic migrations in its workers.
        return self.attempt(tenant, path, Place(idx, count, allow_atomic=False))

    def on_connections(
        self, tenants: Sequence[TenantRef], work: Callable[[TenantRef], T]
    ) -> Iterator[tuple[TenantRef, T]]:
        """``work`` for every tenant, on as many threads (each with its own connection) as the
        executor has processes; each (tenant, what it returned) as it comes."""
        threads = min(pool.processes(self.opts.processes) if self.forks else 1, len(tenants))
        if threads <= 1:
            for tenant in tenants:
                yield tenant, work(tenant)
            return
        todo: queue.SimpleQueue[TenantRef] = queue.SimpleQueue()
        for tenant in tenants:
            todo.put(tenant)
        done: queue.SimpleQueue[tuple[TenantRef, T]] = queue.SimpleQueue()
        halt = threading.Event()
        alias = self.opts.database

        def serve() -> None:
            try:
                while not halt.is_set():
                    try:
                        tenant = todo.get_nowait()
                    except queue.Empty:
                        return
                    done.put((tenant, work(tenant)))
            finally:
                # Django's connections belong to the thread that made them.
                connections[alias].close()

        started = [
            threading.Thread(target=serve, name=f"tenantsafe-executor-{n}", daemon=True)
            for n in range(threads)
        ]
        for thread in started:
            thread.start()
        try:
            for _ in tenants:
                yield done.get()
        finally:
            halt.set()
            for thread in started:
                thread.join()
