"""What ``migrate_schemas_safe`` does: django-tenants' executors, guarded and fault-isolated."""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import queue
import re
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from django.conf import settings
from django.core.management.base import CommandError, OutputWrapper
from django.core.management.color import Style
from django.db import DatabaseError, connections
from django.db.migrations.loader import MigrationLoader
from django.db.models.signals import post_migrate
from django_tenants.migration_executors import base as upstream
from django_tenants.migration_executors.multiproc import get_pool
from django_tenants.signals import schema_migrated, schema_pre_migration
from django_tenants.utils import get_public_schema_name

from tenantsafe import (
    deploy,
    guard,
    locks,
    plan,
    progress,
    replay,
    schemas,
    spares,
    statements,
    stopping,
)
from tenantsafe.drift import grouped_apart
from tenantsafe.errors import (
    PlanError,
    ReplayMismatch,
    SchemaMissingError,
    SchemaNameError,
    SearchPathError,
    sqlstate,
)
from tenantsafe.options import RunOptions
from tenantsafe.results import (
    CURRENT,
    FAILED,
    MIGRATED,
    NOT_ATTEMPTED,
    PENDING,
    PLANNED,
    REPLAYED,
    Summary,
    TenantRef,
    TenantResult,
)

logger = logging.getLogger("tenantsafe.migrate")


@contextlib.contextmanager
def _planned() -> Iterator[list[int]]:
    """How many migrations ``migrate`` applied, from the plan its post_migrate signal carries.

    --plan and --check return before sending it: they applied nothing.
    """
    seen: list[int] = []

    def receiver(plan: list[Any] | None = None, **kwargs: Any) -> None:
        if plan is not None and not seen:
            seen.append(len(plan))

    post_migrate.connect(receiver, dispatch_uid="tenantsafe.migrate.planned")
    try:
        yield seen
    finally:
        post_migrate.disconnect(dispatch_uid="tenantsafe.migrate.planned")


def _log_path(alias: str, schema: str, when: str) -> None:
    if not logger.isEnabledFor(logging.DEBUG):
        return
    current, path = guard.read_path(connections[alias])
    logger.debug(
        "tenant %s %s migrations: current_schema() = %s, search_path = %s",
        schema,
        when,
        current,
        path,
    )


def _public(alias: str) -> None:
    connection: Any = connections[alias]
    connection.set_schema_to_public()


def _reset(alias: str) -> None:
    connection: Any = connections[alias]
    with contextlib.suppress(Exception):
        connection.close()
    connection.set_schema_to_public()


class _LineTracker:
    """sys.stdout for migrate's output, remembering whether its last line is unfinished.

    migrate writes "  Applying x..." and " OK" separately; a failure in between leaves the
    line open, and whatever is written next would be glued to it.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.open_line = False

    def write(self, text: str) -> int:
        if text:
            self.open_line = not text.endswith("\n")
        return int(self._stream.write(text) or 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _LockWaits:
    """Execute wrapper noting the statement that hit lock_timeout, and in which kind of
    migration (atomic ones are rolled back whole and can be tried again)."""

    def __init__(self) -> None:
        self.sql = ""
        self.atomic = False

    def __call__(
        self, execute: Any, sql: Any, params: Any, many: bool, context: dict[str, Any]
    ) -> Any:
        try:
            return execute(sql, params, many, context)
        except Exception as exc:
            if _is_lock_timeout(exc):
                self.sql = sql if isinstance(sql, str) else repr(sql)
                self.atomic = context["connection"].in_atomic_block
            raise


def _is_lock_timeout(exc: BaseException) -> bool:
    return sqlstate(exc) == "55P03"


def _is_connection_lost(exc: BaseException) -> bool:
    # Class 08 (connection exception), 57P01-57P03 (terminated, shutting down), or the
    # driver's own "the connection is lost/closed" without a SQLSTATE.
    code = sqlstate(exc)
    if code:
        return code.startswith("08") or code in ("57P01", "57P02", "57P03")
    seen: BaseException | None = exc
    while seen is not None:
        if type(seen).__name__ in ("OperationalError", "InterfaceError"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _blockers(alias: str, schema: str, sql: str) -> str:
    """Which relations of ``schema`` that ``sql`` names are locked by others, and by whom."""
    names = sorted(set(re.findall(r'"([^"]+)"', sql)) | set(re.findall(r"\b(\w+)\b", sql)))
    try:
        connection: Any = connections[alias]
        connection.set_schema_to_public()
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT DISTINCT c.relname, l.pid, a.state, left(a.query, 100) "
                "FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE n.nspname = %s AND c.relname = ANY(%s) AND l.granted "
                "AND l.pid <> pg_backend_pid() ORDER BY 1, 2",
                [schema, names],
            )
            rows = cursor.fetchall()
    except Exception:
        logger.debug("cannot read who holds the locks in %s", schema, exc_info=True)
        rows = []
    if not rows:
        return "a lock that is no longer held"
    return "; ".join(
        f'"{schema}".{rel} held by pid {pid}'
        + (f" ({state}: {' '.join(str(query).split())})" if state else "")
        for rel, pid, state, query in rows
    )


def migrate_tenant(
    opts: RunOptions,
    tenant: TenantRef,
    *,
    allow_atomic: bool = True,
    idx: int | None = None,
    count: int | None = None,
    lease: locks.Lease | None = None,
) -> TenantResult:
    """Migrate one schema through django-tenants' ``run_migrations``, under the guard and lease.

    Never raises for a failure of this tenant: the caller goes on with the next one. ``lease``
    is one the caller holds already (create_tenant); otherwise the tenant's own is taken.
    """
    alias = opts.database
    try:
        schemas.validate(tenant.schema)
        with guard.guarding(alias), _holding(opts, tenant.schema, lease) as held:
            result = _migrate_retrying(opts, tenant, allow_atomic, idx, count, held)
            if held is not None and result.status in (MIGRATED, CURRENT):
                held.complete()
            return result
    except Exception as exc:
        _reset(alias)
        return TenantResult(tenant.schema, FAILED, _one_line(exc), traceback.format_exc())


@contextlib.contextmanager
def _holding(opts: RunOptions, schema: str, lease: locks.Lease | None) -> Iterator[Any]:
    if lease is not None:
        yield lease
    elif opts.plan or opts.check:
        # They change nothing: no lock, and a tenant whose run did not finish stays so.
        yield None
    else:
        with locks.leased(opts.database, schema) as own:
            yield own


def _migrate_retrying(
    opts: RunOptions,
    tenant: TenantRef,
    allow_atomic: bool,
    idx: int | None,
    count: int | None,
    lease: locks.Lease | None,
) -> TenantResult:
    schema = tenant.schema
    for attempt in range(1, opts.lock_retries + 2):
        waits = _LockWaits()
        try:
            return _migrate_once(opts, tenant, allow_atomic, idx, count, lease, waits)
        except SystemExit as exc:
            # migrate --check exits 1 when something is unapplied.
            _reset(opts.database)
            if opts.check and exc.code not in (0, None):
                return TenantResult(schema, PENDING, "unapplied migrations")
            return TenantResult(schema, FAILED, f"exited with status {exc.code}")
        except Exception as exc:
            _reset(opts.database)
            retry = _is_lock_timeout(exc) and waits.atomic and attempt <= opts.lock_retries
            if not retry:
                return TenantResult(
                    schema,
                    FAILED,
                    _failure(exc, opts, schema, waits, attempt),
                    traceback.format_exc(),
                )
            # The atomic migration was rolled back whole: wait a little, then try it again.
            pause = min(0.5 * 2 ** (attempt - 1), 10.0)
            logger.info(
                "schema %s: lock timeout on %s; trying again in %.1fs (%d of %d)",
                schema,
                statements.short(waits.sql, 120),
                pause,
                attempt,
                opts.lock_retries,
            )
            time.sleep(pause)
    raise AssertionError("unreachable")  # pragma: no cover


def _migrate_once(
    opts: RunOptions,
    tenant: TenantRef,
    allow_atomic: bool,
    idx: int | None,
    count: int | None,
    lease: locks.Lease | None,
    waits: _LockWaits,
) -> TenantResult:
    alias = opts.database
    schema, tenant_type = tenant
    if not schemas.exists(alias, schema):
        if not opts.create_missing:
            raise SchemaMissingError(schema)
        schemas.create(alias, schema)
    connection: Any = connections[alias]
    connection.set_schema(schema, tenant_type=tenant_type, include_public=False)
    _log_path(alias, schema, "before")
    connection.set_schema_to_public()
    terms = guard.Terms(
        fence=lease.fence if lease is not None else None,
        lock_timeout_ms=opts.lock_timeout_ms or None,
    )
    lines = _LineTracker(sys.stdout)
    migrate_options = dict(opts.migrate)
    # call_command(stdout=...) hands migrate a stream of its own.
    given = _LineTracker(migrate_options["stdout"]) if migrate_options.get("stdout") else None
    if given is not None:
        migrate_options["stdout"] = given
    connection.execute_wrappers.insert(0, waits)
    try:
        with (
            guard.with_terms(connection, terms),
            _planned() as applied,
            contextlib.redirect_stdout(lines),
        ):
            upstream.run_migrations(
                opts.args,
                migrate_options,
                opts.executor,
                schema,
                tenant_type=tenant_type,
                allow_atomic=allow_atomic,
                idx=idx,
                count=count,
            )
    finally:
        connection.execute_wrappers.remove(waits)
        for stream in (lines, given):
            if stream is not None and stream.open_line:
                stream.write("\n")
    connection.set_schema(schema, tenant_type=tenant_type, include_public=False)
    _log_path(alias, schema, "after")
    _reset(alias)
    if opts.plan:
        # migrate --plan printed the plan and returned before post_migrate.
        return TenantResult(schema, PLANNED)
    return TenantResult(schema, MIGRATED if applied and applied[0] else CURRENT)


def _failure(
    exc: BaseException, opts: RunOptions, schema: str, waits: _LockWaits, attempts: int
) -> str:
    if _is_lock_timeout(exc):
        held = _blockers(opts.database, schema, waits.sql)
        if not waits.atomic:
            tried = "in a non-atomic migration, which is not tried again (part of it is applied)"
        else:
            tried = f"tried {attempts} time(s) (--lock-retries {opts.lock_retries})"
        return (
            f"lock timeout ({opts.lock_timeout_ms} ms) on "
            f"{statements.short(waits.sql, 120)!r} waiting for "
            f"{held}; {tried}. Run again once that lock is released, or raise --lock-timeout."
        )
    if _is_connection_lost(exc) and not isinstance(exc, SearchPathError):
        return f"the connection to the database was lost: {_one_line(exc)}"
    return _one_line(exc)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (SearchPathError, SchemaNameError)):
        return text
    return f"{type(exc).__name__}: {text}"


def _reachable(alias: str) -> str:
    """Empty when ``alias`` answers within a few short tries; else the last error."""
    error = ""
    for pause in (0.0, 0.5, 1.0, 2.0, 4.0):
        time.sleep(pause)
        try:
            _reset(alias)
            connection: Any = connections[alias]
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
            return ""
        except Exception as exc:
            error = " ".join(str(exc).split()) or type(exc).__name__
    return error


# The pool's workers inherit the run's Stop when forked (shared memory does not pickle).
_pool_stop: stopping.Stop | None = None


def _job(opts: RunOptions, count: int, item: tuple[int, TenantRef]) -> TenantResult:
    idx, tenant = item
    assert _pool_stop is not None
    return _attempt(opts, _pool_stop, tenant, allow_atomic=False, idx=idx, count=count)


def _attempt(
    opts: RunOptions,
    stop: stopping.Stop,
    tenant: TenantRef,
    *,
    allow_atomic: bool = True,
    idx: int | None = None,
    count: int | None = None,
) -> TenantResult:
    """One tenant of a run, unless the run is stopping; a failure may stop it."""
    if stop.requested():
        return TenantResult(tenant.schema, NOT_ATTEMPTED)
    try:
        result = migrate_tenant(opts, tenant, allow_atomic=allow_atomic, idx=idx, count=count)
    except KeyboardInterrupt:
        # A second signal: the tenant in flight was rolled back (its connection is closed).
        _reset(opts.database)
        return TenantResult(tenant.schema, FAILED, "interrupted; its transaction rolled back")
    if result.status == FAILED:
        stop.failed()
        if result.error.startswith("the connection to the database was lost"):
            # One tenant's lost connection fails that tenant; an outage stops the run.
            error = _reachable(opts.database)
            if error:
                stop.request(stopping.UNREACHABLE, error)
    return result


class Executor:
    """Runs tenants one after another (``standard``) or in a fork pool (``multiprocessing``)."""

    codenames = ("standard", "multiprocessing")

    def __init__(self, opts: RunOptions, stop: stopping.Stop) -> None:
        if opts.executor not in self.codenames:
            raise CommandError(
                f"migrate_schemas_safe cannot guard the {opts.executor!r} executor: it runs "
                "plain migrate_schemas in processes tenantsafe does not control. Use "
                "--executor=standard or --executor=multiprocessing."
            )
        self.opts = opts
        self.stop = stop

    def run(self, tenants: Sequence[TenantRef]) -> list[TenantResult]:
        if not tenants:
            return []
        if self.opts.executor == "multiprocessing" and len(tenants) > 1:
            return self._run_pool(tenants)
        return [
            _attempt(self.opts, self.stop, tenant, idx=idx, count=len(tenants))
            for idx, tenant in enumerate(tenants)
        ]

    def _run_pool(self, tenants: Sequence[TenantRef]) -> list[TenantResult]:
        # Workers are forked: close what they would otherwise share with this process.
        connections[self.opts.database].close()
        # Streams do not pickle, and the workers report through signals anyway.
        job = functools.partial(_job, replace(self.opts, stdout=None), len(tenants))
        chunks = getattr(settings, "TENANT_MULTIPROCESSING_CHUNKS", 2)
        global _pool_stop
        _pool_stop = self.stop
        with stopping.signals_ignored():
            pool = get_pool()
        try:
            results: list[TenantResult] = pool.map(job, enumerate(tenants), chunks)
        finally:
            pool.close()
            pool.join()
        return results


def run(opts: RunOptions, *, public: bool, tenants: Sequence[TenantRef]) -> Summary:
    stop = stopping.Stop(opts.max_failures)
    executor = Executor(opts, stop)
    results: list[TenantResult] = []
    problems: list[str] = []
    started = time.monotonic()
    with stopping.on_signals(stop):
        try:
            _run(opts, executor, stop, public, tenants, results, problems)
        except DatabaseError as exc:
            # Outside any tenant (the read, the public-tables check): nothing half-done.
            error = _reachable(opts.database) or " ".join(str(exc).split())
            stop.request(stopping.UNREACHABLE, error)
        except KeyboardInterrupt:
            stop.request(stopping.SIGINT)
    done = {result.schema for result in results}
    results += [TenantResult(t.schema, NOT_ATTEMPTED) for t in tenants if t.schema not in done]
    return Summary(
        tuple(results),
        tuple(problems),
        time.monotonic() - started,
        stopped=stop.describe(opts.database),
        stop_status=stop.exit_status,
    )


def _run(
    opts: RunOptions,
    executor: Executor,
    stop: stopping.Stop,
    public: bool,
    tenants: Sequence[TenantRef],
    results: list[TenantResult],
    problems: list[str],
) -> None:
    alias = opts.database
    if public:
        result = executor.run([TenantRef(get_public_schema_name())])[0]
        results.append(result)
        if result.status == FAILED:
            # Tenants depend on shared tables: stop rather than migrate on a broken base.
            return
    if stop.requested():
        return
    if not (opts.plan or opts.check):
        locks.ensure_table(alias)  # before the snapshot: it is no tenant's table
    public_before = schemas.public_tables(alias) if tenants else set()
    todo, answered, planned = _answer_from_read(opts, tenants)
    results.extend(answered)
    with progress.reporting(
        stream=opts.stdout,
        verbosity=opts.verbosity,
        check=opts.check,
        todo=todo,
        answered=answered,
    ):
        if planned is not None and opts.plan and opts.replay:
            _show_groups(opts, planned)
        if planned is not None and _replaying(opts):
            _deploy(opts, executor, stop, planned, results)
        else:
            results.extend(executor.run(todo))
    if tenants and not stop.requested():
        # tenantsafe's own tables (leases, recordings) may appear meanwhile: create_tenant or
        # a signup in another process creates them on first use.
        gained = (
            schemas.public_tables(alias) - public_before - {locks.TABLE, replay.TABLE, spares.TABLE}
        )
        if gained:
            problems.append(
                "public gained tables while tenants were migrated: " + ", ".join(sorted(gained))
            )


@dataclass(frozen=True)
class _Planned:
    entries: list[plan.SchemaPlan]
    loader: MigrationLoader


def _replaying(opts: RunOptions) -> bool:
    migrate_options = opts.migrate
    return (
        opts.replay
        and not (opts.plan or opts.check)
        and not any(migrate_options.get(o) for o in ("fake", "fake_initial", "run_syncdb", "prune"))
    )


def _deploy(
    opts: RunOptions,
    executor: Executor,
    stop: stopping.Stop,
    planned: _Planned,
    results: list[TenantResult],
) -> None:
    """The tenants with migrations to apply: groups of alike tenants by replay of what two
    witnesses recorded (see tenantsafe.deploy), the others through Django. Each result is
    added to ``results`` as it comes (a second signal may end the run anywhere)."""
    todo = [TenantRef(e.schema, e.tenant_type) for e in planned.entries]
    found = _groups(opts, planned)
    if found is None:
        results.extend(executor.run(todo))
        return
    groups, rest = found
    for group in groups:
        _deploy_group(opts, executor, stop, group, results)
    results.extend(executor.run(rest))


def _groups(
    opts: RunOptions, planned: _Planned
) -> tuple[list[deploy.Group], list[TenantRef]] | None:
    """The groups of alike tenants and the others, said on stdout; None if unknown."""
    try:
        groups, rest, refused, drifted = deploy.grouped(
            opts.database, planned.entries, planned.loader
        )
    except Exception:
        logger.warning("cannot group tenants for replay; migrating all", exc_info=True)
        _reset(opts.database)
        return None
    alike = sum(len(group.tenants) for group in groups)
    if groups:
        _say(
            opts,
            f"{alike} of {alike + len(rest)} tenant(s) to migrate are in {len(groups)} "
            f"group(s) of alike tenants: {deploy.WITNESSES} of each are migrated through "
            "Django, and the others get their recorded SQL if the two recordings agree.",
        )
    for why, count in refused.items():
        _say(opts, f"{count} tenant(s) are migrated through Django: their plan {why}.")
    for sentence in grouped_apart(drifted):
        _say(opts, sentence)
    return groups, rest


def _show_groups(opts: RunOptions, planned: _Planned) -> None:
    found = _groups(opts, planned)
    if found is not None:
        for group in found[0]:
            names = ", ".join(t.schema for t in group.tenants[: deploy.WITNESSES])
            _say(opts, f"witnesses {names} for {len(group.tenants) - deploy.WITNESSES} more")


def _say(opts: RunOptions, text: str) -> None:
    if opts.verbosity >= 1:
        stream = opts.stdout if opts.stdout is not None else sys.stdout
        stream.write(f"migrate_schemas_safe: {text}\n")


def _deploy_group(
    opts: RunOptions,
    executor: Executor,
    stop: stopping.Stop,
    group: deploy.Group,
    results: list[TenantResult],
) -> None:
    first, *rest = group.tenants
    result, one = _witness(opts, stop, first)
    results.append(result)
    apart: list[TenantRef] = []
    if one is not None and not one.problem and not one.without_ids and group.exact:
        # The recording writes rows, which may hold content type or permission ids: only
        # tenants whose ids are the first witness's may get it; the others are grouped apart.
        same = group.exactly_like(first, rest)
        apart = [t for t in rest if t not in set(same)]
        rest = same
        if apart:
            _say(
                opts,
                f"{len(apart)} tenant(s) like {first.schema} number their content types or "
                "permissions otherwise, and its recording writes rows: they are grouped apart.",
            )
    if rest:
        _after_the_first(opts, executor, stop, group, one, rest, results)
    for other in group.split_exactly(apart):
        # Each of these is alike to the ids, so its first witness splits it no further.
        if len(other.tenants) >= deploy.MIN_GROUP and other.exact[0] is not None:
            _deploy_group(opts, executor, stop, other, results)
        else:
            results.extend(executor.run(other.tenants))


def _after_the_first(
    opts: RunOptions,
    executor: Executor,
    stop: stopping.Stop,
    group: deploy.Group,
    one: deploy.Witness | None,
    rest: Sequence[TenantRef],
    results: list[TenantResult],
) -> None:
    """The second witness and the replays, after the first witness (``one``, None when it
    failed) of ``group``."""
    alias = opts.database
    first = group.tenants[0]
    second, *others = rest
    before: dict[str, str | None] = {}
    if one is not None and not one.problem and one.tables:
        # Rows the recording depends on beyond the group's key, before the second witness
        # changes them.
        try:
            before = deploy.rows_of(alias, [t.schema for t in (second, *others)], one.tables)
        except DatabaseError:
            logger.warning("cannot read the rows %s depends on", first.schema, exc_info=True)
            _reset(alias)
            one = None
    if one is None:
        why = "the first witness failed"
    elif one.problem:
        why = one.problem
    elif one.tables and before.get(second.schema) is None:
        why = f"{second.schema} has more than {replay.ROW_LIMIT} rows in a table the recording read"
    else:
        why = ""
    if one is None or why:
        results.extend(_through_django(opts, executor, group, (second, *others), why))
        return
    result, two = _witness(opts, stop, second)
    results.append(result)
    why = one.agrees_with(two) if two is not None else "the second witness failed"
    if why or two is None:
        results.extend(_through_django(opts, executor, group, others, why))
        return
    alike = [t for t in others if not one.tables or before.get(t.schema) == before[second.schema]]
    chosen = set(alike)
    unlike = [t for t in others if t not in chosen]
    _replay_all(opts, stop, alike, two, results)
    results.extend(executor.run(unlike))


def _through_django(
    opts: RunOptions,
    executor: Executor,
    group: deploy.Group,
    tenants: Sequence[TenantRef],
    why: str,
) -> list[TenantResult]:
    if tenants:
        _say(
            opts,
            f"not replaying to {len(tenants)} tenant(s) like {group.tenants[0].schema}: {why}; "
            "migrating them through Django.",
        )
    return executor.run(tenants)


def _witness(
    opts: RunOptions, stop: stopping.Stop, tenant: TenantRef
) -> tuple[TenantResult, deploy.Witness | None]:
    """Migrate ``tenant`` through Django, recording what it sent."""
    connection: Any = connections[opts.database]
    recorder = replay.Recorder(tenant.schema)
    connection.execute_wrappers.insert(0, recorder)
    try:
        result = _attempt(opts, stop, tenant)
    finally:
        connection.execute_wrappers.remove(recorder)
    if result.status != MIGRATED:
        return result, None
    try:
        with guard.guarding(opts.database):
            return result, deploy.witnessed(opts.database, recorder, tenant)
    except Exception:
        logger.warning("cannot use %s as a witness", tenant.schema, exc_info=True)
        _reset(opts.database)
        return result, None


def _replay_all(
    opts: RunOptions,
    stop: stopping.Stop,
    tenants: Sequence[TenantRef],
    witness: deploy.Witness,
    results: list[TenantResult],
) -> None:
    """Replay ``witness``'s recording into ``tenants``; those it fails for go through Django.

    With the multiprocessing executor, on as many connections (threads) as it would use
    processes. Signals, and migrations through Django, stay in this thread.
    """
    failed: list[TenantRef] = []
    for tenant, result in _replaying_on(opts, stop, tenants, witness):
        if result is None:
            failed.append(tenant)
            continue
        if result.status == REPLAYED:
            # As for a migrated tenant (pre_migrate and post_migrate are not sent: what their
            # handlers did in the witnesses is part of the recording).
            schema_pre_migration.send(upstream.run_migrations, schema_name=tenant.schema)
            schema_migrated.send(upstream.run_migrations, schema_name=tenant.schema)
        results.append(result)
    results.extend(_attempt(opts, stop, tenant) for tenant in failed)


def _replaying_on(
    opts: RunOptions, stop: stopping.Stop, tenants: Sequence[TenantRef], witness: deploy.Witness
) -> Iterator[tuple[TenantRef, TenantResult | None]]:
    workers = min(_replay_connections(opts), len(tenants))
    if workers <= 1:
        for tenant in tenants:
            yield tenant, _replay_one(opts, stop, tenant, witness)
        return
    todo: queue.SimpleQueue[TenantRef] = queue.SimpleQueue()
    for tenant in tenants:
        todo.put(tenant)
    done: queue.SimpleQueue[tuple[TenantRef, TenantResult | None]] = queue.SimpleQueue()
    halt = threading.Event()

    def work() -> None:
        try:
            while not halt.is_set():
                try:
                    tenant = todo.get_nowait()
                except queue.Empty:
                    return
                done.put((tenant, _replay_one(opts, stop, tenant, witness)))
        finally:
            # Django's connections belong to the thread that made them.
            connections[opts.database].close()

    threads = [
        threading.Thread(target=work, name=f"tenantsafe-replay-{n}", daemon=True)
        for n in range(workers)
    ]
    for thread in threads:
        thread.start()
    try:
        for _ in tenants:
            yield done.get()
    finally:
        halt.set()
        for thread in threads:
            thread.join()


def _replay_connections(opts: RunOptions) -> int:
    if opts.executor != "multiprocessing":
        return 1
    return int(getattr(settings, "TENANT_MULTIPROCESSING_MAX_PROCESSES", 2))


def _replay_one(
    opts: RunOptions, stop: stopping.Stop, tenant: TenantRef, witness: deploy.Witness
) -> TenantResult | None:
    """Replay ``witness``'s recording into ``tenant``; None when it rolled back."""
    if stop.requested():
        return TenantResult(tenant.schema, NOT_ATTEMPTED)
    alias = opts.database
    try:
        with guard.guarding(alias), locks.leased(alias, tenant.schema) as lease:
            deploy.replay_into(
                alias, tenant, witness, lease, lock_timeout_ms=opts.lock_timeout_ms or None
            )
            lease.complete()
    except (ReplayMismatch, DatabaseError, SearchPathError) as exc:
        logger.warning(
            "schema %s: the replay of %s's migration rolled back (%s); migrating it through Django",
            tenant.schema,
            witness.schema,
            _one_line(exc),
        )
        _reset(alias)
        return None
    finally:
        _public(alias)
    return TenantResult(tenant.schema, REPLAYED)


def _answer_from_read(
    opts: RunOptions, tenants: Sequence[TenantRef]
) -> tuple[list[TenantRef], list[TenantResult], _Planned | None]:
    """(tenants to run migrate in, results for the others, what the read says of the former),
    from one batched read.

    The others are the current tenants (CURRENT) and, under ``--check``, the tenants whose
    unapplied migrations the read already shows (PENDING). Skipping only saves time: whatever
    stops the read, every tenant takes the guarded path.
    """
    if not tenants or not opts.skip_current:
        return list(tenants), [], None
    alias = opts.database
    started = time.monotonic()
    try:
        planner = plan.Planner(opts.app_label, opts.migration_name)
        entries = plan.plan_schemas(alias, tenants, planner=planner)
        # Under --check a schema without django_migrations has everything unapplied; a missing
        # schema still goes to the executor, which names it (or creates it).
        bare = [e.schema for e in entries if not e.has_table and schemas.is_valid(e.schema)]
        without_table = (
            schemas.existing(alias, bare)
            if opts.check and bare and not opts.create_missing
            else set()
        )
    except PlanError:
        # migrate reports the bad target, tenant by tenant, as before
        return list(tenants), [], None
    except Exception:
        logger.warning("cannot tell which tenants are current; migrating all", exc_info=True)
        return list(tenants), [], None
    todo: list[TenantRef] = []
    done: list[TenantResult] = []
    planned: list[plan.SchemaPlan] = []
    for entry in entries:
        if entry.current:
            done.append(TenantResult(entry.schema, CURRENT))
        elif opts.check and entry.unfinished:
            done.append(
                TenantResult(
                    entry.schema,
                    PENDING,
                    f"unfinished: a run did not complete it (lock left by {entry.unfinished})",
                )
            )
        elif opts.check and entry.plan is not None:
            # migrate --check looks at the plan only (not at squash rows it would write).
            if entry.plan.steps:
                done.append(TenantResult(entry.schema, PENDING, _describe(entry)))
            else:
                done.append(TenantResult(entry.schema, CURRENT))
        elif entry.schema in without_table:
            done.append(
                TenantResult(entry.schema, PENDING, "unapplied migrations: no django_migrations")
            )
        else:
            todo.append(TenantRef(entry.schema, entry.tenant_type))
            planned.append(entry)
    logger.debug(
        "read %d schema(s) in %.2fs: %d to run migrate in, %d answered from the read",
        len(tenants),
        time.monotonic() - started,
        len(todo),
        len(done),
    )
    return todo, done, _Planned(planned, planner.loader)


def _describe(entry: plan.SchemaPlan) -> str:
    parts = [f"{app}: {', '.join(names)}" for app, names in entry.missing_by_app().items()]
    return "unapplied migrations: " + "; ".join(parts)


def report(
    summary: Summary,
    *,
    stdout: OutputWrapper,
    stderr: OutputWrapper,
    style: Style,
    verbosity: int,
    show_traceback: bool,
) -> None:
    public = get_public_schema_name()
    tenant_results = [r for r in summary.results if r.schema != public]
    counts = collections.Counter(r.status for r in tenant_results)
    parts = [f"{counts[MIGRATED]} migrated"]
    if counts[REPLAYED]:
        parts.append(f"{counts[REPLAYED]} replayed")
    parts.append(f"{counts[CURRENT]} already current")
    if counts[PLANNED]:
        parts.append(f"{counts[PLANNED]} with a plan shown")
    if counts[PENDING]:
        parts.append(f"{counts[PENDING]} with unapplied migrations")
    parts.append(f"{counts[FAILED]} failed")
    if counts[NOT_ATTEMPTED]:
        parts.append(f"{counts[NOT_ATTEMPTED]} not attempted")
    if verbosity >= 1:
        shared = [f"public {r.status}; " for r in summary.results if r.schema == public]
        stdout.write(
            f"migrate_schemas_safe: {''.join(shared)}{len(tenant_results)} tenant(s): "
            + ", ".join(parts)
            + f" in {summary.elapsed:.1f}s"
        )
        if summary.stopped:
            stdout.write(
                f"migrate_schemas_safe: stopped early ({summary.stopped}): "
                f"{summary.count(NOT_ATTEMPTED)} tenant(s) not attempted."
            )
    for error, failed in _grouped(summary.failed).items():
        if show_traceback:
            for result in failed:
                if result.traceback:
                    stderr.write(result.traceback)
        if len(failed) == 1:
            stderr.write(style.ERROR(f"FAILED {failed[0].schema}: {failed[0].error}"))
            continue
        names = ", ".join(r.schema for r in failed[:3])
        more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
        stderr.write(style.ERROR(f"FAILED {len(failed)} tenants ({names}{more}): {error}"))
    for problem in summary.public_problems:
        stderr.write(style.ERROR(f"FAILED public: {problem}"))
    if verbosity >= 2:
        for result in summary.results:
            if result.status == PENDING:
                stdout.write(f"PENDING {result.schema}: {result.error}")


def _grouped(failed: list[TenantResult]) -> dict[str, list[TenantResult]]:
    """Failures by error, with each tenant's own schema name in it written as <schema>."""
    groups: dict[str, list[TenantResult]] = {}
    for result in failed:
        error = re.sub(rf"(?<![\w$]){re.escape(result.schema)}(?![\w$])", "<schema>", result.error)
        groups.setdefault(error, []).append(result)
    return groups
