"""What the guard keeps: per Django connection, under one attribute; per process, which
aliases are guarded.

A connection's state is read and changed by the thread that owns the connection only (Django's
connections are per thread). Another thread (an event loop closing an abandoned async
iterator's cursor) touches no more than a stream's books, under the stream's lock
(``streams``)."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from tenantsafe import conf
from tenantsafe.guard.sql import Terms
from tenantsafe.guard.streams import Stream

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

T = TypeVar("T")

# The one attribute tenantsafe sets on a Django connection (a DatabaseWrapper).
ATTRIBUTE = "_tenantsafe"

# libpq transaction status values; psycopg 3 and psycopg2 (``connection.info``) share them.
IDLE = 0
INTRANS = 2
INERROR = 3


@dataclass
class ConnectionState:
    # install() has put the guard on the connection.
    installed: bool = False
    # The path the current transaction is pinned to; None once it may have ended.
    pinned: tuple[str, ...] | None = None
    # Added to every transaction the guard pins (with_terms()).
    terms: Terms | None = None
    # The stream open on the connection (a server-side cursor read through a pooler).
    stream: Stream | None = None
    # The check merged into the last statement (and whether it was %-escaped): left out of
    # connection.queries.
    merged: tuple[str, bool] | None = None
    # What was read once per server connection (read_once()), by what: the id() of the driver
    # connection it was read on, and what it found (pooler.detect(), citus.detect()).
    facts: dict[str, tuple[int, Any]] = field(default_factory=dict)
    # tenantsafe.recycling: its counter is on the connection, and the tenant schemas the
    # connection's statements ran in since it last recycled.
    counting: bool = False
    schemas: set[str] = field(default_factory=set)


def of(connection: Any) -> ConnectionState:
    state: ConnectionState | None = getattr(connection, ATTRIBUTE, None)
    if state is None:
        state = ConnectionState()
        setattr(connection, ATTRIBUTE, state)
    return state


def read_once(connection: Any, what: str, read: Callable[[Any], T]) -> T:
    """What ``read(driver connection)`` finds, read once per server connection: kept on the
    connection's state under ``what`` until Django opens another driver connection (a
    reconnect reads again)."""
    connection.ensure_connection()
    raw = connection.connection
    facts = of(connection).facts
    seen = facts.get(what)
    if seen is not None and seen[0] == id(raw):
        found: T = seen[1]
        return found
    found = read(raw)
    facts[what] = (id(raw), found)
    return found


# How many guarding() blocks are open per alias, across the threads of this process.
_guarded: collections.Counter[str] = collections.Counter()
_guarded_lock = threading.Lock()


def enter(alias: str) -> None:
    with _guarded_lock:
        _guarded[alias] += 1


def leave(alias: str) -> None:
    with _guarded_lock:
        _guarded[alias] -= 1


def is_guarded(alias: str) -> bool:
    """Whether a guarding() block is open for ``alias`` (migrate_schemas_safe runs on it)."""
    return _guarded[alias] > 0


def is_active(connection: BaseDatabaseWrapper) -> bool:
    return _guarded[connection.alias] > 0 or conf.runtime_guard_enabled()
