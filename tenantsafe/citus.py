"""Citus, schema-based sharding: what tenantsafe does differently on a Citus coordinator,
outside the guard (whose part is :mod:`tenantsafe.guard.citus`).

With ``citus.enable_schema_based_sharding`` every tenant schema lives on one worker node and
the coordinator routes each query there. For some DDL Citus sends the workers the query string
it was given, which they refuse when it holds several statements ("cannot insert multiple
commands into a prepared statement"; ``bench/probe_citus.py``, docs/citus.md): a recording is
replayed one statement at a time, in one pipeline where the driver has them
(:func:`execute_batch`). A migration that waits for a lock on a worker waits for a shard's lock
there (:func:`blockers`), and a node that cannot be reached fails the statement with an error
that names it (:func:`unreachable_node`).
"""

from __future__ import annotations

import functools
import re
from typing import Any

from django.db.backends.postgresql.psycopg_any import is_psycopg3

from tenantsafe.guard.citus import Citus, detect, is_citus

if is_psycopg3:
    import psycopg

__all__ = ["Citus", "blockers", "detect", "execute_batch", "is_citus", "split", "unreachable_node"]


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
