"""The run-time guard under a real ASGI server: uvicorn serving the test project's async views
(the async ORM: acreate, acount, aiterator) and sync views, through pgbouncer in transaction
pooling with four server connections that other clients use at the same time.

Servers for the module, each started once: one worker with Django's per-request connections,
one with Django's own connection pool (5.1+), and one behind Django Channels' router."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from testproject.serving import Group, Response, get, uvicorn
from tests.dbtools import pool_load
from tests.faults import wait_for
from tests.servers import PRODUCTS, Site, project_env, require_module

pytestmark = [pytest.mark.pooler, pytest.mark.slow]

GUARDED = {"TESTPROJECT_RUNTIME_GUARD": "1"}
# What the other clients of the pool set, as django-tenants does for the tenants it serves.
BUSY = [f'"{schema}", public' for schema in PRODUCTS] + ["public"]


def load(
    base: tuple[str, int], requests: list[tuple[str, str]], *, concurrency: int = 50
) -> list[Response | BaseException]:
    """GET every (path, host) of ``requests``, ``concurrency`` at a time; each answer or the
    exception it raised. After the first request that gets no answer in time the rest are
    not sent (a frozen server would only make each of them wait as long)."""
    frozen = threading.Event()

    def one(request: tuple[str, str]) -> Response | BaseException:
        if frozen.is_set():
            return TimeoutError("not sent: an earlier request got no answer")
        try:
            return get(base, *request, timeout=30)
        except TimeoutError as exc:
            frozen.set()
            return exc
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, requests))


def wrong(answers: list[Response | BaseException], expect: Any) -> list[str]:
    """The answers that are not what ``expect(request_index, body)`` says they must be."""
    bad = []
    for n, answer in enumerate(answers):
        if isinstance(answer, BaseException):
            bad.append(f"{n}: {type(answer).__name__}: {answer}")
        elif answer.status != 200 or not expect(n, answer.body):
            bad.append(f"{n}: {answer.status} {answer.body}")
    return bad


def no_transaction_left(site: Site) -> None:
    # Abandoned streams end when their requests do (request_finished), just after the
    # response is sent: wait for that, boundedly.
    stuck: list[str] = []

    def none_stuck() -> bool:
        stuck[:] = site.idle_in_transaction()
        return not stuck

    wait_for(f"no session idle in transaction (now: {stuck})", none_stuck, timeout=20)


Served = tuple[tuple[str, int], Group]


@contextlib.contextmanager
def guarded_uvicorn(
    site: Site, small_pool: str, app: str = "testproject.asgi:application", **settings: str
) -> Iterator[Served]:
    require_module("uvicorn", "pip install uvicorn")
    env = project_env(site.through(small_pool), **GUARDED, **settings)
    with uvicorn(env, workers=1, app=app) as served:
        yield served


@pytest.fixture(scope="module")
def server(site: Site, small_pool: str) -> Iterator[Served]:
    """uvicorn with the guard on, through the small pool: ((host, port), its processes)."""
    with guarded_uvicorn(site, small_pool) as served:
        yield served


@pytest.fixture(scope="module")
def pool_server(site: Site, small_pool: str) -> Iterator[Served]:
    """The same with Django's own connection pool, under the pooler."""
    with guarded_uvicorn(site, small_pool, TESTPROJECT_DB_POOL="1") as served:
        yield served


@pytest.fixture(scope="module")
def channels_server(site: Site, small_pool: str) -> Iterator[Served]:
    """The same behind Django Channels' router (testproject/channels_asgi.py)."""
    require_module("channels", "pip install channels")
    with guarded_uvicorn(site, small_pool, "testproject.channels_asgi:application") as served:
        yield served


# Enough requests, 50 at a time, for the four server connections to be fought over.
REQUESTS = 120


@pytest.mark.parametrize("served", ["server", "pool_server"])
def test_async_and_sync_views_through_pgbouncer_stay_in_their_tenant(
    request: Any, site: Site, small_pool: str, served: str
) -> None:
    base, _ = request.getfixturevalue(served)
    site.clear_notes()
    paths = [
        "/async/notes/add/?title={title}",
        "/notes/add/?title={title}",
        "/products/",
        "/async/products/first/?then=count",
    ]
    schemas = list(PRODUCTS)
    requests = [
        (paths[n % 4].format(title=f"{schemas[n % 6]}:{n}"), f"{schemas[n % 6]}.localhost")
        for n in range(REQUESTS)
    ]

    def expect(n: int, body: dict[str, Any]) -> bool:
        schema = schemas[n % 6]
        if n % 4 == 3:
            count = len(PRODUCTS[schema])
            return body == {"schema": schema, "first": PRODUCTS[schema][0], "count": count}
        if body["schema"] != schema or body["products"] != PRODUCTS[schema]:
            return False
        # The async view also reads current_schema() and counts notes on the async ORM.
        return n % 4 != 0 or (body["current_schema"] == schema and body["notes"] >= 1)

    with pool_load(site.through(small_pool), BUSY, clients=2):
        answers = load(base, requests)
    assert wrong(answers, expect) == []
    written = {
        schema: sorted(
            f"{schema}:{n}" for n in range(REQUESTS) if schemas[n % 6] == schema and n % 4 < 2
        )
        for schema in schemas
    }
    # No note in another tenant's schema, none missing.
    assert site.notes() == written
    no_transaction_left(site)


def test_leaving_aiterator_early_under_concurrency_does_not_freeze_the_server(
    site: Site, small_pool: str, server: Served
) -> None:
    """``break`` out of ``async for ... in qs.aiterator()``: Django closes the cursor from
    the event loop's thread when the async generator is collected, while the connection
    belongs to the request's thread. The guard must not block the loop there: before the fix
    the server froze (no answer within 30 s) well within these requests."""
    base, group = server
    schemas = list(PRODUCTS)
    requests = [
        (
            "/async/products/first/" + ("?then=count" if n % 2 else ""),
            f"{schemas[n % 6]}.localhost",
        )
        for n in range(REQUESTS)
    ]

    def expect(n: int, body: dict[str, Any]) -> bool:
        schema = schemas[n % 6]
        count = {"count": len(PRODUCTS[schema])} if n % 2 else {}
        return body == {"schema": schema, "first": PRODUCTS[schema][0], **count}

    with pool_load(site.through(small_pool), BUSY, clients=2, check=False) as others:
        answers = load(base, requests)
        bad = wrong(answers, expect)
        stuck = site.idle_in_transaction()
        if bad:
            # Frozen: stop it now, so that its sessions give the pool's server connections
            # back and the other clients get them again.
            group.stop(grace=0)
        else:
            others.wait_running()
    assert bad == [], (len(bad), bad[:3], stuck, group.output())
    # The pool's other clients were served throughout (a frozen server holds every server
    # connection until pgbouncer's query_wait_timeout fails them).
    assert others.errors == []
    no_transaction_left(site)


def test_a_channels_consumer_reads_its_own_tenant_through_pgbouncer(
    site: Site, small_pool: str, channels_server: Served
) -> None:
    """A Channels consumer sets the tenant from the Host header and reads (current_schema(),
    then the products through a server-side cursor) with ``database_sync_to_async``."""
    base, _ = channels_server
    schemas = list(PRODUCTS)
    requests = [("/channels/products/", f"{schemas[n % 6]}.localhost") for n in range(60)]

    def expect(n: int, body: dict[str, Any]) -> bool:
        schema = schemas[n % 6]
        return body == {"schema": schema, "current_schema": schema, "products": PRODUCTS[schema]}

    with pool_load(site.through(small_pool), BUSY, clients=2):
        answers = load(base, requests)
    assert wrong(answers, expect) == []
    no_transaction_left(site)
