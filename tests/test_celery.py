"""The run-time guard in real Celery workers with tenant-schemas-celery: tasks for six tenants
through pgbouncer in transaction pooling (four server connections, other clients on them),
with the prefork pool (connections closed after each task) and the threads pool (connections
kept, tenants cached by CELERY_TASK_TENANT_CACHE_SECONDS)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest

from tests.dbtools import pool_load
from tests.servers import PRODUCTS, Site, celery_worker, project_env

pytestmark = [pytest.mark.pooler, pytest.mark.slow]

BUSY = [f'"{schema}", public' for schema in PRODUCTS] + ["public"]
# pool: (concurrency, settings)
WORKERS: dict[str, tuple[int, dict[str, str]]] = {
    "prefork": (4, {"TESTPROJECT_CONN_MAX_AGE": "0"}),
    "threads": (
        8,
        {"TESTPROJECT_CONN_MAX_AGE": "none", "TESTPROJECT_TENANT_CACHE_SECONDS": "300"},
    ),
}
TASKS = 120


@pytest.fixture(params=list(WORKERS))
def worker(request: Any, site: Site, small_pool: str, celery_app: Any) -> Iterator[str]:
    """A guarded worker through the small pool; the name of its pool (and queue)."""
    pool = request.param
    concurrency, settings = WORKERS[pool]
    env = project_env(
        site.through(small_pool),
        TESTPROJECT_RUNTIME_GUARD="1",
        TESTPROJECT_REDIS_URL=celery_app.conf.broker_url,
        **settings,
    )
    with celery_worker(env, pool=pool, concurrency=concurrency) as queue:
        yield queue


def run_tasks(site: Site, small_pool: str, queue: str) -> list[tuple[str, dict[str, Any]]]:
    """``TASKS`` tasks, each sent for one tenant (tenant-schemas-celery's header), while other
    clients use the pool: (the tenant it was sent for, what it returned)."""
    from testproject.notes.tasks import write_and_read

    schemas = list(PRODUCTS)
    with pool_load(site.through(small_pool), BUSY, clients=2):
        sent = [
            (
                schemas[n % 6],
                write_and_read.apply_async(
                    [f"{schemas[n % 6]}:{n}"], headers={"_schema_name": schemas[n % 6]}, queue=queue
                ),
            )
            for n in range(TASKS)
        ]
        return [(schema, result.get(timeout=120)) for schema, result in sent]


def test_tasks_write_and_read_only_their_tenants_schema(
    site: Site, small_pool: str, worker: str
) -> None:
    site.clear_notes()
    results = run_tasks(site, small_pool, worker)

    wrong = [
        (schema, result)
        for schema, result in results
        if (result["schema"], result["current_schema"], result["products"])
        != (schema, schema, PRODUCTS[schema])
    ]
    assert wrong == []
    # 0 rows in a foreign schema, 0 missing.
    schemas = list(PRODUCTS)
    assert site.notes() == {
        schema: sorted(f"{schema}:{n}" for n in range(TASKS) if schemas[n % 6] == schema)
        for schema in schemas
    }

    # CELERY_TASK_TENANT_CACHE_SECONDS (the threads worker): the tenant row is read once per
    # process and tenant, and the cached tenant is pinned like a looked-up one. Without it
    # (prefork), once per task.
    lookups: dict[int, int] = defaultdict(int)
    tasks: dict[int, int] = defaultdict(int)
    for _, result in results:
        lookups[result["process"]] = max(lookups[result["process"]], result["tenant_lookups"])
        tasks[result["process"]] += 1
    if worker == "threads":
        # Threads that miss the cache together each look the tenant up: at most one per
        # thread and tenant.
        assert sum(lookups.values()) <= WORKERS["threads"][0] * len(PRODUCTS) < TASKS
    else:
        assert lookups == tasks
