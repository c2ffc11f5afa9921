"""A throwaway Citus cluster: a coordinator and two workers on loopback, with pgbouncer in
transaction pooling in front of the coordinator, all in one directory.

The ``citus`` tests start it on first use and share it. Under runtests.py it lives inside the
main throwaway cluster's directory (``TENANTSAFE_CLUSTER_DIR``), so every test process of the
run (xdist workers too) finds the one that the first of them started (under a file lock, its
URLs in ``citus.json``), and stopping the main cluster stops it. Without that directory the
caller owns the cluster it gets and stops it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

from testproject.cluster import Cluster, ClusterUnavailable, find_pg_bindir, find_pgbouncer

INSTALL_HINT = (
    "Citus is not installed for this PostgreSQL ({lib}/citus.so is missing): "
    "bash ../shared/citus/install.sh (see docs/citus.md)"
)
WORKERS = 2
SHARDING = "citus.enable_schema_based_sharding"
DATABASE = "tenantsafe"
# Each server preloads Citus; logical decoding lets citus_schema_move copy a schema online.
# No SSL between the nodes on loopback: libpq would otherwise look for client certificates in
# the home directory of the user who started the servers (root's, unreadable to them).
_SETTINGS = (
    "shared_preload_libraries=citus",
    "wal_level=logical",
    "citus.node_conninfo=sslmode=disable",
)


def missing() -> str:
    """Why a Citus cluster cannot start here; empty when it can."""
    bindir = find_pg_bindir()
    if bindir is None:
        return "no PostgreSQL server binaries (initdb, pg_ctl) found"
    lib = bindir.parent / "lib"
    if not (lib / "citus.so").exists():
        return INSTALL_HINT.format(lib=lib)
    if find_pgbouncer() is None:
        return "pgbouncer is not installed (apt-get install pgbouncer)"
    return ""


class CitusCluster(Cluster):
    def __init__(self, directory: Path) -> None:
        super().__init__(pgbouncer=True, quiet=True)
        self.dir = directory
        self.worker_ports: list[int] = []

    def start(self) -> CitusCluster:
        assert self.dir is not None
        self.dir.mkdir(mode=0o755)
        if self.user is not None:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self._started = True
        self.port = self._start_server(self.dir / "coordinator", *_SETTINGS)
        self.worker_ports = [
            self._start_server(self.dir / f"worker{n}", *_SETTINGS) for n in range(1, WORKERS + 1)
        ]
        for port in (self.port, *self.worker_ports):
            self._createdb(DATABASE, port)
            self.sql(port, "CREATE EXTENSION citus")
        self.sql(self.port, f"SELECT citus_set_coordinator_host('127.0.0.1', {self.port})")
        for port in self.worker_ports:
            self.sql(self.port, f"SELECT citus_add_node('127.0.0.1', {port})")
        self.sql(
            self.port, f"ALTER DATABASE {DATABASE} SET citus.enable_schema_based_sharding = on"
        )
        if self.pgbouncer_bin is None:
            raise ClusterUnavailable("pgbouncer is not installed (apt-get install pgbouncer)")
        self._start_pgbouncer()
        return self

    def sql(self, port: int, statement: str) -> None:
        from testproject.dbtools import connect

        with connect(f"postgres://postgres@127.0.0.1:{port}/{DATABASE}") as conn:
            conn.execute(statement)

    def environ(self) -> dict[str, str]:
        assert self.dir is not None
        assert self.pooled_url is not None
        return {
            "CITUS_URL": self.url,
            "CITUS_PGBOUNCER_URL": self.pooled_url,
            "CITUS_WORKER_URLS": " ".join(
                f"postgres://postgres@127.0.0.1:{port}/{DATABASE}" for port in self.worker_ports
            ),
            "CITUS_DIR": str(self.dir),
        }

    def stop(self) -> None:
        if self._started and self.dir is not None:
            self._started = False
            self.stop_everything_in(self.dir)


def shared(parent: Path) -> dict[str, str]:
    """The Citus cluster in ``parent`` (see the module docstring): its :meth:`environ`."""
    with (parent / "citus.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = parent / "citus.json"
        if state.exists():
            found: dict[str, str] = json.loads(state.read_text())
            return found
        cluster = CitusCluster(parent / "citus")
        try:
            cluster.start()
        except BaseException:
            cluster.stop()
            shutil.rmtree(parent / "citus", ignore_errors=True)
            raise
        env = cluster.environ()
        state.write_text(json.dumps(env))
        return env


def create_database(env: dict[str, str], name: str, *, sharding: bool = True) -> str:
    """A new Citus database ``name`` on every node of ``env``'s cluster: its coordinator URL.

    Citus keeps its nodes per database, so each new one is set up as the cluster's first was.
    """
    from testproject.dbtools import connect, with_dbname

    coordinator = env["CITUS_URL"]
    with connect(coordinator) as conn:
        conn.execute("SET citus.enable_create_database_propagation = on")
        conn.execute(f'CREATE DATABASE "{name}"')
    for worker in env["CITUS_WORKER_URLS"].split():
        with connect(with_dbname(worker, name)) as conn:
            conn.execute("CREATE EXTENSION citus")
    url = with_dbname(coordinator, name)
    with connect(url) as conn:
        conn.execute("CREATE EXTENSION citus")
        conn.execute("SELECT citus_set_coordinator_host('127.0.0.1', %s)", [_port(coordinator)])
        for worker in env["CITUS_WORKER_URLS"].split():
            conn.execute("SELECT citus_add_node('127.0.0.1', %s)", [_port(worker)])
        if sharding:
            conn.execute(f'ALTER DATABASE "{name}" SET {SHARDING} = on')
    return url


def drop_database(env: dict[str, str], name: str) -> None:
    from testproject.dbtools import connect

    with connect(env["CITUS_URL"]) as conn:
        conn.execute("SET citus.enable_create_database_propagation = on")
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


def _worker_data(env: dict[str, str], number: int) -> Path:
    return Path(env["CITUS_DIR"]) / f"worker{number}"


def stop_worker(env: dict[str, str], number: int) -> None:
    """Stop worker ``number`` (1-based) the way a crash would: immediately."""
    node = CitusCluster(Path(env["CITUS_DIR"]))
    node._run(node.bindir / "pg_ctl", "-D", _worker_data(env, number), "-m", "immediate", "stop")


def start_worker(env: dict[str, str], number: int) -> None:
    """Start worker ``number`` again, and have pgbouncer replace its server connections:
    a coordinator session that had a connection to the worker cached fails its next DDL once
    ("failure on connection marked as essential"), which the next test must not meet."""
    node = CitusCluster(Path(env["CITUS_DIR"]))
    node.pg_ctl_start(_worker_data(env, number))
    port = env["CITUS_PGBOUNCER_URL"].rsplit(":", 1)[1].split("/")[0]
    node._run(
        node.bindir / "psql",
        "-X",
        "-h",
        "127.0.0.1",
        "-p",
        port,
        "-U",
        "postgres",
        "-d",
        "pgbouncer",
        "-c",
        "RECONNECT",
    )
