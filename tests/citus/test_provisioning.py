"""Provisioning on Citus through pgbouncer: signups by replay, spare schemas, create_tenant and
the pytest plugin. Every new tenant schema must be a distributed schema, and the same as one
django-tenants migrates."""

from __future__ import annotations

from tests.citus.tools import CITUS, POOLER_SAFE, CitusDatabase
from tests.dbtools import (
    fingerprint,
    pool_load,
    reference_fingerprint,
    signup_result,
    start_signup,
)

pytestmark = CITUS


def busy(database: CitusDatabase, names: list[str]):
    """Other clients on the pool, setting the paths of these tenants."""
    return pool_load(database.pooled, [f'"{name}", public' for name in names] + ["public"])


def test_signups_replay_through_pgbouncer_and_spread_over_both_workers(citus_db):
    reference = reference_fingerprint(citus_db.url, POOLER_SAFE)
    names = [f"sign{n}" for n in range(5)]

    with busy(citus_db, names):
        first = signup_result(start_signup(citus_db.pooled, names[0], POOLER_SAFE))
        # The others at once, each in a process of its own.
        others = [start_signup(citus_db.pooled, name, POOLER_SAFE) for name in names[1:]]
        answers = [signup_result(proc) for proc in others]

    assert first == {"how": "migrated", "migrated": [names[0]]}
    assert answers == [{"how": "replayed", "migrated": []}] * 4
    nodes = citus_db.nodes()
    for name in names:
        assert fingerprint(citus_db.url, name) == reference, name
        assert nodes[name] in citus_db.worker_ports, (name, nodes)
    assert {nodes[name] for name in names} == set(citus_db.worker_ports)


def test_spares_spread_over_the_workers_and_a_claimed_one_stays_distributed(citus_db):
    first = signup_result(start_signup(citus_db.pooled, "recorded", POOLER_SAFE))
    assert first["how"] == "migrated"

    filled = citus_db.manage("tenantsafe_spares", "--count", "4")

    assert filled.returncode == 0, filled.stderr
    assert "4 of 4 spare schema(s) ready (4 made)" in filled.stdout
    spares = citus_db.sql("SELECT schema_name FROM public.tenantsafe_spare ORDER BY created_at")
    nodes = citus_db.nodes()
    assert {nodes[name] for (name,) in spares} == set(citus_db.worker_ports)
    oldest = spares[0][0]

    with busy(citus_db, ["claimer"]):
        claimed = signup_result(start_signup(citus_db.pooled, "claimer", POOLER_SAFE))

    assert claimed == {"how": "spare", "migrated": []}
    after = citus_db.nodes()
    # The oldest spare, renamed: still a distributed schema, on the node it was made on.
    assert oldest not in after
    assert after["claimer"] == nodes[oldest]
    assert fingerprint(citus_db.url, "claimer") == fingerprint(citus_db.url, "recorded")


CREATE_TENANT = (
    "from tenantsafe.testing import create_tenant; "
    "t = create_tenant('made', name='Made'); u = create_tenant('made', name='Made'); "
    "print(t.pk == u.pk, t.get_primary_domain().domain)"
)


def test_create_tenant_through_pgbouncer_makes_one_distributed_tenant(citus_db):
    result = citus_db.manage("shell", "-v", "0", "-c", CREATE_TENANT)

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "made.localhost"]
    assert citus_db.nodes()["made"] in citus_db.worker_ports
    assert citus_db.sql("SELECT count(*) FROM public.customers_client") == [(1,)]
    assert citus_db.sql("SELECT count(*) FROM made.shop_category") == [(3,)]


def test_the_pytest_plugin_on_a_shared_citus_database(citus_db, pytester, monkeypatch):
    from tests.test_plugin import OUTCOMES, project, run

    monkeypatch.setenv("DATABASE_URL", citus_db.pooled)
    for name, value in POOLER_SAFE.items():
        monkeypatch.setenv(name, value)
    project(pytester, shared=True)

    run(pytester).assert_outcomes(**OUTCOMES)

    nodes = citus_db.nodes()
    assert {name: nodes.get(name) in citus_db.worker_ports for name in ("alpha", "beta")} == {
        "alpha": True,
        "beta": True,
    }
    assert citus_db.sql("SELECT count(*) FROM alpha.shop_product") == [(0,)]
