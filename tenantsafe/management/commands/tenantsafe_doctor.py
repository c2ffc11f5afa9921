from __future__ import annotations

import json
from argparse import ArgumentParser
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections
from django.db.migrations.exceptions import NodeNotFoundError

from tenantsafe import doctor


class Command(BaseCommand):
    help = (
        "Report the state of every tenant: rows without schemas, schemas without rows, "
        "tenants behind on migrations, tenant tables in public, the pooler in between."
    )
    # The doctor reports tenantsafe's check messages itself, as findings.
    requires_system_checks = ()

    def add_arguments(self, parser: ArgumentParser) -> None:
        from django_tenants.utils import get_tenant_database_alias

        parser.add_argument(
            "--database",
            default=get_tenant_database_alias() or DEFAULT_DB_ALIAS,
            choices=list(connections),
            help="The database to examine (default: the tenant database).",
        )
        parser.add_argument(
            "--json", action="store_true", help="Print the report as JSON (for CI)."
        )
        parser.add_argument(
            "--fail-on",
            choices=[doctor.ERROR, doctor.WARNING],
            default=doctor.ERROR,
            help="Exit non-zero when a finding of this level or worse is reported "
            "(default: error).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        alias = options["database"]
        try:
            report = doctor.diagnose(alias)
        except DatabaseError as exc:
            raise CommandError(
                f"tenantsafe_doctor could not read database {alias!r}: "
                f"{' '.join(str(exc).split())}. Check that it is reachable and migrated "
                "(migrate_schemas_safe --shared)."
            ) from exc
        except (ImproperlyConfigured, LookupError, NodeNotFoundError) as exc:
            # The configuration the checks would report stops the report itself.
            raise CommandError(
                f"tenantsafe_doctor cannot examine {alias!r}: {exc}. Run `manage.py check` "
                "and fix what it reports first."
            ) from exc
        if options["json"]:
            self.stdout.write(json.dumps(report.as_json(), indent=2, ensure_ascii=False))
        else:
            for line in doctor.render(report):
                self.stdout.write(line)
        if report.fails(options["fail_on"]):
            raise CommandError(
                f"tenantsafe_doctor: {report.count(doctor.ERROR)} error(s), "
                f"{report.count(doctor.WARNING)} warning(s) (--fail-on {options['fail_on']}).",
                returncode=1,
            )
