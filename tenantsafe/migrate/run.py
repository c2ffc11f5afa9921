"""One ``migrate_schemas_safe`` run: public first, then the tenants, ending in a Summary."""

from __future__ import annotations

import time
from collections.abc import Sequence

from django.db import DatabaseError
from django.test.utils import override_settings
from django_tenants.utils import get_public_schema_name

from tenantsafe import locks, progress, recording, schemas, spares, stopping
from tenantsafe.migrate import failures, recorder, warm
from tenantsafe.migrate.deploy import DeployRun, replays
from tenantsafe.migrate.executor import Executor
from tenantsafe.migrate.skipping import Planned, answer_from_read
from tenantsafe.options import RunOptions
from tenantsafe.results import FAILED, NOT_ATTEMPTED, Summary, TenantRef, TenantResult

# Tables of tenantsafe's own in public, which a run or a signup elsewhere may create while
# this run migrates tenants (they are no tenant's).
_OWN_TABLES = frozenset({locks.TABLE, recording.TABLE, spares.TABLE})


def run(opts: RunOptions, *, public: bool, tenants: Sequence[TenantRef]) -> Summary:
    """Migrate public (with ``public``) and ``tenants``; never raises for a schema's failure."""
    return MigrationRun(opts, public=public, tenants=tenants).summary()


class MigrationRun:
    """A run's options, stop, executor, and the results and problems it collects."""

    def __init__(self, opts: RunOptions, *, public: bool, tenants: Sequence[TenantRef]) -> None:
        self.opts = opts
        self.public = public
        self.tenants = tuple(tenants)
        self.stop = stopping.Stop(opts.max_failures)
        self.executor = Executor(opts, self.stop)
        self.results: list[TenantResult] = []
        # What went wrong outside any tenant (public gained tables).
        self.problems: list[str] = []

    def summary(self) -> Summary:
        """Run, under the signal handlers; every tenant not reached is NOT_ATTEMPTED."""
        started = time.monotonic()
        with stopping.on_signals(self.stop), recorder.by_name():
            try:
                self._run()
            except DatabaseError as exc:
                # Outside any tenant (the read, the public-tables check): nothing half-done.
                error = failures.reachable(self.opts.database) or " ".join(str(exc).split())
                self.stop.request(stopping.UNREACHABLE, error)
            except KeyboardInterrupt:
                self.stop.request(stopping.SIGINT)
        done = {result.schema for result in self.results}
        missed = [
            TenantResult(t.schema, NOT_ATTEMPTED) for t in self.tenants if t.schema not in done
        ]
        return Summary(
            (*self.results, *missed),
            tuple(self.problems),
            time.monotonic() - started,
            stopped=self.stop.describe(self.opts.database),
            stop_status=self.stop.exit_status,
        )

    def _run(self) -> None:
        if self.public and not self._public():
            # Tenants depend on shared tables: stop rather than migrate on a broken base.
            return
        if self.stop.requested():
            return
        alias = self.opts.database
        if not (self.opts.plan or self.opts.check):
            locks.ensure_table(alias)  # before the snapshot: it is no tenant's table
        public_before = schemas.public_tables(alias) if self.tenants else set()
        self._tenants()
        if self.tenants and not self.stop.requested():
            # tenantsafe's own tables (leases, recordings) may appear meanwhile: create_tenant
            # or a signup in another process creates them on first use.
            gained = schemas.public_tables(alias) - public_before - _OWN_TABLES
            if gained:
                self.problems.append(
                    "public gained tables while tenants were migrated: " + ", ".join(sorted(gained))
                )

    def _public(self) -> bool:
        """Migrate public; whether it did not fail."""
        result = self.executor.run([TenantRef(get_public_schema_name())])[0]
        self.results.append(result)
        return result.status != FAILED

    def _tenants(self) -> None:
        """The tenants: those the read answers, then the others (by deploy, when it may)."""
        opts = self.opts
        answer = answer_from_read(opts, self.tenants)
        self.results += answer.answered
        applied = [e.applied for e in answer.planned.entries] if answer.planned else []
        with (
            progress.reporting(
                stream=opts.stdout,
                verbosity=opts.verbosity,
                check=opts.check,
                todo=answer.todo,
                answered=answer.answered,
            ),
            warm.serving(opts, applied),
            # Every statement of the run is pinned by the guard, so django-tenants' SET
            # search_path on each new cursor (a round trip, dozens per tenant) buys nothing.
            override_settings(TENANT_LIMIT_SET_CALLS=True),
        ):
            if answer.planned is not None and opts.plan and opts.replay:
                DeployRun(opts, self.executor, answer.planned).show_groups()
            if answer.planned is not None and replays(opts):
                self._deploy(answer.planned)
            else:
                self.results += self.executor.run(answer.todo)

    def _deploy(self, planned: Planned) -> None:
        deploy = DeployRun(self.opts, self.executor, planned)
        try:
            deploy.run()
        finally:
            # Also when a second signal ends it: what it did counts.
            self.results += deploy.results
