"""A full migration of 10 fresh tenants: migrate_schemas_safe against plain migrate_schemas.

    python -m bench.bench_migrate [--tenants 10] [--rounds 3] [--pooled]

Each round prepares two identical databases (public migrated, tenant rows and empty schemas),
runs plain django-tenants on one and tenantsafe on the other (alternating which goes first) and
prints the wall-time ratio; the summary is the median. --pooled runs tenantsafe through
pgbouncer (plain migrate_schemas cannot run there correctly, so it stays direct).
"""

from __future__ import annotations

import argparse
import os

from bench._db import median, server, timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--executor", default="standard")
    parser.add_argument("--pooled", action="store_true")
    ns = parser.parse_args()
    env = {"TESTPROJECT_POOLER_SAFE": "1"} if ns.pooled else {}

    with server():
        from testproject.dbtools import (
            direct_url,
            fresh_database,
            manage,
            register_tenants,
            with_dbname,
        )

        names = [f"bench{n:03d}" for n in range(ns.tenants)]
        ratios = []
        for round_no in range(ns.rounds):
            with fresh_database("bplain") as plain_db, fresh_database("bsafe") as safe_db:
                urls = {}
                for label, db in (("plain", plain_db), ("safe", safe_db)):
                    url = with_dbname(direct_url(), db)
                    result = manage(url, "migrate_schemas", "--shared", "-v0", env=env)
                    assert result.returncode == 0, result.stderr
                    register_tenants(url, names)
                    urls[label] = url
                if ns.pooled:
                    urls["safe"] = with_dbname(os.environ["PGBOUNCER_URL"], safe_db)

                def command(name: str, url: str) -> None:
                    args = ["--tenant", "-v0", f"--executor={ns.executor}"]
                    result = manage(url, name, *args, env=env)
                    assert result.returncode == 0, result.stderr

                order = [("plain", "migrate_schemas"), ("safe", "migrate_schemas_safe")]
                if round_no % 2:
                    order.reverse()
                times = {
                    label: timed(lambda c=cmd, u=urls[label]: command(c, u))  # type: ignore[misc]
                    for label, cmd in order
                }
                ratio = times["safe"] / times["plain"]
                ratios.append(ratio)
                print(
                    f"round {round_no + 1}: migrate_schemas {times['plain']:.2f}s, "
                    f"migrate_schemas_safe {times['safe']:.2f}s, ratio {ratio:.2f}"
                )
        via = ", safe via pgbouncer" if ns.pooled else ""
        print(
            f"{ns.tenants} fresh tenants ({ns.executor}{via}): "
            f"median ratio migrate_schemas_safe / migrate_schemas = {median(ratios):.2f} "
            "(target <= 1.10)"
        )


if __name__ == "__main__":
    main()
