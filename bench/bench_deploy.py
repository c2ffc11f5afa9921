"""Deploying one new migration to many current tenants: migrate_schemas_safe against plain
migrate_schemas, whole command.

    python -m bench.bench_deploy [--app small|large|both] [--tenants 150 2000] [--rounds 2]
                                 [--commands plain safe no-replay] [--models 150] [--jobs 2]
                                 [--deploy schema data]

For each app and tenant count, a prepared database (the golden one) holds public, migrated,
and that many current tenants: clones of one schema migrated through Django (pg_dump, renamed,
restored by ``--jobs`` psql processes, one transaction per tenant). The clones carry the
template's rows too: django_migrations, and the content types and permissions (contenttypes
and auth are tenant apps of the test project). A smaller golden database grows into the next
larger one (CREATE DATABASE ... TEMPLATE, then the missing tenants).

Then the deploy: one new migration, an ``AddField`` plus an ``AddIndex`` on an existing tenant
model (``shop.Product`` on the test project, ``--app small``; the ``Hub`` of a generated app of
``--models`` models, ``--app large``, see ``bench/_bigapp.py``); with ``--deploy data``, a
``RunPython`` between the two that counts the tenant's rows of that model and writes the count
into every row (each tenant has 8 to 12 of them). Only the measured commands see it:
``bench/deploy_settings.py`` points the app's ``MIGRATION_MODULES`` at a temporary copy of its
migrations plus the new one (the model classes do not get the field).

``--rounds`` takes one number, or one per tenant count (``--tenants 150 500 --rounds 2 1``).
Per round, each command runs as a deploy runs it (public and tenants, default verbosity) on its
own copy of the golden database (CREATE DATABASE ... TEMPLATE), timed from process start to
exit: plain ``migrate_schemas``, ``migrate_schemas_safe`` and, when the command has the option,
``migrate_schemas_safe --no-replay``, in an order that rotates by round. After each command,
every tenant must have the new column, the new index and the new django_migrations row, and
the catalog of three tenants (``testproject.dbtools.fingerprint``) must equal what the other
commands left; then that copy is dropped, so the disk holds the golden database and one copy.

The SQL alone: after the first command of the first round, the migration's SQL (``sqlmigrate``,
its column and index renamed) runs in every tenant of that copy through psycopg, one
transaction each with ``SET LOCAL search_path``, together with its django_migrations row (and,
for the data deploy, the ``RunPython``'s own two statements: the count and the update). With
two or more tenant counts, each command's cost per tenant between the smallest and the largest
count is set against it.

Uses DATABASE_URL, or starts a throwaway cluster when it is not set.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench._bigapp import APP as BIGAPP
from bench._bigapp import generate
from bench._db import psql, server
from testproject.dbtools import (
    ROOT,
    connect,
    direct_url,
    fingerprint,
    register_tenants,
    with_dbname,
)

TEMPLATE = "benchtemplate"
FIELD = "deploy_rank"
COMMANDS = {
    "plain": ("migrate_schemas",),
    "safe": ("migrate_schemas_safe",),
    "no-replay": ("migrate_schemas_safe", "--no-replay"),
}
# The catalogs that thousands of tenants make large, analysed once a golden database is ready
# (as they would be in a database that has lived for a while).
CATALOGS = (
    "pg_class",
    "pg_attribute",
    "pg_attrdef",
    "pg_constraint",
    "pg_depend",
    "pg_index",
    "pg_namespace",
    "pg_sequence",
    "pg_type",
)

_DEPLOY = """from django.db import migrations, models


def count_rows(apps, schema_editor):
    model = apps.get_model("{label}", "{model}")
    rows = model.objects.using(schema_editor.connection.alias)
    rows.update({field}=rows.count())


class Migration(migrations.Migration):
    dependencies = [("{label}", "{previous}")]

    operations = [
        migrations.AddField(
            model_name="{model}",
            name="{field}",
            field=models.IntegerField(default=0),
        ),{python}
        migrations.AddIndex(
            model_name="{model}",
            index=models.Index(fields=["{field}"], name="{index}"),
        ),
    ]
"""
_PYTHON = """
        migrations.RunPython(count_rows, migrations.RunPython.noop),"""
# Rows of the deploy's model in the template schema; each clone drops 0 to 4 of them.
ROWS = 12
DEPLOYS = {"schema": "AddField + AddIndex", "data": "AddField + RunPython + AddIndex"}
TARGETS = {"schema": "<= 0.1 at 2,000 tenants", "data": "<= 0.3 at 150, <= 0.15 at 2,000"}


@dataclasses.dataclass(frozen=True)
class App:
    """One app under test: where the deploy's migration goes and how its processes start."""

    title: str
    label: str
    model: str
    migrations: Path
    workdir: Path
    bigapp: bool

    @property
    def table(self) -> str:
        return f"{self.label}_{self.model}"

    @property
    def index(self) -> str:
        return f"{self.table}_deploy_idx"

    def seed(self, schema: str) -> str:
        """SQL giving ``schema`` ROWS rows of the deploy's model."""
        columns = "code, rank" if self.bigapp else "name, sku, price_cents"
        values = "'r' || g, g" if self.bigapp else "'r' || g, '', g"
        return (
            f'INSERT INTO "{schema}".{self.table} ({columns}) '
            f"SELECT {values} FROM generate_series(1, {ROWS}) g"
        )

    def module(self, deploy: str) -> str:
        return f"bench_deploy_{self.label}_{deploy}"

    def env(self, url: str, *, deploy: str, tmp: str) -> dict[str, str]:
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "DJANGO_SETTINGS_MODULE": "bench.deploy_settings",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(self.workdir)]),
            # tenantsafe may share recordings through a file in the temporary directory: every
            # command gets a fresh one.
            "TMPDIR": tmp,
        }
        env.pop("BENCH_DEPLOY_BIGAPP", None)
        env.pop("BENCH_DEPLOY_MIGRATION_MODULES", None)
        if self.bigapp:
            env["BENCH_DEPLOY_BIGAPP"] = "1"
        if deploy:
            env["BENCH_DEPLOY_MIGRATION_MODULES"] = f"{self.label}={self.module(deploy)}"
        return env

    def write_deploy(self, deploy: str) -> str:
        """The app's migrations plus the deploy's, as the package ``module(deploy)``; the new
        migration's name."""
        package = self.workdir / self.module(deploy)
        package.mkdir()
        for source in self.migrations.glob("*.py"):
            shutil.copy(source, package / source.name)
        previous = sorted(p.stem for p in self.migrations.glob("[0-9][0-9][0-9][0-9]_*.py"))[-1]
        name = f"{int(previous[:4]) + 1:04d}_deploy"
        (package / f"{name}.py").write_text(
            _DEPLOY.format(
                label=self.label,
                previous=previous,
                model=self.model,
                field=FIELD,
                index=self.index,
                python=_PYTHON if deploy == "data" else "",
            )
        )
        return name


def make_app(key: str, workdir: Path, models: int) -> App:
    if key == "large":
        package = generate(workdir, models)
        return App(
            f"{models} generated models", BIGAPP, "hub", package / "migrations", workdir, True
        )
    return App(
        "the test project", "shop", "product", ROOT / "testproject/shop/migrations", workdir, False
    )


def manage(app: App, url: str, *args: str, deploy: str = "") -> tuple[float, str]:
    """Run manage.py in a fresh process; its wall time (process start to exit) and stdout."""
    with tempfile.TemporaryDirectory() as tmp:
        env = app.env(url, deploy=deploy, tmp=tmp)
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "testproject.manage", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(
            f"{' '.join(args)} failed ({result.returncode}):\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return seconds, result.stdout


class Databases:
    """The databases of this run, each dropped again however the run ends."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def __enter__(self) -> Databases:
        return self

    def __exit__(self, *exc: object) -> None:
        for name in list(self.names):
            self.drop(name)

    def url(self, name: str) -> str:
        return with_dbname(direct_url(), name)

    def create(self, prefix: str, template: str | None = None) -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        with connect(with_dbname(direct_url(), "postgres")) as conn:
            conn.execute(
                f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")
            )
        self.names.append(name)
        return name

    def drop(self, name: str) -> None:
        with connect(with_dbname(direct_url(), "postgres")) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.names.remove(name)


def restore(url: str, dump: str, names: list[str], jobs: int) -> None:
    """``dump`` (of the template schema) once per name, renamed: ``jobs`` psql processes, each
    fed one script, a transaction per tenant (one per script would fill the lock table)."""
    rename = re.compile(rf"(?<![A-Za-z0-9_]){TEMPLATE}(?=[.;\s])")

    def one(part: list[str]) -> None:
        with tempfile.TemporaryFile("w+") as errors:
            proc = subprocess.Popen(
                ["psql", "-q", "-X", "-v", "ON_ERROR_STOP=1", url],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=errors,
                text=True,
            )
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write("SET client_min_messages = warning;\n")
                for name in part:
                    proc.stdin.write(f"BEGIN;\n{rename.sub(name, dump)}\nCOMMIT;\n")
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            if proc.wait() != 0:
                errors.seek(0)
                raise SystemExit(f"restoring the clones failed:\n{errors.read()[-2000:]}")

    parts = [names[start::jobs] for start in range(jobs)]
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for _ in pool.map(one, [part for part in parts if part]):
            pass


@dataclasses.dataclass
class Golden:
    """A prepared database: public migrated, ``names`` current tenants."""

    name: str
    names: list[str]
    dump: str
    size: int = 0


def tenant_names(start: int, stop: int) -> list[str]:
    return [f"t{number:05d}" for number in range(start, stop)]


def prepare(app: App, dbs: Databases, count: int, jobs: int, grown: Golden | None) -> Golden:
    started = time.perf_counter()
    if grown is None:
        name = dbs.create("bdeploy")
        url = dbs.url(name)
        manage(app, url, "migrate_schemas", "--shared", "-v0")
        register_tenants(url, [TEMPLATE])
        manage(app, url, "migrate_schemas", "--tenant", "-v0")
        psql(url, app.seed(TEMPLATE))
        dump = subprocess.run(
            ["pg_dump", "-n", TEMPLATE, "--no-owner", "--no-privileges", url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        golden = Golden(name, [], dump)
        how = f"public and the template through Django {time.perf_counter() - started:.0f}s"
    else:
        room_for(grown)
        name = dbs.create("bdeploy", template=grown.name)
        golden = Golden(name, list(grown.names), grown.dump)
        dbs.drop(grown.name)
        how = f"grown from {len(grown.names)} tenants (copy {time.perf_counter() - started:.0f}s)"
    url = dbs.url(name)
    new = tenant_names(len(golden.names), count)
    restoring = time.perf_counter()
    restore(url, golden.dump, new, jobs)
    if grown is None and new:
        if fingerprint(url, new[0]) != fingerprint(url, TEMPLATE):
            raise SystemExit(f"the restored {new[0]} differs from {TEMPLATE}, its template")
        # The template is not a tenant of the measured runs.
        psql(
            url,
            "DELETE FROM public.customers_domain WHERE tenant_id IN (SELECT id FROM "
            f"public.customers_client WHERE schema_name = '{TEMPLATE}'); "
            f"DELETE FROM public.customers_client WHERE schema_name = '{TEMPLATE}'; "
            f"DROP SCHEMA {TEMPLATE} CASCADE;",
        )
    with connect(url) as conn:
        conn.execute(
            "INSERT INTO public.customers_client (schema_name, name, created_on) "
            "SELECT n, n, now() FROM unnest(%s::text[]) AS n",
            [new],
        )
        # Tenants of their own size: the data deploy's count differs from one to the next.
        for number, tenant in enumerate(new, start=len(golden.names)):
            conn.execute(f'DELETE FROM "{tenant}".{app.table} WHERE id <= {number % 5}')
        restored = time.perf_counter() - restoring
        analysing = time.perf_counter()
        conn.execute("VACUUM ANALYZE " + ", ".join(f"pg_catalog.{t}" for t in CATALOGS))
        analysed = time.perf_counter() - analysing
        golden.size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    golden.names.extend(new)
    free = free_disk()
    print(
        f"{app.title}: {count} current tenants prepared in {time.perf_counter() - started:.0f}s "
        f"({how}; {len(new)} clones restored by {jobs} psql in {restored:.0f}s, "
        f"{restored / max(len(new), 1) * 1000:.0f} ms each; catalogs analysed in "
        f"{analysed:.0f}s); the database takes {golden.size / 2**30:.1f} GB"
        + ("" if free is None else f", {free / 2**30:.0f} GB free on the server's disk")
    )
    return golden


def free_disk() -> int | None:
    """Free bytes on the server's disk, when the server runs on this machine."""
    with connect(direct_url()) as conn:
        data = conn.execute("SELECT current_setting('data_directory')").fetchone()[0]
    try:
        return shutil.disk_usage(data).free
    except OSError:
        return None


def room_for(golden: Golden) -> None:
    """Stop before a copy of ``golden`` would fill the disk (other work shares it)."""
    free = free_disk()
    if free is not None and free < golden.size * 1.2 + 5 * 2**30:
        raise SystemExit(
            f"not enough disk for another copy of a {golden.size / 2**30:.1f} GB database "
            f"({free / 2**30:.1f} GB free); try fewer tenants"
        )


@dataclasses.dataclass(frozen=True)
class Deploy:
    """One kind of deploy (a key of DEPLOYS) and the name of its migration."""

    kind: str
    migration: str


def check(app: App, url: str, names: list[str], deploy: Deploy) -> dict[str, Any]:
    """Every tenant (and public) migrated, each with its own count for the data deploy; the
    catalog of three tenants."""
    migration = deploy.migration
    with connect(url) as conn:
        registered = conn.execute(
            "SELECT count(*) FROM public.customers_client WHERE schema_name <> 'public'"
        ).fetchone()[0]
        without_column = conn.execute(
            "SELECT count(*) FROM unnest(%s::text[]) AS s(name) WHERE NOT EXISTS (SELECT FROM "
            "pg_attribute a JOIN pg_class t ON t.oid = a.attrelid JOIN pg_namespace n ON "
            "n.oid = t.relnamespace WHERE n.nspname = s.name AND t.relname = %s "
            "AND a.attname = %s AND NOT a.attisdropped)",
            [names, app.table, FIELD],
        ).fetchone()[0]
        without_index = conn.execute(
            "SELECT count(*) FROM unnest(%s::text[]) AS s(name) WHERE NOT EXISTS (SELECT FROM "
            "pg_indexes i WHERE i.schemaname = s.name AND i.tablename = %s "
            "AND i.indexname = %s)",
            [names, app.table, app.index],
        ).fetchone()[0]
        miscounted = [
            schema
            for schema in names
            if deploy.kind == "data"
            and conn.execute(
                f'SELECT count(*) FILTER (WHERE {FIELD} <> n) FROM "{schema}".{app.table}, '
                f'(SELECT count(*) n FROM "{schema}".{app.table}) c'
            ).fetchone()[0]
        ]
        without_row = [
            schema
            for schema in ["public", *names]
            if not conn.execute(
                f'SELECT 1 FROM "{schema}".django_migrations WHERE app = %s AND name = %s',
                [app.label, migration],
            ).fetchone()
        ]
    problems = []
    if registered != len(names):
        problems.append(f"{registered} tenant rows, not {len(names)}")
    if without_column:
        problems.append(f"{without_column} tenant(s) without the column {app.table}.{FIELD}")
    if miscounted:
        problems.append(
            f"{len(miscounted)} tenant(s) whose {FIELD} is not their row count "
            f"(first {', '.join(miscounted[:3])})"
        )
    if without_index:
        problems.append(f"{without_index} tenant(s) without the index {app.index}")
    if without_row:
        problems.append(
            f"{len(without_row)} schema(s) without the django_migrations row of {migration} "
            f"(first {', '.join(without_row[:3])})"
        )
    if problems:
        raise SystemExit("; ".join(problems))
    return {schema: fingerprint(url, schema) for schema in samples(names)}


def samples(names: list[str]) -> list[str]:
    return sorted({names[0], names[len(names) // 2], names[-1]})


def sql_alone(app: App, url: str, names: list[str], deploy: Deploy) -> list[float]:
    """The migration's SQL in every tenant, one psycopg transaction each; seconds per tenant.

    The copy is migrated already, so the column and the index get other names (the table, the
    statements and the work are the same)."""
    _, out = manage(
        app,
        url,
        "tenant_command",
        "sqlmigrate",
        app.label,
        deploy.migration,
        f"--schema={names[0]}",
        deploy=deploy.kind,
    )
    sql = "\n".join(
        line
        for line in out.splitlines()
        if line.strip() and not line.startswith("--") and line.strip() not in {"BEGIN;", "COMMIT;"}
    )
    sql = sql.replace(f'"{FIELD}"', f'"{FIELD}_sql"').replace(
        f'"{app.index}"', f'"{app.index}_sql"'
    )
    if f'"{FIELD}_sql"' not in sql or f'"{app.index}_sql"' not in sql:
        raise SystemExit(f"sqlmigrate gave no column and index to rename:\n{out}")
    if deploy.kind == "data":
        # The RunPython's own statements: the count, and the update with the count it read.
        sql += f"\nUPDATE {app.table} SET {FIELD}_sql = (SELECT count(*) FROM {app.table});"
    record = (
        "INSERT INTO django_migrations (app, name, applied) "
        f"VALUES ('{app.label}', '{deploy.migration}_sql', now());"
    )
    times = []
    with connect(url) as conn:
        for name in names:
            started = time.perf_counter()
            conn.execute(f'BEGIN; SET LOCAL search_path = "{name}"; {sql}\n{record} COMMIT;')
            times.append(time.perf_counter() - started)
    return times


@dataclasses.dataclass
class Measured:
    """What one app at one tenant count and one kind of deploy gave."""

    deploy: Deploy
    count: int
    times: dict[str, list[float]]
    ratios: dict[str, list[float]]
    loads: list[float]
    copies: list[float]
    sql: list[float]
    summaries: list[str]


def measure(
    app: App,
    dbs: Databases,
    golden: Golden,
    deploy: Deploy,
    commands: list[str],
    rounds: int,
    executor: str,
) -> Measured:
    names = golden.names
    result = Measured(
        deploy, len(names), {c: [] for c in commands}, {c: [] for c in commands}, [], [], [], []
    )
    for number in range(rounds):
        shift = number % len(commands)
        order = commands[shift:] + commands[:shift]
        times: dict[str, float] = {}
        prints: dict[str, dict[str, Any]] = {}
        outputs: dict[str, str] = {}
        for command in order:
            room_for(golden)
            copying = time.perf_counter()
            copy = dbs.create("bdeploycopy", template=golden.name)
            result.copies.append(time.perf_counter() - copying)
            url = dbs.url(copy)
            result.loads.append(os.getloadavg()[0])
            times[command], outputs[command] = manage(
                app, url, *COMMANDS[command], f"--executor={executor}", deploy=deploy.kind
            )
            prints[command] = check(app, url, names, deploy)
            if number == 0 and not result.sql:
                result.sql = sql_alone(app, url, names, deploy)
            dbs.drop(copy)
        reference = commands[0]
        for command in commands[1:]:
            for schema in prints[reference]:
                if prints[command][schema] != prints[reference][schema]:
                    differ = sorted(
                        key
                        for key in prints[reference][schema]
                        if prints[command][schema].get(key) != prints[reference][schema][key]
                    )
                    raise SystemExit(
                        f"{schema} differs between {label(reference)} and {label(command)}: "
                        f"{', '.join(differ)}"
                    )
        parts = []
        for command in commands:
            result.times[command].append(times[command])
            text = f"{label(command)} {times[command]:.1f}s"
            if command != "plain" and "plain" in times:
                ratio = times[command] / times["plain"]
                result.ratios[command].append(ratio)
                text += f" ({ratio:.3f} of plain)"
            parts.append(text)
        load = ", ".join(f"{value:.1f}" for value in result.loads[-len(order) :])
        print(f"  round {number + 1} (first {label(order[0])}; load {load}): " + ", ".join(parts))
        for command in commands:
            if command != "plain":
                line = summary_line(outputs[command])
                result.summaries.append(line)
                print(f"    {line}")
    return result


def summary_line(out: str) -> str:
    found = re.findall(r"^migrate_schemas_safe: .*tenant\(s\):.*$", out, re.MULTILINE)
    return found[-1] if found else "(no summary line)"


def label(command: str) -> str:
    return " ".join(COMMANDS[command])


def report(app: App, results: list[Measured], commands: list[str]) -> None:
    for measured in results:
        loads = f"{min(measured.loads):.1f} to {max(measured.loads):.1f}"
        print(
            f"{app.title}, {measured.count} current tenants, one new migration "
            f"({DEPLOYS[measured.deploy.kind]}), {len(measured.times['plain'])} round(s) (python "
            f"{sys.version.split()[0]}, load average {loads}):"
        )
        for command in commands:
            line = f"  {label(command):34} median {median(measured.times[command]):7.1f} s"
            line += f" (rounds {' / '.join(f'{t:.1f}' for t in measured.times[command])})"
            if measured.ratios[command]:
                line += f", {median(measured.ratios[command]):.3f} of plain"
                if command == "safe":
                    line += f" (target {TARGETS[measured.deploy.kind]})"
            print(line)
        sql = measured.sql
        print(
            f"  the migration's SQL alone: {median(sql) * 1000:.1f} ms per tenant (median; "
            f"{sum(sql):.1f} s for all {len(sql)}); a copy of the prepared database took "
            f"{median(measured.copies):.1f} s (median)"
        )
    for kind in DEPLOYS:
        of_kind = [m for m in results if m.deploy.kind == kind]
        if len(of_kind) >= 2:
            per_tenant(app, of_kind[0], of_kind[-1], commands)


def per_tenant(app: App, low: Measured, high: Measured, commands: list[str]) -> None:
    span = high.count - low.count
    parts = [
        f"{label(c)} {(median(high.times[c]) - median(low.times[c])) / span * 1000:.1f} ms"
        for c in commands
    ]
    print(
        f"{app.title}, {DEPLOYS[low.deploy.kind]}, cost per tenant from {low.count} to "
        f"{high.count} tenants: "
        + ", ".join(parts)
        + f"; the SQL alone {median(low.sql) * 1000:.1f} ms at {low.count} and "
        f"{median(high.sql) * 1000:.1f} ms at {high.count}"
    )


def median(values: list[float]) -> float:
    return statistics.median(values)


def run_app(key: str, ns: argparse.Namespace, workdir: Path) -> None:
    appdir = workdir / key
    appdir.mkdir()
    app = make_app(key, appdir, ns.models)
    deploys = [Deploy(kind, app.write_deploy(kind)) for kind in ns.deploy]
    commands = list(ns.commands)
    results: list[Measured] = []
    with Databases() as dbs:
        golden: Golden | None = None
        for count, rounds in zip(ns.tenants, ns.rounds, strict=True):
            golden = prepare(app, dbs, count, ns.jobs, golden)
            if "no-replay" in commands and not supports_no_replay(app, dbs.url(golden.name)):
                print("  migrate_schemas_safe has no --no-replay (yet): that column is left out")
                commands.remove("no-replay")
            for deploy in deploys:
                results.append(measure(app, dbs, golden, deploy, commands, rounds, ns.executor))
    report(app, results, commands)


def supports_no_replay(app: App, url: str) -> bool:
    _, out = manage(app, url, "migrate_schemas_safe", "--help")
    return "--no-replay" in out


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        yield Path(tmp)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--app", choices=["small", "large", "both"], default="both")
    parser.add_argument("--tenants", type=int, nargs="+", default=[150, 2000])
    parser.add_argument(
        "--rounds", type=int, nargs="+", default=[2], help="per tenant count, or one for all"
    )
    parser.add_argument("--commands", nargs="+", choices=list(COMMANDS), default=list(COMMANDS))
    parser.add_argument("--models", type=int, default=150, help="models of the large app")
    parser.add_argument("--jobs", type=int, default=2, help="psql processes restoring clones")
    parser.add_argument("--executor", default="standard")
    parser.add_argument("--deploy", nargs="+", choices=list(DEPLOYS), default=list(DEPLOYS))
    ns = parser.parse_args(argv)
    if len(ns.rounds) == 1:
        ns.rounds *= len(ns.tenants)
    if len(ns.rounds) != len(ns.tenants):
        parser.error("--rounds takes one number, or one per tenant count")
    ns.tenants, ns.rounds = zip(*sorted(zip(ns.tenants, ns.rounds, strict=True)), strict=True)
    if "plain" not in ns.commands:
        parser.error("--commands needs plain: the others are measured against it")
    ns.commands = ["plain", *(c for c in COMMANDS if c in ns.commands and c != "plain")]
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    # A SIGTERM (e.g. from timeout) ends the run through the finally blocks, which drop its
    # databases also on DATABASE_URL's server.
    signal.signal(signal.SIGTERM, _terminate)
    with server(), _workdir() as workdir:
        for key in ["small", "large"] if ns.app == "both" else [ns.app]:
            run_app(key, ns, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
