"""Provisioning a new tenant: django-tenants' save() and clone_schema against tenantsafe's replay.

    python -m bench.bench_provision [--app large|small] [--models 150] [--tenants 4] [--rounds 2]

``--app large`` (the default) generates a tenant app of ``--models`` models into a temporary
directory (``bench/_bigapp.py``) and uses ``bench.bigapp_settings``; ``--app small`` is the test
project as it is. Per round and method, a new database (public migrated) gets ``--tenants``
tenants, by

- ``save``: django-tenants' migrating ``Client(...).save()``;
- ``clone``: the same save with ``TENANT_CREATION_FAKES_MIGRATIONS`` and a ``TENANT_BASE_SCHEMA``
  (migrated beforehand, in another process), which django-tenants clones with ``clone_schema``
  and fakes the migrations of;
- ``replay``: the same save with ``TENANTSAFE_PROVISIONING = "replay"``, after
  ``tenantsafe.provisioning.ensure_recording()`` ran in another process (as
  ``migrate_schemas_safe`` runs it after a deploy): the first tenant is the first signup after a
  deploy, the others replay a recording their process has used before;
- ``spare``: the same, with ``TENANTSAFE_SPARE_SCHEMAS`` as many as there are tenants, filled
  beforehand in another process (``tenantsafe.provisioning.fill_spares()``): each save claims a
  spare schema.

Each method runs in a fresh process with a temporary directory of its own, and only the
provisioning loop is timed; the order of the methods rotates by round. Uses DATABASE_URL, or
starts a throwaway cluster when it is not set.
"""

from __future__ import annotations

import argparse
import contextlib
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

from bench._bigapp import generate
from bench._db import server
from testproject.dbtools import ROOT, direct_url, fresh_database, manage, with_dbname

METHODS = ["save", "clone", "replay", "spare"]
BASE_SCHEMA = "bench_base"


class _Env:
    """What the subprocesses of one run share: the settings module and PYTHONPATH."""

    def __init__(self, settings: str, path: list[str]) -> None:
        self.settings = settings
        self.path = path

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

    with override_settings(**_method_settings(method, count)):
        if step == "prepare":
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
            return {}
        times, how = [], []
        for number in range(count):
            tenant = Client(schema_name=f"bench{number}", name=f"Bench {number}")
            started = time.perf_counter()
            tenant.save(verbosity=0)
            times.append(time.perf_counter() - started)
            # How tenantsafe provisioned it (a private detail, read here only to check).
            how.append(tenant.__dict__.get("_tenantsafe_provisioned", method))
    return {"times": times, "how": how}


def _side(env: _Env, method: str, count: int) -> tuple[list[float], list[str]]:
    with _database(env) as url:
        _run(env, url, "--phase", method, "--step", "prepare", "--tenants", str(count))
        out = _run(env, url, "--phase", method, "--step", "time", "--tenants", str(count))
    result = json.loads(out.strip().splitlines()[-1])
    return [float(t) for t in result["times"]], list(result["how"])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--app", choices=["large", "small"], default="large")
    parser.add_argument("--models", type=int, default=150)
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--phase", choices=METHODS)
    parser.add_argument("--step", choices=["prepare", "time"])
    ns = parser.parse_args(argv)
    if ns.phase:
        print(json.dumps(_phase(ns.phase, ns.step, ns.tenants)))
        return 0
    with server(), tempfile.TemporaryDirectory() as apps:
        if ns.app == "large":
            generate(Path(apps), ns.models)
            env = _Env("bench.bigapp_settings", [apps])
        else:
            env = _Env("testproject.settings", [])
        return _compare(env, ns)


def _compare(env: _Env, ns: argparse.Namespace) -> int:
    count = ns.tenants
    firsts: dict[str, list[float]] = {m: [] for m in METHODS}
    rest: dict[str, list[float]] = {m: [] for m in METHODS}
    rounds: dict[str, list[str]] = {m: [] for m in METHODS}
    hows: list[str] = []
    for number in range(ns.rounds):
        # Rotate the order, so that no method always gets the warmest (or coldest) server.
        order = METHODS[number % len(METHODS) :] + METHODS[: number % len(METHODS)]
        for method in order:
            times, how = _side(env, method, count)
            firsts[method].append(times[0])
            rest[method].extend(times[1:])
            rounds[method].append(_ms(times[1:] or times).strip())
            hows.extend(f"{method}: {h}" for h in how if method in ("replay", "spare"))
    app = f"{ns.models} generated models" if ns.app == "large" else "the test project"
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"{app}: {count} new tenants per method x {ns.rounds} rounds "
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
        f"  first after a deploy (after ensure_recording): {after_deploy / save:.3f} of a save, "
        f"{after_deploy / clone:.3f} of a clone"
    )
    spare = statistics.median(rest["spare"])
    print(
        f"  spare claim: {spare * 1000:.0f} ms"
        + ("  (target <= 50 ms)" if target else "")
        + f", {spare / save:.3f} of a save"
    )
    print(
        f"  tenantsafe provisioned: {', '.join(f'{h} x{hows.count(h)}' for h in sorted(set(hows)))}"
    )
    return 0


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:6.0f} ms"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
