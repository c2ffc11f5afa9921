"""The three-node Citus cluster the other ``citus`` tests stand on."""

from __future__ import annotations

from testproject.dbtools import connect
from tests.citus.tools import CITUS

pytestmark = CITUS


def test_tenant_schemas_made_through_pgbouncer_are_distributed_over_both_workers(citus_db):
    nodes = citus_db.sql("SELECT nodeport, shouldhaveshards FROM pg_dist_node ORDER BY nodeid")
    assert [has for _, has in nodes] == [False, True, True]  # the coordinator holds none
    assert sorted(port for port, _ in nodes[1:]) == sorted(citus_db.worker_ports)

    with connect(citus_db.pooled) as conn:
        assert conn.execute("SHOW citus.enable_schema_based_sharding").fetchone() == ("on",)
        for name in ("alpha", "beta"):
            conn.execute(f"CREATE SCHEMA {name}")
            conn.execute(f"CREATE TABLE {name}.item (id bigserial PRIMARY KEY, label text)")
            conn.execute(f"INSERT INTO {name}.item (label) VALUES (%s)", [name])

    nodes_of = citus_db.nodes()
    assert {nodes_of["alpha"], nodes_of["beta"]} == set(citus_db.worker_ports)
    assert citus_db.sql("SELECT label FROM beta.item") == [("beta",)]


def test_public_is_migrated_and_stays_on_the_coordinator(citus_db):
    assert citus_db.sql("SELECT count(*) FROM public.customers_client") == [(0,)]
    assert citus_db.sql(
        "SELECT count(*) FROM citus_tables WHERE table_name::text LIKE 'customers%'"
    ) == [(0,)]
