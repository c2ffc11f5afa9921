"""What a Citus cluster accepts from tenantsafe: the experiments behind docs/citus.md.

    python -m bench.probe_citus            # starts a three-node cluster of its own (~10 s)
    CITUS_URL=... CITUS_WORKER_URLS="..." python -m bench.probe_citus

Each line printed is one experiment: what was sent, and what happened. Needs Citus
(bash ../shared/citus/install.sh) and psycopg 3 (pipelines).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg

CHECK = (
    "SELECT CASE WHEN set_config('search_path', 'probe_a', true) IS NULL THEN NULL "
    "WHEN current_schema() = 'probe_a' THEN current_schema() "
    "ELSE ('tenantsafe-search-path:' || coalesce(current_schema(), '-'))::int::text END"
)
STATEMENTS = {
    "SELECT": "SELECT count(*) FROM item",
    "INSERT": "INSERT INTO item (label) VALUES ('x') RETURNING id",
    "UPDATE": "UPDATE item SET label = label WHERE id = 1",
    "CREATE TABLE": "CREATE TABLE extra_{n} (id bigserial PRIMARY KEY)",
    "ALTER TABLE ADD COLUMN": "ALTER TABLE item ADD COLUMN c_{n} integer NULL",
    "CREATE INDEX": "CREATE INDEX item_{n} ON item (label)",
    "ADD CONSTRAINT": "ALTER TABLE item ADD CONSTRAINT k_{n} CHECK (id > 0)",
    "RENAME TABLE": "ALTER TABLE extra_{m} RENAME TO renamed_{n}",
}


def connect(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True, prepare_threshold=None)


def outcome(run: Callable[[], object]) -> str:
    started = time.monotonic()
    try:
        run()
    except psycopg.Error as exc:
        first = str(exc).splitlines()[0]
        return f"ERROR after {time.monotonic() - started:.2f}s: {first}"
    return f"ok in {time.monotonic() - started:.2f}s"


def forms(url: str) -> None:
    """The pinning forms: one simple query, a pipeline, and step by step."""
    n = 0
    created: dict[str, int] = {}  # form -> the n of the table CREATE TABLE made with it
    for name, template in STATEMENTS.items():
        for form in ("merged (simple query)", "pipeline", "step by step"):
            n += 1
            if name == "CREATE TABLE":
                created[form] = n
            with connect(url) as conn:
                result = outcome(_pinned(conn, form, template.format(n=n, m=created.get(form))))
            print(f"  {name:24} {form:22} {result}")


def _pinned(conn: psycopg.Connection[Any], form: str, statement: str) -> Callable[[], object]:
    if form.startswith("merged"):
        client = psycopg.ClientCursor(conn)
        return lambda: client.execute(f"{CHECK}; {statement}")
    if form == "pipeline":
        return lambda: _pipelined(conn, [CHECK, statement])
    return lambda: _steps(conn, [CHECK, statement])


def _pipelined(conn: psycopg.Connection[Any], statements: list[str]) -> None:
    with conn.pipeline():
        conn.execute("BEGIN")
        for statement in statements:
            conn.execute(statement)
        conn.execute("COMMIT")


def _steps(conn: psycopg.Connection[Any], statements: list[str]) -> None:
    with conn.transaction():
        for statement in statements:
            conn.execute(statement)


def paths(url: str) -> None:
    for query in ("SELECT current_schema()", "SELECT current_schema(), count(*) FROM item"):
        with connect(url) as conn:
            conn.execute("BEGIN")
            conn.execute("SELECT set_config('search_path', 'probe_a', true)")
            row = conn.execute(query).fetchone()
            conn.execute("ROLLBACK")
        print(f"  after set_config('search_path', 'probe_a', true): {query} -> {row}")


@contextlib.contextmanager
def held(url: str, statement: str) -> Iterator[None]:
    """``statement`` run in a transaction on ``url`` that stays open in the block."""
    with connect(url) as conn:
        conn.execute("BEGIN")
        conn.execute(statement)
        try:
            yield
        finally:
            conn.execute("ROLLBACK")


def blocked(url: str, statements: list[str], *, limit: float = 4.0) -> str:
    """Run ``statements`` in one transaction; cancelled after ``limit`` seconds."""
    with connect(url) as conn:
        timer = threading.Timer(limit, conn.cancel)
        timer.start()
        try:
            return outcome(lambda: _steps(conn, statements))
        finally:
            timer.cancel()


def lock_timeouts(url: str, worker: str, shard: str) -> None:
    """Whether the coordinator's lock_timeout reaches a wait on the worker."""
    by_set_config = ["SELECT set_config('lock_timeout', '300', true)"]
    by_set_local = [
        "SELECT set_config('citus.propagate_set_commands', 'local', true)",
        "SET LOCAL lock_timeout = '300ms'",
    ]
    ddl = "ALTER TABLE probe_a.item ADD COLUMN waits integer"
    dml = "UPDATE probe_a.item SET label = label WHERE id = 1"
    cases = [
        ("DDL; the shell table read in an open transaction", url, "TABLE probe_a.item", ddl),
        ("DDL; the shard read in an open transaction on the worker", worker, f"TABLE {shard}", ddl),
        ("UPDATE; the row locked through the coordinator", url, dml, dml),
    ]
    for label, holder, hold, statement in cases:
        for how, prefix in (("set_config", by_set_config), ("SET LOCAL", by_set_local)):
            with held(holder, hold):
                result = blocked(url, [*prefix, statement])
            print(f"  {label}; lock_timeout by {how}: {result}")


def set_local_in_a_string(url: str) -> None:
    with connect(url) as conn:
        conn.execute("SET citus.propagate_set_commands = 'local'")
        client = psycopg.ClientCursor(conn)
        result = outcome(
            lambda: client.execute(
                "SET LOCAL lock_timeout = '300ms'; INSERT INTO probe_a.note (label) VALUES ('y')"
            )
        )
    print(f"  'SET LOCAL ...; INSERT ...' as one string, propagate_set_commands=local: {result}")


def advisory(url: str, worker: str) -> None:
    update = "UPDATE probe_a.item SET label = label WHERE id = 1"
    with held(url, update), connect(url) as waiter:
        thread = threading.Thread(target=lambda: outcome(lambda: waiter.execute(update)))
        thread.start()
        with connect(worker) as conn:
            on_worker: list[Any] = []
            deadline = time.monotonic() + 30
            while not on_worker:  # until the second update waits
                if time.monotonic() > deadline:
                    sys.exit("the second update never waited on the worker")
                on_worker = conn.execute(
                    "SELECT wait_event_type, wait_event FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock'"
                ).fetchall()
        with connect(url) as conn:
            on_coordinator = conn.execute(
                "SELECT locktype, mode, granted FROM pg_locks "
                "WHERE pid <> pg_backend_pid() AND database = "
                "(SELECT oid FROM pg_database WHERE datname = current_database()) "
                "AND locktype IN ('advisory', 'transactionid') ORDER BY 1, 3"
            ).fetchall()
        waiter.cancel()
        thread.join()
    print(f"  a row update waiting for another: coordinator pg_locks {on_coordinator}")
    print(f"  ... the wait itself, on the worker: {on_worker}")


def catalogs(url: str, worker: str) -> None:
    query = (
        "SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        " WHERE n.nspname = 'probe_a' AND c.relkind = %s) FROM (VALUES (1)) v"
    )
    for kind, label in (("r", "tables"), ("i", "indexes"), ("S", "sequences")):
        with connect(url) as a, connect(worker) as b:
            here = a.execute(query, [kind]).fetchone()
            there = b.execute(query, [kind]).fetchone()
        print(f"  {label} of probe_a in pg_class: coordinator {here[0]}, worker {there[0]}")  # type: ignore[index]
    with connect(url) as conn:
        value = conn.execute("SELECT last_value FROM probe_a.item_id_seq").fetchone()
    print(f"  probe_a.item_id_seq on the coordinator after the inserts: last_value {value[0]}")  # type: ignore[index]


def schemas(url: str) -> None:
    with connect(url) as conn:
        conn.execute("CREATE SCHEMA probe_spare")
        conn.execute("CREATE TABLE probe_spare.t (id bigserial PRIMARY KEY)")
        before = conn.execute(
            "SELECT colocation_id FROM citus_schemas "
            "WHERE schema_name = 'probe_spare'::regnamespace"
        ).fetchone()
        conn.execute("ALTER SCHEMA probe_spare RENAME TO probe_claimed")
        after = conn.execute(
            "SELECT colocation_id FROM citus_schemas "
            "WHERE schema_name = 'probe_claimed'::regnamespace"
        ).fetchone()
        print(f"  a distributed schema renamed: colocation {before} -> {after}")
        conn.execute("SET citus.enable_schema_based_sharding = off")
        conn.execute("CREATE SCHEMA probe_old")
        conn.execute("CREATE TABLE probe_old.t (id bigserial PRIMARY KEY)")
        conn.execute("RESET citus.enable_schema_based_sharding")
        found = conn.execute(
            "SELECT count(*) FROM citus_schemas WHERE schema_name = 'probe_old'::regnamespace"
        ).fetchone()
        print(f"  made with sharding off: {found[0]} distributed")  # type: ignore[index]
        conn.execute("SELECT citus_schema_distribute('probe_old')")
        found = conn.execute(
            "SELECT count(*) FROM citus_schemas WHERE schema_name = 'probe_old'::regnamespace"
        ).fetchone()
        print(f"  after citus_schema_distribute: {found[0]} distributed")  # type: ignore[index]
        conn.execute("CREATE TABLE public.probe_plan (id bigserial PRIMARY KEY)")
        fk = "CREATE TABLE probe_a.sub (id bigserial PRIMARY KEY, plan_id bigint REFERENCES "
        fk += "public.probe_plan (id))"
        print(f"  a foreign key to a public table: {outcome(lambda: conn.execute(fk))}")
        conn.execute("SELECT create_reference_table('public.probe_plan')")
        result = outcome(lambda: conn.execute(fk))
        print(f"  ... once it is a reference table: {result}")
        result = outcome(lambda: conn.execute("ALTER SEQUENCE probe_a.item_id_seq RESTART 100"))
        print(f"  ALTER SEQUENCE in a distributed schema: {result}")


def setup(url: str) -> tuple[str, str]:
    """Schema probe_a with a table; the URL of its worker and its shard's name."""
    with connect(url) as conn:
        conn.execute("DROP SCHEMA IF EXISTS probe_a, probe_claimed, probe_old CASCADE")
        conn.execute("DROP TABLE IF EXISTS public.probe_plan")
        conn.execute("CREATE SCHEMA probe_a")
        conn.execute("CREATE TABLE probe_a.item (id serial PRIMARY KEY, label text)")
        conn.execute("INSERT INTO probe_a.item (label) VALUES ('a'), ('b')")
        conn.execute("CREATE TABLE probe_a.note (label text)")
        port, shard = conn.execute(
            "SELECT nodeport, shard_name FROM citus_shards "
            "WHERE table_name = 'probe_a.item'::regclass"
        ).fetchone()  # type: ignore[misc]
    workers = os.environ["CITUS_WORKER_URLS"].split()
    worker = next(w for w in workers if f":{port}/" in w)
    return worker, shard


@contextlib.contextmanager
def cluster() -> Iterator[str]:
    if os.environ.get("CITUS_URL"):
        yield os.environ["CITUS_URL"]
        return
    from testproject import citus_cluster

    missing = citus_cluster.missing()
    if missing:
        sys.exit(missing)
    directory = Path(tempfile.mkdtemp(prefix="tenantsafe-probe-"))
    directory.chmod(0o755)
    try:
        os.environ.update(citus_cluster.shared(directory))
        yield os.environ["CITUS_URL"]
    finally:
        citus_cluster.CitusCluster(directory / "citus").stop_everything_in(directory)
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    with cluster() as url:
        worker, shard = setup(url)
        with connect(url) as conn:
            version = conn.execute("SELECT citus_version()").fetchone()
        print(f"{version[0]}; probe_a.item is {shard} on {worker}")  # type: ignore[index]
        print("Pinning forms (BEGIN/COMMIT around the pipeline and the steps):")
        forms(url)
        print("The search path:")
        paths(url)
        print("lock_timeout:")
        lock_timeouts(url, worker, shard)
        set_local_in_a_string(url)
        print("Locks:")
        advisory(url, worker)
        print("Catalogs:")
        catalogs(url, worker)
        print("Schemas:")
        schemas(url)


if __name__ == "__main__":
    main()
