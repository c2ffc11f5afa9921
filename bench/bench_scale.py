"""Every command at 10,000 tenants: a no-op migrate_schemas_safe, --check, the doctor, a deploy by
replay; each against plain django-tenants in the same run where it has an equivalent.

    python -m bench.bench_scale [--tenants 10000] [--steps noop check doctor deploy]
                                [--plain] [--profile DIR] [--fresh]

On a database of ``--tenants`` current tenants of the test project (``bench/_many.py``: clones
of one migrated schema, each with a row and a domain), each command runs in a fresh process,
timed from its start to its exit, with its peak memory:

- ``noop``: ``migrate_schemas_safe`` (public and tenants, nothing to apply; target < 10 s);
- ``check``: ``migrate_schemas_safe --check`` (exit 0: nothing unapplied);
- ``doctor``: ``tenantsafe_doctor --json`` (target < 15 s; it has no plain equivalent);
- ``deploy``: one new migration (an ``AddField`` and an ``AddIndex`` on ``shop.Product``, as
  ``bench/bench_deploy.py``) deployed with ``migrate_schemas_safe`` on a copy of the database
  (target < 3 minutes); every tenant is checked for the column, the index and the row.

``--plain`` also runs plain ``migrate_schemas`` (and ``--check``, and the deploy) in the same
run: at 10,000 tenants that takes hours. ``--profile DIR`` runs the tenantsafe commands under
cProfile and writes ``DIR/<step>.prof``.

Uses DATABASE_URL (and keeps the prepared database there), or starts a throwaway cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import _many
from bench._db import server
from bench.bench_deploy import check as deployed
from bench.bench_deploy import make_app
from testproject.dbtools import ROOT, direct_url, with_dbname

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


def command(
    url: str, *args: str, profile: Path | None = None, env: dict[str, str] | None = None
) -> tuple[float, str, float, int]:
    """Wall seconds, stdout, peak memory (MB) and exit status of one manage.py command."""
    prefix = ["-m", "cProfile", "-o", str(profile)] if profile else []
    code = ["-c", _RUN] if not profile else ["-m", "testproject.manage"]
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, *prefix, *code, *args],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": url, **(env or {})},
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    found = re.findall(r"maxrss=(\d+)", result.stderr)
    if result.returncode not in (0, 1) or (result.returncode and "--check" not in args):
        raise SystemExit(
            f"{' '.join(args)} failed:\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
        )
    return seconds, result.stdout, int(found[-1]) / 1024 if found else 0.0, result.returncode


def load() -> str:
    return ", ".join(f"{v:.1f}" for v in os.getloadavg())


def report(label: str, seconds: float, memory: float, extra: str = "") -> None:
    peak = f", peak {memory:.0f} MB" if memory else ""
    print(f"  {label:42} {seconds:8.1f} s{peak} (load {load()}){extra}")


def summary_of(out: str) -> str:
    found = re.findall(r"^migrate_schemas_safe: .*tenant\(s\):.*$", out, re.MULTILINE)
    return f"\n      {found[-1]}" if found else ""


def noop(url: str, ns: argparse.Namespace) -> None:
    seconds, out, memory, _ = command(url, "migrate_schemas_safe", profile=_prof(ns, "noop"))
    report("migrate_schemas_safe (nothing to apply)", seconds, memory, summary_of(out))
    if ns.plain:
        seconds, _, memory, _ = command(url, "migrate_schemas")
        report("plain migrate_schemas (nothing to apply)", seconds, memory)


def check(url: str, ns: argparse.Namespace) -> None:
    seconds, out, memory, status = command(
        url, "migrate_schemas_safe", "--check", profile=_prof(ns, "check")
    )
    report(f"migrate_schemas_safe --check (exit {status})", seconds, memory, summary_of(out))
    if ns.plain:
        seconds, _, memory, status = command(url, "migrate_schemas", "--check")
        report(f"plain migrate_schemas --check (exit {status})", seconds, memory)


def doctor(url: str, ns: argparse.Namespace) -> None:
    seconds, out, memory, status = command(
        url, "tenantsafe_doctor", "--json", profile=_prof(ns, "doctor")
    )
    found = json.loads(out)
    kinds = sorted({f["kind"] for f in found["findings"]})
    report(
        f"tenantsafe_doctor --json (exit {status})",
        seconds,
        memory,
        f"\n      {found['tenants']} tenants, {found['current']} current, read in "
        f"{found['elapsed']}s; findings {found['counts']} ({', '.join(kinds)})",
    )


def deploy(golden: str, ns: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        app = make_app("small", Path(tmp), 0)
        migration = app.write_deploy()
        names = _many.names(ns.tenants)
        commands = [("migrate_schemas_safe", "safe")] + ([("migrate_schemas", "plain")] * ns.plain)
        for name, label in commands:
            copying = time.perf_counter()
            copy = _many.copy(golden, "bscale")
            copied = time.perf_counter() - copying
            try:
                url = with_dbname(direct_url(), copy)
                env = app.env(url, deploy=True, tmp=tmp)
                profile = _prof(ns, "deploy") if label == "safe" else None
                seconds, out, memory, _ = command(url, name, profile=profile, env=env)
                deployed(app, url, names, migration)
                report(
                    f"{name} (deploy: AddField + AddIndex)",
                    seconds,
                    memory,
                    f" (the copy took {copied:.0f}s)" + summary_of(out),
                )
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
    parser.add_argument("--fresh", action="store_true")
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
