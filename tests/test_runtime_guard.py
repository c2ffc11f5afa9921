"""TENANTSAFE_RUNTIME_GUARD: every statement the process runs carries its tenant's search_path.

Two halves. In-process tests on the test database (a direct connection) make the pooler's
behaviour deterministic with ``foreign_server_path``: before every statement that would start a
transaction, the session search_path is set to another tenant's, which is what a transaction
pooler does when it hands over a server connection last used for that tenant. The pooler tests
run worker processes (with threads) through a real pgbouncer in transaction pooling, shared with
other clients, and count every read and write that reached another tenant's schema.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import DatabaseError, connections, transaction
from django.db.backends.postgresql.psycopg_any import is_psycopg3
from django.db.backends.signals import connection_created
from django.test.utils import CaptureQueriesContext
from django_tenants.utils import schema_context, tenant_context

from tenantsafe.errors import PooledStatementError, SchemaMissingError
from tenantsafe.guard import state as guard_state
from testproject.customers.models import Client, Domain
from testproject.shop.models import Category, Product
from tests.dbtools import (
    ROOT,
    connect,
    connection,
    direct_url,
    fresh_database,
    manage,
    pool_load,
    pooled_url,
    register_tenants,
    with_dbname,
)

if is_psycopg3:
    import psycopg
else:
    import psycopg2.extensions

PRODUCTS = {"alpha": ["alpha-0", "alpha-1"], "beta": ["beta-0", "beta-1", "beta-2"]}


def names(schema: str) -> list[str]:
    # Schema-qualified, so the answer does not depend on any search_path.
    with connection.cursor() as cursor:
        cursor.execute(f'SELECT name FROM "{schema}".shop_product ORDER BY name')
        return [row[0] for row in cursor.fetchall()]


def make_tenant(schema: str) -> Client:
    """A tenant row, its domain and a schema holding the shop tables (no migrations: fast)."""
    connection.set_schema_to_public()
    tenant = Client(schema_name=schema, name=schema.title())
    tenant.auto_create_schema = False
    tenant.save()
    Domain.objects.create(domain=f"{schema}.localhost", tenant=tenant, is_primary=True)
    with connection.cursor() as cursor:
        cursor.execute(f'CREATE SCHEMA "{schema}"')
    connection.set_tenant(tenant)
    with connection.schema_editor() as editor:
        editor.create_model(Category)
        editor.create_model(Product)
    Product.objects.bulk_create(Product(name=name) for name in PRODUCTS[schema])
    connection.set_schema_to_public()
    return tenant


@pytest.fixture
def tenants(drop_tenant_schemas: None) -> Iterator[dict[str, Client]]:
    made = {schema: make_tenant(schema) for schema in PRODUCTS}
    yield made
    connection.set_schema_to_public()


@pytest.fixture
def runtime_guard(settings: Any) -> None:
    settings.TENANTSAFE_RUNTIME_GUARD = True


IDLE, INTRANS = 0, 2


@contextlib.contextmanager
def foreign_server_path(schema: str) -> Iterator[None]:
    """Act like a transaction pooler whose other server connections were last used for
    ``schema``.

    A transaction pooler may hand each transaction to another server connection, whose session
    search_path is whatever its last client set. Here that is always ``schema``: whenever the
    driver sends something while no transaction is open (so a new one starts), the session
    path is first set to ``schema``'s. That is between any two transactions: between
    django-tenants' ``SET`` and the query after it, and between a path pinned by a statement
    of its own and the statement it was meant for.
    """
    hooked: dict[Any, Any] = {}

    def hand_over(raw: Any) -> None:
        pipelined = is_psycopg3 and raw.pgconn.pipeline_status
        if raw.info.transaction_status == IDLE and not pipelined:
            plain = psycopg.Cursor(raw) if is_psycopg3 else psycopg2.extensions.cursor(raw)
            with plain:
                plain.execute(f'SET search_path = "{schema}", public')

    def handing_over(base: type) -> type:
        """``base``, with a hand-over before every call that sends a statement."""

        def sending(name: str) -> Any:
            def method(self: Any, *args: Any, **kwargs: Any) -> Any:
                hand_over(self.connection)
                return getattr(base, name)(self, *args, **kwargs)

            return method

        names = [
            n
            for n in (
                "execute",
                "executemany",
                "copy",
                "stream",
                "copy_expert",
                "copy_from",
                "copy_to",
            )
            if hasattr(base, n)
        ]
        namespace: dict[str, Any] = {n: sending(n) for n in names}
        # No instance dict: an existing cursor's class can be swapped for it.
        namespace["__slots__"] = ()
        return type(f"HandedOver{base.__name__}", (base,), namespace)

    def hook(raw: Any) -> None:
        if raw is not None and raw not in hooked:
            hooked[raw] = raw.cursor_factory
            raw.cursor_factory = handing_over(raw.cursor_factory)

    def on_created(sender: Any, connection: Any, **kwargs: Any) -> None:
        hook(connection.connection)

    def create_cursor(name: Any = None) -> Any:
        cursor = original_create_cursor(name)
        hook(connection.connection)
        if name and is_psycopg3:
            # Built by Django from its class, not through the connection's factory.
            cursor.__class__ = handing_over(type(cursor))
        return cursor

    original_create_cursor = connection.create_cursor
    connection.create_cursor = create_cursor
    connection_created.connect(on_created)
    hook(connection.connection)
    try:
        yield
    finally:
        connection_created.disconnect(on_created)
        del connection.create_cursor
        for raw, factory in hooked.items():
            raw.cursor_factory = factory


def raw_count() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM shop_product")
        return int(cursor.fetchone()[0])


def atomic_count() -> int:
    with transaction.atomic():
        return Product.objects.count()


def count_after_rollback() -> int:
    with contextlib.suppress(ZeroDivisionError), transaction.atomic():
        Product.objects.create(name="rolled back")
        1 / 0  # noqa: B018
    return Product.objects.count()


def count_after_savepoint_rollback() -> int:
    with transaction.atomic():
        Product.objects.count()
        with contextlib.suppress(ZeroDivisionError), transaction.atomic():
            Product.objects.create(name="rolled back")
            1 / 0  # noqa: B018
        return Product.objects.count()


def iterator_count() -> int:
    # A named (server-side) cursor.
    return sum(1 for _ in Product.objects.all().iterator(chunk_size=1))


def percent_param_count() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM shop_product WHERE name LIKE %s", ["%-%"])
        return int(cursor.fetchone()[0])


READS: dict[str, Callable[[], int]] = {
    "orm": lambda: Product.objects.count(),
    "raw cursor": raw_count,
    "raw cursor with a % parameter": percent_param_count,
    "atomic block": atomic_count,
    "after rollback": count_after_rollback,
    "after savepoint rollback": count_after_savepoint_rollback,
    "server-side cursor": iterator_count,
}


@pytest.mark.usefixtures("runtime_guard")
@pytest.mark.parametrize("how", READS)
def test_reads_see_only_their_tenant_whatever_path_the_server_connection_carries(tenants, how):
    connection.set_tenant(tenants["alpha"])
    with foreign_server_path("beta"):
        assert READS[how]() == len(PRODUCTS["alpha"])
    connection.set_tenant(tenants["beta"])
    with foreign_server_path("alpha"):
        assert READS[how]() == len(PRODUCTS["beta"])


@pytest.mark.parametrize("how", ["orm", "raw cursor"])
def test_without_the_guard_autocommit_reads_follow_the_server_connection(tenants, how):
    """Documents the leak the setting exists for (the same as through a real pooler)."""
    connection.set_tenant(tenants["alpha"])
    with foreign_server_path("beta"):
        assert READS[how]() == len(PRODUCTS["beta"])


def write_orm(n: int) -> None:
    Product.objects.create(name=f"new-{n}")


def write_atomic(n: int) -> None:
    with transaction.atomic():
        Product.objects.create(name=f"new-{n}")
        Product.objects.filter(name=f"new-{n}").update(price_cents=n)


def write_bulk(n: int) -> None:
    Product.objects.bulk_create([Product(name=f"new-{n}")])


def write_executemany(n: int) -> None:
    with connection.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO shop_product (name, sku, price_cents) VALUES (%s, '', 0)",
            [(f"new-{n}",)],
        )


WRITES: dict[str, Callable[[int], None]] = {
    "orm": write_orm,
    "atomic block": write_atomic,
    "bulk_create": write_bulk,
    "executemany": write_executemany,
}


@pytest.mark.usefixtures("runtime_guard")
@pytest.mark.parametrize("how", WRITES)
def test_writes_land_only_in_their_tenant(tenants, how):
    connection.set_tenant(tenants["alpha"])
    with foreign_server_path("beta"):
        WRITES[how](1)
        WRITES[how](2)
    assert names("alpha") == [*PRODUCTS["alpha"], "new-1", "new-2"]
    assert names("beta") == PRODUCTS["beta"]


@pytest.mark.usefixtures("runtime_guard")
def test_path_holds_after_commit_and_rollback(tenants):
    connection.set_tenant(tenants["alpha"])
    with foreign_server_path("beta"):
        with transaction.atomic():
            Product.objects.create(name="committed")
        assert Product.objects.filter(name="committed").count() == 1
        with contextlib.suppress(ZeroDivisionError), transaction.atomic():
            Product.objects.create(name="rolled back")
            1 / 0  # noqa: B018
        with transaction.atomic():
            assert raw_count() == len(PRODUCTS["alpha"]) + 1
            Product.objects.create(name="after rollback")
        # A manual transaction ended by connection.commit()/rollback(), not by atomic.
        transaction.set_autocommit(False)
        try:
            Product.objects.create(name="manual")
            transaction.commit()
            Product.objects.create(name="manual rolled back")
            transaction.rollback()
            assert Product.objects.count() == len(PRODUCTS["alpha"]) + 3
            transaction.commit()
        finally:
            transaction.set_autocommit(True)
    assert names("alpha") == sorted([*PRODUCTS["alpha"], "committed", "after rollback", "manual"])
    assert names("beta") == PRODUCTS["beta"]


@pytest.mark.usefixtures("runtime_guard")
def test_savepoint_rollback_leaves_the_current_tenant_in_force(tenants):
    # Inside the savepoint the path is re-pinned to beta; rolling the savepoint back undoes
    # that pin (PostgreSQL restores alpha's), but the connection is still set to beta.
    with transaction.atomic():
        connection.set_tenant(tenants["alpha"])
        Product.objects.create(name="a-before")
        with contextlib.suppress(ZeroDivisionError), transaction.atomic():
            connection.set_tenant(tenants["beta"])
            Product.objects.create(name="b-rolled-back")
            1 / 0  # noqa: B018
        Product.objects.create(name="b-after")
    assert names("alpha") == sorted([*PRODUCTS["alpha"], "a-before"])
    assert names("beta") == sorted([*PRODUCTS["beta"], "b-after"])


@pytest.mark.usefixtures("runtime_guard")
def test_rollback_to_savepoint_in_raw_sql_leaves_the_current_tenant_in_force(tenants):
    with transaction.atomic(), connection.cursor() as cursor:
        connection.set_tenant(tenants["alpha"])
        cursor.execute("SELECT 1")
        cursor.execute("SAVEPOINT s1")
        connection.set_tenant(tenants["beta"])
        cursor.execute("INSERT INTO shop_product (name, sku, price_cents) VALUES ('x', '', 0)")
        cursor.execute("ROLLBACK TO SAVEPOINT s1")
        cursor.execute("SELECT current_schema(), count(*) FROM shop_product")
        assert cursor.fetchone() == ("beta", len(PRODUCTS["beta"]))


@contextlib.contextmanager
def switched_to(how: str, tenant: Client) -> Iterator[None]:
    """Into ``tenant`` and back to the tenant before, as each way of switching does it."""
    if how == "tenant_context":
        with tenant_context(tenant):
            yield
    elif how == "schema_context":
        with schema_context(tenant.schema_name):
            yield
    else:
        before = connection.tenant
        connection.set_tenant(tenant)
        yield
        connection.set_tenant(before)


@pytest.mark.usefixtures("runtime_guard")
@pytest.mark.parametrize("how", ["set_tenant", "tenant_context", "schema_context"])
def test_switching_tenants_mid_transaction_applies_from_the_next_statement(tenants, how):
    query = "SELECT current_schema(), count(*) FROM shop_product"
    with foreign_server_path("beta"), transaction.atomic(), connection.cursor() as cursor:
        connection.set_tenant(tenants["alpha"])
        Product.objects.create(name="first")
        with switched_to(how, tenants["beta"]):
            # First on a cursor opened before the switch: django-tenants sets its path only
            # when a cursor opens.
            cursor.execute(query)
            assert cursor.fetchone() == ("beta", len(PRODUCTS["beta"]))
            Product.objects.create(name="second")
            assert Product.objects.count() == len(PRODUCTS["beta"]) + 1
        # Back in alpha from the next statement on, still in the same transaction.
        cursor.execute(query)
        assert cursor.fetchone() == ("alpha", len(PRODUCTS["alpha"]) + 1)
        Product.objects.create(name="third")
        assert Product.objects.count() == len(PRODUCTS["alpha"]) + 2
    assert names("alpha") == sorted([*PRODUCTS["alpha"], "first", "third"])
    assert names("beta") == sorted([*PRODUCTS["beta"], "second"])

    # Both halves belong to one transaction: a rollback undoes both.
    with contextlib.suppress(ZeroDivisionError), transaction.atomic():
        connection.set_tenant(tenants["alpha"])
        Product.objects.create(name="gone")
        with switched_to(how, tenants["beta"]):
            Product.objects.create(name="gone")
            1 / 0  # noqa: B018
    assert "gone" not in names("alpha") + names("beta")


@pytest.mark.usefixtures("runtime_guard")
def test_tenant_limit_set_calls_is_safe_under_the_guard(tenants, settings, monkeypatch):
    # django-tenants then sends its SET only when the tenant changes, and keeps believing in
    # it after a rollback undid it (W002): every statement still pins its own path.
    settings.TENANT_LIMIT_SET_CALLS = True
    for schema, other in (("alpha", "beta"), ("beta", "alpha")):
        connection.set_tenant(tenants[schema])
        with foreign_server_path(other):
            read = {how: READS[how]() for how in READS}
            for n, write in enumerate(WRITES.values()):
                write(n)
            with contextlib.suppress(ZeroDivisionError), transaction.atomic():
                connection.set_tenant(tenants[other])
                Product.objects.create(name="rolled back")
                1 / 0  # noqa: B018
            connection.set_tenant(tenants[schema])
            after_rollback = Product.objects.count()
        assert read == dict.fromkeys(READS, len(PRODUCTS[schema])), schema
        assert after_rollback == len(PRODUCTS[schema]) + len(WRITES)
    for schema in ("alpha", "beta"):
        assert names(schema) == sorted([*PRODUCTS[schema], *(f"new-{n}" for n in range(4))])

    # A savepoint rollback undoes django-tenants' SET. 4.0.1 then forgets it and sends it
    # again; a backend that goes on believing in it (W002) sends none, and the statement must
    # still run in beta.
    believing_after_savepoint_rollback(monkeypatch)
    with foreign_server_path("alpha"), transaction.atomic():
        connection.set_tenant(tenants["alpha"])
        assert Product.objects.count() == len(PRODUCTS["alpha"]) + len(WRITES)
        with contextlib.suppress(ZeroDivisionError), transaction.atomic():
            connection.set_tenant(tenants["beta"])
            Product.objects.create(name="rolled back")
            1 / 0  # noqa: B018
        # PostgreSQL restored alpha's path; the backend believes beta's is set, and sends none.
        assert connection.search_path_set_schemas == ["beta", "public"]
        assert Product.objects.count() == len(PRODUCTS["beta"]) + len(WRITES)


def believing_after_savepoint_rollback(monkeypatch: pytest.MonkeyPatch) -> None:
    """django-tenants' backend acting as one that keeps its cached search_path after a
    savepoint rollback (the backends check W002 warns of)."""
    rollback = connection.savepoint_rollback

    def keeping(sid: str) -> None:
        believed = connection.search_path_set_schemas
        try:
            rollback(sid)
        finally:
            connection.search_path_set_schemas = believed

    monkeypatch.setattr(connection, "savepoint_rollback", keeping)


@pytest.mark.parametrize("guarded", [True, False], ids=["guarded", "unguarded"])
def test_request_through_tenant_middleware_sees_only_its_tenant(tenants, client, settings, guarded):
    settings.TENANTSAFE_RUNTIME_GUARD = guarded
    with foreign_server_path("beta"):
        response = client.get("/products/", HTTP_HOST="alpha.localhost")
    assert response.status_code == 200
    if guarded:
        assert response.json() == {"schema": "alpha", "products": PRODUCTS["alpha"]}
    else:
        # The leak: alpha's page lists beta's products.
        assert response.json() == {"schema": "alpha", "products": PRODUCTS["beta"]}


@pytest.mark.usefixtures("runtime_guard")
def test_missing_schema_raises_and_runs_nothing(tenants):
    connection.set_tenant(tenants["alpha"])
    with connection.cursor() as cursor:
        cursor.execute('DROP SCHEMA "beta" CASCADE')
    connection.set_tenant(tenants["beta"])
    with pytest.raises(SchemaMissingError, match='Schema "beta" does not exist') as info:
        Product.objects.create(name="nowhere")
    assert info.value.schema == "beta"
    with pytest.raises(SchemaMissingError), transaction.atomic():
        Product.objects.count()
    # Nothing landed in public or in alpha, and the connection still works.
    connection.set_tenant(tenants["alpha"])
    assert names("alpha") == PRODUCTS["alpha"]
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass('public.shop_product')")
        assert cursor.fetchone() == (None,)


# What PostgreSQL refuses inside a transaction block, as the guard meets it through a pooler.
REFUSED = [
    "VACUUM shop_product",
    "CREATE INDEX CONCURRENTLY shop_product_never ON shop_product (name)",
    "REINDEX TABLE CONCURRENTLY shop_product",
    "CLUSTER",
    "ALTER SYSTEM SET work_mem = '8MB'",
]


@pytest.mark.usefixtures("runtime_guard")
@pytest.mark.parametrize("statement", REFUSED, ids=lambda s: " ".join(s.split()[:2]))
def test_non_transactional_statement_is_refused_when_pooled(tenants, settings, statement):
    connection.set_tenant(tenants["alpha"])
    settings.TENANTSAFE_TRANSACTION_POOLER = True
    with pytest.raises(PooledStatementError) as info, connection.cursor() as cursor:
        cursor.execute(statement)
    message = str(info.value)
    assert f'Schema "alpha": "{statement}" cannot run inside a transaction block' in message
    assert "direct (non-pooled) connection" in message
    assert "--database" not in message  # that advice is for migrate_schemas_safe
    assert info.value.schema == "alpha"
    # Nothing of it ran: no index, no setting written for the server.
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass('alpha.shop_product_never')")
        assert cursor.fetchone() == (None,)
        cursor.execute("SELECT count(*) FROM pg_file_settings WHERE name = 'work_mem'")
        assert cursor.fetchone() == (0,)


@pytest.mark.usefixtures("runtime_guard")
def test_non_transactional_statements_run_directly_connected(tenants, settings):
    connection.set_tenant(tenants["alpha"])
    settings.TENANTSAFE_TRANSACTION_POOLER = False
    with connection.cursor() as cursor:
        cursor.execute("VACUUM shop_product")
        cursor.execute("CREATE INDEX CONCURRENTLY shop_product_direct ON shop_product (name)")
        cursor.execute("REINDEX TABLE CONCURRENTLY shop_product")
        cursor.execute("SELECT current_schema()")
        assert cursor.fetchone() == ("alpha",)
        # In the tenant's schema, where the path put it.
        cursor.execute("SELECT to_regclass('alpha.shop_product_direct') IS NOT NULL")
        assert cursor.fetchone() == (True,)
        cursor.execute("SELECT to_regclass('beta.shop_product_direct')")
        assert cursor.fetchone() == (None,)


def transaction_status() -> int:
    return int(connection.connection.info.transaction_status)


def open_cursors() -> list[str]:
    # Itself a read: while a stream is open it runs in the stream's transaction.
    with connection.cursor() as cursor:
        cursor.execute("SELECT name FROM pg_cursors ORDER BY name")
        return [row[0] for row in cursor.fetchall()]


def on_server_connection(schema: str) -> None:
    """What a pooler does before a driver call that no execute wrapper sees (COPY, callproc):
    hand over a server connection whose session path is another tenant's."""
    with connection.connection.cursor() as cursor:
        cursor.execute(f'SET search_path = "{schema}", public')


@pytest.fixture
def pooled(settings: Any) -> None:
    # The in-process tests connect directly; the guard then acts as it does through a pooler.
    settings.TENANTSAFE_TRANSACTION_POOLER = True


@pytest.mark.usefixtures("runtime_guard", "pooled")
def test_server_side_cursor_in_autocommit_streams_inside_a_pinned_transaction(tenants):
    connection.set_tenant(tenants["alpha"])
    with foreign_server_path("beta"):
        rows = Product.objects.order_by("name").iterator(chunk_size=1)
        first = next(rows)
        # Declared inside a transaction that stays open while the cursor is read, so every
        # FETCH reaches the server connection that ran the check.
        assert transaction_status() == INTRANS
        assert [first.name, *(p.name for p in rows)] == PRODUCTS["alpha"]
        # Read to the end: the transaction ended with it.
        assert transaction_status() == IDLE
        assert open_cursors() == []
        connection.set_tenant(tenants["beta"])
        assert sorted(p.name for p in Product.objects.iterator(chunk_size=2)) == PRODUCTS["beta"]
        assert transaction_status() == IDLE


@pytest.mark.usefixtures("runtime_guard", "pooled")
def test_server_side_cursor_inside_atomic_is_left_to_the_transaction(tenants):
    connection.set_tenant(tenants["alpha"])
    with foreign_server_path("beta"), transaction.atomic():
        rows = Product.objects.order_by("name").iterator(chunk_size=1)
        assert next(rows).name == "alpha-0"
        # A server-side cursor of the transaction's own (not held past it).
        with connection.cursor() as cursor:
            cursor.execute("SELECT is_holdable FROM pg_cursors")
            assert cursor.fetchall() == [(False,)]
        Product.objects.create(name="alpha-new")
        # The rest of alpha's rows as they were when the cursor was declared.
        assert [p.name for p in rows] == ["alpha-1"]
        assert guard_state.of(connection).stream is None
        assert open_cursors() == []
    assert names("alpha") == sorted([*PRODUCTS["alpha"], "alpha-new"])
    assert names("beta") == PRODUCTS["beta"]


@pytest.mark.usefixtures("runtime_guard", "pooled")
def test_server_side_cursor_abandoned_half_way_ends_its_transaction(tenants):
    connection.set_tenant(tenants["alpha"])
    # Dropped half-way: Django's iterator closes its cursor, the transaction ends at once.
    rows = Product.objects.iterator(chunk_size=1)
    next(rows)
    assert transaction_status() == INTRANS
    del rows
    assert transaction_status() == IDLE

    # A cursor collected without being closed: nothing may run from a finalizer, so its
    # transaction ends, and the cursor (WITH HOLD, as Django declares it in autocommit) is
    # closed rather than left on the server connection, at the connection's next use.
    cursor = connection.chunked_cursor()
    cursor.execute("SELECT name FROM shop_product ORDER BY name")
    assert cursor.fetchmany(1) == [("alpha-0",)]
    del cursor
    assert transaction_status() == INTRANS
    assert Product.objects.count() == len(PRODUCTS["alpha"])
    assert transaction_status() == IDLE
    assert open_cursors() == []


@pytest.mark.usefixtures("runtime_guard", "pooled")
def test_server_side_cursor_still_read_when_the_connection_is_used_reads_on_from_memory(
    tenants, caplog
):
    connection.set_tenant(tenants["alpha"])
    seen = []
    with foreign_server_path("beta"):
        for product in Product.objects.order_by("name").iterator(chunk_size=1):
            seen.append(product.name)
            # Another statement, and a transaction of Django's, while the cursor is open.
            Product.objects.filter(pk=product.pk).update(price_cents=1)
            with transaction.atomic():
                Product.objects.create(name=f"new-{product.name}")
            assert transaction_status() == IDLE
    assert seen == PRODUCTS["alpha"]
    assert "remaining 1 rows were fetched into memory" in caplog.text
    assert open_cursors() == []
    assert names("alpha") == sorted(PRODUCTS["alpha"] + [f"new-{n}" for n in PRODUCTS["alpha"]])
    assert names("beta") == PRODUCTS["beta"]


@pytest.mark.usefixtures("runtime_guard", "pooled")
def test_raw_server_side_cursor_read_to_the_end_or_closed_ends_its_transaction(tenants):
    connection.set_tenant(tenants["alpha"])
    with foreign_server_path("beta"):
        cursor = connection.chunked_cursor()
        cursor.execute("SELECT name FROM shop_product ORDER BY name")
        assert cursor.fetchall() == [(name,) for name in PRODUCTS["alpha"]]
        assert transaction_status() == IDLE
        assert (cursor.fetchone(), cursor.fetchmany(5), cursor.fetchall()) == (None, [], [])
        cursor.close()

        with connection.chunked_cursor() as cursor:
            cursor.execute("SELECT name FROM shop_product ORDER BY name")
            assert [row[0] for row in cursor] == PRODUCTS["alpha"]
        assert transaction_status() == IDLE

        with connection.chunked_cursor() as cursor:
            cursor.execute("SELECT name FROM shop_product ORDER BY name")
            assert cursor.fetchone() == ("alpha-0",)
        assert transaction_status() == IDLE
        assert open_cursors() == []

        # A failing FETCH leaves no aborted transaction behind.
        cursor = connection.chunked_cursor()
        cursor.execute("SELECT 1 / (count(*) OVER () - 2) FROM shop_product")
        with pytest.raises(DatabaseError, match="division by zero"):
            cursor.fetchone()
        assert transaction_status() == IDLE
        cursor.close()
        assert Product.objects.count() == len(PRODUCTS["alpha"])


@pytest.mark.usefixtures("runtime_guard", "pooled")
def test_server_side_cursor_ends_with_the_connection(tenants):
    connection.set_tenant(tenants["alpha"])
    rows = Product.objects.iterator(chunk_size=1)
    next(rows)
    raw = connection.connection
    connection.close()
    assert raw.closed
    assert guard_state.of(connection).stream is None
    connection.set_tenant(tenants["alpha"])
    assert Product.objects.count() == len(PRODUCTS["alpha"])


@pytest.mark.usefixtures("runtime_guard")
@pytest.mark.parametrize("pooler", [True, False], ids=["pooled", "direct"])
def test_copy_lands_in_and_reads_only_the_tenants_schema(tenants, settings, pooler):
    settings.TENANTSAFE_TRANSACTION_POOLER = pooler
    connection.set_tenant(tenants["alpha"])
    with connection.cursor() as cursor:
        if is_psycopg3:
            on_server_connection("beta")
            with cursor.copy("COPY shop_product (name, sku, price_cents) FROM STDIN") as copy:
                copy.write_row(("copied-1", "", 0))
            on_server_connection("beta")
            with cursor.copy("COPY shop_product (name) TO STDOUT") as copy:
                copied = sorted(row[0] for row in copy.rows())
        else:
            on_server_connection("beta")
            cursor.copy_expert(
                "COPY shop_product (name, sku, price_cents) FROM STDIN",
                io.StringIO("copied-1\t\t0\n"),
            )
            on_server_connection("beta")
            copy_in(cursor, ["name", "sku", "price_cents"], ("copied-2", "", "0"))
            out = io.StringIO()
            on_server_connection("beta")
            cursor.copy_to(out, "shop_product", columns=["name"])
            copied = sorted(out.getvalue().split())
            out = io.StringIO()
            on_server_connection("beta")
            cursor.copy_expert("COPY shop_product (name) TO STDOUT", out)
            assert sorted(out.getvalue().split()) == copied
    expected = sorted([*PRODUCTS["alpha"], "copied-1", *([] if is_psycopg3 else ["copied-2"])])
    assert copied == expected
    assert names("alpha") == expected
    assert names("beta") == PRODUCTS["beta"]
    assert transaction_status() == IDLE


def copy_in(cursor: Any, columns: list[str], row: tuple[str, ...]) -> None:
    if is_psycopg3:
        with cursor.copy(f"COPY shop_product ({', '.join(columns)}) FROM STDIN") as copy:
            copy.write_row(row)
    else:
        cursor.copy_from(io.StringIO("\t".join(row) + "\n"), "shop_product", columns=columns)


@pytest.mark.usefixtures("runtime_guard")
def test_copy_inside_atomic_and_after_a_failed_copy(tenants):
    connection.set_tenant(tenants["alpha"])
    with transaction.atomic(), connection.cursor() as cursor:
        on_server_connection("beta")
        copy_in(cursor, ["name", "sku", "price_cents"], ("in-atomic", "", "0"))
    with transaction.atomic(), connection.cursor() as cursor:
        on_server_connection("beta")
        # Pinned by the statement before it, in the same transaction.
        assert Product.objects.count() == len(PRODUCTS["alpha"]) + 1
        copy_in(cursor, ["name", "sku", "price_cents"], ("after-a-statement", "", "0"))
    with connection.cursor() as cursor, pytest.raises(Exception, match="nosuchcolumn"):
        copy_in(cursor, ["nosuchcolumn"], ("x",))
    # The COPY's own transaction was rolled back, not left aborted.
    assert transaction_status() == IDLE
    assert names("alpha") == sorted([*PRODUCTS["alpha"], "in-atomic", "after-a-statement"])


def test_without_the_guard_cursors_behave_as_django_makes_them(tenants):
    connection.set_tenant(tenants["alpha"])
    with connection.cursor() as cursor:
        cursor.execute("SELECT name FROM shop_product ORDER BY name")
        assert [row[0] for row in cursor] == PRODUCTS["alpha"]
        copy_in(cursor, ["name", "sku", "price_cents"], ("plain", "", "0"))
    assert sorted(p.name for p in Product.objects.iterator(chunk_size=1)) == sorted(
        [*PRODUCTS["alpha"], "plain"]
    )


@pytest.mark.usefixtures("runtime_guard")
def test_stream_runs_with_the_tenants_path(tenants):
    if not is_psycopg3:
        pytest.skip("cursor.stream() is psycopg 3's")
    connection.set_tenant(tenants["alpha"])
    query = "SELECT current_schema(), name FROM shop_product ORDER BY name"
    with connection.cursor() as cursor:
        on_server_connection("beta")
        assert list(cursor.stream(query)) == [("alpha", name) for name in PRODUCTS["alpha"]]
        assert transaction_status() == IDLE
        on_server_connection("beta")
        rows = cursor.stream(query)
        assert next(rows) == ("alpha", "alpha-0")
        rows.close()
        assert transaction_status() == IDLE


@pytest.mark.usefixtures("runtime_guard")
def test_callproc_runs_with_the_tenants_path(tenants):
    connection.set_tenant(tenants["alpha"])
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE FUNCTION public.tenantsafe_schema() RETURNS text "
            "LANGUAGE sql AS 'SELECT current_schema()::text'"
        )
    try:
        for schema in ("alpha", "beta"):
            connection.set_tenant(tenants[schema])
            other = "beta" if schema == "alpha" else "alpha"
            with connection.cursor() as cursor:
                on_server_connection(other)
                cursor.callproc("tenantsafe_schema")
                assert cursor.fetchone() == (schema,)
            with transaction.atomic(), connection.cursor() as cursor:
                on_server_connection(other)
                cursor.callproc("tenantsafe_schema")
                assert cursor.fetchone() == (schema,)
            assert transaction_status() == IDLE
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP FUNCTION public.tenantsafe_schema()")


@pytest.mark.usefixtures("runtime_guard")
def test_connection_queries_hold_the_statement_the_code_ran(tenants):
    connection.set_tenant(tenants["alpha"])
    with CaptureQueriesContext(connection) as queries:
        assert Product.objects.filter(name__startswith="alpha").count() == 2
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM shop_product WHERE name LIKE %s", ["%-%"])
            if is_psycopg3:
                with cursor.copy("COPY shop_product (name) TO STDOUT") as copy:
                    assert len(list(copy.rows())) == 2
            else:
                cursor.copy_expert("COPY shop_product (name) TO STDOUT", io.StringIO())
    # django-tenants' own SET search_path when a cursor opens, and the three statements.
    statements = [q["sql"] for q in queries.captured_queries if not q["sql"].startswith("SET ")]
    assert statements == [
        'SELECT COUNT(*) AS "__count" FROM "shop_product" WHERE "shop_product"."name"::text '
        "LIKE 'alpha%'",
        "SELECT count(*) FROM shop_product WHERE name LIKE '%-%'",
        "COPY shop_product (name) TO STDOUT",
    ]


@pytest.mark.usefixtures("runtime_guard")
def test_server_side_binding_cursors_are_pinned_too(tenants):
    if not is_psycopg3:
        pytest.skip("server_side_binding is a psycopg 3 option")
    settings_dict = copy.deepcopy(connection.settings_dict)
    settings_dict["OPTIONS"]["server_side_binding"] = True
    other: Any = type(connections["default"])(settings_dict, alias="default")
    try:
        other.set_tenant(tenants["alpha"])
        with other.cursor() as cursor:
            other.connection.execute('SET search_path = "beta", public')
            cursor.execute("SELECT current_schema(), count(*) FROM shop_product WHERE id > %s", [0])
            assert cursor.fetchone() == ("alpha", len(PRODUCTS["alpha"]))
            other.connection.execute('SET search_path = "beta", public')
            cursor.execute(
                "INSERT INTO shop_product (name, sku, price_cents) VALUES (%s, '', 0)", ["bound"]
            )
    finally:
        other.close()
    assert names("alpha") == sorted([*PRODUCTS["alpha"], "bound"])


# --- Through pgbouncer, in worker processes -------------------------------------------------

POOLER_SAFE = {"TESTPROJECT_POOLER_SAFE": "1"}
WORKER_TENANTS = [f"w{n}" for n in range(6)]
SEEDED = {name: n + 2 for n, name in enumerate(WORKER_TENANTS)}  # products per tenant

# Each thread is pinned to its own tenant and runs a mix of autocommit ORM, raw cursors,
# atomic blocks, rollbacks, savepoint rollbacks and requests; every read is checked against
# the tenant's own data and every write is recorded to be checked in the database afterwards.
WORKER = textwrap.dedent(
    """
    import json, sys, threading
    import django
    django.setup()
    from django.conf import settings
    from django.db import connection, connections, transaction
    from django.test import Client as HttpClient
    from testproject.customers.models import Client
    from testproject.notes.models import Note
    from testproject.shop.models import Product

    settings.TENANTSAFE_RUNTIME_GUARD = sys.argv[1] != "unguarded"
    settings.TENANT_LIMIT_SET_CALLS = sys.argv[1] == "guarded, TENANT_LIMIT_SET_CALLS"
    rounds = int(sys.argv[2])
    seeded = json.loads(sys.argv[3])
    results = {}

    class Rollback(Exception):
        pass

    def work(schema):
        counts = {"reads": 0, "wrong": 0, "errors": 0, "statements": 0, "written": 0}
        samples = []

        def statement(execute, sql, params, many, context):
            counts["statements"] += 1
            return execute(sql, params, many, context)

        def check(what, got, expected):
            counts["reads"] += 1
            if got != expected:
                counts["wrong"] += 1
                samples.append(f"{what}: {got!r} != {expected!r}")

        connection.set_schema_to_public()
        tenant = Client.objects.get(schema_name=schema)
        expected = seeded[schema]
        http = HttpClient()
        for i in range(rounds):
            try:
                with connection.execute_wrapper(statement):
                    connection.set_tenant(tenant)
                    check("orm", Product.objects.count(), expected)
                    with connection.cursor() as cursor:
                        cursor.execute("SELECT current_schema(), count(*) FROM shop_product")
                        check("raw", cursor.fetchone(), (schema, expected))
                    Note.objects.create(title=f"{schema}:{i}:auto")
                    counts["written"] += 1
                    with transaction.atomic():
                        check("atomic", Product.objects.count(), expected)
                        Note.objects.create(title=f"{schema}:{i}:atomic")
                        try:
                            with transaction.atomic():
                                Note.objects.create(title=f"{schema}:{i}:savepoint")
                                raise Rollback
                        except Rollback:
                            pass
                        check("after savepoint", Note.objects.filter(
                            title__startswith=f"{schema}:{i}:").count(), 2)
                    counts["written"] += 1
                    try:
                        with transaction.atomic():
                            Note.objects.create(title=f"{schema}:{i}:rolled-back")
                            raise Rollback
                    except Rollback:
                        pass
                    with connection.cursor() as cursor:
                        cursor.execute("SELECT count(*) FROM notes_note WHERE title LIKE %s",
                                       [f"{schema}:%"])
                        check("after rollback", cursor.fetchone()[0], counts["written"])
                    if i % 5 == 0:
                        response = http.get("/products/", HTTP_HOST=f"{schema}.localhost")
                        body = response.json()
                        check("request", (body["schema"], len(body["products"]),
                              all(p.startswith(schema + "-") for p in body["products"])),
                              (schema, expected, True))
            except Exception as exc:
                counts["errors"] += 1
                samples.append(f"{type(exc).__name__}: {exc}"[:200])
        connection.close()
        results[schema] = {**counts, "samples": samples[:5]}

    threads = [threading.Thread(target=work, args=(s,)) for s in sys.argv[4:]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def pooled_site() -> Iterator[tuple[str, str]]:
    """A migrated database with six tenants, each holding its own number of products."""
    pooled = pooled_url()
    with fresh_database("rtguard") as name:
        direct = with_dbname(direct_url(), name)
        result = manage(direct, "migrate_schemas_safe", "--shared", "-v0", env=POOLER_SAFE)
        assert result.returncode == 0, result.stderr
        register_tenants(direct, WORKER_TENANTS)
        result = manage(direct, "migrate_schemas_safe", "--tenant", "-v0", env=POOLER_SAFE)
        assert result.returncode == 0, result.stderr
        with connect(direct) as conn:
            for schema, count in SEEDED.items():
                for n in range(count):
                    conn.execute(
                        f'INSERT INTO "{schema}".shop_product (name, sku, price_cents) '
                        "VALUES (%s, '', 0)",
                        [f"{schema}-{n}"],
                    )
        yield direct, with_dbname(pooled, name)


def run_workers(pooled: str, modes: list[str], rounds: int) -> dict[str, dict[str, Any]]:
    """Three processes with two threads each, one tenant per thread, on a busy pool; each
    process in its mode ("guarded", "unguarded", "guarded, TENANT_LIMIT_SET_CALLS")."""
    env = {
        **os.environ,
        **POOLER_SAFE,
        "DATABASE_URL": pooled,
        "DJANGO_SETTINGS_MODULE": "testproject.settings",
    }
    busy = [f'"{schema}", public' for schema in WORKER_TENANTS] + ["public"]
    with pool_load(pooled, busy, clients=3):
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    WORKER,
                    mode,
                    str(rounds),
                    json.dumps(SEEDED),
                    *WORKER_TENANTS[2 * n : 2 * n + 2],
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for n, mode in enumerate(modes)
        ]
        outputs = [proc.communicate(timeout=300) for proc in procs]
    results: dict[str, dict[str, Any]] = {}
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
        results.update(json.loads(out.strip().splitlines()[-1]))
    return results


def notes_by_schema(direct: str) -> dict[str, list[str]]:
    with connect(direct) as conn:
        return {
            schema: [
                row[0]
                for row in conn.execute(f'SELECT title FROM "{schema}".notes_note').fetchall()
            ]
            for schema in WORKER_TENANTS
        }


def clear_notes(direct: str) -> None:
    with connect(direct) as conn:
        for schema in WORKER_TENANTS:
            conn.execute(f'TRUNCATE "{schema}".notes_note CASCADE')


@pytest.mark.pooler
@pytest.mark.slow
def test_guarded_workers_through_pgbouncer_never_touch_another_tenant(pooled_site):
    direct, pooled = pooled_site
    clear_notes(direct)
    # The third process also with TENANT_LIMIT_SET_CALLS, which the guard makes safe.
    modes = ["guarded", "guarded", "guarded, TENANT_LIMIT_SET_CALLS"]
    results = run_workers(pooled, modes, rounds=60)

    statements = sum(r["statements"] for r in results.values())
    assert statements > 5000
    for schema, result in results.items():
        assert (result["wrong"], result["errors"]) == (0, 0), (schema, result["samples"])
        assert result["reads"] == 60 * 5 + 12
    # Every write is in its own tenant's schema, committed exactly as often as reported.
    for schema, titles in notes_by_schema(direct).items():
        assert all(title.startswith(f"{schema}:") for title in titles), (schema, titles[:5])
        assert len(titles) == results[schema]["written"] == 120
        assert not [t for t in titles if t.endswith(("savepoint", "rolled-back"))]


@pytest.mark.pooler
@pytest.mark.slow
def test_unguarded_workers_through_pgbouncer_leak_between_tenants(pooled_site):
    """The companion: the same workers without the setting read and write other tenants."""
    direct, pooled = pooled_site
    clear_notes(direct)
    results = run_workers(pooled, ["unguarded"] * 3, rounds=20)

    # Leaks only: a read that answered with another tenant's data, a note in another tenant's
    # schema. Errors (a table missing on the path, say) are no proof of a leak.
    wrong = sum(r["wrong"] for r in results.values())
    foreign = [
        title
        for schema, titles in notes_by_schema(direct).items()
        for title in titles
        if not title.startswith(f"{schema}:")
    ]
    assert wrong + len(foreign) > 0, results


def run_code(pooled: str, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -c code`` in the test project, through ``pooled``."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT,
        env={**os.environ, **POOLER_SAFE, "DATABASE_URL": pooled},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


REFUSE = """
    import json, sys
    import django
    django.setup()
    from django.conf import settings
    from django.db import connection
    from tenantsafe.errors import PooledStatementError
    settings.TENANTSAFE_RUNTIME_GUARD = True
    connection.set_schema("w0")
    refused = {}
    for statement in json.loads(sys.argv[1]):
        try:
            with connection.cursor() as cursor:
                cursor.execute(statement)
        except PooledStatementError as exc:
            refused[statement] = str(exc)
    print(json.dumps(refused))
    with connection.cursor() as cursor:
        cursor.execute("VACUUM shop_product")
"""


@pytest.mark.pooler
@pytest.mark.slow
def test_non_transactional_statement_through_pgbouncer_names_the_fix(pooled_site):
    direct, pooled = pooled_site
    with pool_load(pooled, [f'"{schema}", public' for schema in WORKER_TENANTS]):
        result = run_code(pooled, REFUSE, json.dumps(REFUSED))

    refused = json.loads(result.stdout.strip().splitlines()[-1])
    assert {
        statement: message.split(" so its", 1)[0] for statement, message in refused.items()
    } == {
        statement: f'Schema "w0": "{statement}" cannot run inside a transaction block,'
        for statement in REFUSED
    }
    # Not caught, it ends the program with what to do.
    assert result.returncode == 1
    assert (
        'PooledStatementError: Schema "w0": "VACUUM shop_product" cannot run inside a '
        "transaction block" in result.stderr
    )
    assert "direct (non-pooled) connection" in result.stderr
    with connect(direct) as conn:
        assert conn.execute("SELECT to_regclass('w0.shop_product_never')").fetchone() == (None,)
        assert conn.execute(
            "SELECT count(*) FROM pg_file_settings WHERE name = 'work_mem'"
        ).fetchone() == (0,)


ITERATE = """
    import json, tracemalloc
    import django
    django.setup()
    from django.conf import settings
    from django.db import connection
    from tenantsafe.guard import state as guard_state
    from testproject.shop.models import Product
    settings.TENANTSAFE_RUNTIME_GUARD = True
    connection.set_schema("w5")
    tracemalloc.start()
    count = own = 0
    # Rows as tuples: model instances stream the same way (the in-process tests), and cost
    # tracemalloc several times as much to trace.
    for name, sku in Product.objects.values_list("name", "sku").iterator(chunk_size=2000):
        if count == 0:
            streamed = guard_state.of(connection).stream is not None
        count += 1
        own += name.startswith("w5-")
    _, peak = tracemalloc.get_traced_memory()
    status = int(connection.connection.info.transaction_status)
    print(json.dumps({"count": count, "own": own, "streamed": streamed, "peak": peak,
                      "status": status}))
"""


@pytest.mark.pooler
@pytest.mark.slow
def test_iterator_through_pgbouncer_streams_100000_rows_in_bounded_memory(pooled_site):
    direct, pooled = pooled_site
    rows = 100_000
    with connect(direct) as conn:
        conn.execute(
            "INSERT INTO w5.shop_product (name, sku, price_cents) "
            "SELECT 'w5-bulk-' || n, repeat('x', 32), n FROM generate_series(1, %s) n",
            [rows],
        )
    try:
        with pool_load(pooled, [f'"{schema}", public' for schema in WORKER_TENANTS], clients=1):
            result = run_code(pooled, ITERATE)
        assert result.returncode == 0, result.stderr[-3000:]
        read = json.loads(result.stdout.strip().splitlines()[-1])
        with connect(direct) as conn:
            stuck = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state LIKE 'idle in transaction%'"
            ).fetchone()[0]
    finally:
        with connect(direct) as conn:
            conn.execute("DELETE FROM w5.shop_product WHERE name LIKE 'w5-bulk-%'")

    total = rows + SEEDED["w5"]
    # Every row w5's, read in chunks of 2,000 by one server-side cursor in a transaction the
    # guard kept open through the pooler, and ended with it: as the documentation says, under
    # 8 MB (about 1 MB; the whole result at once takes over 20 MB).
    assert read == {**read, "count": total, "own": total, "streamed": True, "status": IDLE}
    assert read["peak"] < 8_000_000, read
    assert stuck == 0


# Server-side cursors, COPY and callproc: the calls execute wrappers do not see, and the one a
# pooler cannot carry across transactions.
STREAM_WORKER = textwrap.dedent(
    """
    import io, json, sys, threading
    import django
    django.setup()
    from django.conf import settings
    from django.db import connection
    from django.db.backends.postgresql.psycopg_any import is_psycopg3
    from testproject.customers.models import Client
    from testproject.shop.models import Product

    settings.TENANTSAFE_RUNTIME_GUARD = True
    rounds = int(sys.argv[1])
    seeded = json.loads(sys.argv[2])
    results = {}

    def work(schema):
        counts = {"reads": 0, "wrong": 0, "errors": 0, "left_open": 0, "copied": 0}
        samples = []

        def check(what, got, expected):
            counts["reads"] += 1
            if got != expected:
                counts["wrong"] += 1
                samples.append(f"{what}: {got!r} != {expected!r}")

        connection.set_schema_to_public()
        tenant = Client.objects.get(schema_name=schema)
        own = [f"{schema}-{n}" for n in range(seeded[schema])]
        for i in range(rounds):
            try:
                connection.set_tenant(tenant)
                # One FETCH per row, each a chance for a pooler to switch server connections.
                check("iterator", sorted(p.name for p in Product.objects.iterator(chunk_size=1)),
                      own)
                with connection.chunked_cursor() as cursor:
                    cursor.execute("SELECT current_schema(), name FROM shop_product")
                    check("fetchmany", sorted(cursor.fetchmany(2) + cursor.fetchall()),
                          [(schema, name) for name in own])

                # Abandoned half-way, never closed: its transaction ends at the next use.
                cursor = connection.chunked_cursor()
                cursor.execute("SELECT name FROM shop_product ORDER BY name")
                check("abandoned", cursor.fetchone(), (own[0],))
                del cursor
                check("next use", Product.objects.count(), len(own))
                if connection.connection.info.transaction_status != 0:
                    counts["left_open"] += 1

                with connection.cursor() as cursor:
                    title = f"{schema}:{i}:copy"
                    if is_psycopg3:
                        with cursor.copy(
                            "COPY notes_note (title, body, pinned) FROM STDIN"
                        ) as copy:
                            copy.write_row((title, "", False))
                    else:
                        cursor.copy_from(io.StringIO(f"{title}\\t\\tf\\n"), "notes_note",
                                         columns=["title", "body", "pinned"])
                    counts["copied"] += 1
                    if is_psycopg3:
                        with cursor.copy("COPY notes_note (title) TO STDOUT") as copy:
                            titles = [row[0] for row in copy.rows()]
                    else:
                        out = io.StringIO()
                        cursor.copy_expert("COPY notes_note (title) TO STDOUT", out)
                        titles = out.getvalue().split()
                    check("copy to", (len(titles), all(t.startswith(schema + ":")
                          for t in titles)), (counts["copied"], True))

                    cursor.callproc("tenantsafe_schema")
                    check("callproc", cursor.fetchone(), (schema,))
            except Exception as exc:
                counts["errors"] += 1
                samples.append(f"{type(exc).__name__}: {exc}"[:200])
        connection.close()
        results[schema] = {**counts, "samples": samples[:5]}

    threads = [threading.Thread(target=work, args=(s,)) for s in sys.argv[3:]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps(results))
    """
)


@pytest.mark.pooler
@pytest.mark.slow
def test_server_side_cursors_copy_and_callproc_through_pgbouncer_stay_in_their_tenant(
    pooled_site,
):
    direct, pooled = pooled_site
    clear_notes(direct)
    with connect(direct) as conn:
        conn.execute(
            "CREATE OR REPLACE FUNCTION public.tenantsafe_schema() RETURNS text "
            "LANGUAGE sql AS 'SELECT current_schema()::text'"
        )
    env = {**os.environ, **POOLER_SAFE, "DATABASE_URL": pooled}
    rounds = 25
    busy = [f'"{schema}", public' for schema in WORKER_TENANTS] + ["public"]
    with pool_load(pooled, busy, clients=3):
        # Two processes, three threads each: six tenants interleaved on a pool of eight.
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", STREAM_WORKER, str(rounds), json.dumps(SEEDED), *group],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for group in (WORKER_TENANTS[:3], WORKER_TENANTS[3:])
        ]
        outputs = [proc.communicate(timeout=300) for proc in procs]
        # No server connection was left inside a transaction.
        with connect(direct) as conn:
            stuck = conn.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND state LIKE 'idle in transaction%'"
            ).fetchone()[0]
    results: dict[str, dict[str, Any]] = {}
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
        results.update(json.loads(out.strip().splitlines()[-1]))

    assert stuck == 0
    for schema, result in results.items():
        assert (result["wrong"], result["errors"], result["left_open"]) == (0, 0, 0), (
            schema,
            result["samples"],
        )
        assert result["reads"] == rounds * 6
    for schema, titles in notes_by_schema(direct).items():
        assert sorted(titles) == sorted(f"{schema}:{i}:copy" for i in range(rounds))
