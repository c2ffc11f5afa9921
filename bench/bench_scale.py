"""Every command at 10,000 tenants: a no-op migrate_schemas_safe, --check, the doctor, a deploy by
replay; each against plain django-tenants in the same run where it has an equivalent.

    python -m bench.bench_scale [--tenants 10000] [--steps noop check doctor deploy]
                                [--plain] [--executor multiprocessing] [--profile DIR]

On a database of ``--tenants`` current tenants of the test project (``bench/_many.py``: clones
of one migrated schema, each with a row and a domain), each command runs in a fresh process,
timed from its start to its exit, with its peak memory:

- ``noop``: ``migrate_schemas_safe`` (public and tenants, nothing to apply; target < 10 s);
- ``check``: ``migrate_schemas_safe --check`` (exit 0: nothing unapplied);
- ``doctor``: ``tenantsafe_doctor --json`` (target < 15 s; it has no plain equivalent);
- ``deploy``: one new migration (an ``AddField`` and an ``AddIndex`` on ``shop.Product``, as
  ``bench/bench_deploy.py``) deployed with ``migrate_schemas_safe`` on a copy of the database
  (target < 3 minutes); every tenant is checked for the column, the index and the row.

``--copy NAME ...``: the deploys use these copies of the kept database, made beforehand
(``CREATE DATABASE NAME TEMPLATE ...``, minutes at 10,000 tenants), instead of copying it each.

``--plain`` also runs plain ``migrate_schemas`` (and ``--check``, and the deploy) in the same
run: at 10,000 tenants that takes hours. ``--profile DIR`` runs the tenantsafe commands under
cProfile and writes ``DIR/<step>.prof``.

Uses DATABASE_URL (and keeps the prepared database there), or starts a throwaway cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import _many
from bench._db import server
from bench.bench_deploy import Deploy, make_app
from bench.bench_deploy import check as deployed
from testproject.dbtools import ROOT, connect, direct_url, with_dbname

STEPS = ["noop", "check", "doctor", "deploy"]
_RUN = (
    "import resource, sys\n"
    "from testproject.manage import main\n"
    "try:\n"
    "    status = main(['manage.py', *sys.argv[1:]])\n"
    "finally:\n"
    "    sys.stderr.write('maxrss=%d\\n' % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    "sys.exit(status)\n"
)


@dataclasses.dataclass
class Run:
    """One command: wall seconds, stdout, peak memory (MB), exit status, and the CPU seconds
    of its process and of its server backends (which the load of a shared machine does not
    inflate as it does the wall time)."""

    seconds: float
    out: str
    memory: float
    status: int
    client_cpu: float
    server_cpu: float

    def cpu(self) -> str:
        return f"; CPU {self.client_cpu:.1f} s in Django, {self.server_cpu:.1f} s in PostgreSQL"


class _ServerCpu:
    """The CPU time of the backends with ``application_name``, read from /proc while they
    run (the server runs on this machine)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        with connect(with_dbname(direct_url(), "postgres")) as conn:
            while not self.stop.wait(0.1):
                pids = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = %s", [self.name]
                ).fetchall()
                for (pid,) in pids:
                    with contextlib.suppress(OSError, IndexError):
                        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                        self.seen[pid] = (int(fields[11]) + int(fields[12])) / tick

    def __enter__(self) -> _ServerCpu:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def command(
    url: str, *args: str, profile: Path | None = None, env: dict[str, str] | None = None
) -> Run:
    """Run one manage.py command in a fresh process."""
    prefix = ["-m", "cProfile", "-o", str(profile)] if profile else []
    code = ["-c", _RUN] if not profile else ["-m", "testproject.manage"]
    name = f"bench_scale_{os.getpid()}_{time.monotonic_ns()}"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    full = {**os.environ, "DATABASE_URL": url, **(env or {})}
    # Its backends, by name: the watcher reads their CPU time.
    full["DATABASE_URL"] += f"?application_name={name}"
    with _ServerCpu(name) as server_cpu:
        result = subprocess.run(
            [sys.executable, *prefix, *code, *args],
            cwd=ROOT,
            env=full,
            capture_output=True,
            text=True,
            check=False,
        )
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    found = re.findall(r"maxrss=(\d+)", result.stderr)
    if result.returncode not in (0, 1) or (result.returncode and "--check" not in args):
        raise SystemExit(
            f"{' '.join(args)} failed:\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
        )
    memory = int(found[-1]) / 1024 if found else 0.0
    return Run(
        seconds, result.stdout, memory, result.returncode, client, sum(server_cpu.seen.values())
    )


def load() -> str:
    return ", ".join(f"{v:.1f}" for v in os.getloadavg())


def report(label: str, run: Run, extra: str = "") -> None:
    peak = f", peak {run.memory:.0f} MB" if run.memory else ""
    print(f"  {label:42} {run.seconds:8.1f} s{peak} (load {load()}{run.cpu()}){extra}")


def summary_of(out: str) -> str:
    found = re.findall(r"^migrate_schemas_safe: .*tenant\(s\):.*$", out, re.MULTILINE)
    return f"\n      {found[-1]}" if found else ""


def noop(url: str, ns: argparse.Namespace) -> None:
    run = command(url, "migrate_schemas_safe", profile=_prof(ns, "noop"))
    report("migrate_schemas_safe (nothing to apply)", run, summary_of(run.out))
    if ns.plain:
        plain = command(url, "migrate_schemas")
        report("plain migrate_schemas (nothing to apply)", plain, ratio(run, plain))


def ratio(run: Run, plain: Run) -> str:
    return f"\n      tenantsafe / plain: {run.seconds / plain.seconds:.3f}"


def check(url: str, ns: argparse.Namespace) -> None:
    run = command(url, "migrate_schemas_safe", "--check", profile=_prof(ns, "check"))
    report(f"migrate_schemas_safe --check (exit {run.status})", run, summary_of(run.out))
    if ns.plain:
        plain = command(url, "migrate_schemas", "--check")
        report(f"plain migrate_schemas --check (exit {plain.status})", plain, ratio(run, plain))


def doctor(url: str, ns: argparse.Namespace) -> None:
    run = command(url, "tenantsafe_doctor", "--json", profile=_prof(ns, "doctor"))
    found = json.loads(run.out)
    kinds = sorted({f["kind"] for f in found["findings"]})
    report(
        f"tenantsafe_doctor --json (exit {run.status})",
        run,
        f"\n      {found['tenants']} tenants, {found['current']} current, read in "
        f"{found['elapsed']}s; findings {found['counts']} ({', '.join(kinds)})",
    )


def deploy(golden: str, ns: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        app = make_app("small", Path(tmp), 0)
        migration = Deploy("schema", app.write_deploy("schema"))
        names = _many.names(ns.tenants)
        commands = [("migrate_schemas_safe", "safe")] + ([("migrate_schemas", "plain")] * ns.plain)
        runs: dict[str, Run] = {}
        made = list(ns.copy)
        for name, label in commands:
            copying = time.perf_counter()
            copy = made.pop(0) if made else _many.copy(golden, "bscale")
            copied = time.perf_counter() - copying
            try:
                url = with_dbname(direct_url(), copy)
                env = app.env(url, deploy=migration.kind, tmp=tmp)
                profile = _prof(ns, "deploy") if label == "safe" else None
                run = command(url, name, f"--executor={ns.executor}", profile=profile, env=env)
                deployed(app, url, names, migration)
                runs[label] = run
                extra = ratio(runs["safe"], run) if label == "plain" else summary_of(run.out)
                report(f"{name} --executor={ns.executor} (deploy)", run, extra)
                print(f"      (the copy of the database took {copied:.0f}s)")
            finally:
                _many.drop(copy)


def _prof(ns: argparse.Namespace, step: str) -> Path | None:
    return Path(ns.profile) / f"{step}.prof" if ns.profile else None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tenants", type=int, default=10000)
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=STEPS)
    parser.add_argument("--plain", action="store_true", help="plain django-tenants too (hours)")
    parser.add_argument("--profile", help="a directory for cProfile output of tenantsafe's")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--executor",
        default="standard",
        help="the deploy's (multiprocessing: replays on TENANT_MULTIPROCESSING_MAX_PROCESSES "
        "connections)",
    )
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument(
        "--copy",
        nargs="+",
        default=[],
        help="databases copied from the kept one beforehand (CREATE DATABASE ... TEMPLATE), "
        "which the deploys use, in turn, instead of a copy each (and drop)",
    )
    ns = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if ns.profile:
        Path(ns.profile).mkdir(parents=True, exist_ok=True)
    with server():
        golden = _many.golden(ns.tenants, jobs=ns.jobs, fresh=ns.fresh)
        with _many.borrowed(golden) as url:
            python = sys.version.split()[0]
            print(f"{ns.tenants} current tenants of the test project (python {python})")
            for step in ns.steps:
                if step == "deploy":
                    deploy(golden, ns)
                else:
                    {"noop": noop, "check": check, "doctor": doctor}[step](url, ns)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
