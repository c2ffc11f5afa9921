"""Fault injection for migrate_schemas_safe: a pgbouncer the test owns, runs it can stop.

Everything here is real: a pgbouncer process in transaction pooling that a test can PAUSE,
``kill -9`` and start again on the same port; ``manage.py`` runs in subprocesses that a test
signals; and a file handshake with the hooks in ``testproject/faults.py`` that holds a run at a
known point (``TESTPROJECT_HOLD``) until the test lets it go. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from testproject.cluster import _server_user, find_pg_bindir, find_pgbouncer, free_port
from tests.dbtools import ROOT, connect, skip_unless_local, with_dbname


def _psql() -> str:
    bindir = find_pg_bindir()
    if bindir is not None and (bindir / "psql").exists():
        return str(bindir / "psql")
    return shutil.which("psql") or "psql"


def wait_for(what: str, predicate: Any, *, timeout: float, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Bouncer:
    """A pgbouncer in transaction pooling in front of ``server_url``'s PostgreSQL."""

    def __init__(
        self,
        server_url: str,
        *,
        pool_size: int = 4,
        query_wait_timeout: int = 30,
        max_client_conn: int = 200,
    ) -> None:
        binary = find_pgbouncer()
        if binary is None:
            skip_unless_local("pgbouncer is not installed (apt-get install pgbouncer)")
        self.binary = binary
        server = urlsplit(server_url)
        self.server_host = server.hostname or "127.0.0.1"
        self.server_port = server.port or 5432
        self.pool_size = pool_size
        self.query_wait_timeout = query_wait_timeout
        self.max_client_conn = max_client_conn
        self.user = _server_user()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="tenantsafe-bouncer-"))
        self.dir.chmod(0o755)
        if self.user is not None:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, dbname: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{dbname}"

    @property
    def log(self) -> str:
        path = self.dir / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _write_ini(self) -> Path:
        (self.dir / "users.txt").write_text('"postgres" ""\n')
        ini = self.dir / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"* = host={self.server_host} port={self.server_port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            # No unix socket: a socket file left by kill -9 must not stop the restart.
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.dir / 'users.txt'}\n"
            "admin_users = postgres\n"
            "pool_mode = transaction\n"
            f"max_client_conn = {self.max_client_conn}\n"
            f"default_pool_size = {self.pool_size}\n"
            "reserve_pool_size = 0\n"
            f"query_wait_timeout = {self.query_wait_timeout}\n"
            "server_reset_query =\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
            f"logfile = {self.dir / 'pgbouncer.log'}\n"
        )
        return ini

    def start(self) -> Bouncer:
        assert self.process is None or self.process.poll() is not None, "already running"
        ini = self._write_ini()
        kwargs: dict[str, Any] = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid}
        self.process = subprocess.Popen(
            [self.binary, str(ini)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            **kwargs,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"pgbouncer exited with {self.process.returncode}:\n{self.log[-2000:]}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return self
            time.sleep(0.05)
        pytest.fail(f"pgbouncer did not listen on {self.port} within 20s:\n{self.log[-2000:]}")

    def kill(self) -> None:
        """``kill -9``: every client and server connection it carried is gone at once."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def admin(self, command: str, *, timeout: float = 30) -> tuple[float, str]:
        """Run ``command`` (``PAUSE``, ``RESUME``, ``SHOW POOLS``...) on the admin console;
        (seconds it took, its output). Fails the test if it takes longer than ``timeout``.

        psql, not psycopg: the admin console speaks the simple query protocol only.
        """
        argv = [_psql(), "-XA", "-h127.0.0.1", f"-p{self.port}", "-Upostgres", "-dpgbouncer"]
        started = time.monotonic()
        try:
            result = subprocess.run(
                [*argv, "-c", command],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"pgbouncer {command} did not complete within {timeout:.0f}s")
        assert result.returncode == 0, f"pgbouncer {command}: {result.stderr}"
        return time.monotonic() - started, result.stdout

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def bouncer(server_url: str, **settings: Any) -> Iterator[Bouncer]:
    """A running pgbouncer of the test's own; killed and removed however the test ends."""
    instance = Bouncer(server_url, **settings)
    try:
        yield instance.start()
    finally:
        instance.close()


class Run:
    """``python -m testproject.manage ...`` in the background, its output in files.

    Files, not pipes: a run held at a hook would block on a full pipe that nobody reads.
    """

    def __init__(self, url: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.dir = Path(tempfile.mkdtemp(prefix="tenantsafe-run-"))
        self._out = open(self.dir / "stdout", "w+b")  # noqa: SIM115 - closed in close()
        self._err = open(self.dir / "stderr", "w+b")  # noqa: SIM115
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "testproject.manage", *args],
            cwd=ROOT,
            env={**os.environ, "DATABASE_URL": url, **(env or {})},
            stdout=self._out,
            stderr=self._err,
        )
        self.pid = self.process.pid
        self.elapsed = 0.0

    @property
    def stdout(self) -> str:
        return (self.dir / "stdout").read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return (self.dir / "stderr").read_text(errors="replace")

    def running(self) -> bool:
        return self.process.poll() is None

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def deliver(self, signum: int, *, timeout: float = 30) -> None:
        """Send ``signum`` and wait until the process has taken it: no longer pending, and its
        main thread back to sleep (in a hold, say) after running the handler. Two signals
        sent quicker than that may reach the handler as one."""
        self.process.send_signal(signum)
        bit = 1 << (signum - 1)

        def taken() -> bool:
            if not self.running():
                return True
            fields = dict(
                line.split(":", 1)
                for line in Path(f"/proc/{self.pid}/status").read_text().split("\n")
                if ":" in line
            )
            pending = int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)
            return not pending & bit and fields["State"].strip().startswith("S")

        wait_for(f"{self!r} to take signal {signum}", taken, timeout=timeout, interval=0.01)

    def wait(self, timeout: float = 120) -> int:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(
                f"manage.py {' '.join(self.args)} did not finish within {timeout:.0f}s\n"
                f"stdout: {self.stdout[-2000:]}\nstderr: {self.stderr[-3000:]}"
            )
        self.elapsed = time.monotonic() - self.started
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                # A stopped process takes SIGKILL too; SIGCONT lets it be reaped at once.
                os.kill(self.pid, signal.SIGCONT)
                self.process.kill()
            self.process.wait(10)

    def close(self) -> None:
        self.kill()
        self._out.close()
        self._err.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"Run(pid={self.pid}, args={self.args}, rc={self.process.returncode})"


@contextlib.contextmanager
def runs() -> Iterator[Any]:
    """A factory of background runs, each killed and cleaned up when the block ends."""
    started: list[Run] = []

    def start(url: str, *args: str, env: dict[str, str] | None = None) -> Run:
        run = Run(url, *args, env=env)
        started.append(run)
        return run

    try:
        yield start
    finally:
        for run in started:
            run.close()


class Hold:
    """The test's end of ``TESTPROJECT_HOLD``: a run stops at ``point`` in ``schema``."""

    def __init__(self, point: str, schema: str) -> None:
        self.point = point
        self.schema = schema
        self.dir = Path(tempfile.mkdtemp(prefix="tenantsafe-hold-"))

    @property
    def env(self) -> dict[str, str]:
        return {"TESTPROJECT_HOLD": f"{self.dir}:{self.point}:{self.schema}"}

    def wait(self, run: Run, *, timeout: float = 90, in_worker: bool = False) -> dict[str, int]:
        """The held process's pid and its migrating backend's pid, once it is held; the run's
        own process, or (``in_worker``) one of its worker processes."""
        held = self.dir / "held"

        def arrived() -> bool:
            if held.exists():
                return True
            if not run.running():
                pytest.fail(
                    f"{run!r} ended before reaching {self.point} in {self.schema}\n"
                    f"stdout: {run.stdout[-2000:]}\nstderr: {run.stderr[-3000:]}"
                )
            return False

        wait_for(f"{run!r} to reach {self.point} in {self.schema}", arrived, timeout=timeout)
        data: dict[str, int] = json.loads(held.read_text())
        assert (data["pid"] != run.pid) if in_worker else (data["pid"] == run.pid), data
        return data

    def release(self) -> None:
        (self.dir / "go").touch()

    def close(self) -> None:
        self.release()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def hold(point: str, schema: str) -> Iterator[Hold]:
    instance = Hold(point, schema)
    try:
        yield instance
    finally:
        instance.close()


class OpenRead:
    """A session in an open read transaction on ``table``: it holds ACCESS SHARE until
    released, as any reader in the middle of a request does."""

    def __init__(self, url: str, table: str) -> None:
        self.conn = connect(url)
        self.conn.execute("BEGIN")
        self.conn.execute(f"SELECT count(*) FROM {table}").fetchall()
        self.pid = int(self.conn.execute("SELECT pg_backend_pid()").fetchone()[0])

    def release(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.execute("ROLLBACK")

    def close(self) -> None:
        self.release()
        with contextlib.suppress(Exception):
            self.conn.__exit__(None, None, None)


@contextlib.contextmanager
def open_read(url: str, table: str) -> Iterator[OpenRead]:
    holder = OpenRead(url, table)
    try:
        yield holder
    finally:
        holder.close()


class Reader(threading.Thread):
    """Another client of ``table``, reading it again and again: how long does each read wait?"""

    def __init__(self, url: str, table: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.table = table
        self.stop = threading.Event()
        self.times: list[float] = []
        self.errors: list[BaseException] = []
        self.pid = 0

    def run(self) -> None:
        try:
            with connect(self.url) as conn:
                self.pid = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
                while not self.stop.is_set():
                    started = time.monotonic()
                    conn.execute(f"SELECT count(*) FROM {self.table}").fetchall()
                    self.times.append(time.monotonic() - started)
                    time.sleep(0.05)
        except BaseException as exc:  # pragma: no cover - asserted in longest
            self.errors.append(exc)

    @property
    def longest(self) -> float:
        assert not self.errors, self.errors
        assert self.times, "the reader never got an answer"
        return max(self.times)


@contextlib.contextmanager
def reading(url: str, table: str) -> Iterator[Reader]:
    """A Reader, not started (the test starts it when it wants); stopped when the block ends."""
    reader = Reader(url, table)
    try:
        yield reader
    finally:
        reader.stop.set()
        if reader.is_alive():
            reader.join(30)


def lock_waiters(url: str, relation: str, mode: str | None = None) -> list[int]:
    """Backends waiting for a lock on ``relation`` (schema-qualified, unquoted), in ``mode``
    (``AccessExclusiveLock``...) if given."""
    with connect(url) as conn:
        rows = conn.execute(
            "SELECT l.pid FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE NOT l.granted AND n.nspname || '.' || c.relname = %s "
            "AND l.mode = coalesce(%s, l.mode)",
            [relation, mode],
        ).fetchall()
    return [int(row[0]) for row in rows]


def named(url: str, application_name: str) -> str:
    """``url`` whose connections carry ``application_name``, to find them in pg_stat_activity."""
    parts = urlsplit(url)
    return parts._replace(query=f"application_name={application_name}").geturl()


def backends(url: str, application_name: str) -> list[int]:
    with connect(with_dbname(url, "postgres")) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s ORDER BY pid",
            [application_name],
        ).fetchall()
    return [int(row[0]) for row in rows]


def terminate(url: str, pid: int) -> bool:
    with connect(with_dbname(url, "postgres")) as conn:
        return bool(conn.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone()[0])


class LeaseGate:
    """The test's own open transaction that has updated ``schema``'s lease row (to itself).

    A run that tries to take the lease meanwhile waits for that transaction (``INSERT ... ON
    CONFLICT`` waits for a row version in progress), which pg_locks shows: the observable
    event "another run waits for this tenant". The holder's fence (``FOR KEY SHARE``) does
    not wait for it; its heartbeat does, so keep the gate shut for moments only.
    """

    def __init__(self, url: str, schema: str) -> None:
        self.url = url
        self.schema = schema
        self.conn = connect(url)
        self.conn.execute("BEGIN")
        row = self.conn.execute(
            "UPDATE public.tenantsafe_lease SET expires_at = expires_at WHERE schema_name = %s "
            "RETURNING pg_current_xact_id()::text",
            [schema],
        ).fetchone()
        assert row is not None, f"nobody holds the lease on {schema}"
        self.xid = str(row[0])

    def takers(self) -> list[int]:
        """Backends waiting to take the lease."""
        with connect(self.url) as conn:
            rows = conn.execute(
                "SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'transactionid' AND NOT l.granted "
                "AND l.transactionid::text = %s AND a.query ~ 'INSERT INTO \\S*tenantsafe_lease'",
                [self.xid],
            ).fetchall()
        return [int(row[0]) for row in rows]

    def wait_for_taker(self, run: Run, *, timeout: float = 90) -> list[int]:
        """Until ``run`` (or any other) tries to take the lease; fails if ``run`` ends first."""

        def waiting() -> list[int]:
            if not run.running():
                pytest.fail(
                    f"{run!r} ended before it tried to take the lease on {self.schema}\n"
                    f"stdout: {run.stdout[-2000:]}\nstderr: {run.stderr[-3000:]}"
                )
            return self.takers()

        return list(
            wait_for(f"{run!r} to wait for the lease on {self.schema}", waiting, timeout=timeout)
        )

    def open(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.execute("COMMIT")

    def close(self) -> None:
        self.open()
        with contextlib.suppress(Exception):
            self.conn.__exit__(None, None, None)


@contextlib.contextmanager
def lease_gate(url: str, schema: str) -> Iterator[LeaseGate]:
    """A :class:`LeaseGate`, opened when the block ends."""
    gate = LeaseGate(url, schema)
    try:
        yield gate
    finally:
        gate.close()
