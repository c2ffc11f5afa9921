"""bench_runtime_guard's rows for #21, measured in the same run as the rest:

* ``asgi``: requests per second through uvicorn (one worker each), the guard through pgbouncer
  against django-tenants unguarded and directly connected. Sync and async views on the async
  ORM, one of them leaving ``async for`` over ``aiterator()`` early. Rounds alternate the two
  servers; the ratio is paired within a round.
* ``stream memory``: an iterate-and-read loop (``iterator(chunk_size=2000)`` over 100,000 model
  instances, a read every 100 rows) in a process of its own: tracemalloc's peak and the growth
  of the resident set, the guard through pgbouncer against unguarded direct.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench._db import median, run_json

PATHS = ["/products/", "/async/products/first/?then=count", "/async/notes/add/?title=bench"]
STREAM_ROWS = 100_000
POOLER_SAFE = {"TESTPROJECT_POOLER_SAFE": "1"}


def _rate(base: tuple[str, int], requests: int, concurrency: int) -> float:
    """Requests per second, ``concurrency`` clients each on one kept-alive connection."""

    def client(n: int) -> None:
        conn = http.client.HTTPConnection(*base, timeout=30)
        try:
            for i in range(n, requests, concurrency):
                conn.request("GET", PATHS[i % len(PATHS)], headers={"Host": "bench.localhost"})
                response = conn.getresponse()
                response.read()
                assert response.status == 200, response.status
        finally:
            conn.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    return requests / (time.perf_counter() - started)


def asgi(direct: str, pooled: str, *, rounds: int, requests: int = 600) -> dict[str, float]:
    from testproject.serving import uvicorn

    def env(url: str, guarded: bool) -> dict[str, str]:
        return {
            **os.environ,
            **POOLER_SAFE,
            "DATABASE_URL": url,
            "TESTPROJECT_RUNTIME_GUARD": "1" if guarded else "0",
        }

    rates: dict[str, list[float]] = {"guarded": [], "direct": []}
    with uvicorn(env(pooled, True)) as (guarded, _), uvicorn(env(direct, False)) as (plain, _):
        bases = {"guarded": guarded, "direct": plain}
        for base in bases.values():
            _rate(base, 100, 8)
        for round_no in range(rounds):
            order = list(bases) if round_no % 2 == 0 else list(bases)[::-1]
            for side in order:
                rates[side].append(_rate(bases[side], requests, 16))
    ratios = [g / d for g, d in zip(rates["guarded"], rates["direct"], strict=True)]
    return {
        "guarded": median(rates["guarded"]),
        "direct": median(rates["direct"]),
        "ratio": median(ratios),
    }


def prepare_stream(url: str) -> None:
    """A tenant ``bigstream`` (registered and migrated by the caller) with 100,000 products."""
    from testproject.dbtools import connect

    with connect(url) as conn:
        conn.execute(
            "INSERT INTO bigstream.shop_product (name, sku, price_cents) "
            "SELECT 'bulk-' || n, repeat('x', 32), n "
            f"FROM generate_series(1, {STREAM_ROWS}) n"
        )


def stream_memory_worker() -> dict[str, Any]:
    import tracemalloc

    import django

    django.setup()
    from django.db import connection

    from testproject.customers.models import Client
    from testproject.shop.models import Product

    connection.set_tenant(Client.objects.get(schema_name="bigstream"))  # type: ignore[attr-defined]
    before = _rss()
    peak_rss = before
    tracemalloc.start()
    count = 0
    for product in Product.objects.iterator(chunk_size=2000):
        count += 1
        if count % 100 == 0:
            assert Product.objects.filter(pk=product.pk).exists()
            peak_rss = max(peak_rss, _rss())
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == STREAM_ROWS, count
    return {"tracemalloc_peak": peak, "rss_growth": peak_rss - before}


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def stream_memory(url: str, guarded: bool) -> dict[str, Any]:
    env = {
        **os.environ,
        **POOLER_SAFE,
        "DATABASE_URL": url,
        "TESTPROJECT_RUNTIME_GUARD": "1" if guarded else "0",
    }
    return run_json("bench._async", "--stream-memory", env=env)


def measure(direct: str, pooled: str, *, rounds: int) -> dict[str, Any]:
    return {
        "asgi": asgi(direct, pooled, rounds=rounds),
        "memory": {
            "guard, pgbouncer": stream_memory(pooled, True),
            "default, direct": stream_memory(direct, False),
        },
    }


def report(rows: dict[str, Any]) -> None:
    asgi = rows["asgi"]
    print(
        f"ASGI (uvicorn, 1 worker), requests per second: guard through pgbouncer "
        f"{asgi['guarded']:.0f}, default direct {asgi['direct']:.0f}: "
        f"{asgi['ratio']:.2f} (paired by round; target >= 0.85)"
    )
    for label, used in rows["memory"].items():
        print(
            f"iterate-and-read over {STREAM_ROWS:,} rows, {label}: tracemalloc peak "
            f"{used['tracemalloc_peak'] / 1e6:.1f} MB, resident set grew "
            f"{used['rss_growth'] / 1e6:.1f} MB"
        )


if __name__ == "__main__" and sys.argv[1:] == ["--stream-memory"]:
    print(json.dumps(stream_memory_worker()))
