"""The doctor's estimate of what the catalog caches cost the server's backends.

A backend keeps the cache entries of every relation it touched until it exits
(:mod:`tenantsafe.recycling` says why and what to do). What that costs grows with the tenants
a backend serves times the relations each tenant has. Measured on the test project
(bench/bench_catalog_memory.py, docs/benchmarks.md): about 66 kB of ``CacheMemoryContext`` per
tenant served by a request reading five of its tables, whose schemas have 67 relations each,
so about 1 kB per relation of a tenant; a request that reads more of a tenant's tables caches
more. Where the server runs on this machine (and its processes can be read), the doctor also
reads the resident memory of the database's backends.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.db import DatabaseError, connections

from tenantsafe import conf
from tenantsafe.findings import INFO, WARNING, Finding
from tenantsafe.guard import pooler

# Cached per relation of a tenant a backend served (see above).
BYTES_PER_RELATION = 1024
# What one backend may cache before the doctor warns; and what its recommendation aims at.
WARN_BYTES = 512 * 2**20
BUDGET_BYTES = 128 * 2**20
MB = 2**20

_RELATIONS = """
WITH rel AS (
  SELECT c.oid FROM pg_depend d JOIN pg_class c ON c.oid = d.objid
   WHERE d.refclassid = 'pg_namespace'::regclass AND d.refobjid = %s::regnamespace
     AND d.classid = 'pg_class'::regclass AND d.objsubid = 0)
SELECT (SELECT count(*) FROM rel)
     + (SELECT count(*) FROM rel JOIN pg_index i ON i.indrelid = rel.oid)
"""


@dataclass(frozen=True)
class Backend:
    pid: int
    rss_anon: int


@dataclass(frozen=True)
class Estimate:
    tenants: int
    relations_per_tenant: int
    # TENANTSAFE_RECYCLE_AFTER_SCHEMAS, 0 when off.
    recycle_after_schemas: int
    # What a server connection caches by the time it is recycled (or has served every tenant).
    bytes_per_connection: int
    # The database's backends, largest first, where their memory can be read.
    backends: tuple[Backend, ...]
    # The settings to use; empty when the connections are recycled often enough.
    advice: str

    def as_json(self) -> dict[str, Any]:
        return {
            "tenants": self.tenants,
            "relations_per_tenant": self.relations_per_tenant,
            "recycle_after_schemas": self.recycle_after_schemas or None,
            "estimated_bytes_per_connection": self.bytes_per_connection,
            "backends": [{"pid": b.pid, "rss_anon": b.rss_anon} for b in self.backends],
            "advice": self.advice,
        }

    def finding(self) -> Finding | None:
        """The ``catalog-memory`` finding, when there is something to do about it."""
        if not self.advice:
            return None
        served = min(self.tenants, self.recycle_after_schemas or self.tenants)
        largest = max((b.rss_anon for b in self.backends), default=0)
        seen = (
            f"; the largest of the database's {len(self.backends)} backends holds "
            f"{largest / MB:.0f} MB (RssAnon)"
            if self.backends
            else ""
        )
        level = WARNING if max(self.bytes_per_connection, largest) > WARN_BYTES else INFO
        return Finding(
            level,
            "catalog-memory",
            None,
            f"{self.tenants} tenant(s) of {self.relations_per_tenant} relations each: a server "
            f"connection that serves {'every tenant' if served == self.tenants else served} "
            f"caches about {self.bytes_per_connection / MB:.0f} MB of catalog entries until it "
            f"ends{seen}. {self.advice}",
            self.as_json(),
        )


def estimate(alias: str, tenants: int, sample: str) -> Estimate:
    """What ``tenants`` like ``sample`` (a tenant schema) cost a server connection that
    serves them, and the settings to use."""
    relations = _relations(alias, sample)
    limit = conf.recycle_after_schemas()
    served = min(tenants, limit) if limit else tenants
    return Estimate(
        tenants,
        relations,
        limit,
        served * relations * BYTES_PER_RELATION,
        tuple(_backends(alias)),
        _advice(tenants, relations, limit, pooler.detect(connections[alias]).pooled),
    )


def _relations(alias: str, schema: str) -> int:
    with connections[alias].cursor() as cursor:
        cursor.execute(_RELATIONS, [schema])
        return int(cursor.fetchone()[0])


def recommended(relations: int) -> int:
    """A TENANTSAFE_RECYCLE_AFTER_SCHEMAS that keeps a connection's caches near BUDGET_BYTES,
    rounded down to two significant digits."""
    value = max(1, BUDGET_BYTES // max(1, relations * BYTES_PER_RELATION))
    scale = 10 ** max(0, len(str(value)) - 2)
    return int(value // scale * scale)


def _advice(tenants: int, relations: int, limit: int, pooled: bool) -> str:
    suggested = recommended(relations)
    if tenants <= suggested or (limit and limit <= suggested * 2):
        return ""
    text = (
        f"Set TENANTSAFE_RECYCLE_AFTER_SCHEMAS = {suggested} (about "
        f"{suggested * relations * BYTES_PER_RELATION / MB:.0f} MB a connection)"
    )
    if pooled:
        text += (
            ", and pgbouncer's server_lifetime to a few minutes for the server connections "
            "other clients keep"
        )
    return text + " (see Catalog memory in tenantsafe's docs)."


def _backends(alias: str) -> list[Backend]:
    """The database's backends and their RssAnon, when the server runs on this machine and
    its processes can be read (a backend's working directory is the server's data
    directory, which only superusers and pg_read_all_settings may ask); else none."""
    try:
        with connections[alias].cursor() as cursor:
            # Asked only when allowed: a refusal would abort the caller's transaction.
            cursor.execute(
                "SELECT CASE WHEN pg_has_role('pg_read_all_settings', 'USAGE') "
                "THEN current_setting('data_directory') END, array_agg(pid) "
                "FROM pg_stat_activity WHERE datname = current_database() "
                "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
            )
            data, pids = cursor.fetchone()
    except DatabaseError:
        return []
    if data is None:
        return []
    found = []
    for pid in pids or ():
        size = _rss_anon(int(pid), data)
        if size is not None:
            found.append(Backend(int(pid), size))
    return sorted(found, key=lambda b: -b.rss_anon)


def _rss_anon(pid: int, data: str) -> int | None:
    # Only this server's backend: another machine's pid, or another local server's, may be
    # any process here.
    with contextlib.suppress(OSError):
        if os.readlink(f"/proc/{pid}/cwd") != data:
            return None
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return None
