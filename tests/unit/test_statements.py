"""tenantsafe.statements, one table per classifier: what each SQL string is taken for.

The non-transactional table is also run against PostgreSQL (tests/test_statements.py), which
says for itself which of them it refuses inside a transaction block.
"""

from __future__ import annotations

import pytest

from tenantsafe import statements

# (statement, PostgreSQL refuses it inside a transaction block). ``t`` is a table with an
# index ``t_idx`` on it; the test against PostgreSQL creates both.
NON_TRANSACTIONAL: list[tuple[str, bool]] = [
    ("CREATE INDEX CONCURRENTLY t_c_idx ON t (id)", True),
    ("create unique index concurrently t_c_idx on t (id)", True),
    ("  DROP INDEX CONCURRENTLY IF EXISTS t_idx", True),
    ("REINDEX TABLE CONCURRENTLY t", True),
    ("REINDEX (VERBOSE) INDEX CONCURRENTLY t_idx", True),
    ("REINDEX SCHEMA pg_temp", True),
    ("REINDEX (VERBOSE) DATABASE tenantsafe", True),
    ("REINDEX SYSTEM tenantsafe", True),
    ("VACUUM", True),
    ("VACUUM (ANALYZE) t", True),
    ("vacuum full t", True),
    ("CREATE DATABASE tenantsafe_never", True),
    ("DROP DATABASE IF EXISTS tenantsafe_never", True),
    ("CREATE TABLESPACE tenantsafe_never LOCATION '/nonexistent'", True),
    ("DROP TABLESPACE IF EXISTS tenantsafe_never", True),
    ("ALTER SYSTEM SET work_mem = '4MB'", True),
    ("CLUSTER", True),
    ("CLUSTER VERBOSE", True),
    ("DISCARD ALL", True),
    # Their transactional neighbours.
    ("CREATE INDEX t_c_idx ON t (id)", False),
    ("CREATE UNIQUE INDEX t_c_idx ON t (id)", False),
    ("DROP INDEX t_idx", False),
    ("REINDEX TABLE t", False),
    ("REINDEX INDEX t_idx", False),
    ("ANALYZE t", False),
    ("ALTER TABLE t CLUSTER ON t_idx", False),
    ("DISCARD PLANS", False),
    ("DISCARD TEMP", False),
    ("SELECT 'VACUUM'", False),
    ("SELECT 1 AS cluster", False),
    ("CREATE TABLE t_vacuum (id integer)", False),
]


@pytest.mark.parametrize(("sql", "refused"), NON_TRANSACTIONAL)
def test_non_transactional(sql, refused):
    assert bool(statements.NON_TRANSACTIONAL.match(sql)) is refused


TRANSACTION_CONTROL = [
    ("BEGIN", True),
    ("begin isolation level serializable", True),
    ("START TRANSACTION READ ONLY", True),
    ("COMMIT", True),
    ("COMMIT PREPARED 'x'", True),
    ("ROLLBACK", True),
    ("ROLLBACK TO SAVEPOINT s1", True),
    ("  END", True),
    ("ABORT", True),
    ("PREPARE TRANSACTION 'x'", True),
    ("SAVEPOINT s1", False),
    ("RELEASE SAVEPOINT s1", False),
    ("SELECT 'BEGIN'", False),
    ("BEGINNING", False),
    ("COMMITTED", False),
    ("ENDS", False),
    ("INSERT INTO log (what) VALUES ('COMMIT')", False),
]


@pytest.mark.parametrize(("sql", "controls"), TRANSACTION_CONTROL)
def test_transaction_control(sql, controls):
    assert bool(statements.TRANSACTION_CONTROL.match(sql)) is controls


ENDS_TRANSACTION = [
    ("COMMIT", True),
    ('CREATE TABLE "a" ("id" integer);\nCOMMIT', True),
    ("INSERT INTO a VALUES (1); BEGIN; INSERT INTO a VALUES (2)", True),
    ("SELECT 1;START TRANSACTION", True),
    ("SELECT 1; ROLLBACK", True),
    ("SELECT 1; end", True),
    ("SELECT 1; ABORT", True),
    ("SELECT 1; PREPARE TRANSACTION 'x'", True),
    # A savepoint's rollback keeps the transaction.
    ("SAVEPOINT s; SELECT 1; ROLLBACK TO s", False),
    ("SAVEPOINT s; SELECT 1; ROLLBACK TO SAVEPOINT s", False),
    ("SAVEPOINT s; RELEASE SAVEPOINT s", False),
    ('CREATE TABLE "commit_log" ("id" integer)', False),
    ("INSERT INTO log (what) VALUES ('begin')", False),
    ("UPDATE a SET ended = true", False),
]


@pytest.mark.parametrize(("sql", "ends"), ENDS_TRANSACTION)
def test_ends_transaction(sql, ends):
    assert bool(statements.ENDS_TRANSACTION.search(sql)) is ends


SETTING = [
    ("SET search_path = public", True),
    ("set local lock_timeout = '1s'", True),
    ("SET SESSION statement_timeout TO 0", True),
    ("RESET ALL", True),
    ("reset search_path", True),
    ("SETTINGS", False),
    ("SELECT set_config('search_path', 'x', false)", False),
    ("UPDATE t SET a = 1", False),
    ("SHOW search_path", False),
]


@pytest.mark.parametrize(("sql", "setting"), SETTING)
def test_setting(sql, setting):
    assert bool(statements.SETTING.match(sql)) is setting


SET_SEARCH_PATH = [
    ('SET search_path = "alpha", public', '"alpha", public'),
    ("SET search_path TO alpha", "alpha"),
    ("set SESSION search_path=alpha;", "alpha"),
    ("SET LOCAL search_path = 'alpha'  ;  ", "'alpha'"),
    ('SET search_path = "a b",\n  public', '"a b",\n  public'),
    ("SET lock_timeout = '1s'", None),
    ("RESET search_path", None),
    ("SELECT set_config('search_path', 'alpha', false)", None),
]


@pytest.mark.parametrize(("sql", "path"), SET_SEARCH_PATH)
def test_set_search_path(sql, path):
    match = statements.SET_SEARCH_PATH.match(sql)
    assert (match.group(1) if match else None) == path


IS_READ = [
    ("SELECT count(*) FROM shop_product", True),
    ("  select 1", True),
    ("SHOW search_path", True),
    ("SELECT current_schema(), current_setting('search_path')", True),
    # Reads that change something.
    ("SELECT nextval('shop_product_id_seq')", False),
    ("SELECT setval('shop_product_id_seq', 5)", False),
    ("SELECT set_config('search_path', 'alpha', true)", False),
    ("SELECT pg_advisory_xact_lock(1)", False),
    ("SELECT pg_advisory_lock(1)", False),
    ("SELECT lo_import('/etc/hosts')", False),
    ("SELECT * INTO copy_of_t FROM t", False),
    # Not a SELECT or SHOW at all.
    ("WITH moved AS (DELETE FROM t RETURNING *) SELECT count(*) FROM moved", False),
    ("INSERT INTO t VALUES (1)", False),
    ("SELECTED", False),
]


@pytest.mark.parametrize(("sql", "read"), IS_READ)
def test_is_read(sql, read):
    assert statements.is_read(sql) is read


CONCURRENTLY = [
    ('CREATE INDEX CONCURRENTLY "i" ON "t" ("a")', 'CREATE INDEX "i" ON "t" ("a")'),
    ('CREATE UNIQUE INDEX CONCURRENTLY "i" ON "t" ("a")', 'CREATE UNIQUE INDEX "i" ON "t" ("a")'),
    ('DROP INDEX CONCURRENTLY IF EXISTS "i"', 'DROP INDEX IF EXISTS "i"'),
    ('create index concurrently "i" on "t" ("a")', 'create index "i" on "t" ("a")'),
    # Not one of the two: left as it is.
    ('REINDEX INDEX CONCURRENTLY "i"', 'REINDEX INDEX CONCURRENTLY "i"'),
    ('CREATE INDEX "concurrently" ON "t" ("a")', 'CREATE INDEX "concurrently" ON "t" ("a")'),
]


@pytest.mark.parametrize(("sql", "inside_a_transaction"), CONCURRENTLY)
def test_concurrently_is_dropped_for_a_transaction(sql, inside_a_transaction):
    assert statements.CONCURRENTLY.sub(r"\1", sql) == inside_a_transaction


SCHEMA_CHANGE = [
    ('CREATE TABLE "shop_product" ("id" bigint NOT NULL PRIMARY KEY)', True),
    ('ALTER TABLE "shop_product" ADD COLUMN "sku" varchar(20) DEFAULT \'\' NOT NULL', True),
    ('ALTER TABLE "shop_product" ALTER COLUMN "sku" DROP DEFAULT', True),
    ('DROP TABLE "shop_product" CASCADE', True),
    ('CREATE INDEX "shop_product_name_idx" ON "shop_product" ("name")', True),
    ('CREATE UNIQUE INDEX "shop_product_sku_uniq" ON "shop_product" ("sku")', True),
    ('DROP INDEX "shop_product_name_idx"', True),
    ('CREATE SEQUENCE "shop_seq"', True),
    ('ALTER SEQUENCE "shop_seq" OWNED BY "shop_product"."id"', True),
    ('COMMENT ON COLUMN "shop_product"."sku" IS \'stock keeping unit\'', True),
    # Rows read or written, more than one statement, or not the schema editor's form.
    ('CREATE TABLE "copy" AS SELECT * FROM "shop_product"', False),
    ('CREATE TABLE "c" ("id" integer); INSERT INTO "c" VALUES (1)', False),
    ('INSERT INTO "django_migrations" ("app", "name", "applied") VALUES (%s, %s, %s)', False),
    ('UPDATE "shop_product" SET "sku" = \'\'', False),
    ("CREATE TABLE shop_product (id bigint)", False),
    ('CREATE VIEW "v" AS SELECT 1', False),
    ('ALTER TABLE "shop_product" ADD CONSTRAINT "c" CHECK ((SELECT 1) = 1)', False),
    ("SELECT 1", False),
]


@pytest.mark.parametrize(("sql", "schema_change"), SCHEMA_CHANGE)
def test_is_schema_change(sql, schema_change):
    assert statements.is_schema_change(sql) is schema_change


# The row MigrationRecorder.record_applied() writes, as Django sends it and as a recording
# holds it bound; other writes of django_migrations are not it.
RECORD_APPLIED = [
    (
        'INSERT INTO "django_migrations" ("app", "name", "applied") VALUES (%s, %s, %s) '
        'RETURNING "django_migrations"."id"',
        True,
    ),
    (
        'INSERT INTO "django_migrations" ("app", "name", "applied") VALUES '
        "('notes', '0001_initial', statement_timestamp())",
        True,
    ),
    ('DELETE FROM "django_migrations" WHERE "app" = %s AND "name" = %s', False),
    ('UPDATE "django_migrations" SET "applied" = now()', False),
    ('INSERT INTO "shop_product" ("app", "name", "applied") VALUES (%s, %s, %s)', False),
    ("INSERT INTO django_migrations (app, name, applied) VALUES ('a', 'b', now())", False),
    ('SELECT 1; INSERT INTO "django_migrations" ("app", "name", "applied") VALUES (', False),
]


@pytest.mark.parametrize(("sql", "applied"), RECORD_APPLIED)
def test_record_applied(sql, applied):
    assert bool(statements.RECORD_APPLIED.match(sql)) is applied


# Constraint folding: (Django's statements in order, the recording after folding).
CATEGORY = 'CREATE TABLE "category" ("id" integer NOT NULL PRIMARY KEY)'
PRODUCT = 'CREATE TABLE "product" ("id" integer NOT NULL PRIMARY KEY, "category_id" integer)'
FK = (
    'CONSTRAINT "product_category_fk" FOREIGN KEY ("category_id") REFERENCES "category" ("id") '
    "DEFERRABLE INITIALLY DEFERRED"
)
ADD_FK = f'ALTER TABLE "product" ADD {FK}'
UNIQUE = 'CONSTRAINT "product_category_uniq" UNIQUE ("category_id")'
ADD_UNIQUE = f'ALTER TABLE "product" ADD {UNIQUE}'
CHECK = 'CONSTRAINT "product_id_check" CHECK ("id" >= 0)'
ADD_CHECK = f'ALTER TABLE "product" ADD {CHECK}'
PRODUCT_WITH = PRODUCT[:-1] + ", {})"
INDEX = 'CREATE INDEX "product_category_idx" ON "product" ("category_id")'
COLUMN = 'ALTER TABLE "product" ADD COLUMN "name" text NULL'
ROWS = 'INSERT INTO "category" ("id") VALUES (1)'

FOLDING = {
    "a foreign key into its table": (
        [CATEGORY, PRODUCT, ADD_FK],
        [CATEGORY, PRODUCT_WITH.format(FK)],
    ),
    "unique and check constraints, across an index and a comment": (
        [CATEGORY, PRODUCT, INDEX, "COMMENT ON TABLE \"product\" IS 'x'", ADD_UNIQUE, ADD_CHECK],
        [
            CATEGORY,
            PRODUCT_WITH.format(f"{UNIQUE}, {CHECK}"),
            INDEX,
            "COMMENT ON TABLE \"product\" IS 'x'",
        ],
    ),
    "a foreign key to a table the recording does not create": (
        [PRODUCT, ADD_FK],
        [PRODUCT_WITH.format(FK)],
    ),
    "a foreign key to its own table": (
        [
            PRODUCT,
            'ALTER TABLE "product" ADD CONSTRAINT "product_parent_fk" FOREIGN KEY ("category_id") '
            'REFERENCES "product" ("id")',
        ],
        [
            PRODUCT_WITH.format(
                'CONSTRAINT "product_parent_fk" FOREIGN KEY ("category_id") '
                'REFERENCES "product" ("id")'
            )
        ],
    ),
    "not across rows written in between": (
        [CATEGORY, PRODUCT, ROWS, ADD_FK],
        [CATEGORY, PRODUCT, ROWS, ADD_FK],
    ),
    # The case of the last change to folding: a RunSQL of several statements that starts like
    # the schema editor's CREATE TABLE is no schema statement, but a barrier.
    "not across a multi-statement RunSQL starting with CREATE TABLE": (
        [
            CATEGORY,
            PRODUCT,
            'CREATE TABLE "log" ("id" integer); INSERT INTO "product" ("id") VALUES (-1)',
            ADD_CHECK,
        ],
        [
            CATEGORY,
            PRODUCT,
            'CREATE TABLE "log" ("id" integer); INSERT INTO "product" ("id") VALUES (-1)',
            ADD_CHECK,
        ],
    ),
    "not into a CREATE TABLE that holds more statements": (
        [
            'CREATE TABLE "product" ("id" integer); INSERT INTO "product" ("id") VALUES (-1)',
            ADD_CHECK,
        ],
        [
            'CREATE TABLE "product" ("id" integer); INSERT INTO "product" ("id") VALUES (-1)',
            ADD_CHECK,
        ],
    ),
    "not when its table is altered in between": (
        [CATEGORY, PRODUCT, COLUMN, ADD_FK],
        [CATEGORY, PRODUCT, COLUMN, ADD_FK],
    ),
    "not when the referenced table is altered in between": (
        [CATEGORY, PRODUCT, 'ALTER TABLE "category" ADD COLUMN "x" integer NULL', ADD_FK],
        [CATEGORY, PRODUCT, 'ALTER TABLE "category" ADD COLUMN "x" integer NULL', ADD_FK],
    ),
    "not when the referenced table is created after": (
        [PRODUCT, CATEGORY, ADD_FK],
        [PRODUCT, CATEGORY, ADD_FK],
    ),
    "not when the table is created twice": (
        [PRODUCT, 'DROP TABLE "product"', PRODUCT, ADD_CHECK],
        [PRODUCT, 'DROP TABLE "product"', PRODUCT, ADD_CHECK],
    ),
    "not NOT VALID or USING INDEX": (
        [
            PRODUCT,
            f"{ADD_CHECK} NOT VALID",
            'ALTER TABLE "product" ADD CONSTRAINT "u" UNIQUE USING INDEX "product_category_idx"',
        ],
        [
            PRODUCT,
            f"{ADD_CHECK} NOT VALID",
            'ALTER TABLE "product" ADD CONSTRAINT "u" UNIQUE USING INDEX "product_category_idx"',
        ],
    ),
    "not into a table whose column list is not the last thing": (
        [
            'CREATE TABLE "product" ("id" integer) PARTITION BY RANGE ("id")',
            ADD_CHECK,
        ],
        [
            'CREATE TABLE "product" ("id" integer) PARTITION BY RANGE ("id")',
            ADD_CHECK,
        ],
    ),
    "not a constraint of a table created elsewhere": (
        [CATEGORY, ADD_CHECK],
        [CATEGORY, ADD_CHECK],
    ),
}


@pytest.mark.parametrize("case", FOLDING)
def test_fold_constraints(case):
    parts, folded = FOLDING[case]
    assert statements.fold_constraints(parts) == folded
