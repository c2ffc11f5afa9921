"""migrate_schemas_safe under real faults: issue 10's cases, each reproduced.

Runs are real ``manage.py`` processes, stopped, killed and signalled for real; backends are
terminated with ``pg_terminate_backend``; pgbouncers are the tests' own (tests.faults.Bouncer),
in transaction pooling, PAUSEd and ``kill -9``ed. A run is held at a known point through the
hooks of testproject.faults, so nothing depends on timing luck: every wait is bounded, and each
test asserts what a user relies on (output, exit status, what every schema holds afterwards).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests import faults
from tests.dbtools import (
    connect,
    direct_url,
    fresh_database,
    manage,
    pool_load,
    pooled_url,
    register_tenants,
    summary,
    with_dbname,
)

pytestmark = pytest.mark.slow

POOLER_SAFE = {"TESTPROJECT_POOLER_SAFE": "1"}
MIGRATE = ("migrate_schemas_safe", "--tenant")

STOPPED = re.compile(
    r"^migrate_schemas_safe: stopped early \((?P<reason>.+)\): "
    r"(?P<count>\d+) tenant\(s\) not attempted\.$",
    re.M,
)
FAILED = re.compile(r"^FAILED (?P<who>.+?): (?P<error>.*)$", re.M)


# -- what a run printed ---------------------------------------------------------------------


def stopped(stdout: str) -> tuple[str, int] | None:
    match = STOPPED.search(stdout)
    return (match["reason"], int(match["count"])) if match else None


def failures(stderr: str) -> dict[str, str]:
    """``FAILED <who>: <error>`` lines of stderr, by who."""
    return {m["who"]: m["error"] for m in FAILED.finditer(stderr)}


def assert_no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr[-4000:]


# -- what the database holds ----------------------------------------------------------------


def state(url: str, schema: str) -> dict[str, Any]:
    """What a complete migration leaves in ``schema``, in comparable form."""
    q = '"%s"' % schema
    with connect(url) as conn:
        tables = {
            r[0]
            for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s", [schema]
            ).fetchall()
        }
        if "django_migrations" not in tables:
            return {
                "migrations": [],
                "duplicates": [],
                "content_types": 0,
                "permissions": 0,
                "categories": 0,
                "notes": 0,
            }
        rows = conn.execute(
            f"SELECT app, name, count(*) FROM {q}.django_migrations GROUP BY 1, 2 ORDER BY 1, 2"
        ).fetchall()
        count = {
            table: conn.execute(f"SELECT count(*) FROM {q}.{table}").fetchone()[0]
            if table in tables
            else 0
            for table in ("django_content_type", "auth_permission", "shop_category", "notes_note")
        }
    return {
        "migrations": [(app, name) for app, name, _ in rows],
        "duplicates": [(app, name, n) for app, name, n in rows if n > 1],
        "content_types": count["django_content_type"],
        "permissions": count["auth_permission"],
        # What the data migrations wrote: twice as much if one ran twice.
        "categories": count["shop_category"],
        "notes": count["notes_note"],
    }


def incomplete(url: str, names: list[str], reference: dict[str, Any]) -> list[str]:
    return [name for name in names if state(url, name) != reference]


def has_migrations_table(url: str, schema: str) -> bool:
    with connect(url) as conn:
        return bool(
            conn.execute(
                "SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = 'django_migrations'",
                [schema],
            ).fetchone()
        )


def doctor(url: str) -> list[dict[str, Any]]:
    result = manage(url, "tenantsafe_doctor", "--json", env=POOLER_SAFE)
    assert result.stdout.strip().startswith("{"), result.stderr[-3000:]
    findings: list[dict[str, Any]] = json.loads(result.stdout)["findings"]
    return findings


def kinds_for(findings: list[dict[str, Any]], schema: str) -> set[str]:
    return {f["kind"] for f in findings if f.get("schema") == schema}


LAGGING = {"incomplete", "contenttypes-behind", "permissions-behind"}


# -- databases ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    """A tenant migrated directly by plain django-tenants: what every tenant must hold."""
    with fresh_database("fref") as name:
        url = with_dbname(direct_url(), name)
        assert manage(url, "migrate_schemas", "--shared", "-v0", env=POOLER_SAFE).returncode == 0
        register_tenants(url, ["ref"])
        result = manage(url, "migrate_schemas", "--tenant", "-v0", env=POOLER_SAFE)
        assert result.returncode == 0, result.stderr
        ref = state(url, "ref")
    assert ref["content_types"] > 0
    assert ref["permissions"] > 0
    assert not ref["duplicates"]
    return ref


@contextlib.contextmanager
def tenant_database(names: list[str], *, create_schemas: bool = True) -> Iterator[str]:
    """A fresh database, public migrated, ``names`` registered and pending; its direct URL."""
    with fresh_database("flt") as name:
        url = with_dbname(direct_url(), name)
        result = manage(url, "migrate_schemas", "--shared", "-v0", env=POOLER_SAFE)
        assert result.returncode == 0, result.stderr
        register_tenants(url, names, create_schemas=create_schemas)
        yield url


def dbname(url: str) -> str:
    return url.rsplit("/", 1)[1]


def env(*parts: dict[str, str]) -> dict[str, str]:
    merged = dict(POOLER_SAFE)
    for part in parts:
        merged.update(part)
    return merged


def busy(url: str, names: list[str], clients: int = 2, *, reconnect: bool = False) -> Any:
    return pool_load(
        url, [f'"{name}", public' for name in names], clients=clients, reconnect=reconnect
    )


def lease_row(url: str, schema: str, seconds: float) -> tuple[str, bool, bool] | None:
    """(token, whether a lease of ``seconds`` taken when it was would be over by now,
    whether it is unexpired) of ``schema``'s lease; None when there is none. Over and yet
    unexpired: its holder renewed it."""
    with connect(url) as conn:
        row = conn.execute(
            "SELECT token::text, acquired_at + make_interval(secs => %s) < now(), "
            "expires_at > now() FROM public.tenantsafe_lease WHERE schema_name = %s",
            [seconds, schema],
        ).fetchone()
    return (row[0], bool(row[1]), bool(row[2])) if row else None


# -- 1-3: locks and half-finished tenants ---------------------------------------------------


@pytest.mark.pooler
def test_a_stopped_lease_holder_loses_the_tenant_to_the_other_run(reference):
    names = ["r1", "r2", "r3", "r4"]
    lease = {"TESTPROJECT_LOCK_LEASE_SECONDS": "3"}
    with (
        tenant_database(names) as direct,
        faults.runs() as start,
        faults.hold("post_migrate", "r2") as held,
    ):
        pooled = with_dbname(pooled_url(), dbname(direct))
        with busy(pooled, names):
            a = start(pooled, *MIGRATE, env=env(lease, held.env))
            held.wait(a)
            # Frozen for real: its heartbeat stops with it, and its process is still alive.
            os.kill(a.pid, signal.SIGSTOP)
            b = start(pooled, *MIGRATE, env=env(lease))
            assert b.wait(120) == 0, b.stderr[-3000:]
            assert summary(b.stdout)["failed"] == 0
            # B took r2 over once A's lease expired and finished it while A was still frozen.
            assert incomplete(direct, names, reference) == []

            os.kill(a.pid, signal.SIGCONT)
            held.release()
            assert a.wait(120) == 1, a.stderr[-3000:]

        failed = failures(a.stderr)
        assert list(failed) == ["r2"], a.stderr[-3000:]
        assert "lost its lock" in failed["r2"]
        counts = summary(a.stdout)
        assert (counts["total"], counts["failed"]) == (4, 1)
        assert counts["migrated"] + counts["current"] == 3
        assert_no_traceback(a.stderr)
        assert incomplete(direct, names, reference) == []

        again = manage(pooled, *MIGRATE, env=POOLER_SAFE)
        assert again.returncode == 0, again.stderr[-3000:]
        counts = summary(again.stdout)
        assert (counts["current"], counts["migrated"], counts["failed"]) == (4, 0, 0)


def test_a_lease_holder_that_is_only_slow_keeps_its_tenant(reference):
    # The counterpart of the test above: alive and held well past its first lease time, A
    # renews its lease, so the run waiting for r2 does not take it over.
    names = ["r1", "r2", "r3"]
    short = {"TESTPROJECT_LOCK_LEASE_SECONDS": "3"}
    with (
        tenant_database(names) as url,
        faults.runs() as start,
        faults.hold("post_migrate", "r2") as held_a,
        faults.hold("post_migrate", "r1") as held_b,
    ):
        a = start(url, "migrate_schemas_safe", "--schema", "r2", env=env(short, held_a.env))
        held_a.wait(a)
        row = lease_row(url, "r2", 3)
        assert row is not None
        token = row[0]
        b = start(url, *MIGRATE, env=env(short, held_b.env))
        held_b.wait(b)
        held_b.release()  # B's next tenant is r2, whose lease A holds
        # A's heartbeat keeps pushing the lease on: unrenewed, it would have expired by now.
        faults.wait_for(
            "A to renew its lease on r2 past its first expiry",
            lambda: (lease_row(url, "r2", 3) or ("", False, False))[1:] == (True, True),
            timeout=60,
        )
        # B tries to take r2 after that, and does not get it.
        with faults.lease_gate(url, "r2") as gate:
            gate.wait_for_taker(b)
        assert lease_row(url, "r2", 3) == (token, True, True)
        assert b.running(), b.stdout[-2000:]
        assert "standard:r3]" not in b.stdout, "B went past r2 while A held it"
        held_a.release()
        assert a.wait(120) == 0, a.stderr[-3000:]
        assert b.wait(120) == 0, b.stderr[-3000:]
        assert not re.search(r"standard:r2\] +Applying", b.stdout)
        assert re.search(r"standard:r3\] +Applying", b.stdout)
        assert incomplete(url, names, reference) == []


@pytest.mark.parametrize("which", ["its migrating backend", "its other backends"])
def test_a_lease_holders_backends_terminated_in_a_race_fail_that_tenant_only(reference, which):
    # Issue 10, case 1: backends of the run that holds a tenant are terminated (a DBA script
    # killing sessions, a network blip) while another run waits for the tenant. The migrating
    # backend, in the middle of the seed's transaction; or every other backend of that run
    # (whatever holds or renews its lock), while the migrating one lives on.
    names = ["x1", "x2", "x3", "x4"]
    lease = 3
    short = {"TESTPROJECT_LOCK_LEASE_SECONDS": str(lease)}
    with (
        tenant_database(names) as url,
        faults.runs() as start,
        faults.hold("seed", "x2") as held,
    ):
        a = start(faults.named(url, "run-a"), *MIGRATE, env=env(short, held.env))
        migrating = held.wait(a)["backend_pid"]
        b = start(url, *MIGRATE, env=env(short))
        if which == "its migrating backend":
            assert faults.terminate(url, migrating)
        else:
            # For two lease times, every other connection A opens (to renew its lease, say)
            # is cut as soon as it shows up.
            killed: set[int] = set()
            deadline = time.monotonic() + 2 * lease
            while time.monotonic() < deadline:
                for pid in set(faults.backends(url, "run-a")) - {migrating}:
                    if faults.terminate(url, pid):
                        killed.add(pid)
                time.sleep(0.02)
            assert killed, "run A opened no other connection to cut"
        held.release()
        codes = (a.wait(120), b.wait(120))

        assert failures(b.stderr) == {}, b.stderr[-3000:]
        assert codes[1] == 0, b.stderr[-3000:]
        failed = failures(a.stderr)
        # At most the tenant it held: A goes on with connections that work.
        assert set(failed) <= {"x2"}, a.stderr[-3000:]
        assert codes[0] == (1 if failed else 0), a.stderr[-3000:]
        if which == "its migrating backend":
            assert "connection" in failed["x2"]
        assert_no_traceback(a.stderr)
        # Never migrated twice over: no duplicate rows, the seed's categories once.
        assert incomplete(url, names, reference) == []
        again = manage(url, *MIGRATE, env=POOLER_SAFE)
        assert again.returncode == 0, again.stderr[-3000:]
        assert summary(again.stdout)["current"] == 4


def test_a_backend_terminated_in_post_migrate_leaves_the_tenant_for_the_next_run(reference):
    names = ["k1", "k2", "k3"]
    with (
        tenant_database(names) as url,
        faults.runs() as start,
        faults.hold("post_migrate", "k2") as held,
    ):
        run = start(url, *MIGRATE, env=env(held.env))
        pids = held.wait(run)
        assert faults.terminate(url, pids["backend_pid"])
        held.release()
        assert run.wait(120) == 1, run.stderr[-3000:]

        assert list(failures(run.stderr)) == ["k2"], run.stderr[-3000:]
        assert_no_traceback(run.stderr)
        assert incomplete(url, names, reference) == ["k2"]
        half = state(url, "k2")
        assert half["migrations"] == reference["migrations"]
        assert half["content_types"] == 0

        findings = doctor(url)
        assert kinds_for(findings, "k2") & LAGGING, findings
        assert not kinds_for(findings, "k1") & LAGGING
        assert not kinds_for(findings, "k3") & LAGGING

        # Its migrations are all recorded, yet it is not current: the next run completes it.
        check = manage(url, *MIGRATE, "--check", env=POOLER_SAFE)
        assert check.returncode == 1, check.stdout[-2000:]
        again = manage(url, *MIGRATE, env=POOLER_SAFE)
        assert again.returncode == 0, again.stderr[-3000:]
        assert incomplete(url, names, reference) == []
        assert not any(kinds_for(doctor(url), name) & LAGGING for name in names)
        check = manage(url, *MIGRATE, "--check", env=POOLER_SAFE)
        assert check.returncode == 0, check.stdout[-2000:]


def test_a_run_killed_in_post_migrate_does_not_block_the_next_one(reference):
    names = ["s1", "s2", "s3"]
    # A lease that outlasts the test: the next run must not wait for it, as the holder is
    # dead on this host.
    lease = {"TESTPROJECT_LOCK_LEASE_SECONDS": "600"}
    with (
        tenant_database(names) as url,
        faults.runs() as start,
        faults.hold("post_migrate", "s2") as held,
    ):
        run = start(url, *MIGRATE, env=env(lease, held.env))
        held.wait(run)
        run.kill()

        # Not current, though every migration of s2 is recorded (the doctor's view of it is
        # the previous test's).
        check = manage(url, *MIGRATE, "--check", env=env(lease))
        assert check.returncode == 1, check.stdout[-2000:]
        again = manage(url, *MIGRATE, env=env(lease, {"TENANTSAFE_LOG_LEVEL": "INFO"}), timeout=180)
        assert again.returncode == 0, again.stderr[-3000:]
        # Taken over from the dead holder at once (waiting for the lease to expire would have
        # outlasted the timeout above).
        assert "schema s2: took over the lock left by " in again.stderr, again.stderr[-3000:]
        assert incomplete(url, names, reference) == []


# -- 4-7: no server connection held through pgbouncer ---------------------------------------


@pytest.mark.pooler
def test_one_run_completes_through_a_pool_of_one(reference):
    names = ["p1", "p2", "p3"]
    with (
        tenant_database(names) as direct,
        faults.bouncer(direct, pool_size=1, query_wait_timeout=20) as bouncer,
    ):
        pooled = bouncer.url(dbname(direct))
        with busy(pooled, names, clients=1):
            result = manage(pooled, *MIGRATE, env=POOLER_SAFE, timeout=150)
        assert result.returncode == 0, result.stderr[-3000:]
        assert summary(result.stdout)["migrated"] == 3
        assert incomplete(direct, names, reference) == []


@pytest.mark.pooler
def test_multiprocessing_with_as_many_processes_as_the_pool(reference):
    names = ["m1", "m2", "m3", "m4"]
    with (
        tenant_database(names) as direct,
        faults.bouncer(direct, pool_size=2, query_wait_timeout=20) as bouncer,
    ):
        pooled = bouncer.url(dbname(direct))
        with busy(pooled, names, clients=1):
            result = manage(
                pooled,
                *MIGRATE,
                "--executor=multiprocessing",
                env=env({"TESTPROJECT_MAX_PROCESSES": "2"}),
                timeout=150,
            )
        assert result.returncode == 0, result.stderr[-3000:]
        assert summary(result.stdout)["migrated"] == 4
        assert incomplete(direct, names, reference) == []


CREATE_TENANT = (
    "from tenantsafe.testing import create_tenant; "
    "print('created', create_tenant('newco', name='Newco').schema_name)"
)


@pytest.mark.pooler
def test_two_runs_and_create_tenant_on_a_pool_of_four_never_stall(reference):
    names = ["q1", "q2", "q3", "q4"]
    with (
        tenant_database(names) as direct,
        faults.bouncer(direct, pool_size=4, query_wait_timeout=30) as bouncer,
        faults.runs() as start,
    ):
        pooled = bouncer.url(dbname(direct))
        with busy(pooled, names, clients=2):
            runs = [start(pooled, *MIGRATE, env=POOLER_SAFE) for _ in range(2)]
            creator = start(pooled, "shell", "-c", CREATE_TENANT, env=POOLER_SAFE)
            codes = [proc.wait(150) for proc in [*runs, creator]]
        # A stall would fail a client: pgbouncer drops one that waits query_wait_timeout (30 s)
        # for a server connection. No wall-clock bound beyond that.
        assert codes == [0, 0, 0], "\n".join(proc.stderr[-3000:] for proc in [*runs, creator])
        assert "created newco" in creator.stdout
        both = "".join(proc.stdout for proc in runs)
        applied = {
            name: len(re.findall(rf":{name}\] +Applying shop\.0001_initial", both))
            for name in names
        }
        assert applied == dict.fromkeys(names, 1), applied
        assert incomplete(direct, [*names, "newco"], reference) == []


@pytest.mark.pooler
def test_pgbouncer_pause_does_not_wait_for_a_run_in_flight(reference):
    names = ["u1", "u2", "u3"]
    with (
        tenant_database(names) as direct,
        faults.bouncer(direct, pool_size=4) as bouncer,
        faults.runs() as start,
        faults.hold("post_migrate", "u2") as held,
    ):
        pooled = bouncer.url(dbname(direct))
        with busy(pooled, names):
            run = start(pooled, *MIGRATE, env=env(held.env))
            held.wait(run)
            # PAUSE waits until no server connection is in use. The run stays held until the
            # test lets it go, so PAUSE completes only if the run holds none mid-tenant.
            bouncer.admin("PAUSE", timeout=60)
            assert run.running()
            bouncer.admin("RESUME")
            held.release()
            assert run.wait(120) == 0, run.stderr[-3000:]
        assert summary(run.stdout)["migrated"] == 3
        assert incomplete(direct, names, reference) == []


# -- 8: lock timeout ------------------------------------------------------------------------


PRODUCTS = '"l1".shop_product'


def alter_waits(url: str) -> set[tuple[int, str]]:
    """(backend, transaction start) of each ALTER waiting for its lock on l1.shop_product: a
    retry of the same migration is another transaction."""
    with connect(url) as conn:
        rows = conn.execute(
            "SELECT l.pid, a.xact_start::text FROM pg_locks l JOIN pg_class c ON c.oid = "
            "l.relation JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_stat_activity a "
            "ON a.pid = l.pid WHERE NOT l.granted AND l.mode = 'AccessExclusiveLock' "
            "AND n.nspname = 'l1' AND c.relname = 'shop_product'"
        ).fetchall()
    return {(int(pid), str(start)) for pid, start in rows}


def wait_for_the_reader_to_queue(url: str, reader: faults.Reader) -> None:
    """Until the reader's read waits in line behind the ALTER (for its ACCESS SHARE lock)."""
    faults.wait_for(
        "the reader to queue behind the waiting ALTER",
        lambda: reader.pid and reader.pid in faults.lock_waiters(url, "l1.shop_product"),
        timeout=60,
    )


def wait_for_the_alter(url: str, run: faults.Run, *, besides: set[tuple[int, str]]) -> Any:
    """Until a transaction of the run other than ``besides`` waits for l1.shop_product."""

    def waiting() -> Any:
        if not run.running():
            pytest.fail(f"the run ended first:\n{run.stderr[-3000:]}")
        return alter_waits(url) - besides

    return faults.wait_for(
        "the ALTER of l1.shop_product to wait for the reader's lock", waiting, timeout=60
    )


@contextlib.contextmanager
def behind_on_sku(names: list[str]) -> Iterator[str]:
    """Tenants whose shop_product exists and whose shop 0003 (ALTER TABLE ADD sku) is pending."""
    with tenant_database(names) as url:
        result = manage(url, "migrate_schemas", "--tenant", "shop", "0002", "-v0", env=POOLER_SAFE)
        assert result.returncode == 0, result.stderr[-3000:]
        yield url


def has_sku(url: str, schema: str) -> bool:
    with connect(url) as conn:
        return bool(
            conn.execute(
                "SELECT 1 FROM information_schema.columns WHERE table_schema = %s "
                "AND table_name = 'shop_product' AND column_name = 'sku'",
                [schema],
            ).fetchone()
        )


@pytest.mark.pooler
def test_a_lock_held_by_a_reader_for_a_while_times_out_and_the_retry_succeeds(reference):
    names = ["l1", "l2", "l3"]
    with behind_on_sku(names) as direct, faults.runs() as start:
        pooled = with_dbname(pooled_url(), dbname(direct))
        # Other clients on the pool: the run's transactions land on one server connection after
        # another, so a lock_timeout set for the session would not hold.
        with (
            busy(pooled, names, clients=4),
            faults.open_read(direct, PRODUCTS) as holder,
            faults.reading(direct, PRODUCTS) as reader,
        ):
            reader.start()
            run = start(pooled, *MIGRATE, "--lock-timeout", "1s", "--lock-retries", "3", env=env())
            first = wait_for_the_alter(direct, run, besides=set())
            wait_for_the_reader_to_queue(direct, reader)
            # Held past the lock timeout: the migration is rolled back and tried again (another
            # transaction waits), and the lock goes before its retries run out.
            wait_for_the_alter(direct, run, besides=first)
            holder.release()
            assert run.wait(120) == 0, run.stderr[-3000:]
        # Queued behind the waiting ALTER for about the lock timeout at most (1 s; the bound
        # leaves room for a loaded machine), not until the session holding ACCESS SHARE was
        # done (that was after a retry).
        assert reader.longest < 3.0, reader.times
        assert failures(run.stderr) == {}
        assert all(has_sku(direct, name) for name in names)
        assert incomplete(direct, names, reference) == []


@pytest.mark.pooler
def test_a_lock_held_by_a_reader_for_good_fails_that_tenant_clearly(reference):
    names = ["l1", "l2", "l3"]
    with behind_on_sku(names) as direct, faults.runs() as start:
        pooled = with_dbname(pooled_url(), dbname(direct))
        with (
            busy(pooled, names, clients=4),
            faults.open_read(direct, PRODUCTS) as holder,
            faults.reading(direct, PRODUCTS) as reader,
        ):
            reader.start()
            run = start(pooled, *MIGRATE, "--lock-timeout", "1s", "--lock-retries", "2", env=env())
            wait_for_the_alter(direct, run, besides=set())
            wait_for_the_reader_to_queue(direct, reader)
            code = run.wait(120)
            # Still held: the run gave up on l1 on its own.
            assert faults.lock_waiters(direct, "l1.shop_product") == []
        assert code == 1, run.stderr[-3000:]
        # Never queued for longer than about the lock timeout (1 s, with room for load); the
        # holder kept its lock for the whole run (about 4.5 s).
        assert reader.longest < 3.0, reader.times
        failed = failures(run.stderr)
        assert list(failed) == ["l1"], run.stderr[-3000:]
        assert "lock timeout" in failed["l1"]
        assert "shop_product" in failed["l1"]
        assert f"pid {holder.pid}" in failed["l1"]
        assert_no_traceback(run.stderr)
        counts = summary(run.stdout)
        assert (counts["migrated"], counts["failed"]) == (2, 1)
        assert not has_sku(direct, "l1")
        assert incomplete(direct, ["l2", "l3"], reference) == []


# -- 9: outages -----------------------------------------------------------------------------


@pytest.mark.pooler
@pytest.mark.parametrize("outage", ["kill -9 and restart", "admin KILL and RESUME"])
def test_a_pgbouncer_outage_mid_run_fails_only_the_tenant_in_flight(reference, outage):
    names = ["o1", "o2", "o3", "o4"]
    with (
        tenant_database(names) as direct,
        faults.bouncer(direct, pool_size=4) as bouncer,
        faults.runs() as start,
        faults.hold("seed", "o2") as held,
    ):
        pooled = bouncer.url(dbname(direct))
        # The other clients lose their connections too, and connect again.
        with busy(pooled, names, reconnect=True) as others:
            run = start(pooled, *MIGRATE, env=env(held.env))
            held.wait(run)
            if outage == "kill -9 and restart":
                bouncer.restart()  # on the same port
            else:
                # Every client and server connection of the database dropped; the pooler is
                # back at once.
                bouncer.admin(f"KILL {dbname(direct)}")
                bouncer.admin(f"RESUME {dbname(direct)}")
            held.release()
            assert run.wait(120) == 1, run.stderr[-3000:]
        assert others.errors, "the outage passed the other clients by"

        assert list(failures(run.stderr)) == ["o2"], run.stderr[-3000:]
        assert_no_traceback(run.stderr)
        counts = summary(run.stdout)
        assert (counts["total"], counts["migrated"], counts["failed"]) == (4, 3, 1)
        assert counts["not_attempted"] == 0
        assert incomplete(direct, names, reference) == ["o2"]

        again = manage(pooled, *MIGRATE, env=POOLER_SAFE)
        assert again.returncode == 0, again.stderr[-3000:]
        assert incomplete(direct, names, reference) == []


@pytest.mark.pooler
def test_a_database_gone_for_good_stops_the_run_with_a_summary(reference):
    names = ["g1", "g2", "g3", "g4"]
    with (
        tenant_database(names) as direct,
        faults.bouncer(direct, pool_size=4) as bouncer,
        faults.runs() as start,
        faults.hold("seed", "g2") as held,
    ):
        pooled = bouncer.url(dbname(direct))
        # Other clients share the pool until the database goes for everyone.
        with busy(pooled, names):
            run = start(pooled, *MIGRATE, env=env(held.env))
            held.wait(run)
        bouncer.kill()
        held.release()
        assert run.wait(90) == 1, run.stderr[-3000:]
        assert run.elapsed < 80

        assert_no_traceback(run.stderr)
        counts = summary(run.stdout)
        assert (counts["migrated"], counts["failed"], counts["not_attempted"]) == (1, 1, 2)
        reason = stopped(run.stdout)
        assert reason is not None, run.stdout[-3000:]
        assert reason[0].startswith('database "default" unreachable: ')
        assert reason[1] == 2
        assert not has_migrations_table(direct, "g3")


# -- 10: interrupts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_an_interrupt_finishes_the_tenant_in_flight_and_starts_no_other(reference, signum, code):
    names = ["i1", "i2", "i3", "i4"]
    with tenant_database(names) as url, faults.runs() as start, faults.hold("seed", "i2") as held:
        run = start(url, *MIGRATE, env=env(held.env))
        held.wait(run)
        run.signal(signum)
        held.release()
        assert run.wait(120) == code, run.stderr[-3000:]

        assert_no_traceback(run.stderr)
        assert failures(run.stderr) == {}
        counts = summary(run.stdout)
        assert (counts["migrated"], counts["failed"], counts["not_attempted"]) == (2, 0, 2)
        name = signal.Signals(signum).name
        assert stopped(run.stdout) == (f"interrupted by {name}", 2), run.stdout[-2000:]
        assert incomplete(url, ["i1", "i2"], reference) == []
        assert not has_migrations_table(url, "i3")
        assert not has_migrations_table(url, "i4")


def test_a_second_interrupt_rolls_the_tenant_in_flight_back(reference):
    names = ["j1", "j2", "j3", "j4"]
    with tenant_database(names) as url, faults.runs() as start, faults.hold("seed", "j2") as held:
        run = start(url, *MIGRATE, env=env(held.env))
        held.wait(run)
        run.deliver(signal.SIGINT)
        assert run.running()
        # j2 is never let go: only the second SIGINT can end its migration.
        run.deliver(signal.SIGINT)
        assert run.wait(120) == 130, run.stderr[-3000:]

        assert_no_traceback(run.stderr)
        assert failures(run.stderr) == {"j2": "interrupted; its transaction rolled back"}
        counts = summary(run.stdout)
        assert (counts["migrated"], counts["failed"], counts["not_attempted"]) == (1, 1, 2)
        assert stopped(run.stdout) == ("interrupted by SIGINT", 2), run.stdout[-2000:]
        # The seed's migration rolled back whole: no category, not recorded; shop 0001, an
        # earlier transaction, stays.
        half = state(url, "j2")
        assert ("shop", "0001_initial") in half["migrations"]
        assert ("shop", "0002_seed_categories") not in half["migrations"]
        assert half["categories"] == 0
        assert incomplete(url, ["j1"], reference) == []
        assert not has_migrations_table(url, "j3")

        again = manage(url, *MIGRATE, env=POOLER_SAFE)
        assert again.returncode == 0, again.stderr[-3000:]
        assert incomplete(url, names, reference) == []


def test_a_worker_process_killed_mid_tenant_fails_its_tenants_and_the_run_completes(reference):
    # Chunks of two (TENANT_MULTIPROCESSING_CHUNKS): w3 and w4 go to the same worker.
    names = ["w1", "w2", "w3", "w4", "w5", "w6"]
    with tenant_database(names) as url, faults.runs() as start, faults.hold("seed", "w3") as held:
        run = start(url, *MIGRATE, "--executor=multiprocessing", env=env(held.env))
        worker = held.wait(run, in_worker=True)["pid"]
        os.kill(worker, signal.SIGKILL)
        assert run.wait(120) == 1, run.stderr[-3000:]

        assert_no_traceback(run.stderr)
        counts = summary(run.stdout)
        assert (counts["migrated"], counts["failed"]) == (4, 2), run.stdout[-2000:]
        assert failures(run.stderr) == {
            "2 tenants (w3, w4)": "the worker process migrating it exited (status -9) before "
            "reporting; run again to complete it"
        }
        assert incomplete(url, ["w1", "w2", "w5", "w6"], reference) == []

        again = manage(url, *MIGRATE, "--executor=multiprocessing", env=POOLER_SAFE, timeout=120)
        assert again.returncode == 0, again.stderr[-3000:]
        assert incomplete(url, names, reference) == []


# -- 11: stopping a bad deploy --------------------------------------------------------------


def test_max_failures_stops_a_deploy_that_fails_everywhere():
    names = [f"f{n:02d}" for n in range(1, 41)]
    failing = env({"TESTPROJECT_FAIL_SEED": "*"})
    with tenant_database(names) as url:
        result = manage(url, *MIGRATE, "--max-failures", "3", env=failing)
        assert result.returncode == 1, result.stderr[-3000:]
        assert_no_traceback(result.stderr)
        counts = summary(result.stdout)
        assert (counts["total"], counts["migrated"], counts["failed"]) == (40, 0, 3)
        assert counts["not_attempted"] == 37
        assert stopped(result.stdout) == ("3 tenant(s) failed, --max-failures 3", 37)
        # One line for the one error, with the schema's name factored out.
        lines = [line for line in result.stderr.splitlines() if line.startswith("FAILED")]
        assert len(lines) == 1, result.stderr[-3000:]
        match = re.fullmatch(r"FAILED 3 tenants \((\w+), (\w+), (\w+)\): (.*)", lines[0])
        assert match, lines[0]
        attempted = set(match.groups()[:3])
        assert match[4] == "RuntimeError: seeding failed on purpose in <schema>"
        assert {name for name in names if has_migrations_table(url, name)} == attempted

        more = manage(url, *MIGRATE, "--max-failures", "5", env=failing)
        assert more.returncode == 1
        lines = [line for line in more.stderr.splitlines() if line.startswith("FAILED")]
        assert len(lines) == 1, more.stderr[-3000:]
        assert re.fullmatch(
            r"FAILED 5 tenants \(\w+, \w+, \w+ and 2 more\): RuntimeError: "
            r"seeding failed on purpose in <schema>",
            lines[0],
        ), lines[0]

        fast = manage(url, *MIGRATE, "--fail-fast", "--traceback", env=failing)
        assert fast.returncode == 1
        counts = summary(fast.stdout)
        assert (counts["failed"], counts["not_attempted"]) == (1, 39)
        [(who, error)] = failures(fast.stderr).items()
        assert error == f"RuntimeError: seeding failed on purpose in {who}"
        # Asked for, the traceback is there.
        assert "Traceback (most recent call last)" in fast.stderr
        assert "in seed" in fast.stderr


# -- 12: names by bytes ---------------------------------------------------------------------

NAME_63 = "é" * 31 + "a"
NAME_64 = "é" * 32
NAME_65A = "é" * 32 + "a"
NAME_65B = "é" * 32 + "b"

CREATE_BY_BYTES = f"""
from tenantsafe.errors import SchemaNameError
from tenantsafe.testing import create_tenant
try:
    create_tenant({"ü" * 40!r}, name="Long")
except SchemaNameError as exc:
    print("refused:", exc)
print("created:", create_tenant({"ü" * 31 + "a"!r}, name="Fits").schema_name)
"""


def test_schema_names_are_measured_in_bytes(reference):
    assert [len(n.encode()) for n in (NAME_63, NAME_64, NAME_65A)] == [63, 64, 65]
    with tenant_database([NAME_63]) as url:
        register_tenants(url, [NAME_64], create_schemas=False)

        run = manage(url, *MIGRATE, env=POOLER_SAFE)
        assert run.returncode == 1, run.stderr[-3000:]
        assert_no_traceback(run.stderr)
        failed = failures(run.stderr)
        assert list(failed) == [NAME_64], run.stderr[-3000:]
        assert "64 bytes" in failed[NAME_64]
        assert incomplete(url, [NAME_63], reference) == []

        one = manage(url, "migrate_schemas_safe", "--schema", NAME_65A, env=POOLER_SAFE)
        assert one.returncode == 1
        assert "CommandError" in one.stderr, one.stderr[-2000:]
        assert "65 bytes" in one.stderr
        assert_no_traceback(one.stderr)

        created = manage(url, "shell", "-c", CREATE_BY_BYTES, env=POOLER_SAFE)
        assert created.returncode == 0, created.stderr[-3000:]
        refused = [line for line in created.stdout.splitlines() if line.startswith("refused:")]
        assert len(refused) == 1, created.stdout
        assert "80 bytes" in refused[0]
        assert f"created: {'ü' * 31 + 'a'}" in created.stdout
        assert incomplete(url, ["ü" * 31 + "a"], reference) == []

        register_tenants(url, [NAME_65A, NAME_65B], create_schemas=False)
        findings = doctor(url)
        for name in (NAME_64, NAME_65A, NAME_65B):
            assert "invalid-schema-name" in kinds_for(findings, name), findings
        collisions = [f for f in findings if f["kind"] == "schema-name-collision"]
        assert len(collisions) == 1, findings
        assert all(name in collisions[0]["message"] for name in (NAME_64, NAME_65A, NAME_65B))
        assert kinds_for(findings, NAME_63) == set()
