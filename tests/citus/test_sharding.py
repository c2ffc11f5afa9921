"""Where tenants live on Citus: the doctor's nodes and undistributed tenants, check W007, and
tenantsafe_citus distribute / move / rebalance, each tenant under its lease."""

from __future__ import annotations

import json
from typing import Any

from tests.citus.tools import CITUS, CitusDatabase, tenants
from tests.dbtools import fingerprint, register_tenants
from tests.faults import hold, runs, wait_for

pytestmark = CITUS


def node_name(port: int | None) -> str | None:
    return None if port is None else f"127.0.0.1:{port}"


def legacy_tenant(database: CitusDatabase, name: str) -> None:
    """A tenant whose schema was made while schema-based sharding was off, then migrated."""
    register_tenants(database.url, [name], create_schemas=False)
    with database.connection() as conn:
        conn.execute("SET citus.enable_schema_based_sharding = off")
        conn.execute(f'CREATE SCHEMA "{name}"')
    result = database.manage("migrate_schemas_safe", "--schema", name, "-v0")
    assert result.returncode == 0, result.stderr[-3000:]


def doctor(database: CitusDatabase) -> dict[str, Any]:
    result = database.manage("tenantsafe_doctor", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_the_doctor_places_every_tenant_and_distribute_moves_the_undistributed_ones(citus_db):
    tenants(citus_db, ["east", "west"])
    legacy_tenant(citus_db, "legacy")
    nodes = citus_db.nodes()

    report = doctor(citus_db)

    assert report["citus"]["tenants"] == {
        "east": node_name(nodes["east"]),
        "legacy": None,
        "west": node_name(nodes["west"]),
    }
    assert report["citus"]["nodes"] == {node_name(port): 1 for port in citus_db.worker_ports}
    undistributed = [f for f in report["findings"] if f["kind"] == "citus-undistributed"]
    assert [(f["level"], f["schema"]) for f in undistributed] == [("warning", "legacy")]
    assert "tenantsafe_citus distribute --schema legacy" in undistributed[0]["message"]

    result = citus_db.manage("tenantsafe_citus", "distribute", "--all")

    assert result.returncode == 0, result.stderr[-3000:]
    target = node_name(citus_db.nodes()["legacy"])
    assert target in {node_name(port) for port in citus_db.worker_ports}
    assert f"tenantsafe_citus: legacy distributed from the coordinator to {target} in " in (
        result.stdout
    )
    assert result.stdout.endswith("tenantsafe_citus: 1 tenant(s) distributed.\n")
    # Its rows went with it, and the copy Citus leaves on the coordinator was emptied.
    assert citus_db.sql("SELECT count(*) FROM legacy.shop_category") == [(3,)]
    assert citus_db.sql("SELECT pg_relation_size('legacy.shop_category')") == [(0,)]
    after = doctor(citus_db)
    assert [f for f in after["findings"] if f["kind"] == "citus-undistributed"] == []
    assert sorted(after["citus"]["nodes"].values()) == [1, 2]


def test_a_database_without_schema_based_sharding_is_reported(citus_db):
    off = {"PGOPTIONS": "-c citus.enable_schema_based_sharding=off"}

    result = citus_db.manage("check", "--database", "default", pooled=False, env=off)
    normal = citus_db.manage("check", "--database", "default", pooled=False)

    assert "tenantsafe.W007" in result.stderr + result.stdout
    assert "citus.enable_schema_based_sharding is off" in result.stderr + result.stdout
    assert "W007" not in normal.stderr + normal.stdout


def test_a_move_waits_for_the_tenants_deploy_and_then_moves_it(citus_db, shop_deploy):
    tenants(citus_db, ["mover"])
    source = citus_db.nodes()["mover"]
    target = next(port for port in citus_db.worker_ports if port != source)

    with runs() as start, hold("post_migrate", "mover") as held:
        deploy = start(
            citus_db.pooled, "migrate_schemas_safe", "--tenant", env={**shop_deploy, **held.env}
        )
        held.wait(deploy)
        move = start(
            citus_db.pooled,
            "tenantsafe_citus",
            "move",
            "--schema",
            "mover",
            "--to",
            node_name(target),
            env=shop_deploy,
        )
        wait_for(
            "the move to wait for the deploy's lease",
            lambda: (
                "waiting for mover's lease, held by migrate_schemas_safe" in move.stdout
                or not move.running()
            ),
            timeout=120,
        )
        moved_while_held = citus_db.nodes()["mover"]
        held.release()
        assert deploy.wait(300) == 0, deploy.stderr[-3000:]
        assert move.wait(300) == 0, move.stderr[-3000:]
        out = move.stdout

    assert moved_while_held == source
    assert "waiting for mover's lease, held by migrate_schemas_safe" in out
    assert (
        f"tenantsafe_citus: mover moved from {node_name(source)} to {node_name(target)} in " in out
    )
    assert citus_db.nodes()["mover"] == target
    print_ = fingerprint(citus_db.url, "mover")
    assert ("shop", "0005_coupon") in print_["migrations"]
    assert citus_db.sql("SELECT count(*) FROM public.tenantsafe_lease") == [(0,)]


def test_rebalance_moves_tenants_until_the_workers_hold_as_many(citus_db):
    names = [f"r{n}" for n in range(4)]
    tenants(citus_db, names)
    # All on the first worker (as after adding the second one).
    for name in names:
        if citus_db.nodes()[name] != citus_db.worker_ports[0]:
            citus_db.sql(
                "SELECT citus_schema_move(%s, '127.0.0.1', %s, 'block_writes')",
                [name, citus_db.worker_ports[0]],
            )
    assert {citus_db.nodes()[name] for name in names} == {citus_db.worker_ports[0]}

    plan = citus_db.manage("tenantsafe_citus", "rebalance", "--plan")
    result = citus_db.manage("tenantsafe_citus", "rebalance", "--mode", "block_writes")

    assert plan.returncode == 0, plan.stderr[-3000:]
    planned = [line for line in plan.stdout.splitlines() if "would move" in line]
    assert len(planned) == 2, plan.stdout
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.endswith("tenantsafe_citus: 2 tenant(s) moved.\n")
    placed = [citus_db.nodes()[name] for name in names]
    assert sorted(placed.count(port) for port in citus_db.worker_ports) == [2, 2]
    assert [
        n for n in names if citus_db.sql(f"SELECT count(*) FROM {n}.shop_category") != [(3,)]
    ] == []
