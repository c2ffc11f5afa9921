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
# Two waves of tasks, each spread evenly over the six tenants.
WAVES = (36, 24)


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


def run_tasks(queue: str, numbers: range) -> list[tuple[str, dict[str, Any]]]:
    """Task ``n`` of ``numbers`` sent for tenant ``n % 6`` (tenant-schemas-celery's header):
    (the tenant it was sent for, what it returned), once every one has returned."""
    from testproject.notes.tasks import write_and_read

    schemas = list(PRODUCTS)
    sent = [
        (
            schemas[n % 6],
            write_and_read.apply_async(
                [f"{schemas[n % 6]}:{n}"], headers={"_schema_name": schemas[n % 6]}, queue=queue
            ),
        )
        for n in numbers
    ]
    return [(schema, result.get(timeout=120)) for schema, result in sent]


def test_tasks_write_and_read_only_their_tenants_schema(
    site: Site, small_pool: str, worker: str
) -> None:
    site.clear_notes()
    tasks = sum(WAVES)
    with pool_load(site.through(small_pool), BUSY, clients=2):
        first = run_tasks(worker, range(WAVES[0]))
        second = run_tasks(worker, range(WAVES[0], tasks))
    results = first + second

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
        schema: sorted(f"{schema}:{n}" for n in range(tasks) if schemas[n % 6] == schema)
        for schema in schemas
    }

    # How many times each process had read the tenant table when it ran each task.
    if worker == "threads":
        # CELERY_TASK_TENANT_CACHE_SECONDS: the first wave looked every tenant up (threads
        # that missed the cache together each did, at most once per thread and tenant); the
        # second wave, every tenant cached, looked up none, and the cached tenants were
        # pinned like looked-up ones (the checks above).
        assert len({result["process"] for _, result in results}) == 1  # its threads share it
        looked_up = max(result["tenant_lookups"] for _, result in first)
        assert len(PRODUCTS) <= looked_up <= WORKERS["threads"][0] * len(PRODUCTS)
        assert {result["tenant_lookups"] for _, result in second} == {looked_up}
    else:
        # Without the cache, once per task.
        lookups: dict[int, int] = defaultdict(int)
        ran: dict[int, int] = defaultdict(int)
        for _, result in results:
            lookups[result["process"]] = max(lookups[result["process"]], result["tenant_lookups"])
            ran[result["process"]] += 1
        assert lookups == ran
