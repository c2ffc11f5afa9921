"""Provisioning a new tenant: django-tenants' save() and clone_schema against tenantsafe's replay.

    python -m bench.bench_provision [--app large|small] [--models 150] [--tenants 4] [--rounds 2]
                                    [--existing 10 10000]

``--app large`` (the default) generates a tenant app of ``--models`` models into a temporary
directory (``bench/_bigapp.py``) and uses ``bench.bigapp_settings``; ``--app small`` is the test
project as it is. Per round, a new database (public migrated) gets ``--tenants`` tenants by each
of

- ``save``: django-tenants' migrating ``Client(...).save()``;
- ``clone``: the same save with ``TENANT_CREATION_FAKES_MIGRATIONS`` and a ``TENANT_BASE_SCHEMA``
  (migrated beforehand, in another process), which django-tenants clones with ``clone_schema``
  and fakes the migrations of;
- ``replay``: the same save with ``TENANTSAFE_PROVISIONING = "replay"``, after
  ``tenantsafe.provisioning.ensure_recording()`` ran in another process (as
  ``migrate_schemas_safe`` runs it after a deploy): the first tenant is the first signup after a
  deploy, the others replay a recording their process has used before;

taking turns in one process (save, clone, replay, then clone, replay, save, ...), so that the
three see the same database and the same moment's load; and another new database gets them by

- ``spare``: the same save with ``TENANTSAFE_SPARE_SCHEMAS`` as many as there are tenants,
  filled beforehand in another process (``tenantsafe.provisioning.fill_spares()``): each save
  claims a spare schema.

With ``--existing N [M ...]`` (``--app small`` only), each side uses instead a database holding
N current tenants (``bench/_many.py``), which loses what it added afterwards: provisioning at
that size; with several sizes, each round measures each size in turn (in an order that
rotates), and the medians at each size are set against those at the first.

Each timing process has a temporary directory of its own, and only the saves are timed. Uses
DATABASE_URL, or starts a throwaway cluster when it is not set.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import _many
from bench._bigapp import generate
from bench._db import server
from testproject.dbtools import ROOT, connect, direct_url, fresh_database, manage, with_dbname

METHODS = ["save", "clone", "replay", "spare"]
# Measured taking turns in one process and database; the spare claim needs a database of its
# own (a replay there would claim a spare too).
TOGETHER = ["save", "clone", "replay"]
BASE_SCHEMA = "bench_base"


class _Env:
    """What the subprocesses of one run share: the settings module and PYTHONPATH, and the
    database of current tenants each new database is a copy of (empty: a new one)."""

    def __init__(self, settings: str, path: list[str], existing: str = "") -> None:
        self.settings = settings
        self.path = path
        self.existing = existing

    def vars(self, url: str, tmp: str) -> dict[str, str]:
        return {
            "DATABASE_URL": url,
            "DJANGO_SETTINGS_MODULE": self.settings,
            "PYTHONPATH": os.pathsep.join([str(ROOT), *self.path]),
            # A temporary directory of its own: tenantsafe shares test recordings through a file
            # there, and one left by an earlier run must not reach this one.
            "TMPDIR": tmp,
        }


def _run(env: _Env, url: str, *args: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "bench.bench_provision", *args],
            cwd=ROOT,
            env={**os.environ, **env.vars(url, tmp)},
            capture_output=True,
            text=True,
            check=False,
        )
    if result.returncode != 0:
        raise SystemExit(
            f"bench_provision {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        )
    return result.stdout


@contextlib.contextmanager
def _database(env: _Env) -> Iterator[str]:
    if env.existing:
        # The database of that many current tenants (bench/_many.py), cleaned afterwards.
        with _many.borrowed(env.existing) as url:
            yield url
        return
    with fresh_database("bench") as name, tempfile.TemporaryDirectory() as tmp:
        url = with_dbname(direct_url(), name)
        result = manage(url, "migrate_schemas", "--shared", "-v0", env=env.vars(url, tmp))
        if result.returncode != 0:
            raise SystemExit(f"migrate_schemas --shared failed:\n{result.stdout}\n{result.stderr}")
        yield url


def _method_settings(method: str, count: int) -> dict[str, Any]:
    if method == "clone":
        return {"TENANT_CREATION_FAKES_MIGRATIONS": True, "TENANT_BASE_SCHEMA": BASE_SCHEMA}
    if method == "replay":
        return {"TENANTSAFE_PROVISIONING": "replay"}
    if method == "spare":
        return {"TENANTSAFE_PROVISIONING": "replay", "TENANTSAFE_SPARE_SCHEMAS": count}
    return {}


def _phase(method: str, step: str, count: int) -> dict[str, Any]:
    import django

    django.setup()
    from django.test import override_settings

    from testproject.customers.models import Client

    if step == "prepare":
        with override_settings(**_method_settings(method, count)):
            _prepare(method, count)
        return {}
    methods = TOGETHER if method == "together" else [method]
    times: dict[str, list[float]] = {m: [] for m in methods}
    how: list[str] = []
    for number in range(count):
        for name in methods[number % len(methods) :] + methods[: number % len(methods)]:
            tenant = Client(schema_name=f"bench_{name}{number}", name=f"Bench {number}")
            with override_settings(**_method_settings(name, count)):
                started = time.perf_counter()
                tenant.save(verbosity=0)
                times[name].append(time.perf_counter() - started)
            if name in ("replay", "spare"):
                # How tenantsafe provisioned it (a private detail, read here only to check).
                how.append(f"{name}: {tenant.__dict__.get('_tenantsafe_provisioned')}")
    return {"times": times, "how": how}


def _prepare(method: str, count: int) -> None:
    from testproject.customers.models import Client

    if method == "clone":
        # The base schema does not exist yet, so django-tenants migrates this one.
        Client(schema_name=BASE_SCHEMA, name="Base").save(verbosity=0)
    elif method == "replay":
        from tenantsafe.provisioning import ensure_recording

        if not ensure_recording():
            raise SystemExit("ensure_recording() recorded nothing usable")
    elif method == "spare":
        from tenantsafe.provisioning import fill_spares

        filled = fill_spares()
        if filled.ready < count:
            raise SystemExit(f"fill_spares() made too few spares: {filled}")


def _side(
    env: _Env, method: str, count: int, kept: contextlib.ExitStack
) -> tuple[dict[str, list[float]], list[str]]:
    """Time ``method`` ("together" or "spare") on a new database. It is dropped with ``kept``
    (at the end of the run): dropping one unlinks thousands of files, and the disk's work on
    that would fall into the next round's timings."""
    url = kept.enter_context(_database(env))
    for prepared in ("clone", "replay") if method == "together" else (method,):
        _run(env, url, "--phase", prepared, "--step", "prepare", "--tenants", str(count))
    # Nor should a checkpoint of what preparing wrote.
    with connect(url) as conn:
        conn.execute("CHECKPOINT")
    out = _run(env, url, "--phase", method, "--step", "time", "--tenants", str(count))
    result = json.loads(out.strip().splitlines()[-1])
    times = {m: [float(t) for t in ts] for m, ts in result["times"].items()}
    return times, list(result["how"])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--app", choices=["large", "small"], default="large")
    parser.add_argument("--models", type=int, default=150)
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--phase", choices=[*METHODS, "together"])
    parser.add_argument("--step", choices=["prepare", "time"])
    parser.add_argument(
        "--existing",
        type=int,
        nargs="+",
        default=[0],
        help="with --app small: each database holds that many current tenants already; "
        "several sizes take turns in each round",
    )
    ns = parser.parse_args(argv)
    if ns.phase:
        print(json.dumps(_phase(ns.phase, ns.step, ns.tenants)))
        return 0
    if any(ns.existing) and ns.app != "small":
        parser.error("--existing goes with --app small")
    with server(), tempfile.TemporaryDirectory() as apps:
        if ns.app == "large":
            generate(Path(apps), ns.models)
            envs = {0: _Env("bench.bigapp_settings", [apps])}
        else:
            envs = {
                size: _Env("testproject.settings", [], _many.golden(size) if size else "")
                for size in ns.existing
            }
        return _compare(envs, ns)


def _per_method() -> dict[str, Any]:
    return {m: [] for m in METHODS}


@dataclasses.dataclass
class _Results:
    # Per method: each process's first save, the saves after it, and each round's median.
    firsts: dict[str, list[float]] = dataclasses.field(default_factory=_per_method)
    rest: dict[str, list[float]] = dataclasses.field(default_factory=_per_method)
    rounds: dict[str, list[str]] = dataclasses.field(default_factory=_per_method)
    # How tenantsafe provisioned each tenant ("replay: replayed").
    hows: list[str] = dataclasses.field(default_factory=list)
    # replay / clone of the same turn (after the first), which saw the same moment.
    turns: list[float] = dataclasses.field(default_factory=list)


def _compare(envs: dict[int, _Env], ns: argparse.Namespace) -> int:
    """Per round, each size of database (``--existing``) in turn, in an order that rotates."""
    results = {size: _Results() for size in envs}
    sizes = list(envs)
    with contextlib.ExitStack() as kept:
        for number in range(ns.rounds):
            for size in sizes[number % len(sizes) :] + sizes[: number % len(sizes)]:
                _round(envs[size], ns, number, results[size], kept)
    for size, found in results.items():
        _report(ns, found, size)
    smallest = results[sizes[0]]
    for size in sizes[1:]:
        parts = []
        for method in ("replay", "save", "spare"):
            ratio = statistics.median(results[size].rest[method]) / statistics.median(
                smallest.rest[method]
            )
            parts.append(f"{method} {ratio:.2f}")
        print(
            f"at {size} current tenants, each new tenant takes this many times what it takes at "
            f"{sizes[0]}: {', '.join(parts)} (target for the replay: at most 1.2)"
        )
    return 0


def _round(
    env: _Env, ns: argparse.Namespace, number: int, results: _Results, kept: contextlib.ExitStack
) -> None:
    for side in ("together", "spare") if number % 2 == 0 else ("spare", "together"):
        by_method, how = _side(env, side, ns.tenants, kept)
        results.hows.extend(how)
        if side == "together":
            results.turns.extend(
                r / c for r, c in zip(by_method["replay"][1:], by_method["clone"][1:], strict=True)
            )
        for method, times in by_method.items():
            results.firsts[method].append(times[0])
            results.rest[method].extend(times[1:])
            results.rounds[method].append(_ms(times[1:] or times).strip())


def _report(ns: argparse.Namespace, results: _Results, existing: int) -> None:
    firsts, rest, rounds, hows, turns = (
        results.firsts,
        results.rest,
        results.rounds,
        results.hows,
        results.turns,
    )
    count = ns.tenants
    app = f"{ns.models} generated models" if ns.app == "large" else "the test project"
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    there = f", {existing} current tenants in each database" if existing else ""
    print(
        f"{app}{there}: {count} new tenants per method x {ns.rounds} rounds "
        f"(python {sys.version.split()[0]}, load average {load})"
    )
    labels = {
        "save": "django-tenants save()       ",
        "clone": "clone_schema (BASE_SCHEMA)  ",
        "replay": "tenantsafe replay + save()  ",
        "spare": "tenantsafe spare claim      ",
    }
    for method in METHODS:
        print(
            f"  {labels[method]} first {_ms(firsts[method])}  then {_ms(rest[method])} "
            f"each (median; rounds {' / '.join(rounds[method])})"
        )
    replay, save, clone = (statistics.median(rest[m]) for m in ("replay", "save", "clone"))
    after_deploy = statistics.median(firsts["replay"])
    target = ns.app == "large"
    print(f"  replay/save:  {replay / save:.3f}" + ("  (target <= 0.1)" if target else ""))
    print(f"  replay/clone: {replay / clone:.3f}" + ("  (target <= 0.4)" if target else ""))
    print(
        f"  replay/clone turn by turn: median {statistics.median(turns):.3f} "
        f"({min(turns):.3f} to {max(turns):.3f})"
    )
    print(
        f"  first after a deploy (after ensure_recording): {after_deploy / save:.3f} of a save, "
        f"{after_deploy / clone:.3f} of a clone"
    )
    spare = statistics.median(rest["spare"])
    print(
        f"  spare claim: {spare * 1000:.0f} ms"
        + ("  (target <= 50 ms)" if target else "")
        + f", {spare / save:.3f} of a save, {spare / clone:.3f} of a clone"
    )
    print(
        f"  tenantsafe provisioned: {', '.join(f'{h} x{hows.count(h)}' for h in sorted(set(hows)))}"
    )


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:6.0f} ms"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
