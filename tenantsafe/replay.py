"""Provisioning tenant schemas from a recording of the statements their migration ran.

Migrating a schema mostly costs Python: loading the graph, rendering model states, running
post_migrate handlers. The SQL it sends is small and, for a fresh schema, the same every time.
So the first schema for a given migration state is migrated while an execute wrapper records
every statement that changed something; later schemas replay that recording in one
transaction with the search_path pinned, which leaves the same tables, rows and sequence
values.

Recordings live in ``public.tenantsafe_recording`` (created on first use), one row per
migration state and tenant type, so every process sharing the database replays what the first
one recorded. A row is looked up by the current state's digest: after a deploy that changes a
migration, the old row is never used, and the next recording deletes it.

A recording is only trusted when nothing in it is specific to the schema it was taken from
(its name, its tenant's domain or field values, a read of its tenant's row) and when it can
run inside one transaction; otherwise the row says why, and every schema is migrated. A replay
commits only if the new schema's catalog fingerprint equals the recorded one.

The interface: :func:`record` around a fresh schema's migration, :func:`replay` for the next
schemas, :func:`recording_for` to look, :func:`turn_to_record` so that processes sharing the
database record a state once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import DatabaseError, Error, connections, transaction
from django.db.backends.postgresql.psycopg_any import is_psycopg3
from django.db.migrations.loader import MigrationLoader
from django_tenants.utils import (
    get_tenant_domain_model,
    get_tenant_model,
)

from tenantsafe import conf, guard, locks, own_tables, schemas, statements, tenants
from tenantsafe.errors import ReplayMismatch, sqlstate

if is_psycopg3:
    import psycopg

logger = logging.getLogger("tenantsafe.replay")

TABLE = "tenantsafe_recording"
# Changes when what a recording holds or how it is fingerprinted changes: a recording made by
# another version is never used.
_FORMAT = "3"


@dataclass(frozen=True)
class Recording:
    state: str
    tenant_type: str
    # The statements, parameters bound, as one multi-statement string.
    sql: str
    # The catalog fingerprint (a digest) of the schema the statements were recorded from.
    fingerprint: str
    # Why the recording cannot be replayed; empty when it can.
    problem: str = ""


# state_key() builds Django's MigrationLoader, which imports every app's migrations (and
# re-runs their packages): a few ms a call, tens of ms the first time in a process, at every
# provisioning. So each process keeps its answer while nothing it came from can have changed:
# the settings and apps the loader reads, sys.path, the migration files (an edit changes the
# file's mtime) and the directories they are listed from, and the ones holding those (a file
# or package added, removed or renamed changes its directory's mtime). Nothing modified in
# the last _RACY seconds is kept: a second change within the filesystem's timestamp
# granularity could leave the same stat. Where it cannot tell (a top-level migrations module,
# one that is not imported), it computes the key every time.

_RACY = 2.0
_Stats = tuple[tuple[str, tuple[int, int, int, int]], ...]
_states: dict[tuple[str, ...], tuple[str, _Stats]] = {}


def state_key(alias: str, tenant_type: str = "") -> str:
    """A digest of everything a fresh schema's migration depends on.

    Every migration the loader finds on disk (so a new, removed or edited migration file
    changes it), which apps migrate into tenant schemas, and the routers. Not the database's
    name: xdist workers' test databases share it.
    """
    inputs = _state_inputs(alias, tenant_type)
    known = _states.get(inputs)
    if known is not None and _stats(path for path, _ in known[1]) == known[1]:
        return known[0]
    started = time.time()
    loader = MigrationLoader(None, ignore_no_migrations=True)
    digest = hashlib.sha256()
    for part in (
        _FORMAT,
        alias,
        tenant_type,
        repr(list(getattr(settings, "TENANT_APPS", []))),
        repr(getattr(settings, "TENANT_TYPES", None)),
        repr(list(getattr(settings, "DATABASE_ROUTERS", []))),
    ):
        digest.update(part.encode() + b"\0")
    for key in sorted(loader.disk_migrations):
        migration = loader.disk_migrations[key]
        digest.update(repr(key).encode() + b"\0")
        digest.update(_source(type(migration).__module__) + b"\0")
    state = digest.hexdigest()
    paths = _watched(loader)
    watched = _stats(paths) if paths is not None else None
    if watched is not None and all(
        max(stat[0], stat[1]) < (started - _RACY) * 1e9 for _, stat in watched
    ):
        _states[inputs] = (state, watched)
    return state


def _state_inputs(alias: str, tenant_type: str) -> tuple[str, ...]:
    from django.apps import apps

    return (
        alias,
        tenant_type,
        repr(list(getattr(settings, "TENANT_APPS", []))),
        repr(getattr(settings, "TENANT_TYPES", None)),
        repr(list(getattr(settings, "DATABASE_ROUTERS", []))),
        repr(getattr(settings, "MIGRATION_MODULES", {})),
        repr([(config.label, config.name) for config in apps.get_app_configs()]),
        repr(sys.path),
    )


def _watched(loader: MigrationLoader) -> list[str] | None:
    """The files and directories whose change can change what ``loader`` found; None when
    that is not known."""
    from django.apps import apps

    paths: set[str] = set()
    for config in apps.get_app_configs():
        name, _ = MigrationLoader.migrations_module(config.label)
        if name is None:
            continue
        parent = sys.modules.get(name.rpartition(".")[0])
        if parent is None or not hasattr(parent, "__path__"):
            return None
        paths.update(parent.__path__)
        module = sys.modules.get(name)
        paths.update(getattr(module, "__path__", ()))
        file = getattr(module, "__file__", None)
        if file:
            paths.add(str(file))
    for migration in loader.disk_migrations.values():
        path = getattr(sys.modules.get(type(migration).__module__), "__file__", None)
        if not path:
            return None
        paths.add(path)
    return sorted(paths)


def _stats(paths: Iterable[str]) -> _Stats | None:
    found = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            return None
        found.append((path, (info.st_mtime_ns, info.st_ctime_ns, info.st_size, info.st_ino)))
    return tuple(found)


def _source(module_name: str) -> bytes:
    path = getattr(sys.modules.get(module_name), "__file__", None)
    if not path:
        return module_name.encode()
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return module_name.encode()


# Where recordings live.


def table() -> str:
    return own_tables.qualified(TABLE)


def ensure_table(alias: str) -> None:
    own_tables.ensure(
        alias,
        TABLE,
        "state text NOT NULL, tenant_type text NOT NULL, statements text NOT NULL, "
        "fingerprint text NOT NULL, problem text NOT NULL, "
        "created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (state, tenant_type)",
    )


def recording_for(
    alias: str, tenant_type: str = "", *, state: str | None = None
) -> Recording | None:
    """The recording for the current migration state (usable or saying why not), if any."""
    state = state or state_key(alias, tenant_type)
    ensure_table(alias)
    connection: Any = connections[alias]
    connection.set_schema_to_public()
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT statements, fingerprint, problem FROM {table()} "  # noqa: S608
            "WHERE state = %s AND tenant_type = %s",
            [state, tenant_type],
        )
        row = cursor.fetchone()
    if row is not None:
        return Recording(state, tenant_type, row[0], row[1], row[2])
    shared = _from_file(state, tenant_type)
    if shared is not None:
        _store(alias, shared)
    return shared


def _store(alias: str, recording: Recording) -> None:
    """Keep ``recording`` unless one for its state is there already (a refusal replaces it);
    drop older states' recordings."""
    ensure_table(alias)
    connection: Any = connections[alias]
    connection.set_schema_to_public()
    with transaction.atomic(using=alias), connection.cursor() as cursor:
        own_tables.lock(cursor, own_tables.RECORDING_LOCK, recording.tenant_type)
        cursor.execute(
            f"DELETE FROM {table()} WHERE tenant_type = %s AND state <> %s",  # noqa: S608
            [recording.tenant_type, recording.state],
        )
        cursor.execute(
            f"INSERT INTO {table()} AS r (state, tenant_type, statements, "  # noqa: S608
            "fingerprint, problem) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (state, tenant_type) "
            "DO UPDATE SET statements = '', fingerprint = '', problem = excluded.problem "
            "WHERE excluded.problem <> '' AND r.problem = ''",
            [
                recording.state,
                recording.tenant_type,
                recording.sql,
                recording.fingerprint,
                recording.problem,
            ],
        )


def discard(alias: str, state: str, tenant_type: str, problem: str) -> None:
    """Stop replaying for ``state``: its schemas are migrated one by one from now on."""
    logger.warning("tenantsafe: new tenant schemas will be migrated, not replayed: %s", problem)
    _remove_file(state, tenant_type)
    _store(alias, Recording(state, tenant_type, "", "", problem))


# Recording once. Processes sharing a database that find no recording for their state (two web
# workers' first signups after a deploy, say) make it once between them: the first takes a
# claim, a lease (tenantsafe.locks) on a name no schema can have, and records; the others poll
# until its recording is stored. A lease needs no session or open transaction, so this holds
# through a transaction pooler, and a dead recorder's claim expires (at once when its process
# on this host is gone). A waiter that waited TENANTSAFE_RECORDING_WAIT_SECONDS, or whose
# recorder gave up, records itself, as every process did before.


def _claim_name(state: str, tenant_type: str) -> str:
    return f"recording:{tenant_type}:{state}"


@contextlib.contextmanager
def turn_to_record(alias: str, tenant_type: str = "") -> Iterator[Recording | None]:
    """The current migration state's recording, after waiting while another process records
    it; None when this process is to record it, and then the block holds the claim that makes
    the others wait (unless it waited in vain). Call it outside any transaction."""
    state = state_key(alias, tenant_type)
    found = recording_for(alias, tenant_type, state=state)
    if found is not None:
        yield found
        return
    claim, found = _claim(alias, state, tenant_type)
    try:
        yield found
    finally:
        if claim is not None:
            claim.complete()
            claim.release()


def _claim(alias: str, state: str, tenant_type: str) -> tuple[locks.Lease | None, Recording | None]:
    name = _claim_name(state, tenant_type)
    wait = conf.recording_wait_seconds()
    deadline = time.monotonic() + wait
    pauses = locks.pauses()
    while True:
        claim = locks.try_lease(alias, name, purpose="record")
        # Looked at after the claim: its previous holder may have stored it and gone.
        found = recording_for(alias, tenant_type, state=state)
        if claim is not None and found is None:
            return claim, None
        if claim is not None:
            claim.complete()
            claim.release()
        if found is not None:
            return None, found
        if time.monotonic() >= deadline:
            logger.warning(
                "tenantsafe: waited %.0f s for another process to record the migration state; "
                "migrating and recording here instead",
                wait,
            )
            return None, None
        time.sleep(next(pauses))


# The file xdist workers of one test session share (each has a database of its own). Only
# create_tenant turns it on: a production process has one database and needs none. A worker
# that finds no file takes the file's lock and keeps it until it has recorded (or gave up), so
# the others wait for its recording instead of migrating too.

_share_files = False
_file_locks: dict[Path, Any] = {}
# How long a worker waits for another one's recording before it migrates itself.
_FILE_WAIT = 600.0


@contextlib.contextmanager
def sharing_files() -> Iterator[None]:
    global _share_files
    previous, _share_files = _share_files, True
    try:
        yield
    finally:
        _share_files = previous
        if not previous:
            for path in list(_file_locks):
                _unlock(path)


def _file(state: str, tenant_type: str) -> Path:
    name = hashlib.sha256(f"{state}\0{tenant_type}".encode()).hexdigest()[:32]
    return Path(tempfile.gettempdir()) / f"tenantsafe-recordings-{os.getuid()}" / f"{name}.json"


def _own_directory(path: Path) -> bool:
    """Create the directory if needed; True only if it is ours and nobody else may write in
    it (what it holds is run as SQL)."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = path.lstat()
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022


def _read_file(path: Path, state: str, tenant_type: str) -> Recording | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("state") != state or data.get("tenant_type") != tenant_type:
        return None
    return Recording(state, tenant_type, str(data["sql"]), str(data["fingerprint"]))


def _from_file(state: str, tenant_type: str) -> Recording | None:
    """The shared file's recording; without one, this process is to record it (it takes the
    file's lock, waiting while another process holds it) and None."""
    if not _share_files:
        return None
    path = _file(state, tenant_type)
    if path in _file_locks or not _own_directory(path.parent):
        return None
    found = _read_file(path, state, tenant_type)
    if found is not None:
        return found
    handle = open(path.with_suffix(".lock"), "a")  # noqa: SIM115 - kept while recording
    deadline = time.monotonic() + _FILE_WAIT
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                handle.close()
                return None
            time.sleep(0.05)
    found = _read_file(path, state, tenant_type)
    if found is not None:
        handle.close()
        return found
    _file_locks[path] = handle
    return None


def _unlock(path: Path) -> None:
    handle = _file_locks.pop(path, None)
    if handle is not None:
        handle.close()


def _to_file(recording: Recording) -> None:
    if not _share_files:
        return
    path = _file(recording.state, recording.tenant_type)
    try:
        if not recording.problem and _own_directory(path.parent):
            temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            temporary.write_text(
                json.dumps(
                    {
                        "state": recording.state,
                        "tenant_type": recording.tenant_type,
                        "sql": recording.sql,
                        "fingerprint": recording.fingerprint,
                    }
                )
            )
            # Atomic: a worker reads the whole recording or none.
            temporary.replace(path)
    finally:
        _unlock(path)


def _remove_file(state: str, tenant_type: str) -> None:
    if _share_files:
        with contextlib.suppress(OSError):
            _file(state, tenant_type).unlink()


# Recording.


@dataclass(frozen=True)
class _Statement:
    sql: Any
    params: Any
    many: bool


class Recorder:
    """An execute wrapper keeping every statement that changed ``schema`` and succeeded."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.statements: list[_Statement] = []
        # A migration that reads the tenant's own row may write what it read (its pk, a
        # date) where no identifying string shows: such a recording is never replayed.
        self._tenant_tables = re.compile(
            "|".join(
                rf"\b{re.escape(model._meta.db_table)}\b"
                for model in (get_tenant_model(), get_tenant_domain_model())
            ),
            re.IGNORECASE,
        )
        self.read_tenant_row = ""
        # What the migration read in the schema: a deploy's replay depends on those rows.
        self.reads: list[str] = []

    def __call__(
        self,
        execute: Callable[..., Any],
        sql: Any,
        params: Any,
        many: bool,
        context: dict[str, Any],
    ) -> Any:
        if many and params is not None and not isinstance(params, (list, tuple)):
            # An iterator would be used up by the driver; keep a list we can replay.
            params = list(params)
        connection = context["connection"]
        ours = getattr(connection, "schema_name", None) == self.schema and not _sets_own_path(
            sql, connection, self.schema
        )
        result = execute(sql, params, many, context)
        if not ours:
            return result
        if isinstance(sql, str) and statements.is_read(sql):
            if not self.read_tenant_row and self._tenant_tables.search(sql):
                self.read_tenant_row = sql
            self.reads.append(sql)
        else:
            self.statements.append(_Statement(sql, params, many))
        return result


def _sets_own_path(sql: Any, connection: Any, schema: str) -> bool:
    # django-tenants sets the path to the schema (and back) when it opens a cursor and around
    # introspection; that is not part of the migration, and the replay pins the path itself.
    match = isinstance(sql, str) and statements.SET_SEARCH_PATH.match(sql)
    if not match:
        return False
    names = {part.strip().strip('"') for part in match.group(1).split(",")}
    return names <= {schema, "$user", *connection._get_cursor_search_paths()}


@contextlib.contextmanager
def record(alias: str, tenant: Any) -> Iterator[None]:
    """Record the block's statements in ``tenant``'s (new) schema, and keep them if it ends
    without an exception and nothing is recorded for this migration state yet."""
    tenant_type = tenants.tenant_type(tenant)
    state = state_key(alias, tenant_type)
    if recording_for(alias, tenant_type, state=state) is not None:
        yield
        return
    connection: Any = connections[alias]
    recorder = Recorder(tenant.schema_name)
    # First in the list is outermost: the recorder sees each statement as the migration sent
    # it, before the guard adds its search_path check to it.
    connection.execute_wrappers.insert(0, recorder)
    try:
        yield
    finally:
        connection.execute_wrappers.remove(recorder)
    recording = _built(alias, state, tenant_type, recorder, identifying(tenant, alias))
    if recording.problem:
        discard(alias, state, tenant_type, recording.problem)
    else:
        _store(alias, recording)
    # Releases the shared file's lock either way: the other workers go on (and migrate, when
    # it was refused).
    _to_file(recording)


def _built(
    alias: str, state: str, tenant_type: str, recorder: Recorder, identifying: Iterable[str]
) -> Recording:
    """The recording (usable, or with the reason it is not)."""
    parts, problem = _kept(alias, recorder, identifying)
    if problem:
        return Recording(state, tenant_type, "", "", problem)
    path = _path(connections[alias], recorder.schema, tenant_type)
    with guard.pinned_transaction(alias, path) as cursor:
        print_ = fingerprint(cursor, recorder.schema)
    sql = _joined(parts)
    folded = statements.fold_constraints(parts)
    if folded != parts and _leaves(alias, tenant_type, _joined(folded), print_):
        sql = _joined(folded)
    return Recording(state, tenant_type, sql, print_)


def _leaves(alias: str, tenant_type: str, sql: str, expected: str) -> bool:
    """Whether ``sql`` replayed into a new schema leaves one whose fingerprint is
    ``expected``; rolled back either way."""
    try:
        with in_scratch(alias, tenant_type, sql) as (cursor, scratch):
            # Deferred constraints are checked at commit, which this never reaches.
            cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
            return fingerprint(cursor, scratch) == expected
    except Error as exc:
        # Only a faster form of what is kept anyway: whatever went wrong, it is not used.
        logger.debug("the recording with constraints folded in fails (%s): kept as recorded", exc)
        return False


@contextlib.contextmanager
def in_scratch(alias: str, tenant_type: str, sql: str) -> Iterator[tuple[Any, str]]:
    """A raw cursor, and the name of the new schema ``sql`` was replayed into, with that
    schema's path pinned; in a transaction that is rolled back after the block."""
    scratch = f"tenantsafe_scratch_{uuid.uuid4().hex[:12]}"
    path = _path(connections[alias], scratch, tenant_type)
    with guard.pinned_transaction(alias, path, create=True) as cursor:
        try:
            cursor.execute(sql)
            yield cursor, scratch
        finally:
            transaction.set_rollback(True, using=alias)


def taken(alias: str, recorder: Recorder, identifying: Iterable[str]) -> tuple[str, str]:
    """What ``recorder`` recorded as one multi-statement string, and why it cannot be
    replayed into another schema (empty when it can)."""
    parts, problem = _kept(alias, recorder, identifying)
    return _joined(parts), problem


def _kept(alias: str, recorder: Recorder, identifying: Iterable[str]) -> tuple[list[str], str]:
    """The statements ``recorder`` recorded, parameters bound, or why they cannot be replayed
    into another schema."""
    kept: list[_Statement] = []
    words = sorted({w for w in identifying if w}, key=len, reverse=True)
    pattern = (
        re.compile("|".join(rf"(?<![\w$]){re.escape(w)}(?![\w$])" for w in words), re.IGNORECASE)
        if words
        else None
    )
    problem = ""
    if recorder.read_tenant_row:
        problem = f"{statements.short(recorder.read_tenant_row)!r} reads the tenant's own row"
    for statement in () if problem else map(_normalised, recorder.statements):
        sql = statement.sql
        if isinstance(sql, str):
            sql = statements.CONCURRENTLY.sub(r"\1", sql)
            if statements.NON_TRANSACTIONAL.match(sql):
                problem = f"{statements.short(sql)!r} cannot run inside a transaction"
            elif statements.ENDS_TRANSACTION.search(sql):
                problem = f"{statements.short(sql)!r} controls the transaction"
        if not problem and pattern is not None:
            found = pattern.search(sql if isinstance(sql, str) else repr(sql))
            found = found or next(
                (m for m in map(pattern.search, _strings(statement.params)) if m), None
            )
            if found:
                problem = (
                    f"{statements.short(str(sql))!r} names {found.group(0)!r}, which belongs "
                    f'to the tenant of schema "{recorder.schema}"'
                )
        if problem:
            break
        kept.append(_Statement(sql, statement.params, statement.many))
    if problem:
        return [], problem
    connection: Any = connections[alias]
    connection.ensure_connection()
    return _bound(connection.connection, kept), ""


def _normalised(statement: _Statement) -> _Statement:
    sql, params = statement.sql, statement.params
    if (
        isinstance(sql, str)
        and not statement.many
        and isinstance(params, (list, tuple))
        and len(params) == 3
        and (found := statements.RECORD_APPLIED.match(sql))
        and sql.startswith("%s, %s, %s)", found.end())
    ):
        # When it was applied is the replay's own time, not the recorded one's (and two
        # recordings of one plan are then the same text).
        at = found.end() + len("%s, %s, ")
        return _Statement(
            f"{sql[:at]}statement_timestamp(){sql[at + 2 :]}", list(params[:2]), False
        )
    return statement


def identifying(tenant: Any, alias: str) -> list[str]:
    # What a data migration could copy from the tenant it runs for: its schema name, domains
    # and (longer) text fields. A recording naming any of them is specific to that tenant.
    values = [tenant.schema_name]
    if tenant.pk is not None:
        values += list(
            get_tenant_domain_model()
            ._default_manager.db_manager(alias)
            .filter(tenant=tenant)
            .values_list("domain", flat=True)
        )
    for field in tenant._meta.concrete_fields:
        value = getattr(tenant, field.attname, None)
        if isinstance(value, str) and len(value) >= 3:
            values.append(value)
    return values


def _strings(params: Any) -> Iterable[str]:
    if isinstance(params, str):
        yield params
    elif isinstance(params, dict):
        for value in params.values():
            yield from _strings(value)
    elif isinstance(params, (list, tuple)):
        for value in params:
            yield from _strings(value)


def _bound(raw: Any, kept: list[_Statement]) -> list[str]:
    with _binder(raw) as bind:
        parts: list[str] = []
        for statement in kept:
            if statement.many:
                parts.extend(bind(statement.sql, params) for params in statement.params)
            elif statement.params is None:
                parts.append(statement.sql)
            else:
                parts.append(bind(statement.sql, statement.params))
    return parts


def _joined(parts: list[str]) -> str:
    # A newline before each ';' so that a statement ending in a -- comment still ends.
    return "\n;\n".join(parts)


@contextlib.contextmanager
def _binder(raw: Any) -> Iterator[Callable[[str, Any], str]]:
    if is_psycopg3:
        with contextlib.closing(psycopg.ClientCursor(raw)) as client:
            yield lambda sql, params: str(client.mogrify(sql, params))
        return
    encoding = raw.encoding
    with contextlib.closing(raw.cursor()) as cursor:

        def bind(sql: str, params: Any) -> str:
            value = cursor.mogrify(sql, params)
            return value.decode(encoding) if isinstance(value, bytes) else str(value)

        yield bind


# Catalog fingerprints: what each schema holds, with its own name factored out (the prefix
# PostgreSQL prints where the schema is not first on the path), one line per object; a digest
# of the lines per schema, or the lines themselves (to name what differs).
_CATALOG_LINES = r"""
WITH ns AS (
  SELECT oid, nspname, quote_ident(nspname) || '.' AS own
    FROM pg_namespace WHERE nspname = ANY(%(schemas)s)),
-- The schema's relations through pg_depend, whose index finds them (pg_class has none on
-- relnamespace, and a scan of it grows with every tenant); indexes come through pg_index.
rel AS (
  SELECT c.oid, c.relname, c.relkind, c.relpersistence, ns.nspname, ns.own
    FROM ns JOIN pg_depend d ON d.refclassid = 'pg_namespace'::regclass
         AND d.refobjid = ns.oid AND d.classid = 'pg_class'::regclass AND d.objsubid = 0
    JOIN pg_class c ON c.oid = d.objid AND c.relnamespace = ns.oid),
lines AS (
  SELECT r.nspname, concat_ws(E'\t', 'relation', r.relname, r.relkind, r.relpersistence)
    FROM rel r WHERE r.relkind NOT IN ('i', 'I')
  UNION ALL
  SELECT r.nspname, concat_ws(E'\t', 'column', r.relname, a.attname, a.attnum, a.attcollation,
         replace(format_type(a.atttypid, a.atttypmod), r.own, ''),
         a.attnotnull, a.attidentity, a.attgenerated,
         replace(coalesce(pg_get_expr(d.adbin, d.adrelid), ''), r.own, ''))
    FROM rel r JOIN pg_attribute a ON a.attrelid = r.oid
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE a.attnum > 0 AND NOT a.attisdropped AND r.relkind NOT IN ('i', 'I', 'S')
  UNION ALL
  -- By its catalog columns too: deparsing every constraint cost a third of the query. Only
  -- CHECK and exclusion constraints, whose expressions these columns do not show, are.
  SELECT r.nspname, concat_ws(E'\t', 'constraint', r.relname, con.conname, con.contype,
         con.condeferrable, con.condeferred, con.convalidated, con.conkey, con.confkey,
         replace(NULLIF(con.confrelid, 0)::regclass::text, r.own, ''),
         con.confupdtype, con.confdeltype, con.confmatchtype,
         CASE WHEN con.contype IN ('c', 'x')
              THEN replace(pg_get_constraintdef(con.oid), r.own, '') END)
    FROM rel r JOIN pg_constraint con ON con.conrelid = r.oid
  UNION ALL
  -- By its catalog columns (column numbers are in the column lines): deparsing every index
  -- would cost most of the query. Expressions and predicates are deparsed.
  SELECT r.nspname, concat_ws(E'\t', 'index', r.relname, c.relname, c.relam, c.reltablespace,
         c.reloptions, i.indisunique, i.indisprimary, i.indnullsnotdistinct, i.indimmediate,
         i.indkey, i.indclass, i.indcollation, i.indoption,
         CASE WHEN i.indexprs IS NOT NULL OR i.indpred IS NOT NULL
              THEN replace(pg_get_indexdef(i.indexrelid), r.own, '') END)
    FROM rel r JOIN pg_index i ON i.indrelid = r.oid JOIN pg_class c ON c.oid = i.indexrelid
  UNION ALL
  SELECT r.nspname, concat_ws(E'\t', 'sequence', r.relname, format_type(s.seqtypid, NULL),
         s.seqstart, s.seqincrement, s.seqmin, s.seqmax, s.seqcycle,
         CASE WHEN %(values)s THEN coalesce(pg_sequence_last_value(r.oid)::text, '') END)
    FROM rel r JOIN pg_sequence s ON s.seqrelid = r.oid
)
"""
_CATALOG = (
    _CATALOG_LINES  # noqa: S608 - constant SQL
    + r"""
SELECT ns.nspname, encode(sha256(convert_to(
         coalesce(string_agg(l.concat_ws, E'\n' ORDER BY l.concat_ws COLLATE "C"), ''),
         'UTF8')), 'hex')
  FROM ns LEFT JOIN lines l ON l.nspname = ns.nspname GROUP BY ns.nspname
"""
)
_CATALOG_ROWS = _CATALOG_LINES + "SELECT l.nspname, l.concat_ws FROM lines l"  # noqa: S608


def catalogs(cursor: Any, names: Sequence[str], *, sequence_values: bool = False) -> dict[str, str]:
    """A digest per schema of ``names`` (missing ones are left out): its tables, columns with
    types, defaults and nullability, constraints, indexes and sequences (their values too with
    ``sequence_values``). Independent of the search path, except for how objects in schemas
    other than the digested one print."""
    cursor.execute(_CATALOG, {"schemas": list(names), "values": sequence_values})
    return dict(cursor.fetchall())


def catalog_lines(cursor: Any, names: Sequence[str]) -> dict[str, list[str]]:
    """The lines :func:`catalogs` digests (without sequence values), sorted, per schema of
    ``names`` that has any: one per relation, column, constraint, index and sequence,
    tab-separated, the kind of object first (see :mod:`tenantsafe.drift`)."""
    cursor.execute(_CATALOG_ROWS, {"schemas": list(names), "values": False})
    found: dict[str, list[str]] = {}
    for schema, line in cursor.fetchall():
        found.setdefault(schema, []).append(line)
    # The digest's order: by code point, as COLLATE "C" sorts.
    return {schema: sorted(lines) for schema, lines in found.items()}


def fingerprint(cursor: Any, schema: str) -> str:
    """The digest of a new schema, with its sequences' values (see :func:`catalogs`)."""
    return catalogs(cursor, [schema], sequence_values=True).get(schema, "")


# Tables per statement of rows_digests: PostgreSQL plans a UNION ALL of scalar subqueries in
# time that grows with the square of their number (200 cost four times as much a table as 50).
_ROWS_BATCH = 50

# The rows a recording may depend on (those it read, and those it inserted and was given ids
# for): small tables, digested whole, with the values of their sequences.
ROW_LIMIT = 1000


# Content types and permissions without their ids: which models and permissions a schema
# has, whatever order they were created in. (row, what the row needs joined.)
_WITHOUT_IDS = {
    "django_content_type": ("(t.app_label, t.model)::text", ""),
    "auth_permission": (
        "(c.app_label, c.model, t.codename, t.name)::text",
        'LEFT JOIN {schema}."django_content_type" c ON c.id = t.content_type_id',
    ),
}
WITHOUT_IDS = frozenset(_WITHOUT_IDS)


def rows_digests(
    cursor: Any,
    names: Sequence[str],
    tables: Iterable[str],
    *,
    present: Iterable[str] | None = None,
    unlimited: Iterable[str] = (),
    without_ids: Iterable[str] = (),
) -> dict[str, str | None]:
    """A digest per schema of ``names`` of the rows of those of ``tables`` it has, and of
    their sequences' values; None where one of them holds more than ``ROW_LIMIT`` rows.
    ``django_migrations`` counts by app and name only (when and in which order is not part
    of the state). ``present``: the tables each schema is known to have (one query less; a
    missing one fails). ``unlimited``: tables read whatever their size. ``without_ids``
    (of ``WITHOUT_IDS``): tables digested without their ids and sequence values."""
    wanted = sorted(set(tables))
    whole = set(unlimited)
    idless = set(without_ids)
    if present is None:
        cursor.execute(
            "SELECT n.nspname, c.relname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = ANY(%s) AND c.relname = ANY(%s) AND c.relkind IN ('r', 'p')",
            [list(names), wanted],
        )
        pairs = sorted(cursor.fetchall())
    else:
        pairs = [(schema, name) for schema in names for name in sorted(set(present) & set(wanted))]
    lines: dict[str, list[str]] = {name: [] for name in names}
    for start in range(0, len(pairs), _ROWS_BATCH):
        batch = pairs[start : start + _ROWS_BATCH]
        parts = []
        for i, (schema, name) in enumerate(batch):
            relation = f"{schemas.quote(schema)}.{schemas.ident(name)}"
            row, join = "(t.app, t.name)::text" if name == "django_migrations" else "t::text", ""
            if name in idless:
                row, join = _WITHOUT_IDS[name]
                join = join.format(schema=schemas.quote(schema))
            limit = None if name in whole else ROW_LIMIT
            at_most = f"LIMIT {limit + 1}" if limit else ""
            sequences = (
                "NULL"
                if name in idless
                else "(SELECT string_agg(s.relname || '=' || "  # noqa: S608
                "coalesce(pg_sequence_last_value(s.oid)::text, ''), ' ' ORDER BY s.relname) "
                "FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S' "
                "WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass "
                f"AND d.refobjid = {schemas.literal(relation)}::regclass "
                "AND d.deptype IN ('a', 'i'))"
            )
            parts.append(
                f"SELECT {i}, (SELECT CASE WHEN count(*) > {limit or 'NULL'} THEN NULL ELSE "  # noqa: S608
                "encode(sha256(convert_to(coalesce(string_agg(r, E'\\n' ORDER BY r COLLATE "
                f"\"C\"), ''), 'UTF8')), 'hex') END FROM (SELECT {row} AS r FROM {relation} t "
                f"{join} {at_most}) x), {sequences}"
            )
        cursor.execute(" UNION ALL ".join(parts))
        for i, digest, sequences in cursor.fetchall():
            schema, name = batch[i]
            lines[schema].append(f"{name}\t{digest}\t{sequences or ''}" if digest else "")
    result: dict[str, str | None] = {}
    for schema, found in lines.items():
        if "" in found:
            result[schema] = None
        else:
            result[schema] = hashlib.sha256("\n".join(sorted(found)).encode()).hexdigest()
    return result


def pinned_path(alias: str, schema: str, tenant_type: str) -> list[str]:
    """The search path a replay pins for ``schema`` (for :func:`fingerprint` and guard.pin)."""
    return _path(connections[alias], schema, tenant_type)


def _path(connection: Any, schema: str, tenant_type: str) -> list[str]:
    # The path the migration ran with: the schema, then public and any extra paths.
    connection.set_schema(schema, tenant_type=tenant_type or None)
    try:
        return guard.search_path(connection)
    finally:
        connection.set_schema_to_public()


# Replaying.


def replay(alias: str, tenant: Any) -> bool:
    """Create ``tenant``'s schema from the recording for the current state, if there is a
    usable one, in one transaction (a savepoint inside the caller's). False when there is
    none, or when replaying it failed or left a schema unlike the recorded one: then nothing
    of it is kept, the recording is discarded, and the schema is to be migrated."""
    schema = tenant.schema_name
    tenant_type = tenants.tenant_type(tenant)
    recording = recording_for(alias, tenant_type)
    if recording is None or recording.problem:
        return False
    started = time.perf_counter()
    path = _path(connections[alias], schema, tenant_type)
    try:
        # Through a transaction pooler the batch runs on the server connection checked.
        with guard.pinned_transaction(alias, path, create=True) as cursor:
            # One round trip: the statements as one multi-statement query.
            cursor.execute(recording.sql)
            if fingerprint(cursor, schema) != recording.fingerprint:
                raise ReplayMismatch(schema=schema)
    except ReplayMismatch:
        discard(
            alias,
            recording.state,
            tenant_type,
            f"replaying it into {schema} left a schema unlike the recorded one",
        )
        return False
    except DatabaseError as exc:
        if sqlstate(exc) == "42P06":
            # The schema appeared meanwhile (another process provisioned it): not the
            # recording's fault.
            return False
        # Something in the recording depends on more than the schema (a row a data
        # migration read in public, say): stop trusting it and migrate instead.
        discard(alias, recording.state, tenant_type, f"replaying it into {schema} failed: {exc}")
        return False
    logger.debug(
        "schema %s: replayed %d characters of SQL in %.1f ms",
        schema,
        len(recording.sql),
        (time.perf_counter() - started) * 1000,
    )
    return True
