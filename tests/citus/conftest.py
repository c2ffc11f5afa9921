"""The Citus cluster the ``citus`` tests share, and a database of their own on it.

One cluster per run (testproject.citus_cluster): a coordinator and two workers on loopback,
with pgbouncer in transaction pooling in front of the coordinator, started by the first test
that needs it. Locally these tests skip, saying why, when Citus is not installed; under CI
they fail instead.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testproject import citus_cluster
from tests.citus.tools import POOLER_SAFE, CitusDatabase, clean


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


@pytest.fixture(scope="session")
def citus_env() -> Iterator[dict[str, str]]:
    """The cluster's URLs (``CITUS_URL``, ``CITUS_PGBOUNCER_URL``, ``CITUS_WORKER_URLS``)."""
    missing = citus_cluster.missing()
    if missing:
        if under_ci():
            pytest.fail(f"{missing}; under CI the Citus tests must run")
        pytest.skip(missing)
    parent = os.environ.get("TENANTSAFE_CLUSTER_DIR")
    if parent:
        # runtests.py's cluster directory: shared with the run's other processes, stopped
        # with it.
        yield citus_cluster.shared(Path(parent))
        return
    directory = Path(tempfile.mkdtemp(prefix="tenantsafe-citus-"))
    directory.chmod(0o755)
    try:
        yield citus_cluster.shared(directory)
    finally:
        citus_cluster.CitusCluster(directory / "citus").stop_everything_in(directory)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def citus_session_db(
    citus_env: dict[str, str], request: pytest.FixtureRequest
) -> Iterator[CitusDatabase]:
    """The Citus database of this test process, public migrated (with ``-n``, one process runs
    every Citus test: ``tools.CITUS``)."""
    worker = getattr(request.config, "workerinput", {}).get("workerid", "main")
    database = CitusDatabase.create(citus_env, f"ts_citus_{worker}")
    try:
        database.migrate_public()
        yield database
    finally:
        citus_cluster.drop_database(citus_env, database.name)


@pytest.fixture
def shop_deploy(new_migrations: Callable[..., str]) -> dict[str, str]:
    """The environment of a deploy with shop's two new migrations (an added column with its
    index, a new model)."""
    from tests.test_deploy import COLOUR, COUPON

    package = new_migrations("shop", {"0004_colour": COLOUR, "0005_coupon": COUPON})
    return {**POOLER_SAFE, "TESTPROJECT_MIGRATION_MODULES": json.dumps({"shop": package})}


@pytest.fixture
def citus_db(citus_session_db: CitusDatabase) -> Iterator[CitusDatabase]:
    """The process's Citus database, without tenants before and after the test."""
    clean(citus_session_db)
    yield citus_session_db
    clean(citus_session_db)
