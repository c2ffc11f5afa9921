"""migrate_schemas_safe on Citus, through pgbouncer with other clients on the pool: deploys
replayed to alike tenants, lock timeouts that reach the workers, a worker stopped mid-deploy;
and directly connected, the migration that cannot run through a pooler."""

from __future__ import annotations

import json

from testproject import citus_cluster
from tests.citus.tools import CITUS, POOLER_SAFE, CitusDatabase, tenants
from tests.dbtools import connect, fingerprint, pool_load, register_tenants, summary
from tests.faults import hold, open_read, runs

pytestmark = CITUS


def deploy(database: CitusDatabase, env: dict[str, str], *args: str):
    return database.manage("migrate_schemas_safe", "--tenant", *args, env=env)


def test_a_deploy_is_replayed_to_every_alike_tenant_identical_to_the_witnesses(
    citus_db, shop_deploy
):
    names = [f"d{n}" for n in range(6)]
    tenants(citus_db, names)

    with pool_load(citus_db.pooled, [f'"{n}", public' for n in names] + ["public"]):
        result = deploy(citus_db, shop_deploy)

    assert result.returncode == 0, result.stderr[-3000:]
    counts = summary(result.stdout)
    assert (counts["migrated"], counts["replayed"], counts["failed"]) == (2, 4, 0)
    witness = fingerprint(citus_db.url, "d0")
    assert ("shop", "0005_coupon") in witness["migrations"]
    assert [n for n in names if fingerprint(citus_db.url, n) != witness] == []
    nodes = citus_db.nodes()
    assert {nodes[n] for n in names} == set(citus_db.worker_ports)

    again = deploy(citus_db, shop_deploy)

    assert again.returncode == 0, again.stderr[-3000:]
    assert summary(again.stdout)["current"] == 6


def shard_of(database: CitusDatabase, table: str) -> tuple[str, str]:
    """(the URL of the worker holding ``table``, its shard's name there)."""
    port, shard = database.sql(
        "SELECT nodeport, shard_name FROM citus_shards WHERE table_name = %s::regclass",
        [table],
    )[0]
    worker = next(url for url in database.worker_urls if f":{port}/" in url)
    return worker, shard


def test_a_lock_held_on_a_worker_times_the_tenant_out_and_the_next_run_completes_it(
    citus_db, shop_deploy
):
    tenants(citus_db, ["held", "free"])
    worker, shard = shard_of(citus_db, "held.shop_product")
    args = ("--lock-timeout", "300ms", "--lock-retries", "1")

    # A reader in the middle of a transaction on the worker itself: the coordinator sees no
    # lock, and without a lock_timeout on the worker the ALTER TABLE would wait for it forever.
    port = int(worker.rsplit(":", 1)[1].split("/")[0])
    with runs() as start, open_read(worker, shard) as reader:
        run = start(citus_db.pooled, "migrate_schemas_safe", "--tenant", *args, env=shop_deploy)
        code = run.wait(120)
        out, err = run.stdout, run.stderr

    assert code == 1, err[-3000:]
    counts = summary(out)
    assert (counts["migrated"], counts["failed"]) == (1, 1), out
    # The lock is named where it is held: on the worker, not on the coordinator.
    assert (
        'FAILED held: lock timeout (300 ms) on \'ALTER TABLE "shop_product" ADD COLUMN ' in err
    ), err
    assert f'"held".shop_product held by pid {reader.pid} on node 127.0.0.1:{port}' in err, err
    assert ("shop", "0004_colour") not in fingerprint(citus_db.url, "held")["migrations"]

    again = deploy(citus_db, shop_deploy, *args)

    assert again.returncode == 0, again.stderr[-3000:]
    assert (summary(again.stdout)["migrated"], summary(again.stdout)["current"]) == (1, 1)
    assert fingerprint(citus_db.url, "held") == fingerprint(citus_db.url, "free")


# A data migration: it changes rows of the tenant's own node only.
NOTE = """
    from django.db import migrations


    class Migration(migrations.Migration):
        dependencies = [("notes", "0003_welcome_note")]

        operations = [
            migrations.RunSQL(
                "INSERT INTO notes_note (title, body, pinned) VALUES ('deployed', '', false)",
                migrations.RunSQL.noop,
            )
        ]
"""


def worker_port(database: CitusDatabase, number: int) -> int:
    return database.worker_ports[number - 1]


def test_a_worker_stopped_mid_deploy_fails_its_tenants_only_and_the_next_run_completes_them(
    citus_db, new_migrations
):
    env = {
        **POOLER_SAFE,
        "TESTPROJECT_MIGRATION_MODULES": json.dumps(
            {"notes": new_migrations("notes", {"0004_deployed": NOTE})}
        ),
    }
    names = [f"w{n}" for n in range(4)]
    tenants(citus_db, names)
    nodes = citus_db.nodes()
    first = names[0]
    stopped = next(n for n in (1, 2) if worker_port(citus_db, n) != nodes[first])
    lost = sorted(n for n in names if nodes[n] == worker_port(citus_db, stopped))
    kept = sorted(set(names) - set(lost))
    assert lost

    with runs() as start, hold("post_migrate", first) as held:
        run = start(citus_db.pooled, "migrate_schemas_safe", "--tenant", env={**env, **held.env})
        held.wait(run)
        citus_cluster.stop_worker(citus_db.env, stopped)
        try:
            held.release()
            code = run.wait(300)
            out, err = run.stdout, run.stderr
        finally:
            citus_cluster.start_worker(citus_db.env, stopped)

    assert code == 1, err[-3000:]
    counts = summary(out)
    assert (counts["failed"], counts["migrated"] + counts["replayed"]) == (len(lost), len(kept))
    node = f"127.0.0.1:{worker_port(citus_db, stopped)}"
    assert (
        f"Citus node {node} (Connection refused) is unreachable. Run again once it is back" in err
    ), err
    assert deployed(citus_db, names) == {name: name in kept for name in names}

    again = deploy(citus_db, env)

    assert again.returncode == 0, again.stderr[-3000:]
    assert (summary(again.stdout)["failed"], summary(again.stdout)["current"]) == (0, len(kept))
    assert deployed(citus_db, names) == dict.fromkeys(names, True)


def deployed(database: CitusDatabase, names: list[str]) -> dict[str, bool]:
    return {
        name: database.sql(f"SELECT count(*) FROM {name}.notes_note WHERE title = 'deployed'")
        == [(1,)]
        for name in names
    }


def test_a_schema_deploy_with_a_worker_stopped_fails_every_tenant_whole_and_the_next_run_completes(
    citus_db, shop_deploy
):
    names = [f"s{n}" for n in range(2)]
    tenants(citus_db, names)
    before = fingerprint(citus_db.url, names[0])

    citus_cluster.stop_worker(citus_db.env, 2)
    try:
        result = deploy(citus_db, shop_deploy)
    finally:
        citus_cluster.start_worker(citus_db.env, 2)

    # Citus applies DDL on every node: no tenant's schema can change while one is down.
    assert result.returncode == 1, result.stderr[-3000:]
    assert summary(result.stdout)["failed"] == 2
    node = f"127.0.0.1:{worker_port(citus_db, 2)}"
    assert f"Citus node {node}" in result.stderr, result.stderr
    # Nothing half-applied: each tenant's migration rolled back whole.
    assert [n for n in names if fingerprint(citus_db.url, n) != before] == []

    again = deploy(citus_db, shop_deploy)

    assert again.returncode == 0, again.stderr[-3000:]
    after = fingerprint(citus_db.url, names[0])
    assert ("shop", "0005_coupon") in after["migrations"]
    assert [n for n in names if fingerprint(citus_db.url, n) != after] == []


def test_directly_connected_the_whole_project_migrates_its_concurrent_index_onto_the_workers(
    citus_db,
):
    names = ["direct1", "direct2"]
    register_tenants(citus_db.url, names)
    # The whole test project: its search app's CREATE INDEX CONCURRENTLY cannot run through a
    # pooler, so the guard pins the session's path for it, on the coordinator directly.
    whole = {"TESTPROJECT_POOLER_SAFE": ""}

    result = citus_db.manage("migrate_schemas_safe", "--tenant", pooled=False, env=whole)

    assert result.returncode == 0, result.stderr[-3000:]
    assert summary(result.stdout)["failed"] == 0
    nodes = citus_db.nodes()
    assert all(nodes[name] in citus_db.worker_ports for name in names), nodes
    assert citus_db.sql(
        "SELECT n.nspname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relname = 'search_term_idx' "
        "ORDER BY 1"
    ) == [(name, True) for name in names]
    # The shards' indexes (search_term_idx_<shard id>; every node also has the shells of every
    # distributed table): valid, each on its tenant's worker.
    shards = []
    for port, worker in zip(citus_db.worker_ports, citus_db.worker_urls, strict=True):
        with connect(worker) as conn:
            # Citus hides shards from the catalog on a node with metadata.
            conn.execute("SET citus.override_table_visibility = off")
            shards += [
                (name, port, valid)
                for name, valid in conn.execute(
                    "SELECT n.nspname, i.indisvalid FROM pg_index i "
                    "JOIN pg_class c ON c.oid = i.indexrelid "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE c.relname ~ '^search_term_idx_[0-9]+$'"
                ).fetchall()
            ]
    assert sorted(shards) == [(name, nodes[name], True) for name in names]
    assert citus_db.sql(
        "SELECT count(*) FROM pg_indexes WHERE indexname = 'search_term_idx' "
        "AND schemaname = 'public'"
    ) == [(0,)]


def test_a_run_killed_mid_tenant_leaves_nothing_half_applied_and_the_next_run_completes(citus_db):
    names = ["k1", "k2"]
    register_tenants(citus_db.url, names)

    with runs() as start, hold("seed", "k2") as held:
        # Held inside shop 0002's transaction, which has written to k2's shard on its worker.
        run = start(
            citus_db.pooled, "migrate_schemas_safe", "--tenant", env={**POOLER_SAFE, **held.env}
        )
        held.wait(run)
        run.kill()

    # shop 0001 committed; 0002's rows and record went with the killed transaction.
    assert citus_db.sql("SELECT name FROM k2.django_migrations WHERE app = 'shop'") == [
        ("0001_initial",)
    ]
    assert citus_db.sql("SELECT count(*) FROM k2.shop_category") == [(0,)]

    again = deploy(citus_db, {})

    assert again.returncode == 0, again.stderr[-3000:]
    assert summary(again.stdout)["failed"] == 0
    assert citus_db.sql("SELECT count(*) FROM k2.shop_category") == [(3,)]
    assert fingerprint(citus_db.url, "k2") == fingerprint(citus_db.url, "k1")
    # No distributed transaction of the killed run left prepared on a worker.
    for worker in citus_db.worker_urls:
        with connect(worker) as conn:
            assert conn.execute("SELECT gid FROM pg_prepared_xacts").fetchall() == []
