"""The main job on the embedded database: ``python runtests.py --demo``.

Migrates the shared apps, registers a few demo tenants (rows and empty schemas, as a signup
flow that defers migrations to the deploy would leave them), then runs migrate_schemas_safe.
"""

from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="runtests.py --demo")
    parser.add_argument("--tenants", type=int, default=3)
    parser.add_argument("--executor", default="standard")
    ns = parser.parse_args(argv)

    import django
    from django.core.management import call_command
    from django.core.management.base import CommandError

    django.setup()
    from django.db import connection

    from testproject.customers.models import Client, Domain

    call_command("migrate_schemas_safe", shared=True, verbosity=0)
    for number in range(1, ns.tenants + 1):
        schema = f"demo{number}"
        tenant = Client(schema_name=schema, name=f"Demo {number}")
        tenant.auto_create_schema = False
        tenant.save()
        Domain.objects.create(tenant=tenant, domain=f"{schema}.localhost", is_primary=True)
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE SCHEMA "{schema}"')
    try:
        call_command("migrate_schemas_safe", tenant=True, executor=ns.executor, verbosity=1)
    except CommandError as exc:
        print(exc)
        return 1
    return 0
