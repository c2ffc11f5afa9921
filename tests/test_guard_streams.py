"""Server-side cursors under the guard through a pooler (a *stream*, tenantsafe/guard/streams.py):
reads during an iteration keep it streaming, and a cursor closed from a thread that does not
own the connection (an event loop collecting an abandoned async iterator) never waits for it.

In-process on the test database, with TENANTSAFE_TRANSACTION_POOLER = True (the guard then
acts as it does through a pooler), and through the suite's pgbouncer where it says so."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.signals import request_finished
from django.db import DatabaseError, connections, transaction
from django.db.backends.postgresql.psycopg_any import is_psycopg3

from tenantsafe.guard import state as guard_state
from testproject.customers.models import Client
from testproject.shop.models import Category, Product
from tests.dbtools import add_tenant, connection, pool_load, pooled_url, with_dbname

NAMES = [f"p{n}" for n in range(5)]
IDLE, INTRANS = 0, 2
MEMORY = "were fetched into memory"


def make_tenant(schema: str) -> Client:
    """A tenant whose schema holds the shop tables (created, not migrated: fast)."""
    add_tenant(schema)
    tenant = Client.objects.get(schema_name=schema)
    connection.set_tenant(tenant)
    with connection.schema_editor() as editor:
        editor.create_model(Category)
        editor.create_model(Product)
    Product.objects.bulk_create(Product(name=f"{schema}-{name}") for name in NAMES)
    connection.set_schema_to_public()
    return tenant  # type: ignore[no-any-return]


@pytest.fixture
def tenant(drop_tenant_schemas: None, settings: Any) -> Iterator[Client]:
    settings.TENANTSAFE_RUNTIME_GUARD = True
    settings.TENANTSAFE_TRANSACTION_POOLER = True
    made = make_tenant("streams")
    connection.set_tenant(made)
    yield made
    connection.set_schema_to_public()


def status(alias: str = "default") -> int:
    return int(connections[alias].connection.info.transaction_status)


def server_cursors() -> list[tuple[str, bool]]:
    # A read: while a stream is open it runs in the stream's transaction and sees its cursor.
    with connection.cursor() as cursor:
        # Not the unnamed portal of this very query (psycopg 3 pipelines it).
        cursor.execute("SELECT name, is_holdable FROM pg_cursors WHERE name <> ''")
        return list(cursor.fetchall())


def test_reads_during_an_iteration_keep_it_streaming(tenant, caplog):
    """The peer of django-tenants' test_iterator_really_uses_a_server_side_cursor."""
    seen, streaming = [], []
    rows = Product.objects.order_by("name").iterator(chunk_size=1)
    first = next(rows)
    cursors = server_cursors()
    assert len(cursors) == 1
    assert cursors[0][0].startswith("_django_curs_")
    for product in itertools.chain([first], rows):
        seen.append(product.name)
        # A read per row, as ``order.customer`` does: it runs in the stream's transaction.
        assert Product.objects.get(pk=product.pk).name == product.name
        streaming.append(guard_state.of(connection).stream is not None)
    assert seen == [f"streams-{name}" for name in NAMES]
    assert all(streaming)
    assert MEMORY not in caplog.text
    assert status() == IDLE
    assert server_cursors() == []


def test_a_read_that_fails_during_an_iteration_leaves_it_streaming(tenant, caplog):
    rows = Product.objects.order_by("name").iterator(chunk_size=1)
    assert next(rows).name == "streams-p0"
    with pytest.raises(DatabaseError, match="division by zero"), connection.cursor() as cursor:
        cursor.execute("SELECT 1 / (count(*) - count(*)) FROM shop_product")
    # Behind a savepoint: the stream's transaction is not aborted, its cursor reads on.
    assert status() == INTRANS
    assert [p.name for p in rows] == [f"streams-{name}" for name in NAMES[1:]]
    assert MEMORY not in caplog.text
    assert status() == IDLE


def test_a_read_for_another_tenant_during_an_iteration_sees_that_tenant(tenant, caplog):
    other = make_tenant("streams_other")
    connection.set_tenant(tenant)
    seen = []
    for product in Product.objects.order_by("name").iterator(chunk_size=2):
        seen.append(product.name)
        connection.set_tenant(other)
        assert Product.objects.order_by("name").values_list("name", flat=True)[0] == (
            "streams_other-p0"
        )
        connection.set_tenant(tenant)
        assert Product.objects.count() == len(NAMES)
    assert seen == [f"streams-{name}" for name in NAMES]
    assert MEMORY not in caplog.text


def test_a_failed_read_for_another_tenant_leaves_the_next_one_pinned(tenant):
    other = make_tenant("streams_other")
    connection.set_tenant(tenant)
    rows = Product.objects.order_by("name").iterator(chunk_size=1)
    assert next(rows).name == "streams-p0"
    connection.set_tenant(other)
    with pytest.raises(DatabaseError, match="division by zero"), connection.cursor() as cursor:
        cursor.execute("SELECT 1 / (count(*) - count(*)) FROM shop_product")
    # The savepoint's rollback took the other tenant's path with it: pinned again.
    assert Product.objects.order_by("name").values_list("name", flat=True)[0] == (
        "streams_other-p0"
    )
    connection.set_tenant(tenant)
    assert [p.name for p in rows] == [f"streams-{name}" for name in NAMES[1:]]


@pytest.mark.parametrize(
    "statement",
    ["UPDATE shop_product SET price_cents = 1", "SELECT id FROM shop_product FOR UPDATE"],
    ids=["write", "row lock"],
)
def test_writes_and_locks_during_an_iteration_end_it_first(tenant, caplog, statement):
    """As before: the rest of the rows are read into memory, and the warning says so."""
    rows = Product.objects.order_by("name").iterator(chunk_size=1)
    assert next(rows).name == "streams-p0"
    with connection.cursor() as cursor:
        cursor.execute(statement)
    assert status() == IDLE
    assert [p.name for p in rows] == [f"streams-{name}" for name in NAMES[1:]]
    assert "its remaining 4 rows were fetched into memory" in caplog.text


def test_under_repeatable_read_a_read_ends_the_iteration_first(tenant, caplog):
    """One snapshot for the whole transaction: a read inside the stream's would not see what
    was committed since it began, so it does not join."""
    with connection.cursor() as cursor:
        cursor.execute("SET default_transaction_isolation = 'repeatable read'")
    try:
        rows = Product.objects.order_by("name").iterator(chunk_size=1)
        assert next(rows).name == "streams-p0"
        assert Product.objects.count() == len(NAMES)
        assert status() == IDLE
        assert [p.name for p in rows] == [f"streams-{name}" for name in NAMES[1:]]
        assert "its remaining 4 rows were fetched into memory" in caplog.text
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET default_transaction_isolation")


def closed_elsewhere(rows: Iterator[Any]) -> threading.Thread:
    """Close the iterator ``rows`` (and so Django's cursor under it) in a thread of its own, as
    an event loop finalizes an ``async for`` left early; the thread, started."""
    thread = threading.Thread(target=rows.close)  # type: ignore[attr-defined]
    thread.start()
    return thread


@pytest.mark.skipif(not is_psycopg3, reason="the psycopg 3 connection lock")
def test_a_cursor_closed_by_another_thread_never_waits_for_the_connection(tenant):
    """Its owner holds the driver's connection lock, as a request thread does while it waits
    for a pooled server connection: the other thread's close must not wait for it."""
    rows = Product.objects.order_by("name").iterator(chunk_size=1)
    assert next(rows).name == "streams-p0"
    lock = connection.connection.lock
    with lock:
        closer = closed_elsewhere(rows)
        closer.join(10)
        alive = closer.is_alive()
    closer.join()
    assert not alive, "the close from another thread waited for the connection's lock"
    # The transaction ends at the connection's next use, in its own thread.
    assert status() == INTRANS
    assert Product.objects.count() == len(NAMES)
    assert status() == IDLE
    assert server_cursors() == []


def test_an_iteration_closed_elsewhere_ends_when_the_request_does(tenant, monkeypatch):
    """No next statement: request_finished (Django's close_old_connections) ends the
    transaction, in the owner's thread, on a connection kept for the next request."""
    # A persistent connection (CONN_MAX_AGE = None): request_finished keeps it open.
    monkeypatch.setattr(connection, "close_at", None)
    rows = Product.objects.order_by("name").iterator(chunk_size=1)
    assert next(rows).name == "streams-p0"
    closed_elsewhere(rows).join()
    raw = connection.connection
    assert status() == INTRANS
    request_finished.send(sender=None)
    assert connection.connection is raw
    assert status() == IDLE
    assert guard_state.of(connection).stream is None
    assert server_cursors() == []


def test_the_owner_and_another_thread_racing_on_streams_leave_nothing_open(tenant, caplog):
    """Many rounds: the other thread closes an iteration's cursor while the owner reads, writes
    or starts a transaction on the connection; every answer is right, nothing stays open."""
    caplog.set_level(logging.ERROR, "tenantsafe.guard")
    errors: list[BaseException] = []
    closes: queue.Queue[tuple[Iterator[Any], threading.Barrier] | None] = queue.Queue()

    def other() -> None:
        while (job := closes.get()) is not None:
            rows, start = job
            start.wait(10)
            try:
                rows.close()  # type: ignore[attr-defined]
            except BaseException as exc:
                errors.append(exc)

    thread = threading.Thread(target=other)
    thread.start()
    try:
        for n in range(150):
            rows = Product.objects.order_by("name").iterator(chunk_size=1)
            assert next(rows).name == "streams-p0"
            start = threading.Barrier(2)
            closes.put((rows, start))
            del rows
            start.wait(10)
            if n % 3 == 0:
                assert Product.objects.count() == len(NAMES)
            elif n % 3 == 1:
                Product.objects.filter(name="streams-p0").update(price_cents=n)
            else:
                with transaction.atomic():
                    assert Product.objects.filter(price_cents__gte=0).count() == len(NAMES)
            assert Product.objects.count() == len(NAMES)
    finally:
        closes.put(None)
        thread.join(30)
    assert errors == []
    assert Product.objects.count() == len(NAMES)
    assert status() == IDLE
    assert guard_state.of(connection).stream is None
    assert server_cursors() == []


@pytest.fixture
def through_pgbouncer(tenant: Client) -> Iterator[str]:
    """A connection alias to the test database through the suite's pgbouncer (made here, not
    in settings: Django's test case then allows it)."""
    from urllib.parse import urlsplit

    from django.db.utils import load_backend

    url = urlsplit(pooled_url())
    alias = "pgbouncer"
    settings_dict = {**connection.settings_dict, "HOST": url.hostname, "PORT": str(url.port)}
    pooled = load_backend(settings_dict["ENGINE"]).DatabaseWrapper(settings_dict, alias)
    connections[alias] = pooled
    try:
        pooled.set_tenant(tenant)
        yield alias
    finally:
        pooled.close()
        del connections[alias]
        # pgbouncer keeps its server connections to the test database, which could then not
        # be dropped at the end of the run: end them (this test's are the only others).
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = "
                "current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
            )


def test_iterate_and_read_over_100000_rows_through_pgbouncer_in_bounded_memory(
    through_pgbouncer, caplog
):
    alias = through_pgbouncer
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO shop_product (name, sku, price_cents) "
            "SELECT 'bulk-' || n, repeat('x', 32), n FROM generate_series(1, 100000) n"
        )
    products = Product.objects.using(alias)
    # Other clients on the pool, as in production, on another path than the tenant's.
    others = with_dbname(pooled_url(), connection.settings_dict["NAME"])
    with pool_load(others, ["public"], clients=1):
        tracemalloc.start()
        try:
            count = reads = 0
            # Tuples rather than model instances: the same stream, less for tracemalloc to
            # trace.
            for pk, _, _ in products.values_list("pk", "name", "sku").iterator(chunk_size=2000):
                count += 1
                if count % 1000 == 0:
                    # A read now and then: before, the first one loaded the rest into memory.
                    assert products.filter(pk=pk).exists()
                    reads += 1
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert (count, reads) == (100000 + len(NAMES), 100)
    # 2,000 rows at a time; the rest of the result, read into memory, takes over 20 MB.
    assert peak < 5_000_000, peak
    assert MEMORY not in caplog.text
    assert status(alias) == IDLE
