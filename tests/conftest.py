from __future__ import annotations

import os
import shutil
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["tests.servers"]


@pytest.fixture
def drop_tenant_schemas(transactional_db: None) -> Iterator[None]:
    """Tenant schemas (and the lease rows of runs on them) outlive a transactional test's
    flush; drop them afterwards."""
    yield
    from tests.dbtools import connection

    connection.set_schema_to_public()
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname NOT IN ('public', "
            "'information_schema') AND nspname NOT LIKE 'pg\\_%%'"
        )
        for (name,) in cursor.fetchall():
            cursor.execute('DROP SCHEMA "%s" CASCADE' % name.replace('"', '""'))
        cursor.execute("SELECT to_regclass('public.tenantsafe_lease')")
        if cursor.fetchone()[0] is not None:
            cursor.execute("DELETE FROM public.tenantsafe_lease")
        cursor.execute("SELECT to_regclass('public.tenantsafe_spare')")
        if cursor.fetchone()[0] is not None:
            cursor.execute("DELETE FROM public.tenantsafe_spare")


@pytest.fixture
def fresh_recordings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No recording left by an earlier test, in the database or in the file xdist workers
    share (this process's and its subprocesses' temporary directory is the test's own)."""

    from tests.dbtools import scalar, sql

    def forget() -> None:
        if scalar("SELECT to_regclass('public.tenantsafe_recording') IS NOT NULL"):
            sql("DELETE FROM public.tenantsafe_recording")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    forget()
    yield
    forget()


@pytest.fixture
def migrations_run() -> Iterator[list[str]]:
    """Schemas django-tenants' migration machinery runs for, as its signal reports them."""
    from django_tenants.signals import schema_pre_migration

    seen: list[str] = []

    def receiver(sender: Any, schema_name: str, **kwargs: Any) -> None:
        seen.append(schema_name)

    schema_pre_migration.connect(receiver)
    yield seen
    schema_pre_migration.disconnect(receiver)


@pytest.fixture
def reference() -> dict[str, Any]:
    """What django-tenants' own migrating save() leaves in a schema."""
    from testproject.customers.models import Client
    from tests.dbtools import database_url, fingerprint

    Client(schema_name="reference", name="Reference").save(verbosity=0)
    return fingerprint(database_url(), "reference")


@pytest.fixture
def new_migrations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    """``make(app, {"0004_x": source, ...})``: a package with the test project app's
    migrations plus those, for ``MIGRATION_MODULES`` (on sys.path, and on PYTHONPATH of
    the processes the test starts)."""
    from tests.dbtools import ROOT

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), *sys.path])))

    def make(app: str, files: dict[str, str]) -> str:
        package = f"ts{app}_{uuid.uuid4().hex[:8]}"
        target = tmp_path / package
        shutil.copytree(
            ROOT / "testproject" / app / "migrations",
            target,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        for name, source in files.items():
            (target / f"{name}.py").write_text(textwrap.dedent(source))
        return package

    return make


@pytest.fixture
def extra_migration(new_migrations: Callable[..., str]) -> str:
    """The notes app's migrations plus a new 0004 (a table and a row), under another module."""
    return new_migrations(
        "notes",
        {
            "0004_extra": """
            from django.db import migrations


            class Migration(migrations.Migration):
                dependencies = [("notes", "0003_welcome_note")]

                operations = [
                    migrations.RunSQL(
                        "CREATE TABLE notes_extra (id serial PRIMARY KEY, label text NOT NULL);"
                        "INSERT INTO notes_extra (label) VALUES ('added')",
                        "DROP TABLE notes_extra",
                    )
                ]
            """
        },
    )
