"""A server connection's memory after it served requests across many tenants.

    python -m bench.bench_catalog_memory [--tenants 10000] [--at 100 1000 5000 10000]
                                         [--variants plain pooled recycle lifetime ...]

A database of ``--tenants`` current tenants of the test project (``bench/_many.py``), and one
Django process per variant that requests a page of every tenant in turn (Django's test
client, through django-tenants' middleware by each tenant's domain: the full request cycle;
the page reads each tenant app's tables, ``bench/memory_urls.py``). After the ``--at``-th
tenant, it reads the memory of the backend that answers its next query (the sum of
``pg_backend_memory_contexts``, and of ``CacheMemoryContext`` with its children, where
PostgreSQL keeps the relation and catalog caches) and the anonymous resident memory
(``RssAnon`` of ``/proc/<pid>/status``: the server runs on this machine) of every backend of
the database. Variants:

- ``plain``: django-tenants as it ships, connected directly with a persistent connection
  (``CONN_MAX_AGE = None``): one backend serves every request;
- ``pooled``: through pgbouncer in transaction pooling (a pool of 8), with the run-time guard,
  ``CONN_MAX_AGE = 0``;
- ``recycle``: the same with ``TENANTSAFE_RECYCLE_AFTER_SCHEMAS = --recycle`` (1000);
- ``recycle-direct``: ``plain`` with the guard and that setting;
- ``lifetime``: ``pooled`` through a pgbouncer of its own with ``server_lifetime =
  --lifetime`` seconds (and the pool of 8).

Uses DATABASE_URL and PGBOUNCER_URL when set (and keeps the prepared database there, see
``bench/_many.py``), or starts a throwaway cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import _many
from bench._db import server
from testproject.dbtools import ROOT, connect, direct_url, with_dbname

VARIANTS = {
    "plain": {"BENCH_CONN_MAX_AGE": "none"},
    "pooled": {"BENCH_GUARD": "1", "pool": "bouncer"},
    "recycle": {"BENCH_GUARD": "1", "pool": "bouncer", "recycle": "1"},
    "recycle-direct": {"BENCH_CONN_MAX_AGE": "none", "BENCH_GUARD": "1", "recycle": "1"},
    "lifetime": {"BENCH_GUARD": "1", "pool": "lifetime"},
}

# Requests between two samples of the backends' memory.
SAMPLE = 25
_CONTEXTS = (
    "SELECT pg_backend_pid(), sum(total_bytes)::bigint, sum(total_bytes) FILTER (WHERE name = "
    "'CacheMemoryContext' OR parent = 'CacheMemoryContext')::bigint "
    "FROM pg_backend_memory_contexts"
)


def rss_anon(pid: int) -> int | None:
    """The backend's anonymous resident memory in bytes (None when it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return None


def serve(at: list[int], count: int) -> None:
    """In the measured process: request every tenant's page, measuring at ``at``."""
    import django

    django.setup()
    from django.db import connections
    from django.test import Client

    connection: Any = connections["default"]

    client = Client()
    monitor = connect(os.environ["BENCH_MONITOR_URL"])
    started = time.perf_counter()
    pids: set[int] = set()
    peak = 0
    for number, schema in enumerate(_many.names(count), 1):
        response = client.get("/page/", HTTP_HOST=f"{schema}.localhost")
        if response.status_code != 200 or response.json()["schema"] != schema:
            raise SystemExit(f"{schema}: {response.status_code} {response.content[:300]!r}")
        if number % SAMPLE == SAMPLE - 1:
            # The largest backend between checkpoints, read just before round numbers (where
            # recycling after a round number of schemas ends one).
            peak = max([peak, *(rss_anon(pid) or 0 for pid in _backends(monitor, connection))])
        if number not in at:
            continue
        connection.set_schema_to_public()
        with connection.cursor() as cursor:
            cursor.execute(_CONTEXTS)
            pid, total, cache = cursor.fetchone()
        backends = _backends(monitor, connection)
        pids.update(backends)
        sizes = [size for size in map(rss_anon, backends) if size is not None]
        print(
            json.dumps(
                {
                    "tenants": number,
                    "seconds": round(time.perf_counter() - started, 1),
                    "cache": cache,
                    "contexts": total,
                    "rss": rss_anon(pid),
                    "max_rss": max(sizes, default=0),
                    "peak_rss": max(peak, *sizes),
                    "backends": len(backends),
                    "backends_seen": len(pids),
                }
            ),
            flush=True,
        )
        peak = 0


def _backends(monitor: Any, connection: Any) -> list[int]:
    """The pids of the measured database's backends (the monitor's own is in another)."""
    return [
        row[0]
        for row in monitor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s "
            "AND backend_type = 'client backend'",
            [connection.settings_dict["NAME"]],
        ).fetchall()
    ]


@contextlib.contextmanager
def own_pgbouncer(lifetime: int) -> Iterator[str]:
    """A pgbouncer in transaction pooling with ``server_lifetime``; its URL (database left
    out), run as the user the throwaway cluster's servers run as when this runs as root."""
    from testproject.cluster import _server_user, find_pgbouncer, free_port

    binary = find_pgbouncer()
    if binary is None:
        raise SystemExit("pgbouncer is not installed")
    server_url = direct_url()
    host, port = server_url.split("@", 1)[1].split("/", 1)[0].rsplit(":", 1)
    work = Path(subprocess.check_output(["mktemp", "-d"], text=True).strip())
    user = _server_user()
    listen = free_port()
    (work / "users.txt").write_text('"postgres" ""\n')
    (work / "pgbouncer.ini").write_text(
        f"[databases]\n* = host={host} port={port}\n[pgbouncer]\nlisten_addr = 127.0.0.1\n"
        f"listen_port = {listen}\nunix_socket_dir = {work}\nauth_type = trust\n"
        f"auth_file = {work / 'users.txt'}\npool_mode = transaction\nmax_client_conn = 100\n"
        f"default_pool_size = 8\nserver_reset_query =\nserver_lifetime = {lifetime}\n"
        "ignore_startup_parameters = extra_float_digits,options\n"
        f"logfile = {work / 'pgbouncer.log'}\n"
    )
    if user is not None:
        os.chown(work, user.pw_uid, user.pw_gid)
    kwargs: dict[str, Any] = {}
    if user is not None:
        kwargs = {"user": user.pw_uid, "group": user.pw_gid}
    proc = subprocess.Popen(
        [binary, str(work / "pgbouncer.ini")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        **kwargs,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with connect(f"postgres://postgres@127.0.0.1:{listen}/postgres"):
                    break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        yield f"postgres://postgres@127.0.0.1:{listen}"
    finally:
        proc.terminate()
        proc.wait(10)
        subprocess.run(["rm", "-rf", str(work)], check=False)


def run_variant(
    variant: str, database: str, ns: argparse.Namespace, bouncer: str | None
) -> list[dict[str, Any]]:
    spec = VARIANTS[variant]
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "bench.memory_settings",
        "PYTHONPATH": str(ROOT),
        "BENCH_MONITOR_URL": with_dbname(direct_url(), "postgres"),
    }
    for key in ("BENCH_CONN_MAX_AGE", "BENCH_GUARD", "BENCH_RECYCLE_AFTER_SCHEMAS"):
        env.pop(key, None)
    env.update({k: v for k, v in spec.items() if k.startswith("BENCH_")})
    if spec.get("recycle"):
        env["BENCH_RECYCLE_AFTER_SCHEMAS"] = str(ns.recycle)
    if spec.get("pool") == "bouncer":
        pooled = os.environ.get("PGBOUNCER_URL")
        if not pooled:
            raise SystemExit("pgbouncer is not installed")
        env["DATABASE_URL"] = with_dbname(pooled, database)
    elif spec.get("pool") == "lifetime":
        assert bouncer is not None
        env["DATABASE_URL"] = f"{bouncer}/{database}"
    else:
        env["DATABASE_URL"] = with_dbname(direct_url(), database)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.bench_catalog_memory",
            "--serve",
            "--tenants",
            str(ns.tenants),
            "--at",
            *map(str, ns.at),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def end_backends(database: str) -> None:
    with connect(with_dbname(direct_url(), "postgres")) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            [database],
        )
        deadline = time.monotonic() + 30
        while conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [database]
        ).fetchone()[0]:
            if time.monotonic() > deadline:
                raise SystemExit(f"the backends of {database} did not end")
            time.sleep(0.1)


def mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def relations_per_tenant(database: str) -> int:
    with connect(with_dbname(direct_url(), database)) as conn:
        return int(
            conn.execute(
                "SELECT count(*) FROM pg_class WHERE relnamespace = %s::regnamespace",
                [_many.names(1)[0]],
            ).fetchone()[0]
        )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tenants", type=int, default=10000)
    parser.add_argument("--at", type=int, nargs="+", default=[100, 1000, 5000, 10000])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--recycle", type=int, default=1000)
    parser.add_argument("--lifetime", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    ns.at = sorted(n for n in ns.at if n <= ns.tenants)
    if ns.serve:
        serve(ns.at, ns.tenants)
        return 0
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    with server():
        database = _many.golden(ns.tenants, jobs=ns.jobs, fresh=ns.fresh)
        relations = relations_per_tenant(database)
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
        print(
            f"{ns.tenants} tenants of the test project, {relations} relations each; "
            f"load average {load}"
        )
        with contextlib.ExitStack() as stack:
            bouncer = (
                stack.enter_context(own_pgbouncer(ns.lifetime))
                if "lifetime" in ns.variants
                else None
            )
            for variant in ns.variants:
                # Each variant starts with new backends (the pool's are kept otherwise).
                end_backends(database)
                print(f"{variant}:")
                for row in run_variant(variant, database, ns, bouncer):
                    print(
                        f"  after {row['tenants']:>6} tenants ({row['seconds']:6.1f}s): "
                        f"CacheMemoryContext {mb(row['cache']):>5} MB, all contexts "
                        f"{mb(row['contexts']):>5} MB, RssAnon {mb(row['rss']):>5} MB (largest "
                        f"backend {mb(row['max_rss'])} MB, since the last line "
                        f"{mb(row['peak_rss'])} MB; {row['backends']} backends now, "
                        f"{row['backends_seen']} seen)"
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
