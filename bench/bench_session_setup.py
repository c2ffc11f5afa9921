"""The plugin's session setup of 2 tenants under ``-n 2`` against a plain conftest, same run.

    python -m bench.bench_session_setup [--rounds 2]

Each side is a small pytest project run with ``-n 2`` (each worker its own test database):
``plain`` has a conftest whose session fixture saves two tenants the django-tenants way
(``Client(...).save()`` migrates each schema, plus a Domain); ``tenantsafe`` uses the plugin
(``tenantsafe_tenants = alpha beta``), once on new test databases and once rerun with
``--reuse-db``. The time from the end of ``django_db_setup`` to the tenants being ready is
recorded in every worker; the whole run's wall time is shown too. Uses DATABASE_URL, or starts
a throwaway cluster when it is not set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench._db import server
from testproject.dbtools import ROOT, with_dbname

COMMON = """
import json, os, time
import pytest


def record(started):
    with open(os.environ["BENCH_OUT"], "a") as out:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        out.write(json.dumps([worker, time.perf_counter() - started]) + "\\n")


@pytest.fixture(scope="session")
def _started(django_db_setup):
    return time.perf_counter()
"""

PLAIN = """
@pytest.fixture(scope="session")
def tenants(_started, django_db_blocker):
    from testproject.customers.models import Client, Domain

    made = {}
    with django_db_blocker.unblock():
        for name in ["alpha", "beta"]:
            tenant = Client(schema_name=name, name=name.title())
            tenant.save(verbosity=0)
            Domain.objects.create(tenant=tenant, domain=f"{name}.localhost", is_primary=True)
            made[name] = tenant
    record(_started)
    return made
"""

TENANTSAFE = """
@pytest.fixture(scope="session")
def tenantsafe_tenant_fields():
    return lambda schema: {"name": schema.title()}


@pytest.fixture(scope="session")
def tenants(_started, tenants):
    record(_started)
    return tenants
"""

TESTS = """
import pytest


@pytest.mark.parametrize("n", range(4))
def test_tenants(tenants, db, n):
    assert sorted(tenants) == ["alpha", "beta"]
"""


def _side(side: str, url: str, *, reuse: bool = False) -> tuple[list[float], float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        (path / "pytest.ini").write_text(
            "[pytest]\n"
            "DJANGO_SETTINGS_MODULE = testproject.settings\n"
            f"pythonpath = {ROOT}\n"
            "tenantsafe_tenants = alpha beta\n"
            "filterwarnings = ignore::DeprecationWarning\n"
        )
        (path / "conftest.py").write_text(COMMON + (PLAIN if side == "plain" else TENANTSAFE))
        (path / "test_bench.py").write_text(TESTS)
        out = path / "setup.jsonl"
        name = f"bench_{uuid.uuid4().hex[:8]}"
        env = {**os.environ, "DATABASE_URL": with_dbname(url, name), "BENCH_OUT": str(out)}
        cmd = [sys.executable, "-m", "pytest", "-n", "2", "-q", "-p", "no:cacheprovider"]
        cmd += ["-p", "no:benchmark", "-p", "no:randomly"]
        if side == "plain":
            cmd += ["-p", "no:tenantsafe"]
        try:
            if reuse:
                # A first run creates (and keeps) the databases and tenants; time the second.
                cmd.append("--reuse-db")
                _pytest(cmd, path, env, side)
                out.unlink()
            started = time.perf_counter()
            _pytest(cmd, path, env, side)
            wall = time.perf_counter() - started
        finally:
            if reuse:
                _drop(url, name)
        times = [json.loads(line)[1] for line in out.read_text().splitlines()]
        return times, wall


def _pytest(cmd: list[str], path: Path, env: dict[str, str], side: str) -> None:
    result = subprocess.run(cmd, cwd=path, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{side} failed:\n{result.stdout}\n{result.stderr}")


def _drop(url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(with_dbname(url, "postgres"), autocommit=True) as conn:
        for worker in ("gw0", "gw1"):
            conn.execute(f'DROP DATABASE IF EXISTS "test_{name}_{worker}" WITH (FORCE)')


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    ns = parser.parse_args(argv)
    with server():
        return _compare(os.environ["DATABASE_URL"], ns.rounds)


def _compare(url: str, rounds: int) -> int:
    sides = ["plain", "tenantsafe", "tenantsafe --reuse-db"]
    setup: dict[str, list[float]] = {side: [] for side in sides}
    walls: dict[str, list[float]] = {side: [] for side in sides}
    for number in range(rounds):
        # Alternate the order, so that neither side always runs on the warmer server.
        for side in sides if number % 2 == 0 else sides[::-1]:
            times, wall = _side(side.split()[0], url, reuse="--reuse-db" in side)
            setup[side].extend(times)
            walls[side].append(wall)
    print(f"session setup of 2 tenants, pytest -n 2, {rounds} rounds")
    for side in sides:
        print(
            f"  {side:22s} setup per worker {statistics.mean(setup[side]) * 1000:6.0f} ms "
            f"(n={len(setup[side])})   whole run {statistics.mean(walls[side]):5.1f} s"
        )
    plain_setup, plain_wall = statistics.mean(setup["plain"]), statistics.mean(walls["plain"])
    for side in sides[1:]:
        print(
            f"  ratio {side} / plain: session setup "
            f"{statistics.mean(setup[side]) / plain_setup:.2f}, "
            f"whole run {statistics.mean(walls[side]) / plain_wall:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
