"""create_tenant of fresh tenants against django-tenants' migrating save(), same run.

    python -m bench.bench_create_tenant [--tenants 12] [--rounds 2] [--existing 10000]

Two identical databases (public schema migrated) per round; in one, N tenants are created with
``Client(...).save()`` (django-tenants creates and migrates each schema), in the other with
``tenantsafe.testing.create_tenant`` (the first is migrated and recorded, the rest replayed).
Each side runs in a fresh process and only the creation loop is timed. With ``--existing N``
both sides use a database holding N current tenants (``bench/_many.py``), which loses what they
added afterwards. Uses DATABASE_URL, or starts a throwaway cluster when it is not set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator

from bench import _many
from bench._db import server
from testproject.dbtools import ROOT, with_dbname


@contextlib.contextmanager
def _database(url: str, existing: str = "") -> Iterator[str]:
    if existing:
        # The database of that many current tenants (bench/_many.py), cleaned afterwards.
        with _many.borrowed(existing) as target:
            yield target
        return
    import psycopg

    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin = with_dbname(url, "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        target = with_dbname(url, name)
        _run(
            [sys.executable, "-m", "testproject.manage", "migrate_schemas", "--shared", "-v0"],
            target,
        )
        yield target
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _run(cmd: list[str], url: str) -> str:
    # A temporary directory of its own: create_tenant shares recordings through a file there,
    # and one left by an earlier run would make the first tenant a replay.
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(ROOT), "TMPDIR": tmp}
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def _phase(side: str, count: int) -> list[float]:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
    import django

    django.setup()
    from tenantsafe.testing import create_tenant
    from testproject.customers.models import Client, Domain

    times = []
    for number in range(count):
        schema = f"bench{number}"
        started = time.perf_counter()
        if side == "save":
            tenant = Client(schema_name=schema, name=f"Bench {number}")
            tenant.save(verbosity=0)
            Domain.objects.create(tenant=tenant, domain=f"bench{number}.localhost")
        else:
            create_tenant(schema, name=f"Bench {number}")
        times.append(time.perf_counter() - started)
    return times


def _side(side: str, url: str, count: int) -> list[float]:
    out = _run([sys.executable, __file__, "--phase", side, "--tenants", str(count)], url)
    return [float(t) for t in json.loads(out.strip().splitlines()[-1])]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tenants", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--phase", choices=["save", "create"])
    parser.add_argument(
        "--existing", type=int, default=0, help="each database holds that many current tenants"
    )
    ns = parser.parse_args(argv)
    if ns.phase:
        print(json.dumps(_phase(ns.phase, ns.tenants)))
        return 0
    with server():
        existing = _many.golden(ns.existing) if ns.existing else ""
        return _compare(os.environ["DATABASE_URL"], ns.tenants, ns.rounds, existing)


def _compare(url: str, count: int, rounds: int, existing: str = "") -> int:
    save: list[float] = []
    create: list[float] = []
    for number in range(rounds):
        # Alternate which side goes first, so neither always gets the warmer server.
        order = ["save", "create"] if number % 2 == 0 else ["create", "save"]
        for side in order:
            with _database(url, existing) as target:
                (save if side == "save" else create).extend(_side(side, target, count))
    firsts = slice(0, None, count)
    save_first, create_first = save[firsts], create[firsts]
    save_rest = [t for i, t in enumerate(save) if i % count]
    create_rest = [t for i, t in enumerate(create) if i % count]
    there = f", {existing} (its current tenants) copied for each" if existing else ""
    print(f"{count} fresh tenants x {rounds} rounds{there} (python {sys.version.split()[0]})")
    print(
        f"  django-tenants save(): total {sum(save):7.2f}s  first {_ms(save_first)}  "
        f"then {_ms(save_rest)} each (median)"
    )
    print(
        f"  create_tenant():       total {sum(create):7.2f}s  first {_ms(create_first)}  "
        f"then {_ms(create_rest)} each (median)"
    )
    print(f"  ratio create_tenant/save, all tenants:   {sum(create) / sum(save):.2f}")
    print(
        f"  ratio create_tenant/save, after the first: "
        f"{statistics.median(create_rest) / statistics.median(save_rest):.2f}"
    )
    return 0


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:6.0f} ms"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
