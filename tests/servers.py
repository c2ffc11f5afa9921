"""Real servers for the integration tests, started once per test run and shared.

A pytest plugin (``pytest_plugins`` in conftest.py): session fixtures start each server on
loopback the first time a test asks for it and stop it when the run ends.

* ``site``: a migrated database with six tenants, each holding its own products;
* ``small_pool``: a pgbouncer of its own in transaction pooling with four server connections
  per database (the suite's shared one has eight), in front of the throwaway cluster;
* ``redis_url``: a Redis, the Celery broker and result backend;
* :func:`uvicorn` and :func:`celery_worker` run the test project in processes of their own.

Locally a test skips, with the reason, when a server's binary or a Python package it needs is
absent; under CI it fails instead.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testproject.cluster import free_port
from testproject.dbtools import (
    connect,
    direct_url,
    fresh_database,
    manage,
    with_dbname,
)
from testproject.serving import Group
from tests.faults import bouncer

POOLER_SAFE = {"TESTPROJECT_POOLER_SAFE": "1"}
# Products per tenant, each a different number, so a read in the wrong schema shows.
PRODUCTS = {f"s{n}": [f"s{n}-{i}" for i in range(n + 2)] for n in range(6)}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in {"", "0", "false"}


def require(binary: str | None, what: str, install: str) -> str:
    """``binary``'s path; without it the test skips, or fails under CI."""
    if binary is None:
        message = f"{what} is not installed ({install})"
        if in_ci():
            pytest.fail(f"{message}: under CI every integration test must run")
        pytest.skip(message)
    return binary


def require_module(name: str, install: str) -> None:
    """Python package ``name`` importable; without it the test skips, or fails under CI."""
    require(name if importlib.util.find_spec(name) else None, f"Python package {name}", install)


@dataclass(frozen=True)
class Site:
    """A migrated database with the tenants of ``PRODUCTS``."""

    direct: str
    name: str

    def through(self, pooler: str) -> str:
        return with_dbname(pooler, self.name)

    def notes(self) -> dict[str, list[str]]:
        """Every tenant's note titles, read directly and schema-qualified."""
        with connect(self.direct) as conn:
            return {
                schema: sorted(
                    row[0]
                    for row in conn.execute(f'SELECT title FROM "{schema}".notes_note').fetchall()
                )
                for schema in PRODUCTS
            }

    def clear_notes(self) -> None:
        with connect(self.direct) as conn:
            for schema in PRODUCTS:
                conn.execute(f'TRUNCATE "{schema}".notes_note CASCADE')

    def idle_in_transaction(self) -> list[str]:
        """The queries of server sessions on the site's database idle in a transaction."""
        with connect(with_dbname(self.direct, "postgres")) as conn:
            rows = conn.execute(
                "SELECT query FROM pg_stat_activity WHERE datname = %s "
                "AND state LIKE 'idle in transaction%%'",
                [self.name],
            ).fetchall()
        return [row[0] for row in rows]


# One process: the shared apps migrated, then the tenants by tenantsafe.testing.create_tenant
# (the first one migrated, the others provisioned from its recording: seconds, not a minute).
_MAKE_SITE = f"""
from django.core.management import call_command
from tenantsafe.testing import create_tenant
call_command("migrate_schemas_safe", "--shared", verbosity=0)
for name in {list(PRODUCTS)!r}:
    create_tenant(name, domain=f"{{name}}.localhost", name=name.title())
"""


@pytest.fixture(scope="session")
def site() -> Iterator[Site]:
    with fresh_database("asyncsite") as name:
        direct = with_dbname(direct_url(), name)
        result = manage(direct, "shell", "-c", _MAKE_SITE, env=POOLER_SAFE)
        assert result.returncode == 0, result.stderr
        with connect(direct) as conn:
            for schema, names in PRODUCTS.items():
                conn.execute(
                    f'INSERT INTO "{schema}".shop_product (name, sku, price_cents) '
                    "SELECT unnest(%s::text[]), '', 0",
                    [names],
                )
        yield Site(direct, name)


@pytest.fixture(scope="session")
def small_pool() -> Iterator[str]:
    """A pgbouncer URL (database ``postgres``): transaction pooling, 4 server connections."""
    with bouncer(direct_url(), pool_size=4) as pool:
        yield pool.url("postgres")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    binary = require(shutil.which("redis-server"), "redis-server", "apt-get install redis-server")
    require_module("redis", "pip install redis")
    import redis

    workdir = Path(tempfile.mkdtemp(prefix="tenantsafe-redis-"))
    port = free_port()
    args = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--dir", str(workdir)]
    server = Group(args, dict(os.environ), workdir / "redis.log")
    url = f"redis://127.0.0.1:{port}/0"
    try:
        server.wait_until(lambda: redis.Redis.from_url(url).ping(), "redis-server")
        yield url
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def project_env(database_url: str, **settings: str) -> dict[str, str]:
    """The environment of a process running the test project on ``database_url``."""
    return {
        **os.environ,
        **POOLER_SAFE,
        "DATABASE_URL": database_url,
        "DJANGO_SETTINGS_MODULE": "testproject.settings",
        **settings,
    }


@pytest.fixture(scope="session")
def celery_app(redis_url: str) -> Any:
    """The test project's Celery app, in this process, on the test run's Redis."""
    for name in ("celery", "tenant_schemas_celery"):
        require_module(name, f"pip install {name.replace('_', '-')}")
    from testproject.celery import app

    app.conf.update(broker_url=redis_url, result_backend=redis_url)
    return app


@contextlib.contextmanager
def celery_worker(env: dict[str, str], *, pool: str, concurrency: int) -> Iterator[str]:
    """A Celery worker consuming queue ``pool`` (its name too) until the block ends."""
    from testproject.celery import app

    name = f"{pool}@tenantsafe"
    args = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "testproject.celery",
        "worker",
        "--pool",
        pool,
        "--concurrency",
        str(concurrency),
        "--queues",
        pool,
        "--hostname",
        name,
        "--loglevel",
        "WARNING",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    workdir = Path(tempfile.mkdtemp(prefix="tenantsafe-celery-"))
    worker = Group(args, env, workdir / "worker.log")
    try:
        worker.wait_until(lambda: app.control.ping(destination=[name], timeout=0.5), name)
        yield pool
    except BaseException:
        print(worker.output(), file=sys.stderr)
        raise
    finally:
        worker.stop()
        shutil.rmtree(workdir, ignore_errors=True)
