"""Queries per second with TENANTSAFE_RUNTIME_GUARD against django-tenants' default.

    python -m bench.bench_runtime_guard [--queries 1000] [--rounds 7]

Through pgbouncer it also measures an ASGI row and an iterate-and-read loop's memory
(``bench/_async.py``).

Prepares one database with a migrated tenant, then measures, directly and through pgbouncer
(when installed), in one worker process per endpoint:

* ``default``: django-tenants as it ships (``SET search_path`` whenever a cursor is opened);
* ``guard``: ``TENANTSAFE_RUNTIME_GUARD = True``, as it runs for Django's default cursors;
* ``guard+limit``: the guard with ``TENANT_LIMIT_SET_CALLS = True``;
* ``guard/pipeline`` and ``guard/steps``: the guard forced onto its other strategies (the psycopg
  3 pipeline used for server-side binding cursors; BEGIN, pin, statement and COMMIT one by one,
  as for named cursors, and as the guard ran every statement before the merged check), to show
  what the default strategy saves.

Workloads: ``orm get``, ``raw cursor``, ``atomic x5`` (queries per second) and ``iterator``
(``QuerySet.iterator(chunk_size=2000)`` over 20,000 rows in autocommit, rows per second; through
pgbouncer the guard reads it in a transaction of its own, see ``tenantsafe.guard``).

Variants run interleaved, ``--rounds`` times, and each reports its median. Round trips per
query (per call for ``iterator``) are counted separately through a small TCP relay that counts
request bursts (the client sending after it has received), so they are measured, not assumed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from bench import _async
from bench._db import median, run_json, server

VARIANTS = ["default", "guard", "guard+limit", "guard/pipeline", "guard/steps"]
WORKLOADS = ["orm get", "raw cursor", "atomic x5", "iterator"]
ITERATOR_ROWS = 20_000
POOLER_SAFE = {"TESTPROJECT_POOLER_SAFE": "1"}


class RoundTripRelay:
    """A TCP relay that counts request bursts from client to server."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.bursts = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self._listener.accept()
            upstream = socket.create_connection(self.target)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            turn = {"last": "server"}
            threading.Thread(
                target=self._pump, args=(client, upstream, turn, "client"), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(upstream, client, turn, "server"), daemon=True
            ).start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, turn: dict[str, str], side: str
    ) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                with self._lock:
                    if side == "client" and turn["last"] == "server":
                        self.bursts += 1
                    turn["last"] = side
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def worker(queries: int, rounds: int) -> dict[str, Any]:
    import django

    django.setup()
    from django.conf import settings
    from django.db import connection, connections, transaction

    from tenantsafe.guard import dispatch
    from testproject.customers.models import Client
    from testproject.notes.models import Note
    from testproject.shop.models import Product

    tenant = Client.objects.get(schema_name="bench")
    connection.set_tenant(tenant)  # type: ignore[attr-defined]
    ids = list(Product.objects.values_list("id", flat=True))
    merges, pipelines = dispatch._merges, dispatch._pipelines

    def orm_get(i: int) -> None:
        Product.objects.get(pk=ids[i % len(ids)])

    def raw_cursor(i: int) -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT name FROM shop_product WHERE id = %s", [ids[i % len(ids)]])
            cursor.fetchall()

    def atomic_x5(i: int) -> None:
        # Five queries per call; counted as five below.
        with transaction.atomic():
            for j in range(5):
                Product.objects.get(pk=ids[(i + j) % len(ids)])

    notes = Note.objects.count()

    def iterator(i: int) -> None:
        # A server-side cursor, as management commands and exports stream.
        count = sum(1 for _ in Note.objects.iterator(chunk_size=2000))
        assert count == notes, count

    workloads: dict[str, tuple[Callable[[int], None], int]] = {
        "orm get": (orm_get, 1),
        "raw cursor": (raw_cursor, 1),
        "atomic x5": (atomic_x5, 5),
        "iterator": (iterator, ITERATOR_ROWS),
    }

    @contextlib.contextmanager
    def variant(name: str) -> Iterator[None]:
        settings.TENANTSAFE_RUNTIME_GUARD = name != "default"
        settings.TENANT_LIMIT_SET_CALLS = name == "guard+limit"
        if name in ("guard/pipeline", "guard/steps"):
            dispatch._merges = lambda raw, raw_cursor: False
        if name == "guard/steps":
            dispatch._pipelines = lambda raw: False
        connection.set_tenant(tenant)  # type: ignore[attr-defined]
        try:
            yield
        finally:
            dispatch._merges, dispatch._pipelines = merges, pipelines

    rates: dict[str, dict[str, list[float]]] = {w: {v: [] for v in VARIANTS} for w in workloads}
    for round_no in range(rounds):
        order = VARIANTS if round_no % 2 == 0 else VARIANTS[::-1]
        for workload, (fn, per_call) in workloads.items():
            calls = max(2, queries // per_call)
            for name in order:
                with variant(name):
                    for i in range(min(50, calls)):
                        fn(i)
                    started = time.perf_counter()
                    for i in range(calls):
                        fn(i)
                    elapsed = time.perf_counter() - started
                rates[workload][name].append(calls * per_call / elapsed)

    # Through pgbouncer: iterator() guarded against unguarded over a direct connection (the
    # "direct" alias), back to back in each round, so the ratio is paired too.
    against_direct: list[float] = []
    if "direct" in connections:
        direct = connections["direct"]
        direct.set_tenant(tenant)  # type: ignore[attr-defined]

        def direct_iterator(i: int) -> None:
            count = sum(1 for _ in Note.objects.using("direct").iterator(chunk_size=2000))
            assert count == notes, count

        for round_no in range(rounds):
            pair: dict[str, float] = {}
            order = ["pooled", "direct"] if round_no % 2 == 0 else ["direct", "pooled"]
            for side in order:
                settings.TENANTSAFE_RUNTIME_GUARD = side == "pooled"
                fn = iterator if side == "pooled" else direct_iterator
                fn(0)
                started = time.perf_counter()
                for i in range(2):
                    fn(i)
                pair[side] = 2 * ITERATOR_ROWS / (time.perf_counter() - started)
            against_direct.append(pair["pooled"] / pair["direct"])
        direct.close()

    # Round trips: the same calls through the relay, after warming the connection up.
    relay = RoundTripRelay(
        connection.settings_dict["HOST"] or "127.0.0.1", int(connection.settings_dict["PORT"])
    )
    connection.close()
    connection.settings_dict["HOST"], connection.settings_dict["PORT"] = "127.0.0.1", relay.port
    trips: dict[str, dict[str, float]] = {w: {} for w in workloads}
    for workload, (fn, per_call) in workloads.items():
        # The iterator is counted per call (10 chunks of 2,000 rows), the others per query.
        calls, per = (3, 1) if workload == "iterator" else (100, per_call)
        for name in VARIANTS:
            with variant(name):
                fn(0)
                before = relay.bursts
                for i in range(calls):
                    fn(i)
                trips[workload][name] = (relay.bursts - before) / (calls * per)
    connection.close()
    return {
        "qps": {w: {v: median(r) for v, r in by.items()} for w, by in rates.items()},
        # Paired within a round (the variants ran back to back), so load on the machine that
        # drifts between rounds cancels out.
        "ratio": {
            w: {
                v: median([a / b for a, b in zip(r, by["default"], strict=True)])
                for v, r in by.items()
            }
            for w, by in rates.items()
        },
        "round_trips": trips,
        "iterator_against_direct": median(against_direct) if against_direct else None,
    }


def prepare(url: str) -> None:
    from testproject.dbtools import connect, manage, register_tenants

    result = manage(url, "migrate_schemas_safe", "--shared", "-v0", env=POOLER_SAFE)
    assert result.returncode == 0, result.stderr
    register_tenants(url, ["bench", "bigstream"])
    result = manage(url, "migrate_schemas_safe", "--tenant", "-v0", env=POOLER_SAFE)
    assert result.returncode == 0, result.stderr
    with connect(url) as conn:
        for n in range(100):
            conn.execute(
                "INSERT INTO bench.shop_product (name, sku, price_cents) VALUES (%s, '', %s)",
                [f"product {n}", n],
            )
        conn.execute(
            "INSERT INTO bench.notes_note (title, body, pinned) "
            "SELECT 'note ' || n, repeat('x', 100), n % 2 = 0 "
            f"FROM generate_series(1, {ITERATOR_ROWS}) n"
        )
    _async.prepare_stream(url)


def run_worker(url: str, queries: int, rounds: int, direct: str | None = None) -> dict[str, Any]:
    env = {**os.environ, **POOLER_SAFE, "DATABASE_URL": url}
    if direct:
        env["DATABASE_DIRECT_URL"] = direct
    args = ["--worker", "--queries", str(queries), "--rounds", str(rounds)]
    return run_json("bench.bench_runtime_guard", *args, env=env)


def report(endpoint: str, data: dict[str, Any]) -> None:
    print(
        f"\n{endpoint}: queries (iterator: rows) per second (median), ratio to default, "
        "round trips per query (iterator: per call)"
    )
    header = f"  {'workload':<11}" + "".join(f"{v:>22}" for v in VARIANTS)
    print(header)
    for workload in WORKLOADS:
        qps, ratio = data["qps"][workload], data["ratio"][workload]
        trips = data["round_trips"][workload]
        cells = [f"{qps[v]:7.0f} {ratio[v]:4.2f}x {trips[v]:4.1f}rt" for v in VARIANTS]
        print(f"  {workload:<11}" + "".join(f"{c:>22}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--async-only", action="store_true", help="only the ASGI and stream memory rows"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.worker:
        print(json.dumps(worker(ns.queries, ns.rounds)))
        return

    with server():
        from testproject.dbtools import direct_url, fresh_database, with_dbname

        with fresh_database("bguard") as name:
            direct = with_dbname(direct_url(), name)
            prepare(direct)
            endpoints = {"direct": direct}
            if os.environ.get("PGBOUNCER_URL"):
                endpoints["pgbouncer"] = with_dbname(os.environ["PGBOUNCER_URL"], name)
            results = {
                label: run_worker(
                    url, ns.queries, ns.rounds, direct if label == "pgbouncer" else None
                )
                for label, url in endpoints.items()
                if not ns.async_only
            }
            if "pgbouncer" in endpoints:
                rows = _async.measure(direct, endpoints["pgbouncer"], rounds=ns.rounds)
        for label, data in results.items():
            report(label, data)
        if results:
            ratio = results["direct"]["ratio"]["orm get"]["guard"]
            print(
                f"\nguard / default, ORM autocommit queries, direct: {ratio:.2f} (target >= 0.80)"
            )
        if "pgbouncer" in results:
            paired = results["pgbouncer"]["iterator_against_direct"]
            print(
                f"iterator(), guard through pgbouncer / default direct: {paired:.2f} "
                "(paired in one process; target >= 0.80)"
            )
        if "pgbouncer" in endpoints:
            _async.report(rows)


if __name__ == "__main__":
    main()
