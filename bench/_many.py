"""Shared by the 10,000-tenant benchmarks: a database of the test project with many current
tenants, made once and kept on a server that outlives the run.

Public is migrated through Django, and so is one template tenant; the others are clones of
it (``pg_dump`` of its schema, renamed, restored by ``jobs`` psql processes, one transaction per
tenant: see :func:`bench.bench_deploy.restore`), each with a tenant row and a domain
``<schema>.localhost``. The catalogs are analysed, as they are in a database that has lived
a while.

On a server given by DATABASE_URL the database is kept under a name that says the tenant
count and a digest of the test project's migrations (``bench_many_<count>_<digest>``), and a
later run with the same count and migrations uses it again (``CREATE DATABASE ... TEMPLATE``
copies of it are what the benchmarks change). A larger one is grown from the largest smaller
one there is. ``--fresh`` in the scripts makes it anew.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator

from bench._db import psql
from bench.bench_deploy import CATALOGS, TEMPLATE, restore
from testproject.dbtools import ROOT, connect, direct_url, register_tenants, with_dbname

PREFIX = "bench_many_"


def names(count: int) -> list[str]:
    return [f"t{number:05d}" for number in range(count)]


def state() -> str:
    """A digest of the test project's migration files: a kept database is of this state."""
    digest = hashlib.sha256()
    for path in sorted(ROOT.glob("testproject/*/migrations/*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:10]


def _admin() -> str:
    return with_dbname(direct_url(), "postgres")


def _existing() -> dict[int, str]:
    """The kept databases of this state, by tenant count."""
    with connect(_admin()) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", [f"{PREFIX}%_{state()}"]
        ).fetchall()
    found = {}
    for (name,) in rows:
        count = name[len(PREFIX) :].split("_")[0]
        if count.isdigit():
            found[int(count)] = name
    return found


def _manage(url: str, *args: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "testproject.manage", *args],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": url, "DJANGO_SETTINGS_MODULE": "testproject.settings"},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(
            f"{' '.join(args)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )


def golden(count: int, *, jobs: int = 2, fresh: bool = False) -> str:
    """The name of a database with ``count`` current tenants (made, grown or kept)."""
    existing = _existing()
    name = f"{PREFIX}{count}_{state()}"
    with connect(_admin()) as conn:
        if fresh and count in existing:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            del existing[count]
        if count in existing:
            print(f"  using the kept database {name}")
            return name
        smaller = max((n for n in existing if n < count), default=None)
        started = time.perf_counter()
        template = f' TEMPLATE "{existing[smaller]}"' if smaller is not None else ""
        conn.execute(f'CREATE DATABASE "{name}"{template}')
    url = with_dbname(direct_url(), name)
    try:
        have = _made(url) if smaller is not None else 0
        dump = _template(url)
        new = names(count)[have:]
        restoring = time.perf_counter()
        restore(url, dump, new, jobs)
        with connect(url) as conn:
            conn.execute(
                "INSERT INTO public.customers_client (schema_name, name, created_on) "
                "SELECT n, n, now() FROM unnest(%s::text[]) AS n",
                [new],
            )
            conn.execute(
                "INSERT INTO public.customers_domain (domain, is_primary, tenant_id) "
                "SELECT schema_name || '.localhost', true, id FROM public.customers_client "
                "WHERE schema_name = ANY(%s)",
                [new],
            )
            conn.execute("VACUUM ANALYZE " + ", ".join(f"pg_catalog.{t}" for t in CATALOGS))
    except BaseException:
        with connect(_admin()) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        raise
    print(
        f"  made {name}: {len(new)} clones in {time.perf_counter() - restoring:.0f}s "
        f"({(time.perf_counter() - restoring) / max(len(new), 1) * 1000:.0f} ms each), "
        f"{time.perf_counter() - started:.0f}s in all"
        + (f", grown from {existing[smaller]}" if smaller is not None else "")
    )
    return name


def _made(url: str) -> int:
    with connect(url) as conn:
        if conn.execute("SELECT to_regclass('public.customers_client')").fetchone()[0] is None:
            return 0
        return int(
            conn.execute(
                "SELECT count(*) FROM public.customers_client WHERE schema_name <> 'public'"
            ).fetchone()[0]
        )


def _template(url: str) -> str:
    """A tenant's schema as SQL, its name TEMPLATE: in a new database, the template tenant
    migrated through Django (then dropped: it is no tenant), else the first clone's."""
    first = names(1)[0]
    if _made(url):
        dump = _dump(url, first)
        return re.sub(rf"(?<![A-Za-z0-9_]){first}(?=[.;\s])", TEMPLATE, dump)
    _manage(url, "migrate_schemas", "--shared", "-v0")
    register_tenants(url, [TEMPLATE])
    _manage(url, "migrate_schemas", "--tenant", "-v0")
    dump = _dump(url, TEMPLATE)
    psql(
        url,
        "DELETE FROM public.customers_domain WHERE tenant_id IN (SELECT id FROM "
        f"public.customers_client WHERE schema_name = '{TEMPLATE}'); "
        f"DELETE FROM public.customers_client WHERE schema_name = '{TEMPLATE}'; "
        f"DROP SCHEMA {TEMPLATE} CASCADE;",
    )
    return dump


def _dump(url: str, schema: str) -> str:
    return subprocess.run(
        ["pg_dump", "-n", schema, "--no-owner", "--no-privileges", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def copy(golden_name: str, prefix: str) -> str:
    """A new database copied from ``golden_name``; the caller drops it (:func:`drop`). At
    10,000 tenants a copy takes minutes (700,000 relation files)."""
    name = f"{prefix}_{os.getpid()}_{int(time.time() * 1000) % 10**8}"
    with connect(_admin()) as conn:
        # A template must have no connections (a pooler's kept server connections included).
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            [golden_name],
        )
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{golden_name}" STRATEGY = FILE_COPY')
    return name


def drop(name: str) -> None:
    with connect(_admin()) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def borrowed(golden_name: str) -> Iterator[str]:
    """``golden_name``'s URL, for a benchmark that adds tenants (and tenantsafe's rows) to it:
    whatever it added is removed again afterwards, which at 10,000 tenants is much faster
    than a copy."""
    url = with_dbname(direct_url(), golden_name)
    clean(url)
    try:
        yield url
    finally:
        clean(url)


def clean(url: str) -> None:
    """Drop every schema and tenant row but the database's own tenants (``names(count)``,
    count from its name), and tenantsafe's recordings, spares and leases."""
    count = int(url.rsplit("/", 1)[1][len(PREFIX) :].split("_")[0])
    kept = names(count)
    with connect(url) as conn:
        extra = [
            row[0]
            for row in conn.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname NOT IN ('public', "
                "'information_schema') AND nspname NOT LIKE 'pg\\_%%' AND nspname <> ALL(%s)",
                [kept],
            ).fetchall()
        ]
        for schema in extra:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        conn.execute(
            "DELETE FROM public.customers_domain WHERE tenant_id IN (SELECT id FROM "
            "public.customers_client WHERE schema_name <> ALL(%s))",
            [kept],
        )
        conn.execute("DELETE FROM public.customers_client WHERE schema_name <> ALL(%s)", [kept])
        for table in ("tenantsafe_recording", "tenantsafe_spare", "tenantsafe_lease"):
            if conn.execute("SELECT to_regclass(%s)", [f"public.{table}"]).fetchone()[0]:
                conn.execute(f"DELETE FROM public.{table}")
