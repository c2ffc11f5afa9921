"""The run-time guard on Citus through pgbouncer, with other clients on the pool: no statement
sees or writes another tenant's rows, whichever worker each tenant lives on."""

from __future__ import annotations

import json
import os
import textwrap

from tests.citus.tools import CITUS, POOLER_SAFE, CitusDatabase
from tests.dbtools import pool_load, python_workers, register_tenants

pytestmark = CITUS

TENANTS = [f"g{n}" for n in range(4)]
SEEDED = {name: n + 2 for n, name in enumerate(TENANTS)}  # products per tenant

# One thread per tenant: ORM and raw reads in autocommit and in transactions, writes that
# commit and that roll back, and DDL at run time (an index created in autocommit and inside a
# transaction: on Citus the guard pins those in a pipeline, not merged). Every read is checked
# against the tenant's own rows; the writes are checked in the database afterwards.
WORKER = textwrap.dedent(
    """
    import json, sys, threading
    import django
    django.setup()
    from django.conf import settings
    from django.db import connection, transaction
    from testproject.customers.models import Client
    from testproject.notes.models import Note
    from testproject.shop.models import Product

    settings.TENANTSAFE_RUNTIME_GUARD = True
    rounds, seeded = int(sys.argv[1]), json.loads(sys.argv[2])
    results = {}

    class Rollback(Exception):
        pass

    def work(schema):
        wrong, errors, written = [], [], 0
        connection.set_schema_to_public()
        connection.set_tenant(Client.objects.get(schema_name=schema))
        expected = seeded[schema]
        for i in range(rounds):
            try:
                if Product.objects.count() != expected:
                    wrong.append(("orm", Product.objects.count()))
                with connection.cursor() as cursor:
                    cursor.execute("SELECT count(*), min(name) FROM shop_product")
                    count, first = cursor.fetchone()
                    if (count, first[: len(schema) + 1]) != (expected, schema + "-"):
                        wrong.append(("raw", count, first))
                    cursor.execute(f"CREATE INDEX IF NOT EXISTS note_{i % 3} ON notes_note (title)")
                Note.objects.create(title=f"{schema}:{i}:auto")
                written += 1
                with transaction.atomic():
                    with connection.cursor() as cursor:
                        cursor.execute("CREATE INDEX IF NOT EXISTS note_body ON notes_note (body)")
                    Note.objects.create(title=f"{schema}:{i}:atomic")
                    if Product.objects.filter(name__startswith=schema).count() != expected:
                        wrong.append(("atomic", i))
                written += 1
                try:
                    with transaction.atomic():
                        Note.objects.create(title=f"{schema}:{i}:rolled-back")
                        raise Rollback
                except Rollback:
                    pass
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
        connection.close()
        results[schema] = {"wrong": wrong[:5], "errors": errors[:5], "written": written}

    threads = [threading.Thread(target=work, args=(s,)) for s in sys.argv[3:]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps(results))
    """
)


def seed(database: CitusDatabase) -> None:
    register_tenants(database.url, TENANTS)
    result = database.manage("migrate_schemas_safe", "--tenant", "-v0")
    assert result.returncode == 0, result.stderr[-3000:]
    for schema, count in SEEDED.items():
        for n in range(count):
            database.sql(
                f'INSERT INTO "{schema}".shop_product (name, sku, price_cents) VALUES (%s, %s, 0)',
                [f"{schema}-{n}", ""],
            )


def test_guarded_workers_through_pgbouncer_never_touch_another_tenant(citus_db):
    seed(citus_db)
    assert {citus_db.nodes()[name] for name in TENANTS} == set(citus_db.worker_ports)
    env = {**os.environ, **POOLER_SAFE, "DATABASE_URL": citus_db.pooled}
    rounds = 10

    args = [str(rounds), json.dumps(SEEDED)]
    with pool_load(citus_db.pooled, [f'"{s}", public' for s in TENANTS] + ["public"], clients=3):
        results = python_workers(WORKER, [[*args, *TENANTS[:2]], [*args, *TENANTS[2:]]], env)

    assert {s: (r["wrong"], r["errors"]) for s, r in results.items()} == {
        s: ([], []) for s in TENANTS
    }
    for schema in TENANTS:
        titles = [t for (t,) in citus_db.sql(f'SELECT title FROM "{schema}".notes_note')]
        mine = [t for t in titles if t.startswith(f"{schema}:")]
        # The welcome note of the data migration, and every write of this tenant, only.
        assert len(titles) == len(mine) + 1 == rounds * 2 + 1, (schema, titles[:5])
        assert not [t for t in mine if t.endswith("rolled-back")]
        indexes = citus_db.sql(
            "SELECT indexname FROM pg_indexes WHERE schemaname = %s AND indexname ~ '^note_'",
            [schema],
        )
        assert sorted(i for (i,) in indexes) == ["note_0", "note_1", "note_2", "note_body"]
    assert citus_db.sql(
        "SELECT count(*) FROM pg_indexes WHERE schemaname = 'public' AND indexname ~ '^note_'"
    ) == [(0,)]
