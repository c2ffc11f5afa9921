"""Mutation check: break a promise on purpose and see whether the tests meant to hold it fail.

    python -m bench.mutants                # every mutant, after a baseline run of their tests
    python -m bench.mutants -k guard       # the mutants whose name contains "guard"
    python -m bench.mutants --list         # names, promises and tests; runs nothing

Each mutant is a named deliberate breakage: exact text replacements in the source, each of
which must match once. They are applied one at a time to a copy of the working tree (the tree
itself is never touched), and the tests named for the mutant run there (``pytest -x``) against
one throwaway PostgreSQL and pgbouncer that every run shares. **caught**: a test failed;
**missed**: they all passed with the code broken, a gap in the suite; **stale**: a replacement
no longer matches the source (update the mutant). The same tests first run once unmutated (the
baseline, ``--no-baseline`` to skip it): a test that fails anyway proves nothing when it fails
under a mutant.

Not part of the suite (it takes minutes): run it after changing a promise or its tests.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Mutated code can wait for something that never happens; the tests' own waits end it sooner.
TIMEOUT = 600
# A run held at a hook (testproject/faults.py) and never let go gives up after this long.
HOLD_TIMEOUT = "45"

RTG = "tests/test_runtime_guard.py::"


@dataclass(frozen=True)
class Mutant:
    name: str
    promise: str
    # (path, text, replacement)
    edits: tuple[tuple[str, str, str], ...]
    tests: tuple[str, ...]


MUTANTS = [
    Mutant(
        "guard-check-apart",
        "the guard pins in the statement's own transaction (merged check)",
        (
            (
                "tenantsafe/guard/strategies.py",
                "        result = call.run(sql.merged(check, call.sql))\n",
                "        with call.raw.cursor() as apart:\n"
                '            apart.execute(check.replace("%%", "%") if escaped else check)\n'
                "        result = call.run()\n",
            ),
        ),
        (
            RTG + "test_reads_see_only_their_tenant_whatever_path_the_server_connection_carries",
            RTG + "test_writes_land_only_in_their_tenant",
        ),
    ),
    Mutant(
        "guard-session-pin",
        "a statement in autocommit gets a transaction of its own with the pin in it",
        (
            (
                "tenantsafe/guard/strategies.py",
                '        cursor.execute("BEGIN")\n        with _rolled_back(call):\n'
                "            pin(call.connection, cursor, call.path)\n"
                "            result = call.run()\n        _commit(call)\n",
                "        pin(call.connection, cursor, call.path, local=False)\n"
                "        result = call.run()\n",
            ),
        ),
        (RTG + "test_reads_see_only_their_tenant_whatever_path_the_server_connection_carries",),
    ),
    Mutant(
        "guard-trusts-open-transaction",
        "tenant_context()/schema_context() apply from the next statement in a transaction",
        (
            (
                "tenantsafe/guard/dispatch.py",
                "    if call.status == INERROR or (call.status == INTRANS and call.pinned):\n",
                "    if call.status in (INERROR, INTRANS):\n",
            ),
        ),
        (RTG + "test_switching_tenants_mid_transaction_applies_from_the_next_statement",),
    ),
    Mutant(
        "guard-pin-survives-savepoint-sql",
        "a pin undone by ROLLBACK TO SAVEPOINT in raw SQL is not trusted",
        (
            # Raw SQL (transaction control through the execute wrapper).
            (
                "tenantsafe/guard/strategies.py",
                "    try:\n        return call.run()\n    finally:\n        _forget(call)\n",
                "    return call.run()\n",
            ),
        ),
        (
            RTG + "test_tenant_limit_set_calls_is_safe_under_the_guard",
            RTG + "test_rollback_to_savepoint_in_raw_sql_leaves_the_current_tenant_in_force",
        ),
    ),
    Mutant(
        "guard-pin-survives-savepoint-api",
        "TENANT_LIMIT_SET_CALLS is safe: not trusted after Django's savepoint_rollback() either",
        # Both ways: savepoint_rollback() also sends ROLLBACK TO SAVEPOINT through the wrapper.
        (
            (
                "tenantsafe/guard/strategies.py",
                "    try:\n        return call.run()\n    finally:\n        _forget(call)\n",
                "    return call.run()\n",
            ),
            (
                "tenantsafe/guard/install.py",
                '("commit", "rollback", "savepoint_rollback", "close")',
                '("commit", "rollback", "close")',
            ),
        ),
        (
            RTG + "test_tenant_limit_set_calls_is_safe_under_the_guard",
            RTG + "test_savepoint_rollback_leaves_the_current_tenant_in_force",
        ),
    ),
    Mutant(
        "guard-no-stream",
        "iterator() streams inside a pinned transaction through a pooler (bounded memory)",
        (
            (
                "tenantsafe/guard/dispatch.py",
                "    if call.named and call.own and call.pooled():\n",
                "    if False:\n",
            ),
        ),
        (
            RTG + "test_server_side_cursor_in_autocommit_streams_inside_a_pinned_transaction",
            RTG + "test_iterator_through_pgbouncer_streams_100000_rows_in_bounded_memory",
        ),
    ),
    Mutant(
        "cluster-alter-system-pass",
        "CLUSTER and ALTER SYSTEM through a pooler raise PooledStatementError",
        (
            (
                "tenantsafe/statements.py",
                r'r"|ALTER\s+SYSTEM|CLUSTER\b|DISCARD\s+ALL)"',
                r'r"|DISCARD\s+ALL)"',
            ),
        ),
        (RTG + "test_non_transactional_statement_is_refused_when_pooled",),
    ),
    Mutant(
        "reindex-concurrently-passes",
        "REINDEX CONCURRENTLY through a pooler raises PooledStatementError",
        (
            (
                "tenantsafe/statements.py",
                r'r"|REINDEX\b[^;]*\bCONCURRENTLY|',
                r'r"|',
            ),
        ),
        ("tests/unit/test_statements.py",),
    ),
    Mutant(
        "fold-across-runsql",
        "constraints are not folded across a multi-statement RunSQL starting with CREATE TABLE",
        (
            (
                "tenantsafe/statements.py",
                'and ";" not in sql and not _SELECT',
                "and not _SELECT",
            ),
        ),
        (
            "tests/unit/test_statements.py",
            "tests/test_provisioning.py::"
            "test_constraints_stay_after_the_table_when_rows_are_written_in_between",
        ),
    ),
    Mutant(
        "lock-timeout-unset",
        "migrations run under the lock timeout (5 s by default)",
        (
            (
                "tenantsafe/migrate/tenant.py",
                "            lock_timeout_ms=opts.lock_timeout_ms or None,\n",
                "            lock_timeout_ms=None,\n",
            ),
        ),
        ("tests/test_migrate_command.py::test_the_lock_timeout_a_migration_runs_under",),
    ),
    Mutant(
        "lock-timeout-min-as-seconds",
        "--lock-timeout reads ms and min",
        (("tenantsafe/options.py", '"min": 60_000', '"min": 1_000'),),
        ("tests/test_migrate_command.py::test_the_lock_timeout_a_migration_runs_under",),
    ),
    Mutant(
        "prune-keeps-skipping",
        "--run-syncdb and --prune turn skipping off",
        (("tenantsafe/options.py", ' or options.get("prune"))', ")"),),
        (
            "tests/test_skip_current.py::test_options_that_write_with_nothing_to_apply_turn_the_skip_off",
        ),
    ),
    Mutant(
        "fake-replayed",
        "--fake and --fake-initial are never replayed",
        (
            (
                "tenantsafe/migrate/deploy.py",
                '("fake", "fake_initial", "run_syncdb", "prune")',
                '("run_syncdb", "prune")',
            ),
        ),
        ("tests/test_deploy.py::test_fake_runs_are_never_replayed",),
    ),
    Mutant(
        "replay-skips-a-statement",
        "replayed tenants are identical to migrated ones, and are replayed",
        (
            (
                "tenantsafe/migrate/witness.py",
                "    for part in sql.split(recording.SEPARATOR):\n",
                "    for part in sql.split(recording.SEPARATOR)[:-1]:\n",
            ),
            (
                "tenantsafe/recording/replaying.py",
                "            citus.execute_batch(connections[alias], cursor, recording.sql)\n",
                "            citus.execute_batch(\n"
                "                connections[alias],\n"
                "                cursor,\n"
                '                recording.sql.rsplit("\\n;\\n", 1)[0],\n'
                "            )\n",
            ),
        ),
        (
            "tests/test_deploy.py::test_replayed_tenants_are_identical_to_migrated_ones",
            "tests/test_provisioning.py::test_save_replays_every_tenant_after_the_first",
        ),
    ),
    Mutant(
        "lease-taken-from-live-holder",
        "two runs at once migrate each tenant once (a live holder keeps its lease)",
        (
            (
                "tenantsafe/locks.py",
                "        if not (expired or _holder_gone(host, pid)):\n",
                "        if False:\n",
            ),
        ),
        (
            "tests/test_migrate_concurrent.py::"
            "test_concurrent_runs_with_a_concurrent_index_migrate_each_tenant_once",
        ),
    ),
    Mutant(
        "second-sigint-ignored",
        "a second SIGINT interrupts the tenant in flight and rolls it back",
        (
            (
                "tenantsafe/stopping.py",
                "            raise KeyboardInterrupt\n",
                "            return\n",
            ),
        ),
        ("tests/test_migrate_faults.py::test_a_second_interrupt_rolls_the_tenant_in_flight_back",),
    ),
    Mutant(
        "lease-not-renewed",
        "a slow but live lease holder keeps its tenant",
        (
            (
                "tenantsafe/locks.py",
                "                    if not _renew(connection, self, seconds):\n",
                "                    if False:\n",
            ),
        ),
        ("tests/test_migrate_faults.py::test_a_lease_holder_that_is_only_slow_keeps_its_tenant",),
    ),
    Mutant(
        "failed-recorder-keeps-claim",
        "a recorder whose migration fails hands its claim to the next waiter",
        (
            (
                "tenantsafe/recording/store.py",
                "        try:\n            yield found\n        finally:\n"
                "            if claim is not None:\n                claim.complete()\n"
                "                claim.release()\n",
                "        yield found\n        if claim is not None:\n"
                "            claim.complete()\n            claim.release()\n",
            ),
        ),
        (
            "tests/test_provisioning.py::"
            "test_a_recorder_whose_migration_fails_hands_its_claim_to_a_waiting_signup",
        ),
    ),
    Mutant(
        "spares-count-0-drops-all",
        "tenantsafe_spares --count 0 only drops spares of an older state",
        (
            (
                "tenantsafe/spares.py",
                "AND state <> %s FOR UPDATE SKIP LOCKED",
                "AND (state <> %s OR true) FOR UPDATE SKIP LOCKED",
            ),
        ),
        ("tests/test_spares.py::test_count_0_only_drops_the_spares_of_an_older_state",),
    ),
    Mutant(
        "spares-fills-unserialized",
        "concurrent fills make no more than N spares between them",
        (
            (
                "tenantsafe/spares.py",
                "            own_tables.lock(cursor, own_tables.SPARES_LOCK, tenant_type)\n",
                "            pass\n",
            ),
        ),
        ("tests/test_spares.py::test_concurrent_fills_make_no_more_than_asked_between_them",),
    ),
    Mutant(
        "ci-true-only",
        "under any CI value but 0/false a missing pgbouncer fails instead of skipping",
        (
            (
                "tests/dbtools.py",
                '    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")\n',
                '    return os.environ.get("CI") == "true"\n',
            ),
        ),
        ("tests/unit/test_ci.py",),
    ),
    Mutant(
        "pool-load-stops-early",
        "the other clients on the pool run until the test's end",
        (
            (
                "tests/dbtools.py",
                "                        load.stop.wait(0.001)\n",
                "                        load.stop.wait(0.001)\n"
                "                        if load.queries[n] >= 20:\n"
                "                            return\n",
            ),
        ),
        ("tests/test_checks.py::test_w003_transaction_pooler_found_by_check_database",),
    ),
    Mutant(
        "has-table-listed",
        "a run asks for django_migrations by name, not by listing every table",
        (
            (
                "tenantsafe/migrate/run.py",
                "        with stopping.on_signals(self.stop), recorder.by_name():\n",
                "        with stopping.on_signals(self.stop):\n",
            ),
        ),
        ("tests/test_recorder.py",),
    ),
    Mutant(
        "doctor-digests-in-small-chunks",
        "the doctor reads every tenant's catalog in a few queries, on its other connections too",
        (("tenantsafe/drift.py", "CHUNK = 1000\n", "CHUNK = 10\n"),),
        ("tests/test_drift.py::test_the_doctor_reads_a_few_hundred_tenants_in_a_few_queries",),
    ),
    Mutant(
        "first-half-dropped",
        "reads split over two connections (the doctor's catalogs, a deploy's grouping) keep both",
        (
            (
                "tenantsafe/meanwhile.py",
                "        return [first(), second]\n",
                "        first()\n        return [second]\n",
            ),
        ),
        (
            "tests/test_drift.py::test_each_kind_of_drift_is_found_and_named",
            "tests/test_deploy.py::test_drifted_tenants_are_migrated_through_django_and_end_correct",
        ),
    ),
    Mutant(
        "data-directory-asked-anyway",
        "a role that may not read data_directory gets the memory estimate, its transaction intact",
        (
            (
                "tenantsafe/memory.py",
                "                \"SELECT CASE WHEN pg_has_role('pg_read_all_settings', "
                "'USAGE') \"\n"
                "                \"THEN current_setting('data_directory') END, array_agg(pid) \"\n",
                "                \"SELECT current_setting('data_directory'), array_agg(pid) \"\n",
            ),
        ),
        (
            "tests/test_recycling.py::test_a_role_that_may_not_read_the_data_directory_gets_the_"
            "estimate_without_backends",
        ),
    ),
]


def copy_tree(to: Path) -> None:
    """The working tree's files (tracked, and untracked ones not ignored) copied to ``to``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, to / name)


def pytest(tree: Path, tests: list[str]) -> tuple[int, str, float]:
    """(exit status, the first failure, seconds) of ``pytest -x tests`` in ``tree``."""
    env = {
        **os.environ,
        # Source and bytecode change within a second: never trust a .pyc.
        "PYTHONDONTWRITEBYTECODE": "1",
        "TESTPROJECT_HOLD_TIMEOUT": HOLD_TIMEOUT,
    }
    argv = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", *tests]
    started = time.monotonic()
    try:
        done = subprocess.run(
            argv, cwd=tree, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {TIMEOUT} s", time.monotonic() - started
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", done.stdout, re.MULTILINE)
    last = done.stdout.strip().splitlines()[-1:] or [done.stderr.strip()[-200:]]
    return done.returncode, (failed[0] if failed else last[0]), time.monotonic() - started


def mutated(tree: Path, mutant: Mutant) -> dict[Path, str] | None:
    """Apply ``mutant`` in ``tree``; the original texts, or None (nothing applied) if stale."""
    originals: dict[Path, str] = {}
    changed: dict[Path, str] = {}
    for path, text, replacement in mutant.edits:
        file = tree / path
        original = originals.setdefault(file, file.read_text())
        current = changed.get(file, original)
        if current.count(text) != 1:
            return None
        changed[file] = current.replace(text, replacement)
    for file, text in changed.items():
        file.write_text(text)
    return originals


def check(tree: Path, mutant: Mutant) -> tuple[str, str, float]:
    originals = mutated(tree, mutant)
    if originals is None:
        return "stale", "a replacement no longer matches the source", 0.0
    try:
        status, detail, seconds = pytest(tree, list(mutant.tests))
    finally:
        for file, text in originals.items():
            file.write_text(text)
    if status == 0:
        return "MISSED", detail, seconds
    return "caught", detail, seconds


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-k", dest="select", default="", help="mutants whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.select in m.name]
    if args.list:
        for mutant in chosen:
            print(f"{mutant.name}: {mutant.promise}\n    " + "\n    ".join(mutant.tests))
        return 0

    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
    from testproject.cluster import throwaway_cluster

    tree = Path(tempfile.mkdtemp(prefix="tenantsafe-mutants-"))
    try:
        copy_tree(tree)
        imported = subprocess.run(
            [sys.executable, "-c", "import tenantsafe; print(tenantsafe.__file__)"],
            cwd=tree,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        # Mutants of a tenantsafe imported from anywhere else would all be missed.
        assert Path(imported).is_relative_to(tree), imported
        with throwaway_cluster(quiet=True):
            if not args.no_baseline:
                tests = sorted({test for mutant in chosen for test in mutant.tests})
                status, detail, seconds = pytest(tree, tests)
                print(f"baseline, unmutated: status {status} in {seconds:.0f} s ({detail})")
                if status != 0:
                    return 2
            missed = 0
            print(f"{'mutant':<34} {'result':<7} {'s':>4}  promise / what failed")
            for mutant in chosen:
                result, detail, seconds = check(tree, mutant)
                missed += result != "caught"
                print(f"{mutant.name:<34} {result:<7} {seconds:4.0f}  {mutant.promise}")
                print(f"{'':<48}{detail}", flush=True)
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    print(f"{len(chosen) - missed} of {len(chosen)} caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
