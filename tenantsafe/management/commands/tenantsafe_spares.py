from __future__ import annotations

from argparse import ArgumentParser, ArgumentTypeError
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections

from tenantsafe import provisioning, spares


class Command(BaseCommand):
    help = (
        "Keep TENANTSAFE_SPARE_SCHEMAS spare tenant schemas of the current migration state "
        "provisioned ahead (drops those of older states), so that signups claim one."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        from django_tenants.utils import get_tenant_database_alias

        parser.add_argument(
            "--count",
            type=_count,
            metavar="N",
            help="How many spares to keep (default: TENANTSAFE_SPARE_SCHEMAS, else 0; 0 only "
            "drops spares of older migration states).",
        )
        parser.add_argument(
            "--database",
            default=get_tenant_database_alias() or DEFAULT_DB_ALIAS,
            choices=list(connections),
            help="The database to provision them in (default: the tenant database).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        from django_tenants.utils import has_multi_type_tenants

        alias = options["database"]
        if has_multi_type_tenants():
            raise CommandError(
                "tenantsafe_spares does not support multi-type tenants (TENANT_TYPES) yet; "
                "remove TENANTSAFE_SPARE_SCHEMAS or the cron job that runs it."
            )
        try:
            filled = provisioning.fill_spares(alias, options["count"])
        except DatabaseError as exc:
            raise CommandError(
                f"tenantsafe_spares could not provision spare schemas in database {alias!r}: "
                f"{' '.join(str(exc).split())}. Check that it is reachable and migrated "
                "(migrate_schemas_safe)."
            ) from exc
        if options["verbosity"] >= 1:
            for line in describe(filled):
                self.stdout.write(line)
        if filled.problem:
            raise CommandError(f"tenantsafe_spares: {filled.problem}.", returncode=1)


def describe(filled: spares.Filled) -> list[str]:
    lines = []
    if filled.dropped:
        lines.append(
            f"tenantsafe_spares: dropped {len(filled.dropped)} spare schema(s) of an older "
            "migration state."
        )
    lines.append(
        f"tenantsafe_spares: {filled.ready} of {filled.wanted} spare schema(s) ready "
        f"({len(filled.made)} made)."
    )
    return lines


def _count(text: str) -> int:
    if not text.isdigit():
        raise ArgumentTypeError(f"{text!r} is not a whole number of 0 or more")
    return int(text)
