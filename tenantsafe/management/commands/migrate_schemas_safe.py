from __future__ import annotations

import contextlib
import os
from argparse import ArgumentParser, ArgumentTypeError
from typing import Any

from django.core.management.base import CommandError
from django.db import DatabaseError
from django.test.utils import override_settings
from django_tenants.management.commands import SyncCommon
from django_tenants.management.commands.migrate_schemas import MigrateSchemasCommand
from django_tenants.utils import (
    get_public_schema_name,
    get_tenant_database_alias,
    get_tenant_migration_order,
    has_multi_type_tenants,
)

from tenantsafe import conf, guard, migrate, provisioning, schemas, tenants
from tenantsafe.errors import SchemaNameError
from tenantsafe.options import RunOptions, duration_ms
from tenantsafe.results import PENDING, TenantRef


class Command(MigrateSchemasCommand):  # type: ignore[misc]
    help = (
        "django-tenants' migrate_schemas with the search_path pinned to every statement, "
        "per-tenant fault isolation, locking and a summary."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument(
            "--create-missing",
            action="store_true",
            help="Create the schema of a tenant row that has none, then migrate it.",
        )
        parser.add_argument(
            "--no-skip",
            action="store_true",
            help="Run migrate in every tenant, also in those whose django_migrations shows "
            "nothing to apply (they are skipped by default; see tenantsafe.plan).",
        )
        parser.add_argument(
            "--lock-timeout",
            type=_duration,
            metavar="DURATION",
            help="PostgreSQL's lock_timeout inside every migration transaction, e.g. 5s or "
            "500ms; 0 turns it off (default: TENANTSAFE_LOCK_TIMEOUT, else 5s).",
        )
        parser.add_argument(
            "--lock-retries",
            type=int,
            metavar="N",
            help="How often an atomic migration that hit the lock timeout is tried again, "
            "with backoff (default: TENANTSAFE_LOCK_RETRIES, else 3).",
        )
        parser.add_argument(
            "--no-replay",
            action="store_true",
            help="Migrate every tenant through Django, also those that could get the SQL "
            "recorded in tenants like them (TENANTSAFE_REPLAY_MIGRATIONS = False does the "
            "same).",
        )
        stopping = parser.add_mutually_exclusive_group()
        stopping.add_argument(
            "--max-failures",
            type=_positive,
            metavar="N",
            help="Start no new tenant once N tenants have failed.",
        )
        stopping.add_argument(
            "--fail-fast", action="store_true", help="Start no new tenant after one failed."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        # SyncCommon parses --shared/--tenant/--schema; MigrateSchemasCommand.handle would run
        # the unguarded executors, so the run itself is tenantsafe.migrate's.
        SyncCommon.handle(self, *args, **options)
        codename = self.executor or os.environ.get("EXECUTOR") or "standard"
        opts = RunOptions.from_command(
            options,
            args=args,
            executor=codename,
            lock_timeout=conf.lock_timeout(),
            lock_retries=conf.lock_retries(),
            replay=conf.replay_migrations(),
            subprocess_parallel=conf.subprocess_parallel(),
        )
        # Guarded from the first read: behind a transaction pooler the tenant rows need their
        # path as much as the migrations do.
        with guard.guarding(opts.database), _migrating_through(opts.database):
            refs = self._tenants(opts.database) if self.sync_tenant else []
            summary = migrate.run(opts, public=bool(self.sync_public), tenants=refs)
        migrate.report(
            summary,
            stdout=self.stdout,
            stderr=self.stderr,
            style=self.style,
            verbosity=opts.verbosity,
            show_traceback=bool(options.get("traceback")),
        )
        failed = len(summary.failed) + len(summary.public_problems)
        if self.sync_tenant and not (failed or summary.stopped or opts.plan or opts.check):
            self._refresh_recording(opts)
        if summary.stop_status:
            raise CommandError(
                f"migrate_schemas_safe stopped early ({summary.stopped}).",
                returncode=summary.stop_status,
            )
        if summary.stopped:
            raise CommandError(
                f"migrate_schemas_safe stopped early ({summary.stopped}); {failed} schema(s) "
                "failed; see above.",
                returncode=1,
            )
        if failed:
            raise CommandError(
                f"{failed} of {len(summary.results)} schema(s) failed; see above.", returncode=1
            )
        pending = summary.count(PENDING)
        if pending:
            raise CommandError(f"{pending} schema(s) have unapplied migrations.", returncode=1)

    def _refresh_recording(self, opts: RunOptions) -> None:
        # So that the first signup after this deploy replays like the rest (it would migrate,
        # and record, otherwise).
        if conf.provisioning() != "replay" or has_multi_type_tenants():
            return
        usable = provisioning.ensure_recording(opts.database)
        if opts.verbosity >= 1:
            self.stdout.write(
                "migrate_schemas_safe: new tenants are provisioned by replay of the recorded "
                "migration state."
                if usable
                else "migrate_schemas_safe: the migration state cannot be recorded (see the "
                "warning above); new tenants are migrated."
            )
        wanted = conf.spare_schemas()
        if not (usable and wanted):
            return
        try:
            filled = provisioning.fill_spares(opts.database, wanted)
        except DatabaseError as exc:
            # The migration succeeded; spares are made by the next run or tenantsafe_spares.
            self.stderr.write(
                f"migrate_schemas_safe: could not provision spare schemas: "
                f"{' '.join(str(exc).split())}"
            )
            return
        if filled.problem:
            self.stderr.write(f"migrate_schemas_safe: no spare schemas: {filled.problem}.")
        elif opts.verbosity >= 1:
            self.stdout.write(
                f"migrate_schemas_safe: {filled.ready} spare schema(s) ready for new tenants "
                f"({len(filled.made)} made, {len(filled.dropped)} of an older state dropped)."
            )

    def _tenants(self, alias: str) -> list[TenantRef]:
        public = get_public_schema_name()
        if self.schema_name == public:
            return []
        if self.schema_name:
            try:
                schemas.validate(self.schema_name, owner="--schema")
            except SchemaNameError as exc:
                raise CommandError(str(exc)) from exc
            rows = tenants.refs(alias, schema=self.schema_name)
            if not rows and self.options.get("create_missing"):
                raise CommandError(
                    f'No tenant row has schema "{self.schema_name}": --create-missing only '
                    "creates the schemas of tenant rows. Check the name, or create the tenant."
                )
            return rows or [TenantRef(self.schema_name)]
        return tenants.refs(alias, order=get_tenant_migration_order())


def _migrating_through(alias: str) -> contextlib.AbstractContextManager[Any]:
    # django-tenants' router migrates on TENANT_DB_ALIAS only and skips (while recording)
    # every operation on any other alias: --database points it at the one given.
    if alias == get_tenant_database_alias():
        return contextlib.nullcontext()
    return override_settings(TENANT_DB_ALIAS=alias)


def _duration(text: str) -> str:
    try:
        duration_ms(text)
    except ValueError as exc:
        raise ArgumentTypeError(str(exc)) from None
    return text


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return int(text)
