"""Catalog drift (tenantsafe.drift): tenants whose schema is not what their migration state
says, found by the doctor in a few queries and named object by object."""

from __future__ import annotations

import io
from typing import Any

import pytest
from django.core.management import call_command
from django.db import transaction
from django.test import SimpleTestCase
from django.test.utils import CaptureQueriesContext

from tenantsafe import catalog_lines, doctor, drift, recording
from tenantsafe.testing import create_tenant
from tests.dbtools import (
    connection,
    doctor_json,
    other_connections_queries,
    reads,
    restore_as,
    scalar,
    sql,
)

# Planted drift: (tenant, the SQL that makes it, what the doctor names).
KINDS = [
    (
        "missing_index",
        'DROP INDEX "missing_index".shop_product_category_id_14d7eea8',
        "index shop_product_category_id_14d7eea8 missing",
    ),
    (
        "extra_column",
        'ALTER TABLE "extra_column".notes_note ADD COLUMN legacy integer',
        "column notes_note.legacy extra",
    ),
    (
        "own_default",
        """ALTER TABLE "own_default".notes_note ALTER COLUMN body SET DEFAULT 'x'""",
        "default of notes_note.body differs",
    ),
    (
        "renamed",
        'ALTER TABLE "renamed".shop_category RENAME CONSTRAINT shop_category_name_key '
        "TO shop_category_name_uniq",
        # Its index is renamed with it, and not named apart.
        "constraint shop_category_name_key renamed to shop_category_name_uniq",
    ),
    (
        "retyped",
        'ALTER TABLE "retyped".shop_product ALTER COLUMN price_cents TYPE bigint',
        "type of shop_product.price_cents differs (bigint, expected integer)",
    ),
    (
        "hotfixed",
        'CREATE INDEX notes_note_title_idx ON "hotfixed".notes_note (title); '
        'ALTER TABLE "hotfixed".notes_note ALTER COLUMN title DROP NOT NULL',
        "nullability of notes_note.title differs (NULL, expected NOT NULL); "
        "index notes_note_title_idx extra",
    ),
]
EXPECTED = {
    drift.RECORDING: "what a new tenant gets (the provisioning recording)",
    drift.MOST: "what 2 of the 8 tenants at its migration state have",
}


def drift_findings(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["schema"]: f for f in report["findings"] if f["kind"] == "catalog-drift"}


@pytest.mark.usefixtures("drop_tenant_schemas", "fresh_recordings")
@pytest.mark.parametrize("reference", [drift.RECORDING, drift.MOST])
# With chunks of two, the catalogs are read in halves on two connections (as beyond 1,000).
@pytest.mark.parametrize("chunk", [drift.CHUNK, 2], ids=["one-connection", "two-connections"])
def test_each_kind_of_drift_is_found_and_named(reference, chunk, monkeypatch):
    monkeypatch.setattr(drift, "CHUNK", chunk)
    for name in ["alike1", "alike2", *(kind[0] for kind in KINDS)]:
        create_tenant(name, name=name)
    for _, statement, _ in KINDS:
        sql(statement)
    if reference == drift.MOST:
        # No recording: the catalog most tenants at the state have is the expected one.
        sql("DELETE FROM public.tenantsafe_recording")

    report, status = doctor_json()

    assert status == 0
    found = drift_findings(report)
    assert sorted(found) == sorted(kind[0] for kind in KINDS)
    for name, _, named in KINDS:
        assert found[name]["level"] == "warning"
        assert found[name]["message"] == (
            f'Tenant "{name}" differs from {EXPECTED[reference]}: {named}. Undo the change, or '
            "make it a migration every tenant gets (see Catalog drift in tenantsafe's docs)."
        )
        assert found[name]["details"]["reference"] == reference
    assert found["retyped"]["details"]["differences"] == [
        {
            "what": "column",
            "name": "shop_product.price_cents",
            "change": "differs",
            "attribute": "type",
            "expected": "integer",
            "found": "bigint",
        }
    ]
    assert found["renamed"]["details"]["differences"] == [
        {
            "what": "constraint",
            "name": "shop_category_name_key",
            "change": "renamed",
            "attribute": "",
            "expected": None,
            "found": "shop_category_name_uniq",
        }
    ]
    out = io.StringIO()
    call_command("tenantsafe_doctor", stdout=out)
    assert (
        'WARNING  "extra_column"   Tenant "extra_column" differs from '
        f"{EXPECTED[reference]}: column notes_note.legacy extra." in out.getvalue()
    )


@pytest.mark.usefixtures("drop_tenant_schemas", "fresh_recordings")
def test_alike_tenants_and_tenants_at_another_state_are_not_drift():
    for name in ("one", "two", "three", "behind"):
        create_tenant(name, name=name)
    # Behind on shop's last migration, and without what it adds: as that state leaves it.
    sql("DELETE FROM \"behind\".django_migrations WHERE app = 'shop' AND name = '0003_product_sku'")
    sql('ALTER TABLE "behind".shop_product DROP COLUMN sku')

    report, _ = doctor_json()

    assert [(f["kind"], f["schema"]) for f in report["findings"] if f["kind"] != "pooler"] == [
        ("behind", "behind")
    ]


@pytest.mark.usefixtures("drop_tenant_schemas", "fresh_recordings")
def test_a_tenant_restored_from_a_dump_is_not_drift():
    # Migrations leave the attribute numbers of dropped columns unused (contenttypes drops
    # django_content_type.name); a schema restored from pg_dump numbers its columns anew.
    for name in ("one", "two"):
        create_tenant(name, name=name)
    restore_as("one", "restored")
    assert scalar(
        "SELECT attnum FROM pg_attribute WHERE attrelid = %s::regclass AND attname = 'model'",
        ['"restored".django_content_type'],
    ) < scalar(
        "SELECT attnum FROM pg_attribute WHERE attrelid = %s::regclass AND attname = 'model'",
        ['"one".django_content_type'],
    )
    # The restored one is in the drift of neither reference (a recording, and the most).
    report, _ = doctor_json()
    assert [f for f in report["findings"] if f["kind"] == "catalog-drift"] == []
    sql("DELETE FROM public.tenantsafe_recording")
    report, _ = doctor_json()
    assert [f for f in report["findings"] if f["kind"] == "catalog-drift"] == []
    # A column moved is still named.
    sql(
        'ALTER TABLE "restored".notes_note DROP COLUMN body; '
        "ALTER TABLE \"restored\".notes_note ADD COLUMN body text NOT NULL DEFAULT ''"
    )
    report, _ = doctor_json()
    (found,) = [f for f in report["findings"] if f["kind"] == "catalog-drift"]
    assert found["schema"] == "restored"
    assert "position of notes_note.body differs" in found["message"]


@pytest.mark.usefixtures("drop_tenant_schemas", "fresh_recordings")
def test_inside_a_transaction_the_doctor_sees_what_it_holds():
    # As in a TestCase: what the transaction changed is not visible to another connection,
    # so the doctor reads everything on this one.
    for name in ("one", "two", "three"):
        create_tenant(name, name=name)
    with transaction.atomic():
        sql('ALTER TABLE "two".notes_note ADD COLUMN legacy integer')
        sql('DELETE FROM "three".auth_permission')
        report = doctor.diagnose("default")
        transaction.set_rollback(True)

    assert sorted((f.kind, f.schema) for f in report.findings if f.schema) == [
        ("catalog-drift", "two"),
        ("permissions-behind", "three"),
    ]


@pytest.mark.usefixtures("drop_tenant_schemas", "fresh_recordings")
def test_the_doctor_reads_a_few_hundred_tenants_in_a_few_queries():
    light("few", 3)
    sql('CREATE INDEX extra_idx ON "few0001".django_migrations (name)')
    with CaptureQueriesContext(connection) as few, other_connections_queries() as few_others:
        report = doctor.diagnose("default")
    assert [f.schema for f in report.findings if f.kind == "catalog-drift"] == ["few0001"]

    light("many", 300)
    sql('ALTER TABLE "many0123".django_migrations ALTER COLUMN app TYPE text')
    with CaptureQueriesContext(connection) as many, other_connections_queries() as others:
        report = doctor.diagnose("default")

    assert report.tenants == report.current == 303
    drifted = {str(f.schema): f.message for f in report.findings if f.kind == "catalog-drift"}
    assert sorted(drifted) == ["few0001", "many0123"]
    assert (
        "type of django_migrations.app differs (text, expected character varying(255))"
        in (drifted["many0123"])
    )
    assert "what 301 of the 303 tenants at its migration state have" in drifted["many0123"]
    assert len(many.captured_queries) == len(few.captured_queries)
    # What test_doctor's test of the doctor's reads counts, and the lines of the two catalogs.
    assert len(reads(many.captured_queries)) <= 13
    # The reads on connections of their own (the catalog digests: one statement per 1,000
    # tenants) do not grow with the tenants either.
    assert 1 <= len(reads(others)) == len(reads(few_others)) <= 2


def light(prefix: str, count: int) -> None:
    """``count`` current tenants, each schema holding just a complete django_migrations table
    (the doctor's reads do not depend on how much else a schema holds), and no recording to
    compare them with."""
    create_tenant("template", name="T")
    names = [f"{prefix}{n:04d}" for n in range(count)]
    sql(
        "; ".join(
            f'CREATE SCHEMA "{n}"; CREATE TABLE "{n}".django_migrations '
            '(LIKE "template".django_migrations INCLUDING ALL); '
            f'INSERT INTO "{n}".django_migrations SELECT * FROM "template".django_migrations'
            for n in names
        )
    )
    sql(
        "INSERT INTO customers_client (schema_name, name, created_on) "
        "SELECT n, n, now() FROM unnest(%s::text[]) AS n",
        [names],
    )
    sql(
        "DELETE FROM customers_domain WHERE tenant_id IN "
        "(SELECT id FROM customers_client WHERE schema_name = 'template')"
    )
    sql("DELETE FROM customers_client WHERE schema_name = 'template'")
    sql('DROP SCHEMA "template" CASCADE')
    sql("DELETE FROM public.tenantsafe_recording")


@pytest.mark.usefixtures("drop_tenant_schemas", "fresh_recordings")
def test_the_digest_of_the_lines_is_the_catalog_digest():
    create_tenant("acme", name="Acme")
    with connection.cursor() as cursor:
        lines = recording.catalog_lines(cursor, ["acme"])["acme"]
        assert catalog_lines.digest(lines) == recording.catalogs(cursor, ["acme"])["acme"]
    assert "column\tnotes_note\ttitle\t2\t100\tcharacter varying(100)\tt\t\t\t" in lines


# The differences of catalog lines, without a database.

TABLE = "relation\tnotes_note\tr\tp"
SEQUENCE = [
    "relation\tnotes_note_id_seq\tS\tp",
    "sequence\tnotes_note_id_seq\tbigint\t1\t1\t1\t9\tf",
]
ID = "column\tnotes_note\tid\t1\t0\tbigint\tt\td\t\t"
TITLE = "column\tnotes_note\ttitle\t2\t100\tcharacter varying(100)\tt\t\t\t"
PKEY = "constraint\tnotes_note\tnotes_note_pkey\tp\tPRIMARY KEY (id)"
PKEY_INDEX = "index\tnotes_note\tnotes_note_pkey\t403\t0\tt\tt\tf\tt\t1\t3124\t0\t0"
BASE = [TABLE, *SEQUENCE, ID, TITLE, PKEY, PKEY_INDEX]


class DifferencesTests(SimpleTestCase):
    def describe(self, found: list[str]) -> str:
        return catalog_lines.describe(catalog_lines.differences(BASE, found))

    def test_alike_catalogs_have_no_differences(self):
        assert catalog_lines.differences(BASE, list(reversed(BASE))) == ()

    def test_each_change_of_a_column(self):
        cases = [
            (TITLE.replace("character varying(100)", "text"), "type of notes_note.title differs"),
            (TITLE.replace("\tt\t\t\t", "\tf\t\t\t"), "nullability of notes_note.title differs"),
            (TITLE + "'x'::text", "default of notes_note.title differs"),
            (TITLE.replace("\t100\t", "\t950\t"), "collation of notes_note.title differs"),
        ]
        for line, named in cases:
            with self.subTest(named):
                found = [line if x == TITLE else x for x in BASE]
                assert self.describe(found).startswith(named)

    def test_columns_in_another_order(self):
        found = [
            ID.replace("\t1\t", "\t2\t")
            if x == ID
            else TITLE.replace("\t2\t", "\t1\t")
            if x == TITLE
            else x
            for x in BASE
        ]
        assert self.describe(found) == (
            "position of notes_note.id differs; position of notes_note.title differs"
        )

    def test_numbers_left_unused_by_dropped_columns_are_no_difference(self):
        # A column dropped after id: title is number 3, in the index on it too.
        title_index = "index\tnotes_note\tnotes_title\t403\t0\tf\tf\tf\tt\t{}\t3126\t100\t0"
        base = [*BASE, title_index.format(2)]
        gap = [TITLE.replace("\t2\t", "\t3\t") if x == TITLE else x for x in BASE]
        assert catalog_lines.differences(base, [*gap, title_index.format(3)]) == ()
        moved = catalog_lines.differences(base, [*gap, title_index.format(1)])
        assert catalog_lines.describe(moved) == "definition of index notes_title differs"

    def test_a_missing_table_is_named_once(self):
        found = [x for x in BASE if "\tnotes_note\t" not in x]
        assert self.describe(found) == "table notes_note missing"

    def test_a_missing_sequence_is_named_once(self):
        found = [x for x in BASE if x not in SEQUENCE]
        assert self.describe(found) == "sequence notes_note_id_seq missing"

    def test_a_renamed_column_and_a_renamed_primary_key(self):
        found = [
            TABLE,
            *SEQUENCE,
            ID,
            TITLE.replace("\ttitle\t", "\theadline\t"),
            PKEY.replace("notes_note_pkey", "notes_pk"),
            PKEY_INDEX.replace("notes_note_pkey", "notes_pk"),
        ]
        assert self.describe(found) == (
            "column notes_note.title renamed to notes_note.headline; "
            "constraint notes_note_pkey renamed to notes_pk"
        )

    def test_an_unlogged_table(self):
        found = [TABLE.replace("\tp", "\tu") if x == TABLE else x for x in BASE]
        assert self.describe(found) == (
            "persistence of table notes_note differs (unlogged, expected permanent)"
        )

    def test_an_index_on_other_columns(self):
        found = [
            PKEY_INDEX.replace("\t1\t3124", "\t2\t3124") if x == PKEY_INDEX else x for x in BASE
        ]
        assert self.describe(found) == "definition of index notes_note_pkey differs"
