"""tenantsafe on Citus against single-node PostgreSQL, measured in the same run.

    python -m bench.bench_citus [--tenants 200] [--queries 400] [--rounds 5]

Starts a Citus cluster of its own (a coordinator and two workers on loopback, schema-based
sharding; ``testproject.citus_cluster``) and uses the throwaway single-node cluster (or
DATABASE_URL). On each, a new database with public migrated (the test project, pooler-safe app
set) gets, one after the other:

- **provisioning**: ``--tenants`` tenants from one process calling
  ``tenantsafe.provisioning.provision()``: the first migrates and records, every other one
  replays the recording. Per tenant: the median of the replays (and the first, apart).
- **deploy**: ``migrate_schemas_safe --tenant`` with two new shop migrations (a column with
  its index, a new model): two witnesses through Django, the others by replay. Per tenant: the
  command's wall time divided by the tenants (its summary line is printed too).
- **guard**: queries per second on one tenant, in one process, with
  ``TENANTSAFE_RUNTIME_GUARD`` off, on, and on with a lock timeout in its terms (what
  ``migrate_schemas_safe`` adds: on Citus that is the pinned form Citus needs for DDL too, a
  pipeline of ``BEGIN``, ``SET LOCAL`` statements, the check, the statement and ``COMMIT``).
  ``--rounds`` interleaved rounds, medians.

Direct connections (the forms are the same through pgbouncer). Needs Citus
(``bash ../shared/citus/install.sh``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench._db import server
from testproject.dbtools import ROOT, fresh_database, manage, with_dbname

POOLER_SAFE = {"TESTPROJECT_POOLER_SAFE": "1"}


def _deploy_package(workdir: Path) -> dict[str, str]:
    """shop's migrations plus two new ones (the deploy tests' own), as a package on
    PYTHONPATH."""
    import django

    django.setup()
    from tests.test_deploy import COLOUR, COUPON

    target = workdir / "bench_citus_shop"
    shutil.copytree(
        ROOT / "testproject" / "shop" / "migrations",
        target,
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    (target / "0004_colour.py").write_text(textwrap.dedent(COLOUR))
    (target / "0005_coupon.py").write_text(textwrap.dedent(COUPON))
    return {
        "TESTPROJECT_MIGRATION_MODULES": json.dumps({"shop": "bench_citus_shop"}),
        "PYTHONPATH": os.pathsep.join([str(workdir), str(ROOT)]),
    }


def _child(url: str, mode: str, *args: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "bench.bench_citus", f"--{mode}", *args],
            cwd=ROOT,
            env={**os.environ, **POOLER_SAFE, "DATABASE_URL": url, "TMPDIR": tmp},
            capture_output=True,
            text=True,
            check=False,
        )
    if result.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{result.stderr[-3000:]}")
    found: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return found


def provision_child(count: int) -> None:
    import django

    django.setup()
    from tenantsafe.provisioning import provision
    from testproject.customers.models import Client

    times, hows = [], []
    for n in range(count):
        started = time.perf_counter()
        hows.append(provision(Client(schema_name=f"b{n:04d}", name=f"B {n}")))
        times.append(time.perf_counter() - started)
    print(json.dumps({"times": times, "hows": hows}))


def guard_child(queries: int, rounds: int) -> None:
    import django

    django.setup()
    from django.conf import settings
    from django.db import connection as default

    from tenantsafe import guard
    from testproject.customers.models import Client
    from testproject.shop.models import Category

    connection: Any = default
    connection.set_tenant(Client.objects.get(schema_name="b0000"))
    first = Category.objects.order_by("pk").first()
    assert first is not None

    def run() -> float:
        started = time.perf_counter()
        for _ in range(queries):
            Category.objects.filter(pk=first.pk).first()
        return queries / (time.perf_counter() - started)

    # "guard+lock_timeout" is the form migrate_schemas_safe gives every statement: on Citus
    # not merged (a pipeline: BEGIN, SET LOCALs, the check, the statement, COMMIT), as DDL is.
    timeout = guard.Terms(lock_timeout_ms=5000)
    variants: dict[str, list[float]] = {"off": [], "guard": [], "guard+lock_timeout": []}
    for _ in range(rounds):
        for name in variants:
            settings.TENANTSAFE_RUNTIME_GUARD = name != "off"
            terms = name == "guard+lock_timeout"
            with guard.with_terms(connection, timeout) if terms else contextlib.nullcontext():
                variants[name].append(run())
    print(json.dumps({name: statistics.median(v) for name, v in variants.items()}))


def measure(
    url: str, tenants: int, queries: int, rounds: int, deploy: dict[str, str]
) -> dict[str, Any]:
    result = manage(url, "migrate_schemas", "--shared", "-v0", env=POOLER_SAFE)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    provisioned = _child(url, "provision", str(tenants))
    env = {**POOLER_SAFE, **deploy}
    started = time.perf_counter()
    deployed = manage(url, "migrate_schemas_safe", "--tenant", env=env, timeout=3600)
    deploy_seconds = time.perf_counter() - started
    if deployed.returncode != 0:
        raise SystemExit(deployed.stderr[-3000:])
    return {
        "first": provisioned["times"][0],
        "replay": statistics.median(provisioned["times"][1:]),
        "replayed": provisioned["hows"].count("replayed"),
        "deploy": deploy_seconds / tenants,
        "deploy summary": [line for line in deployed.stdout.splitlines() if " tenant(s): " in line][
            -1
        ],
        "guard": _child(url, "guard", str(queries), str(rounds)),
    }


@contextlib.contextmanager
def citus_database() -> Iterator[str]:
    from testproject import citus_cluster

    missing = citus_cluster.missing()
    if missing:
        raise SystemExit(missing)
    directory = Path(tempfile.mkdtemp(prefix="tenantsafe-bench-citus-"))
    directory.chmod(0o755)
    try:
        env = citus_cluster.shared(directory)
        yield citus_cluster.create_database(env, "bench_citus")
    finally:
        citus_cluster.CitusCluster(directory / "citus").stop_everything_in(directory)
        shutil.rmtree(directory, ignore_errors=True)


def report(single: dict[str, Any], citus: dict[str, Any], tenants: int) -> None:
    print(f"\n{tenants} tenants; Citus: coordinator + 2 workers, schema-based sharding")
    print(f"{'':34} {'single node':>12} {'Citus':>12} {'Citus/single':>13}")
    rows = [
        ("provisioning, first (migrates) s", "first"),
        ("provisioning by replay, s/tenant", "replay"),
        ("deploy, s/tenant (run/tenants)", "deploy"),
    ]
    for label, key in rows:
        print(f"{label:34} {single[key]:12.3f} {citus[key]:12.3f} {citus[key] / single[key]:13.2f}")
    for name in ("off", "guard", "guard+lock_timeout"):
        a, b = single["guard"].get(name), citus["guard"].get(name)
        left = f"{a:12.0f}" if a else f"{'-':>12}"
        ratio = f"{b / a:13.2f}" if a else f"{'-':>13}"
        print(f"{'queries/s, ' + name:34} {left} {b:12.0f} {ratio}")
    for label, data in (("single node", single), ("Citus", citus)):
        off = data["guard"]["off"]
        costs = ", ".join(
            f"{name} {off / qps:.2f}x" for name, qps in data["guard"].items() if name != "off"
        )
        print(f"guard cost on {label} (time per query against off): {costs}")
        print(f"  {label}: {data['replayed']} of {tenants - 1} replayed; {data['deploy summary']}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tenants", type=int, default=200)
    parser.add_argument("--queries", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--provision", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--guard", nargs=2, type=int, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.provision:
        provision_child(ns.provision)
        return
    if ns.guard:
        guard_child(*ns.guard)
        return
    with server(), tempfile.TemporaryDirectory() as tmp:
        deploy = _deploy_package(Path(tmp))
        with fresh_database("bench_single") as name:
            url = with_dbname(os.environ["DATABASE_URL"], name)
            single = measure(url, ns.tenants, ns.queries, ns.rounds, deploy)
        with citus_database() as url:
            on_citus = measure(url, ns.tenants, ns.queries, ns.rounds, deploy)
    report(single, on_citus, ns.tenants)


if __name__ == "__main__":
    main()
