"""Citus, schema-based sharding: what tenantsafe sends differently to a Citus coordinator.

With ``citus.enable_schema_based_sharding`` every tenant schema lives on one worker node and
the coordinator routes each query there. Two things found on a three-node cluster
(``bench/probe_citus.py``, docs/citus.md) change how statements may be sent:

* For some DDL (``CREATE INDEX``, most ``ALTER TABLE`` forms, renames) Citus sends the workers
  the query string it was given, and for a multi-statement simple query that is the whole
  string, which the workers refuse ("cannot insert multiple commands into a prepared
  statement"). Queries and DML are deparsed per shard. So the guard merges its check only into
  those (:func:`merges`), and a recording is replayed one statement at a time, in one pipeline
  where the driver has them (:func:`execute_batch`).
* ``lock_timeout`` set with ``set_config(..., true)`` bounds the waits on the coordinator only;
  a DDL or an ``UPDATE`` waiting on a worker waits on. ``SET LOCAL`` reaches the workers of the
  transaction when ``citus.propagate_set_commands`` is ``'local'``, but Citus sends them its
  whole query string too: :func:`local_settings` are statements to send each on its own.

Whether a connection reaches Citus is read once per server connection (Django's), like
:mod:`tenantsafe.pooler`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from django.db.backends.postgresql.psycopg_any import is_psycopg3

if is_psycopg3:
    import psycopg


@dataclass(frozen=True)
class Citus:
    # The citus extension exists in the database.
    installed: bool
    # citus.enable_schema_based_sharding, as this connection sees it.
    sharding: bool


NOT_CITUS = Citus(False, False)


def detect(connection: Any) -> Citus:
    """What ``connection``'s database is, read once per server connection."""
    connection.ensure_connection()
    raw = connection.connection
    cached: tuple[int, Citus] | None = getattr(connection, "_tenantsafe_citus", None)
    if cached is not None and cached[0] == id(raw):
        return cached[1]
    with raw.cursor() as cursor:
        cursor.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus'), "
            "coalesce(current_setting('citus.enable_schema_based_sharding', true), 'off')"
        )
        installed, sharding = cursor.fetchone()
    found = Citus(bool(installed), installed and sharding == "on") if installed else NOT_CITUS
    connection._tenantsafe_citus = (id(raw), found)
    return found


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


def merges(connection: Any, sql: str, lock_timeout_ms: int | None) -> bool:
    """Whether the guard may send its check and ``sql`` as one simple query."""
    if not is_citus(connection):
        return True
    # A lock_timeout must reach the workers: SET LOCAL, a query of its own (local_settings).
    return lock_timeout_ms is None and deparsed(sql)


def local_settings(connection: Any, lock_timeout_ms: int | None) -> tuple[str, ...]:
    """Statements to send, each alone, at the start of a pinned transaction."""
    if lock_timeout_ms is None or not is_citus(connection):
        return ()
    return (
        "SELECT set_config('citus.propagate_set_commands', 'local', true)",
        f"SET LOCAL lock_timeout = '{int(lock_timeout_ms)}ms'",
    )


# A multi-statement string's tokens that may hold a ';' that ends nothing: quoted strings
# (E'' with backslash escapes), quoted names, dollar quotes and comments. A bare ';' ends a
# statement.
_TOKEN = re.compile(
    r"(?<![\w$])[Ee]'(?:[^'\\]|\\.|'')*'|'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\""
    r"|\$\$.*?\$\$|\$(?P<tag>[A-Za-z_]\w*)\$.*?\$(?P=tag)\$|--[^\n]*|/\*.*?\*/|;",
    re.DOTALL,
)


@functools.lru_cache(maxsize=16)
def split(sql: str) -> tuple[str, ...]:
    """The statements of a multi-statement string (a recording), without the empty ones."""
    parts: list[str] = []
    start = 0
    for token in _TOKEN.finditer(sql):
        if token.group() == ";":
            parts.append(sql[start : token.start()])
            start = token.end()
    parts.append(sql[start:])
    return tuple(part for part in parts if _has_statement(part))


def _has_statement(part: str) -> bool:
    # Whether anything but comments and white space is left.
    bare = _TOKEN.sub(lambda m: "" if m.group().startswith(("--", "/*")) else "x", part)
    return bool(bare.strip())


def execute_batch(connection: Any, cursor: Any, sql: str) -> None:
    """Run the multi-statement ``sql`` on the raw ``cursor``, inside the caller's transaction:
    as one query, or on Citus one statement at a time, all in one pipeline where the driver
    has them (one round trip either way)."""
    if not is_citus(connection):
        cursor.execute(sql)
        return
    raw = connection.connection
    statements = split(sql)
    if is_psycopg3 and psycopg.Pipeline.is_supported() and not raw.pgconn.pipeline_status:
        with raw.pipeline():
            for statement in statements:
                cursor.execute(statement)
        return
    for statement in statements:
        cursor.execute(statement)


_SHARD_SUFFIX = re.compile(r"_\d+$")


def blockers(cursor: Any, schema: str, names: list[str]) -> list[tuple[str, str, str, str]]:
    """Who holds locks on the shards of ``schema``'s tables ``names``, on any node: (table,
    "pid P on node H:P", state, query). A lock a migration waits for on a worker is not in
    the coordinator's pg_locks."""
    cursor.execute(
        "SELECT DISTINCT l.relation_name, l.pid, n.nodename || ':' || n.nodeport, a.state, "
        "left(a.query, 100) FROM citus_locks l "
        "JOIN pg_catalog.pg_dist_node n ON n.nodeid = l.nodeid "
        "LEFT JOIN citus_stat_activity a ON a.global_pid = l.global_pid AND a.nodeid = l.nodeid "
        "WHERE l.granted AND l.relation_name LIKE %s AND l.global_pid <> citus_backend_gpid() "
        "ORDER BY 1, 2",
        [schema.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + ".%"],
    )
    found = []
    for relation, pid, node, state, query in cursor.fetchall():
        table = _SHARD_SUFFIX.sub("", relation.split(".", 1)[1])
        if table in names:
            found.append((table, f"{pid} on node {node}", state, query))
    return found


# How Citus reports a node it could not reach for a statement.
_UNREACHABLE = re.compile(
    r"connection to the remote node (?:[^@\s]+@)?(\S+:\d+) failed with the following error: "
    r"([^\n]*)|failure on connection marked as essential: (\S+:\d+)"
)


def unreachable_node(exc: BaseException) -> str:
    """The Citus node ``exc`` says could not be reached ("host:port (why)"); empty if none."""
    seen: BaseException | None = exc
    while seen is not None:
        found = _UNREACHABLE.search(str(seen))
        if found:
            node, why = found.group(1) or found.group(3), (found.group(2) or "").strip()
            return f"{node} ({why.rstrip('.')})" if why else node
        seen = seen.__cause__ or seen.__context__
    return ""
