"""Which statements may run inside the transaction the guard holds open for a server-side
cursor (statements.joins_stream): reads that change and lock nothing."""

from __future__ import annotations

import pytest

from tenantsafe.statements import joins_stream

CASES = {
    'SELECT "shop_product"."id" FROM "shop_product" WHERE "shop_product"."id" = %s': True,
    "  select 1": True,
    "SHOW search_path": True,
    "SELECT name FROM pg_cursors": True,
    'UPDATE "shop_product" SET "price_cents" = 1': False,
    'INSERT INTO "notes_note" ("title") VALUES (%s)': False,
    "DELETE FROM shop_product": False,
    'SELECT "id" FROM "shop_product" FOR UPDATE': False,
    'SELECT "id" FROM "shop_product" FOR NO KEY UPDATE SKIP LOCKED': False,
    'SELECT "id" FROM "shop_product" FOR SHARE': False,
    "SELECT nextval('shop_product_id_seq')": False,
    "SELECT pg_advisory_xact_lock(1)": False,
    "SELECT * INTO copy FROM shop_product": False,
    "SELECT 1; DELETE FROM shop_product": False,
    "WITH gone AS (DELETE FROM shop_product RETURNING id) SELECT count(*) FROM gone": False,
}


@pytest.mark.parametrize(("sql", "joins"), CASES.items(), ids=list(CASES))
def test_joins_stream(sql: str, joins: bool) -> None:
    assert joins_stream(sql) is joins
