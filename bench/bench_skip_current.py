"""Skipping current tenants: migrate_schemas_safe against plain migrate_schemas.

    python -m bench.bench_skip_current [--current 150] [--rounds 3] [--many 2000] [--full]

1. ``--current`` tenants that are fully migrated plus one fresh tenant (row and empty schema):
   each round copies one prepared database twice (CREATE DATABASE ... TEMPLATE), runs plain
   ``migrate_schemas --tenant`` on one copy and ``migrate_schemas_safe --tenant`` on the other
   (alternating which goes first) and prints the wall-time ratio; the summary is the median
   (target <= 0.10). Both copies must end with the same fresh tenant.
2. ``--many`` current tenants: wall time of ``migrate_schemas_safe --tenant`` and of
   ``--check`` (target < 5 s), and the command's peak memory. Skipped tenants are only read
   (their django_migrations), so by default these schemas hold just a complete
   django_migrations table; ``--full`` clones the whole migrated template schema instead
   (slow to prepare: about 0.1 s per tenant).

Current tenants are clones of one migrated template schema (pg_dump, renamed), which is how
they look after a deploy and is much faster to prepare than migrating each one.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
from collections.abc import Iterator

from bench._db import median, psql, server, timed

TEMPLATE = "benchtemplate"


def run(url: str, *args: str) -> str:
    from testproject.dbtools import manage

    result = manage(url, *args, timeout=1800)
    assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-2000:])
    return str(result.stdout)


def add_rows(url: str, names: list[str]) -> None:
    from testproject.dbtools import connect

    with connect(url) as conn:
        conn.execute(
            "INSERT INTO public.customers_client (schema_name, name, created_on) "
            "SELECT n, n, now() FROM unnest(%s::text[]) AS n",
            [names],
        )


def prepare(url: str, names: list[str], *, full: bool) -> None:
    """Public migrated, a migrated template schema, and ``names`` as current tenants."""
    from testproject.dbtools import register_tenants

    run(url, "migrate_schemas", "--shared", "-v0")
    register_tenants(url, [TEMPLATE])
    run(url, "migrate_schemas_safe", "--tenant", "-v0")
    if full:
        dump = subprocess.run(
            ["pg_dump", "-n", TEMPLATE, "--no-owner", "--no-privileges", url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        name = re.compile(rf"(?<![A-Za-z0-9_]){TEMPLATE}(?=[.;\s])")
        for start in range(0, len(names), 200):
            psql(url, "\n".join(name.sub(n, dump) for n in names[start : start + 200]))
    else:
        psql(
            url,
            "\n".join(
                f'CREATE SCHEMA "{n}"; CREATE TABLE "{n}".django_migrations '
                f"(LIKE {TEMPLATE}.django_migrations INCLUDING ALL); "
                f'INSERT INTO "{n}".django_migrations SELECT * FROM {TEMPLATE}.django_migrations;'
                for n in names
            ),
        )
    add_rows(url, names)
    # The template is not a tenant of the measured runs.
    psql(
        url,
        "DELETE FROM public.customers_domain WHERE tenant_id IN (SELECT id FROM "
        f"public.customers_client WHERE schema_name = '{TEMPLATE}'); "
        f"DELETE FROM public.customers_client WHERE schema_name = '{TEMPLATE}';",
    )


@contextlib.contextmanager
def copy_of(golden: str, prefix: str) -> Iterator[str]:
    from testproject.dbtools import connect, direct_url, fresh_database, with_dbname

    with fresh_database(prefix) as name, connect(with_dbname(direct_url(), "postgres")) as conn:
        conn.execute(f'DROP DATABASE "{name}"')
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{golden}"')
        yield with_dbname(direct_url(), name)


def ratio_rounds(current: int, rounds: int) -> float:
    from testproject.dbtools import (
        direct_url,
        fingerprint,
        fresh_database,
        register_tenants,
        with_dbname,
    )

    names = [f"cur{n:04d}" for n in range(current)]
    ratios = []
    with fresh_database("bgolden") as golden:
        url = with_dbname(direct_url(), golden)
        prepare(url, names, full=True)
        register_tenants(url, ["fresh"])
        for round_no in range(rounds):
            with copy_of(golden, "bplain") as plain, copy_of(golden, "bsafe") as safe:
                order = [
                    ("plain", "migrate_schemas", plain),
                    ("safe", "migrate_schemas_safe", safe),
                ]
                if round_no % 2:
                    order.reverse()
                times = {
                    label: timed(lambda c=cmd, u=u: run(u, c, "--tenant", "-v0"))  # type: ignore[misc]
                    for label, cmd, u in order
                }
                assert fingerprint(plain, "fresh") == fingerprint(safe, "fresh")
                assert "shop_category" in fingerprint(safe, "fresh")
                ratio = times["safe"] / times["plain"]
                ratios.append(ratio)
                print(
                    f"round {round_no + 1}: migrate_schemas {times['plain']:.2f}s, "
                    f"migrate_schemas_safe {times['safe']:.2f}s, ratio {ratio:.3f}"
                )
    result = median(ratios)
    print(
        f"{current} current tenants + 1 fresh: median ratio migrate_schemas_safe / "
        f"migrate_schemas = {result:.3f} (target <= 0.10)"
    )
    return result


def measured(url: str, *args: str) -> tuple[float, str, float]:
    """Wall seconds, stdout and peak memory (MB) of one manage.py command."""
    import os
    import sys
    import time

    from testproject.dbtools import ROOT

    code = (
        "import resource, sys\n"
        "from testproject.manage import main\n"
        "status = main(['manage.py', *sys.argv[1:]])\n"
        "sys.stderr.write('maxrss=%d\\n' % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
        "sys.exit(status)\n"
    )
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": url},
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-2000:]
    maxrss = int(re.findall(r"maxrss=(\d+)", result.stderr)[-1])
    return seconds, result.stdout, maxrss / 1024


def many(count: int, *, full: bool) -> None:
    from testproject.dbtools import direct_url, fresh_database, with_dbname

    names = [f"many{n:05d}" for n in range(count)]
    with fresh_database("bmany") as db:
        url = with_dbname(direct_url(), db)
        prepare(url, names, full=full)
        seconds, out, memory = measured(url, "migrate_schemas_safe", "--tenant")
        check, _, check_memory = measured(url, "migrate_schemas_safe", "--tenant", "--check")
        empty, _, empty_memory = measured(url, "migrate_schemas_safe", "--schema", "public")
        assert f"{count} tenant(s): 0 migrated, {count} already current, 0 failed" in out, out
    kind = "full schemas" if full else "django_migrations only"
    print(
        f"{count} current tenants ({kind}): migrate_schemas_safe --tenant {seconds:.2f}s "
        f"(peak {memory:.0f} MB), --check {check:.2f}s (peak {check_memory:.0f} MB); "
        f"target < 5 s. For scale, the same command with no tenant takes {empty:.2f}s "
        f"(peak {empty_memory:.0f} MB)."
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--current", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--many", type=int, default=2000)
    parser.add_argument("--full", action="store_true", help="--many tenants as full clones")
    ns = parser.parse_args()
    with server():
        if ns.current and ns.rounds:
            ratio_rounds(ns.current, ns.rounds)
        if ns.many:
            many(ns.many, full=ns.full)


if __name__ == "__main__":
    main()
