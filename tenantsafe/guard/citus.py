"""Whether a connection reaches a Citus coordinator, and what the guard sends differently there.

With ``citus.enable_schema_based_sharding`` every tenant schema lives on one worker node and
the coordinator routes each query there. Two things found on a three-node cluster
(``bench/probe_citus.py``, docs/citus.md) change how the guard may pin a statement:

* For some DDL (``CREATE INDEX``, most ``ALTER TABLE`` forms, renames) Citus sends the workers
  the query string it was given, and for a multi-statement simple query that is the whole
  string, which the workers refuse ("cannot insert multiple commands into a prepared
  statement"). Queries and DML are deparsed per shard. So the check is merged only into those
  (:func:`merges`); other statements are pipelined or pinned step by step.
* ``lock_timeout`` set with ``set_config(..., true)`` bounds the waits on the coordinator only;
  a DDL or an ``UPDATE`` waiting on a worker waits on. ``SET LOCAL`` reaches the workers of the
  transaction when ``citus.propagate_set_commands`` is ``'local'``, but Citus sends them its
  whole query string too: :func:`local_settings` are statements to send each on its own, and
  with them nothing is merged.

Whether a connection reaches Citus is read once per server connection (Django's), like
:mod:`tenantsafe.guard.pooler`. What else tenantsafe does on Citus is in
:mod:`tenantsafe.citus`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tenantsafe.guard import state
from tenantsafe.guard.sql import Terms


@dataclass(frozen=True)
class Citus:
    # The citus extension exists in the database.
    installed: bool
    # citus.enable_schema_based_sharding, as this connection sees it.
    sharding: bool


NOT_CITUS = Citus(False, False)


def detect(connection: Any) -> Citus:
    """What ``connection``'s database is, read once per server connection."""
    return state.read_once(connection, "citus", _read)


def _read(raw: Any) -> Citus:
    with raw.cursor() as cursor:
        cursor.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus'), "
            "coalesce(current_setting('citus.enable_schema_based_sharding', true), 'off')"
        )
        installed, sharding = cursor.fetchone()
    return Citus(True, sharding == "on") if installed else NOT_CITUS


def is_citus(connection: Any) -> bool:
    return detect(connection).installed


# Queries and DML: Citus deparses them for the worker, so they may share a query string.
_DEPARSED = re.compile(
    r"^\s*\(*\s*(?:SELECT|INSERT|UPDATE|DELETE|WITH|VALUES|TABLE|MERGE)\b", re.IGNORECASE
)


def deparsed(sql: str) -> bool:
    """Whether Citus deparses ``sql`` for the workers (a query or DML), rather than sending
    them the query string it came in."""
    return bool(_DEPARSED.match(sql))


def merges(sql: str, terms: Terms | None) -> bool:
    """Whether, on Citus, the guard may send its check and ``sql`` as one simple query."""
    # A lock_timeout must reach the workers: SET LOCAL, a query of its own (local_settings).
    return (terms is None or terms.lock_timeout_ms is None) and deparsed(sql)


def local_settings(connection: Any, terms: Terms | None) -> tuple[str, ...]:
    """Statements to send, each alone, at the start of a pinned transaction."""
    if terms is None or terms.lock_timeout_ms is None or not is_citus(connection):
        return ()
    return (
        "SELECT set_config('citus.propagate_set_commands', 'local', true)",
        f"SET LOCAL lock_timeout = '{int(terms.lock_timeout_ms)}ms'",
    )
