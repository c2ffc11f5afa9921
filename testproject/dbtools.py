"""Helpers that talk to the test project's PostgreSQL outside Django (psycopg), for the tests
and the benchmarks alike: databases, tenant rows, manage.py in a subprocess, fingerprints."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent


def direct_url() -> str:
    return os.environ["DATABASE_URL"]


def with_dbname(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@contextlib.contextmanager
def fresh_database(prefix: str = "ts") -> Iterator[str]:
    """A new, empty database on the server; dropped afterwards. Yields its name."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = with_dbname(direct_url(), "postgres")
    with connect(admin) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with connect(admin) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def manage(url: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300):
    """Run ``python -m testproject.manage`` against ``url`` in a subprocess."""
    full_env = {**os.environ, "DATABASE_URL": url, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "testproject.manage", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def manage_at_once(
    url: str, *args: str, runs: int = 2, env: dict[str, str] | None = None, timeout: float = 300
) -> list[tuple[int, str, str]]:
    """Start ``runs`` identical manage.py commands together; (exit status, stdout, stderr) each."""
    full_env = {**os.environ, "DATABASE_URL": url, **(env or {})}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "testproject.manage", *args],
            cwd=ROOT,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(runs)
    ]
    outputs = [proc.communicate(timeout=timeout) for proc in procs]
    return [(proc.returncode, out, err) for proc, (out, err) in zip(procs, outputs, strict=True)]


def connect(url: str) -> Any:
    """An autocommit connection with psycopg 3's ``execute()`` API, on either driver."""
    try:
        import psycopg
    except ImportError:
        import psycopg2

        raw = psycopg2.connect(url)
        raw.autocommit = True
        return _Psycopg2(raw)
    # No server-side prepared statements: they do not survive a transaction pooler.
    return psycopg.connect(url, autocommit=True, prepare_threshold=None)


class _Psycopg2:
    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.prepare_threshold = None

    def execute(self, sql: str, params: Any = None) -> Any:
        cursor = self.raw.cursor()
        cursor.execute(sql, params)
        return cursor

    def cursor(self) -> Any:
        return self.raw.cursor()

    def __enter__(self) -> _Psycopg2:
        return self

    def __exit__(self, *exc: object) -> None:
        self.raw.close()


def register_tenants(url: str, names: list[str], *, create_schemas: bool = True) -> None:
    """Tenant rows (and empty schemas) in a database whose public schema is migrated."""
    with connect(url) as conn:
        for name in names:
            conn.execute(
                "INSERT INTO public.customers_client (schema_name, name, created_on) "
                "VALUES (%s, %s, now())",
                [name, name.title()],
            )
            conn.execute(
                "INSERT INTO public.customers_domain (domain, is_primary, tenant_id) "
                "SELECT %s, true, id FROM public.customers_client WHERE schema_name = %s",
                [f"{name}.localhost", name],
            )
            if create_schemas:
                conn.execute(f'CREATE SCHEMA "{name}"')


def fingerprint(url: str, schema: str) -> dict[str, Any]:
    """Everything a migration leaves in ``schema``, with the schema's own name factored out."""

    def rows(sql: str, *params: Any) -> list[tuple[Any, ...]]:
        return [
            tuple(str(v).replace(f'"{schema}".', "").replace(f"{schema}.", "") for v in row)
            for row in conn.execute(sql, params).fetchall()
        ]

    with connect(url) as conn:
        tables = {
            r[0]
            for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s", [schema]
            ).fetchall()
        }
        fp: dict[str, Any] = {
            "columns": rows(
                "SELECT table_name, column_name, data_type, is_nullable, column_default "
                "FROM information_schema.columns WHERE table_schema = %s ORDER BY 1, 2",
                schema,
            ),
            "indexes": rows(
                "SELECT tablename, indexname, indexdef FROM pg_indexes "
                "WHERE schemaname = %s ORDER BY 1, 2",
                schema,
            ),
            "constraints": rows(
                "SELECT c.conrelid::regclass::text, c.conname, c.contype, "
                "pg_get_constraintdef(c.oid) FROM pg_constraint c "
                "JOIN pg_namespace n ON n.oid = c.connamespace WHERE n.nspname = %s "
                "ORDER BY 1, 2",
                schema,
            ),
            "sequences": rows(
                "SELECT sequencename, last_value FROM pg_sequences WHERE schemaname = %s "
                "ORDER BY 1",
                schema,
            ),
        }
        q = f'"{schema}"'
        if "django_migrations" in tables:
            fp["migrations"] = rows(f"SELECT app, name FROM {q}.django_migrations ORDER BY 1, 2")
        if "django_content_type" in tables:
            fp["content_types"] = rows(
                f"SELECT id, app_label, model FROM {q}.django_content_type ORDER BY 2, 3"
            )
        if "auth_permission" in tables:
            fp["permissions"] = rows(
                f"SELECT p.codename, p.name, ct.app_label, ct.model FROM {q}.auth_permission p "
                f"JOIN {q}.django_content_type ct ON ct.id = p.content_type_id ORDER BY 1, 3, 4"
            )
        for table, column in (
            ("shop_category", "name"),
            ("notes_note", "title"),
            ("notes_tag", "label"),
        ):
            if table in tables:
                fp[table] = rows(f"SELECT id, {column} FROM {q}.{table} ORDER BY id")
    return fp


def public_tables(url: str) -> set[str]:
    with connect(url) as conn:
        return {
            r[0]
            for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            ).fetchall()
        }


def schemas_named(url: str, names: list[str]) -> set[str]:
    with connect(url) as conn:
        return {
            r[0]
            for r in conn.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname = ANY(%s)", [names]
            ).fetchall()
        }


def reference_fingerprint(url: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """A tenant ("reference") saved the django-tenants way in ``url``'s database: what every
    tenant provisioned there must look like."""
    result = manage(
        url,
        "shell",
        "-c",
        "from testproject.customers.models import Client; "
        "Client(schema_name='reference', name='R').save(verbosity=0)",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    return fingerprint(url, "reference")
