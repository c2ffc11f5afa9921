"""Recycling server connections that have served many tenant schemas.

Every PostgreSQL backend caches the catalog entries (relcache, catcache) of each relation it
touches, and frees them only when it exits. A connection that serves thousands of tenants
caches thousands of tenants' tables, indexes and sequences: hundreds of MB per backend (see
the measured curve in docs/catalog-memory.md). Behind a transaction pooler every server
connection ends up serving every tenant, and the pool keeps them for hours.

With ``TENANTSAFE_RECYCLE_AFTER_SCHEMAS = N`` a process counts, per connection alias and
thread (on Django's connection object, which outlives its reconnects), the distinct schemas
its statements ran in. Once it reached N, the next safe point recycles:

* directly connected, it closes the Django connection, which ends its backend (Django opens a
  new one at the next query);
* behind a pooler, closing its own connection frees nothing (the server connection goes back
  to the pool), so it first ends the server connection the pooler hands it, with
  ``pg_terminate_backend(pg_backend_pid())`` in a transaction of its own, and then closes.
  That is not necessarily the backend that served its schemas, but every backend of the pool
  serves every process, so when each process ends one backend per N schemas it sent, a backend
  serves N schemas on average before it ends (see docs/benchmarks.md for the measured effect).

A safe point is the end of a request (``request_finished``), and :func:`recycle_if_due` for
other loops (a Celery task's ``task_postrun``, a command iterating over tenants); never inside
a transaction or ``atomic()`` block, where it waits for the next one.

The counter is one execute wrapper, put on every connection by :func:`install` (from
``AppConfig.ready()`` and on ``connection_created``), as the guard is; what it counts is kept
in the guard's state of the connection (``tenantsafe.guard.state``, one attribute).
"""

from __future__ import annotations

import logging
from typing import Any

from django.core.signals import request_finished
from django.db import Error, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.signals import connection_created
from django_tenants.utils import get_public_schema_name

from tenantsafe import conf
from tenantsafe.guard import pooler, state

logger = logging.getLogger("tenantsafe.recycling")


def _touched(connection: Any) -> set[str]:
    return state.of(connection).schemas


def _count(execute: Any, sql: Any, params: Any, many: bool, context: dict[str, Any]) -> Any:
    if conf.recycle_after_schemas():
        connection = context["connection"]
        schema = getattr(connection, "schema_name", None)
        # Public is one schema, shared by every request: not counted.
        if schema is not None and schema != get_public_schema_name():
            _touched(connection).add(schema)
    return execute(sql, params, many, context)


def touched(connection: BaseDatabaseWrapper) -> int:
    """How many distinct schemas ``connection``'s statements ran in since it last recycled."""
    return len(_touched(connection))


def recycle_if_due(alias: str | None = None) -> list[str]:
    """Recycle the connections (of ``alias``, default all of this thread's) that reached
    ``TENANTSAFE_RECYCLE_AFTER_SCHEMAS`` and are outside any transaction. The aliases
    recycled."""
    limit = conf.recycle_after_schemas()
    if not limit:
        return []
    recycled = []
    for connection in connections.all(initialized_only=True):
        if alias is not None and connection.alias != alias:
            continue
        if len(_touched(connection)) >= limit and _idle(connection):
            try:
                _recycle(connection)
            except Error:
                # Unreachable now: the next safe point tries again.
                logger.warning("cannot recycle connection %r", connection.alias, exc_info=True)
                connection.close()
                continue
            recycled.append(connection.alias)
    return recycled


def _idle(connection: Any) -> bool:
    # In a transaction the connection (and, behind a pooler, its server connection) is in use.
    return not connection.in_atomic_block and (
        connection.connection is None or connection.get_autocommit()
    )


def _recycle(connection: Any) -> None:
    count = len(_touched(connection))
    ended = None
    if pooler.detect(connection).pooled:
        ended = _end_server_connection(connection)
    connection.close()
    _touched(connection).clear()
    logger.info(
        "recycled connection %r after %d schemas%s",
        connection.alias,
        count,
        f" (ended server backend {ended})" if ended else "",
    )


def _end_server_connection(connection: Any) -> int | None:
    """End the backend the pooler hands this connection; its pid (None if not ended)."""
    connection.ensure_connection()
    raw = connection.connection
    pid = None
    try:
        # One transaction, so that the pooler keeps one server connection for both; raw, as
        # no tenant's path matters (and the guard would pin one).
        with raw.cursor() as cursor:
            cursor.execute("BEGIN")
            cursor.execute("SELECT pg_backend_pid()")
            pid = int(cursor.fetchone()[0])
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    except connection.Database.OperationalError:
        # The backend ends before it answers (57P01, admin shutdown), or the pooler drops the
        # link: what was asked for.
        return pid
    except connection.Database.Error as exc:
        logger.warning("cannot end server backend %s: %s", pid, exc)
        return None
    return pid


def _on_request_finished(sender: Any, **kwargs: Any) -> None:
    recycle_if_due()


def install(connection: BaseDatabaseWrapper | None = None, **kwargs: Any) -> None:
    """Put the counter on ``connection`` (default: every connection of this thread, and those
    created later), and recycle at the end of every request. Idempotent."""
    if connection is None:
        for conn in connections.all():
            install(conn)
        connection_created.connect(_on_connection_created, dispatch_uid="tenantsafe.recycling")
        request_finished.connect(_on_request_finished, dispatch_uid="tenantsafe.recycling")
        return
    kept = state.of(connection)
    if kept.counting:
        return
    connection.execute_wrappers.append(_count)
    kept.counting = True


def _on_connection_created(sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    install(connection)
