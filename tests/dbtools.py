"""Test helpers: the test project's database helpers, and those that need pytest or Django."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import pytest
from django import db

from testproject.dbtools import (
    ROOT,
    connect,
    direct_url,
    fingerprint,
    fresh_database,
    manage,
    manage_at_once,
    public_tables,
    reference_fingerprint,
    register_tenants,
    schemas_named,
    with_dbname,
)

# django-tenants' connection (set_schema, set_tenant, schema_name, ...), which the stubs cannot
# know: Django's default connection, typed for the tests.
connection: Any = db.connection

__all__ = [
    "ROOT",
    "PoolLoad",
    "add_tenant",
    "answer",
    "at_the_gate",
    "connect",
    "connection",
    "database_url",
    "direct_url",
    "doctor_json",
    "fingerprint",
    "fresh_database",
    "has_table",
    "last_output",
    "manage",
    "manage_at_once",
    "migrate",
    "pool_load",
    "pooled_url",
    "public_tables",
    "python_workers",
    "reads",
    "recorded",
    "reference_fingerprint",
    "register_tenants",
    "restore_as",
    "scalar",
    "schemas_named",
    "signup_code",
    "signup_result",
    "signups_at_once",
    "skip_unless_local",
    "sql",
    "start_manage",
    "start_signup",
    "summary",
    "tables",
    "under_ci",
    "with_dbname",
]


def under_ci() -> bool:
    """Whether this is a CI run, where nothing may skip for want of a server: any non-empty
    ``CI`` but ``0`` and ``false`` (``CI=true``, ``CI=1``, ``CI=yes``...)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def skip_unless_local(reason: str) -> NoReturn:
    """Skip for ``reason`` locally; under CI, where it must not happen, fail."""
    if under_ci():
        pytest.fail(f"{reason}, under CI={os.environ['CI']}: it must run in CI")
    pytest.skip(reason)


def pooled_url() -> str:
    url = os.environ.get("PGBOUNCER_URL")
    if not url:
        skip_unless_local("pgbouncer is not installed (apt-get install pgbouncer)")
    return url


def add_tenant(schema: str, *, with_schema: bool = True) -> None:
    """In the Django test database: a tenant row (and an empty schema), unmigrated, as a
    signup that leaves migrations to the next deploy would leave it."""
    connection.set_schema_to_public()
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO customers_client (schema_name, name, created_on) VALUES (%s, %s, now())",
            [schema, schema],
        )
        if with_schema:
            cursor.execute('CREATE SCHEMA "%s"' % schema.replace('"', '""'))


class PoolLoad:
    """The other clients of :func:`pool_load`: how many queries each has run, what went wrong."""

    def __init__(self, clients: int) -> None:
        self.queries = [0] * clients
        self.errors: list[BaseException] = []
        self.stop = threading.Event()

    def progressed_since(self, seen: list[int]) -> bool:
        return all(now > then for now, then in zip(self.queries, seen, strict=True))

    def wait_running(self, *, reconnect: bool = False) -> None:
        """Until every client has run another query (fails the test if one stopped)."""
        seen = list(self.queries)
        deadline = time.monotonic() + 60
        while not self.progressed_since(seen) and time.monotonic() < deadline:
            assert reconnect or not self.errors, self.errors
            time.sleep(0.05)
        assert self.progressed_since(seen), (
            f"the other clients on the pool stopped: queries per client {self.queries} "
            f"(at the end of the block {seen}); errors: {self.errors[-3:]}"
        )


@contextlib.contextmanager
def pool_load(
    url: str, paths: list[str], *, clients: int = 4, reconnect: bool = False, check: bool = True
) -> Iterator[PoolLoad]:
    """Other clients sharing the pgbouncer pool, as in production, until the block ends.

    Each one keeps issuing a session-level SET to one of ``paths`` (as django-tenants does for
    the tenants it serves) and a query in autocommit, so the server connections the pool hands
    out carry other search paths. When the block is done, every client must still be running
    queries (each runs more after it), so no test ends with the pool to itself. With
    ``reconnect``, for tests that take the pooler down, a client whose connection is lost
    connects again. Without ``check`` the block checks nothing (the test reads the yielded
    :class:`PoolLoad` itself, say after a failure of its own that stopped the clients).
    """
    load = PoolLoad(clients)

    def client(n: int) -> None:
        i = n
        while not load.stop.is_set():
            try:
                with connect(url) as conn:
                    while not load.stop.is_set():
                        conn.execute(f"SET search_path = {paths[i % len(paths)]}")
                        conn.execute("SELECT 1")
                        load.queries[n] += 1
                        i += 1
                        # Hundreds of SETs a second each, without taking a core from the test.
                        load.stop.wait(0.001)
            except Exception as exc:
                if load.stop.is_set():
                    return
                load.errors.append(exc)
                if not reconnect:
                    return
                time.sleep(0.1)  # the pooler is down: try again shortly

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    try:
        yield load
        if check:
            load.wait_running(reconnect=reconnect)
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(30)
    assert not check or reconnect or not load.errors, load.errors


def python_workers(code: str, groups: list[list[str]], env: dict[str, str]) -> dict[str, Any]:
    """``python -c code *group`` in a process of its own per group, all at once, from the
    repository root with ``env``: the JSON objects their last lines print, merged."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, *group],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for group in groups
    ]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    merged: dict[str, Any] = {}
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
        merged.update(json.loads(out.strip().splitlines()[-1]))
    return merged


# Through Django's connection (the test database), always on the public schema's path.


def database_url() -> str:
    """The test database's URL, for clients outside Django."""
    return with_dbname(direct_url(), connection.settings_dict["NAME"])


def sql(statement: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    connection.set_schema_to_public()
    with connection.cursor() as cursor:
        cursor.execute(statement, params or [])
        return cursor.fetchall() if cursor.description else []


def scalar(statement: str, params: list[Any] | None = None) -> Any:
    return sql(statement, params)[0][0]


def tables(schema: str) -> set[str]:
    return {
        row[0] for row in sql("SELECT tablename FROM pg_tables WHERE schemaname = %s", [schema])
    }


def has_table(schema: str, table: str) -> bool:
    return table in tables(schema)


def recorded(schema: str) -> set[tuple[str, str]]:
    """The (app, name) rows of ``schema``'s django_migrations."""
    return {(app, name) for app, name in sql(f'SELECT app, name FROM "{schema}".django_migrations')}


SUMMARY = re.compile(
    r"^migrate_schemas_safe: (?:public \S+; )?(?P<total>\d+) tenant\(s\): "
    r"(?P<migrated>\d+) migrated(?:, (?P<replayed>\d+) replayed)?, (?P<current>\d+) already current"
    r"(?:, (?P<planned>\d+) with a plan shown)?(?:, (?P<pending>\d+) with unapplied migrations)?"
    r", (?P<failed>\d+) failed(?:, (?P<not_attempted>\d+) not attempted)? in \d+\.\ds$",
    re.M,
)


def summary(stdout: str) -> dict[str, int]:
    """The counts of migrate_schemas_safe's summary line (there must be exactly one)."""
    found = SUMMARY.findall(stdout)
    assert len(found) == 1, f"no summary line of its own in:\n{stdout[-3000:]}"
    match = SUMMARY.search(stdout)
    assert match is not None
    return {key: int(value or 0) for key, value in match.groupdict().items()}


_last: list[tuple[str, str]] = [("", "")]


def migrate(*args: str, **options: Any) -> tuple[str, str]:
    """``call_command("migrate_schemas_safe", ...)``: its stdout and stderr (also when it
    raises: then ``last_output()``)."""
    import io

    from django.core.management import call_command

    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("migrate_schemas_safe", *args, stdout=out, stderr=err, **options)
    finally:
        _last[0] = (out.getvalue(), err.getvalue())
    return _last[0]


def last_output() -> tuple[str, str]:
    return _last[0]


def doctor_json(*args: str) -> tuple[dict[str, Any], int]:
    """``tenantsafe_doctor --json``: the report and the exit status."""
    import io

    from django.core.management import call_command
    from django.core.management.base import CommandError

    out = io.StringIO()
    try:
        call_command("tenantsafe_doctor", "--json", *args, stdout=out)
        status = 0
    except CommandError as exc:
        status = exc.returncode
    return json.loads(out.getvalue()), status


# A signup in a process of its own, as a web worker runs it.


def signup_code(schema: str) -> str:
    """Python for ``python -c`` or ``manage.py shell -c``: ``provision()`` a new tenant
    ``schema``, then print as JSON what it answered ("how") and the schemas django-tenants'
    migration machinery ran for in the process ("migrated")."""
    return textwrap.dedent(f"""
        import json, django
        django.setup()
        from django_tenants.signals import schema_pre_migration
        from tenantsafe.provisioning import provision
        from testproject.customers.models import Client
        migrated = []
        schema_pre_migration.connect(
            lambda sender, schema_name, **kw: migrated.append(schema_name), weak=False
        )
        how = provision(Client(schema_name={schema!r}, name={schema.title()!r}))
        print(json.dumps({{"how": how, "migrated": migrated}}))
    """)


def answer(stdout: str) -> dict[str, Any]:
    """What :func:`signup_code` printed."""
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return result


def start_signup(url: str, schema: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """:func:`signup_code` in a new process on ``url``'s database; :func:`signup_result`
    waits for it."""
    return subprocess.Popen(
        [sys.executable, "-c", signup_code(schema)],
        cwd=ROOT,
        env={
            **os.environ,
            "DATABASE_URL": url,
            "DJANGO_SETTINGS_MODULE": "testproject.settings",
            **(env or {}),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def start_manage(url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``python -m testproject.manage *args`` in a new process on ``url``'s database."""
    return subprocess.Popen(
        [sys.executable, "-m", "testproject.manage", *args],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": url, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def signup_result(proc: subprocess.Popen[str], timeout: float = 300) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return answer(out)


def at_the_gate(
    url: str, gate: str, mode: str, start: Callable[[], list[subprocess.Popen[str]]]
) -> list[subprocess.Popen[str]]:
    """The processes ``start()`` starts, let through a lock on table ``gate`` (held in
    ``mode`` meanwhile) once every one of them waits for it: they go on from there at the
    same moment."""
    with connect(url) as conn:
        conn.execute("BEGIN")
        conn.execute(f"LOCK TABLE {gate} IN {mode} MODE")
        procs = start()
        waiting = 0
        deadline = time.monotonic() + 120
        while waiting < len(procs) and time.monotonic() < deadline:
            assert all(proc.poll() is None for proc in procs), [p.communicate() for p in procs]
            time.sleep(0.05)
            waiting = conn.execute(
                "SELECT count(*) FROM pg_locks WHERE relation = %s::regclass AND NOT granted",
                [gate],
            ).fetchone()[0]
        assert waiting == len(procs)
        conn.execute("COMMIT")
    return procs


def signups_at_once(
    url: str, names: list[str], *, gate: str, mode: str, env: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """A signup per name, each in its own process, that reach table ``gate`` at the same
    moment (:func:`at_the_gate`). Their :func:`signup_result`, in the order of ``names``."""
    procs = at_the_gate(url, gate, mode, lambda: [start_signup(url, name, env) for name in names])
    return [signup_result(proc) for proc in procs]


@contextlib.contextmanager
def other_connections_queries() -> Iterator[list[dict[str, str]]]:
    """The queries of the connections other than the test's that are opened while the block
    runs, in any thread (the doctor's reads on connections of their own), as
    CaptureQueriesContext's ``captured_queries``; complete when the block ends."""
    from django.db.backends.signals import connection_created

    opened: list[Any] = []

    def made(sender: Any, connection: Any, **kwargs: Any) -> None:
        connection.force_debug_cursor = True
        opened.append(connection)

    uid = "tests.other_connections_queries"
    connection_created.connect(made, weak=False, dispatch_uid=uid)
    captured: list[dict[str, str]] = []
    try:
        yield captured
    finally:
        connection_created.disconnect(dispatch_uid=uid)
        for other in opened:
            if other is not connection:
                captured.extend(other.queries_log)


def reads(captured: list[dict[str, str]]) -> list[str]:
    """The reads of CaptureQueriesContext's queries: SET search_path and transaction control
    (BEGIN/COMMIT) are not counted."""
    return [q["sql"] for q in captured if q["sql"].lstrip().startswith(("SELECT ", "WITH "))]


def restore_as(source: str, name: str) -> None:
    """A tenant ``name`` whose schema is ``source``'s dumped with pg_dump and restored under
    the new name (with a tenant row and a domain), as a tenant restored from a backup is."""
    url = database_url()
    dump = subprocess.run(
        ["pg_dump", "-n", source, "--no-owner", "--no-privileges", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    renamed = re.sub(rf"(?<![A-Za-z0-9_]){re.escape(source)}(?=[.;\s])", name, dump)
    subprocess.run(
        ["psql", "-q", "-X", "-v", "ON_ERROR_STOP=1", "-1", url],
        input=renamed,
        capture_output=True,
        text=True,
        check=True,
    )
    register_tenants(url, [name], create_schemas=False)
