"""Where tenants live on a Citus cluster, and moving them there under their leases.

With schema-based sharding each tenant schema is a distributed schema placed on one worker
(``citus_schemas``); a schema created before sharding was on stays on the coordinator until
``citus_schema_distribute``. :func:`layout` reads the placement of every schema from Citus's
catalog on the coordinator (``pg_dist_*``; the ``citus_shards`` view would ask every worker for
its shard sizes).

Distributing a tenant, moving it to another node and rebalancing are Citus's own functions;
what tenantsafe adds is the tenant's lease (:mod:`tenantsafe.locks`), held for the operation:
no tenant is distributed or moved while ``migrate_schemas_safe`` migrates it, and no deploy
starts on a tenant while it moves. A rebalance is Citus's plan
(``get_rebalance_table_shards_plan()``), applied one tenant at a time.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from django.db import connections, transaction

from tenantsafe import citus, locks, schemas
from tenantsafe.errors import ShardingError
from tenantsafe.findings import INFO, WARNING, Finding, quoted

logger = logging.getLogger("tenantsafe.sharding")

PURPOSE = "tenantsafe_citus"
# How a schema's tables are copied to their new node: Citus's shard_transfer_mode.
TRANSFER_MODES = ("auto", "force_logical", "block_writes")


@dataclass(frozen=True)
class Layout:
    # citus.enable_schema_based_sharding, for this connection.
    sharding: bool
    # "host:port" of every node that holds (or may get) tenants.
    workers: tuple[str, ...]
    # Each distributed schema's node; "" while it has no table (Citus places it with its first).
    nodes: dict[str, str] = field(default_factory=dict)

    def per_node(self, names: list[str]) -> dict[str, list[str]]:
        """Of ``names``, those on each worker (every worker listed), and those on none."""
        found: dict[str, list[str]] = {worker: [] for worker in self.workers}
        for name in names:
            node = self.nodes.get(name)
            if node:
                found.setdefault(node, []).append(name)
        return found

    def undistributed(self, names: list[str]) -> list[str]:
        return [name for name in names if name not in self.nodes]


def layout(alias: str) -> Layout | None:
    """The placement of every distributed schema; None when the database is not Citus."""
    connection: Any = connections[alias]
    found = citus.detect(connection)
    if not found.installed:
        return None
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT nodename || ':' || nodeport FROM pg_catalog.pg_dist_node "
            "WHERE shouldhaveshards AND isactive AND noderole = 'primary' ORDER BY nodeid"
        )
        workers = tuple(row[0] for row in cursor.fetchall())
        cursor.execute(
            "SELECT n.nspname, coalesce(min(w.nodename || ':' || w.nodeport), '') "
            "FROM pg_catalog.pg_dist_schema d "
            "JOIN pg_catalog.pg_namespace n ON n.oid = d.schemaid "
            "LEFT JOIN pg_catalog.pg_dist_partition p ON p.colocationid = d.colocationid "
            "LEFT JOIN pg_catalog.pg_dist_shard s ON s.logicalrelid = p.logicalrelid "
            "LEFT JOIN pg_catalog.pg_dist_placement l ON l.shardid = s.shardid "
            "LEFT JOIN pg_catalog.pg_dist_node w ON w.groupid = l.groupid "
            "GROUP BY n.nspname"
        )
        nodes = dict(cursor.fetchall())
    return Layout(found.sharding, workers, nodes)


@dataclass(frozen=True)
class Moved:
    """One tenant distributed or moved: from where (empty: the coordinator) to where."""

    schema: str
    source: str
    target: str
    seconds: float


@contextlib.contextmanager
def _leased(alias: str, schema: str) -> Iterator[None]:
    with locks.leased(alias, schema, purpose=PURPOSE) as lease:
        try:
            yield
        finally:
            # A move leaves nothing of the tenant's migrations unfinished, failed or not:
            # the lease row goes, so that no run counts the tenant incomplete.
            lease.complete()


# Told the holder of a lease the operation waits for (its "holder" text).
Waiting = Callable[[str, str], None]


def _timed(
    alias: str, schema: str, run: Callable[[Any], None], waiting: Waiting | None
) -> tuple[str, str, float]:
    before = _node_of(alias, schema)
    started = time.monotonic()
    held = locks.unfinished(alias, [schema])
    if held and waiting is not None:
        waiting(schema, held[schema])
    with _leased(alias, schema):
        connection: Any = connections[alias]
        connection.set_schema_to_public()
        with connection.cursor() as cursor:
            run(cursor)
    return before, _node_of(alias, schema), time.monotonic() - started


def _node_of(alias: str, schema: str) -> str:
    found = layout(alias)
    return found.nodes.get(schema, "") if found is not None else ""


def distribute(alias: str, schema: str, *, waiting: Waiting | None = None) -> Moved:
    """Make ``schema`` a distributed schema, under its lease; its rows move to a worker (the
    local copy Citus keeps on the coordinator is truncated)."""
    known = layout(alias)
    if known is None:
        raise ShardingError(f'Database {alias!r} is not a Citus database: "{schema}" stays.')
    if schema in known.nodes:
        raise ShardingError(f'Schema "{schema}" is distributed already (on {known.nodes[schema]}).')
    if not schemas.exists(alias, schema):
        raise ShardingError(f'Schema "{schema}" does not exist.')

    def run(cursor: Any) -> None:
        # One transaction: the schema is distributed with its coordinator copy emptied, or
        # neither.
        with transaction.atomic(using=alias):
            _distribute(cursor, schema)

    source, target, seconds = _timed(alias, schema, run, waiting)
    return Moved(schema, source, target, seconds)


def _distribute(cursor: Any, schema: str) -> None:
    cursor.execute("SELECT citus_schema_distribute(%s::regnamespace)", [schemas.quote(schema)])
    cursor.execute(
        "SELECT truncate_local_data_after_distributing_table(p.logicalrelid) "
        "FROM pg_catalog.pg_dist_partition p JOIN pg_catalog.pg_class c "
        "ON c.oid = p.logicalrelid WHERE c.relnamespace = %s::regnamespace",
        [schemas.quote(schema)],
    )


def move(
    alias: str, schema: str, node: str, mode: str = "auto", *, waiting: Waiting | None = None
) -> Moved:
    """Move distributed ``schema`` to ``node`` ("host:port"), under its lease."""
    known = layout(alias)
    if known is None or schema not in known.nodes:
        raise ShardingError(
            f'Schema "{schema}" is not a distributed schema: distribute it first '
            f"(tenantsafe_citus distribute --schema {schema})."
        )
    if node not in known.workers:
        raise ShardingError(
            f'Node "{node}" is not a worker of this cluster ({", ".join(known.workers)}).'
        )
    host, _, port = node.rpartition(":")

    def run(cursor: Any) -> None:
        cursor.execute(
            "SELECT citus_schema_move(%s::regnamespace, %s, %s, %s::citus.shard_transfer_mode)",
            [schemas.quote(schema), host, int(port), mode],
        )

    source, target, seconds = _timed(alias, schema, run, waiting)
    return Moved(schema, source, target, seconds)


def rebalance_plan(alias: str) -> list[tuple[str, str]]:
    """Citus's rebalance plan as (schema, target node), one entry per tenant schema."""
    with connections[alias].cursor() as cursor:
        cursor.execute(
            "SELECT n.nspname, p.targetname || ':' || p.targetport "
            "FROM get_rebalance_table_shards_plan() p "
            "JOIN pg_catalog.pg_class c ON c.oid = p.table_name "
            "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
        )
        planned: dict[str, str] = {}
        for name, target in cursor.fetchall():
            planned.setdefault(name, target)
    return list(planned.items())


def rebalance(alias: str, mode: str = "auto", *, waiting: Waiting | None = None) -> Iterator[Moved]:
    """Apply Citus's rebalance plan one tenant at a time, each under its lease."""
    for schema, target in rebalance_plan(alias):
        yield move(alias, schema, target, mode, waiting=waiting)


# How many tenants' names a node's line of the doctor shows; --json lists them all.
SHOWN = 10


def findings(alias: str, names: list[str]) -> tuple[dict[str, Any], list[Finding]]:
    """For the doctor, on Citus: where the tenants ``names`` live (the report's ``citus``), a
    finding per worker with its tenants, and one per tenant left on the coordinator."""
    found = layout(alias)
    if found is None:
        return {}, []
    per_node = found.per_node(names)
    data = {
        "sharding": found.sharding,
        "nodes": {node: len(held) for node, held in per_node.items()},
        "tenants": {name: found.nodes.get(name) or None for name in names},
    }
    result = []
    for node, held in per_node.items():
        listed = ", ".join(quoted(name) for name in held[:SHOWN])
        more = f" and {len(held) - SHOWN} more (--json lists them)" if len(held) > SHOWN else ""
        result.append(
            Finding(
                INFO,
                "citus-node",
                None,
                f"Citus node {quoted(node)} holds {len(held)} tenant(s)"
                + (f": {listed}{more}." if held else "."),
                {"node": node, "tenants": held},
            )
        )
    for name in found.undistributed(names):
        result.append(
            Finding(
                WARNING,
                "citus-undistributed",
                name,
                f"Tenant {quoted(name)} is not distributed: its schema lives on the coordinator "
                "(it was created before schema-based sharding was on). Distribute it with "
                f"manage.py tenantsafe_citus distribute --schema {name}.",
            )
        )
    return data, result
