"""A throwaway PostgreSQL cluster (and a pgbouncer in transaction pooling in front of it).

Used by runtests.py and manage.py when no DATABASE_URL is set. Everything lives in one
temporary directory that is removed again on exit, Ctrl-C or failure.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

INSTALL_HINT = (
    "tenantsafe: no PostgreSQL server binaries (initdb, pg_ctl) found and DATABASE_URL is not "
    "set; install them (Debian/Ubuntu: apt-get install postgresql) or set DATABASE_URL to a "
    "server, e.g. postgres://user:pass@localhost:5432/tenantsafe"
)


class ClusterUnavailable(RuntimeError):
    pass


def find_pg_bindir() -> Path | None:
    explicit = os.environ.get("TENANTSAFE_PG_BINDIR")
    if explicit:
        # An explicit choice is never second-guessed by a search elsewhere.
        bindir = Path(explicit)
        return bindir if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists() else None
    candidates: list[Path] = []
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(Path(out.stdout.strip()))
    candidates += [
        Path(p)
        for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    ]
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    return None


def _version_key(path: str) -> int:
    try:
        return int(Path(path).parent.name)
    except ValueError:
        return 0


def find_pgbouncer() -> str | None:
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.path.exists(p)), None
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_user() -> pwd.struct_passwd | None:
    """PostgreSQL refuses to run as root: as root, run the servers as ``nobody``."""
    if os.geteuid() != 0:
        return None
    return pwd.getpwnam(os.environ.get("TENANTSAFE_CLUSTER_USER", "nobody"))


class Cluster:
    def __init__(self, *, pgbouncer: bool = True, quiet: bool = False) -> None:
        bindir = find_pg_bindir()
        if bindir is None:
            raise ClusterUnavailable(INSTALL_HINT)
        self.bindir = bindir
        self.pgbouncer_bin = find_pgbouncer() if pgbouncer else None
        self.quiet = quiet
        self.user = _server_user()
        self.dir: Path | None = None
        self.port = 0
        self.bouncer_port = 0
        self._bouncer: subprocess.Popen[bytes] | None = None
        self._started = False

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/tenantsafe"

    @property
    def pooled_url(self) -> str | None:
        if not self._bouncer:
            return None
        return f"postgres://postgres@127.0.0.1:{self.bouncer_port}/tenantsafe"

    def _run(self, *cmd: str | os.PathLike[str]) -> None:
        kwargs: dict[str, object] = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid}
        result = subprocess.run(
            [str(c) for c in cmd],
            capture_output=True,
            text=True,
            check=False,
            cwd=self.dir,
            **kwargs,  # type: ignore[call-overload]
        )
        if result.returncode != 0:
            raise ClusterUnavailable(
                f"{Path(str(cmd[0])).name} failed ({result.returncode}): "
                f"{result.stderr.strip() or result.stdout.strip()}"
            )

    def start(self) -> Cluster:
        base = os.environ.get("TENANTSAFE_CLUSTER_TMPDIR") or tempfile.gettempdir()
        self.dir = Path(tempfile.mkdtemp(prefix="tenantsafe-pg-", dir=base))
        self.dir.chmod(0o755)
        if self.user is not None:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self._started = True
        self.port = self._start_server(self.dir / "data")
        self._createdb("tenantsafe")
        if self.pgbouncer_bin:
            self._start_pgbouncer()
        if not self.quiet:
            pooled = (
                f", pgbouncer (transaction pooling) on {self.bouncer_port}" if self._bouncer else ""
            )
            print(
                f"tenantsafe: throwaway PostgreSQL on 127.0.0.1:{self.port}{pooled} in {self.dir}",
                file=sys.stderr,
            )
        return self

    def _start_server(self, data: Path, *options: str) -> int:
        """initdb ``data`` and start a server on it (with ``name=value`` ``options``); its port."""
        assert self.dir is not None
        self._run(
            self.bindir / "initdb",
            "-D",
            data,
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        port = free_port()
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(port),
            "unix_socket_directories": str(self.dir),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "max_locks_per_transaction": "256",
            **dict(option.split("=", 1) for option in options),
        }
        # In the data directory, not on pg_ctl's command line: a test that stops a server
        # (a Citus worker) starts it again with `pg_ctl start` alone.
        with (data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{name} = '{value}'\n" for name, value in settings.items())
        self.pg_ctl_start(data)
        return port

    def pg_ctl_start(self, data: Path) -> None:
        self._run(
            self.bindir / "pg_ctl",
            "-D",
            data,
            "-l",
            data.parent / f"{data.name}.log",
            "-w",
            "-t",
            "60",
            "start",
        )

    def _createdb(self, name: str, port: int | None = None) -> None:
        self._run(
            self.bindir / "createdb",
            "-h",
            "127.0.0.1",
            "-p",
            str(port or self.port),
            "-U",
            "postgres",
            name,
        )

    def _start_pgbouncer(self) -> None:
        assert self.dir is not None
        assert self.pgbouncer_bin is not None
        self.bouncer_port = free_port()
        (self.dir / "users.txt").write_text('"postgres" ""\n')
        ini = self.dir / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={self.port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.bouncer_port}\n"
            f"unix_socket_dir = {self.dir}\n"
            "auth_type = trust\n"
            f"auth_file = {self.dir / 'users.txt'}\n"
            "admin_users = postgres\n"
            "pool_mode = transaction\n"
            "max_client_conn = 500\n"
            "default_pool_size = 8\n"
            "server_reset_query =\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
            f"logfile = {self.dir / 'pgbouncer.log'}\n"
            # For a process other than its starter to stop it (see stop_everything_in).
            f"pidfile = {self.dir / 'pgbouncer.pid'}\n"
        )
        kwargs: dict[str, object] = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid}
        self._bouncer = subprocess.Popen(  # type: ignore[call-overload]
            [self.pgbouncer_bin, str(ini)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            **kwargs,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._bouncer.poll() is not None:
                raise ClusterUnavailable(
                    f"pgbouncer exited with {self._bouncer.returncode}; "
                    f"see {self.dir}/pgbouncer.log"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.bouncer_port), timeout=0.5),
            ):
                return
            time.sleep(0.05)
        raise ClusterUnavailable("pgbouncer did not start listening within 20 seconds")

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        if self._bouncer is not None:
            with contextlib.suppress(ProcessLookupError):
                self._bouncer.terminate()
            try:
                self._bouncer.wait(10)
            except subprocess.TimeoutExpired:
                self._bouncer.kill()
                self._bouncer.wait()
            self._bouncer = None
        assert self.dir is not None
        self.stop_everything_in(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)

    def stop_everything_in(self, directory: Path) -> None:
        """Stop every server and pgbouncer under ``directory``, also those another process
        started there (the Citus cluster a test process starts inside this one's directory)."""
        for pidfile in sorted(directory.glob("**/pgbouncer.pid")):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pidfile.read_text().split()[0])
                # Only the pgbouncer of that directory, never a process that reused its pid.
                if str(pidfile.parent).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGTERM)
        for pidfile in sorted(directory.glob("**/postmaster.pid")):
            with contextlib.suppress(ClusterUnavailable):
                self._run(
                    self.bindir / "pg_ctl", "-D", pidfile.parent, "-m", "immediate", "-w", "stop"
                )

    def environ(self) -> dict[str, str]:
        assert self.dir is not None
        # Where a test process may start the Citus cluster (testproject.citus_cluster), so
        # that stopping this one stops it too.
        env = {"DATABASE_URL": self.url, "TENANTSAFE_CLUSTER_DIR": str(self.dir)}
        if self.pooled_url:
            env["PGBOUNCER_URL"] = self.pooled_url
        return env


@contextlib.contextmanager
def throwaway_cluster(*, quiet: bool = False) -> Iterator[Cluster]:
    """Start a cluster, export its URLs into os.environ, and always stop it again."""
    cluster = Cluster(quiet=quiet)

    def _terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        cluster.start()
        os.environ.update(cluster.environ())
        yield cluster
    finally:
        cluster.stop()
        os.environ.pop("DATABASE_URL", None)
        os.environ.pop("PGBOUNCER_URL", None)
        os.environ.pop("TENANTSAFE_CLUSTER_DIR", None)
        signal.signal(signal.SIGTERM, previous)
